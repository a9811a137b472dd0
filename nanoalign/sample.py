"""Masked-image-attention sampling for BDHS (paper 000, Section 3.4.1, Eq. 6), dense and compacted.

Image-token mask (Eq. 6): for the n image embeddings of a sample draw u_j ~ U(0, 1) and mask embedding j when
u_j < rho_th, i.e. keep it with probability 1 - rho_th. Default rho_th = 0.99: the paper reports its final results "at
rho_th close to 1" -- the value itself is lost in our text extraction of footnote 2; 0.99 is the value of the issue and
of shared/notes/performance.md, and Table 15's rows (also unreadable) ablate values around it. A masked embedding is
removed from attention for every query at every layer; everything else (text tokens, kept image tokens) is unchanged.

Two implementations of the same thing:
- dense (the reference, `dense_forward` / `generate_dense`): the full sequence, with a boolean attention mask
  (B,1,T,T) = causal & real key & kept key (plus each query's own key, so masked/padded rows stay finite; their
  outputs reach no kept position). Costs as much as the unmasked model.
- compacted (`compact_prefill` / `extend` / `decode`): a key that no query may see has no effect, so the masked image
  tokens are dropped from the sequence and the survivors KEEP THEIR ORIGINAL RoPE POSITIONS (position ids are counted
  over the full sequence). Rows get ragged lengths (right padded); the cache `RaggedKVCache` stores per-row lengths.
  Prefill runs once per (example, mask); `RaggedKVCache.fork` copies rows so several sentence branches continue from
  the same prefix; `extend` appends ragged token lists (each branch's reference text); `decode` samples.
  At rho_th 0.99 about 1% of the image tokens remain: prefill and every decode step attend over ~20x fewer keys.

Attention: N new tokens (prefill / extend) use SDPA with a (B,1,N,Tk) mask over the cache; one new token per row on
CUDA uses the Triton kernel nanoalign.kernels.decode_attention (ragged lengths, GQA, online softmax), else SDPA with a
padding mask. Departure from a fused design: the decoder layers are run here layer by layer from the model's own
submodules (LlamaLayer.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}), so
nanoalign/model.py needs no change.
Shapes: B rows, T full length, L compact length, N new tokens, H hidden, Hkv kv heads, D head dim, C cache capacity.
"""
from __future__ import annotations

import torch

from nanoalign.model import KVCache, attention, causal_mask, rope_cos_sin, sample_next

RHO_TH = 0.99


# ---------------------------------------------------------------------------------------------------- masks
def sample_image_mask(n_tokens: int, rho_th: float = RHO_TH, generator: torch.Generator | None = None,
                      device="cpu") -> torch.Tensor:
    """Eq. 6: u ~ U(0,1)^n, masked where u < rho_th. Returns keep (n,) bool, True = the embedding stays visible.
    rho_th = 0 keeps all, rho_th = 1 masks all (u < 1 always)."""
    if not 0.0 <= rho_th <= 1.0:
        raise ValueError(f"rho_th must be in [0, 1], got {rho_th}")
    u = torch.rand(n_tokens, generator=generator)
    return (u >= rho_th).to(device)


def image_counts(input_ids, image_token_index: int) -> list[int]:
    """Image tokens per row of input_ids (B,T)."""
    return (input_ids == image_token_index).sum(1).tolist()


def keep_positions(input_ids, attention_mask, image_token_index: int, image_keep) -> torch.Tensor:
    """(B,T) bool: real token and (text token or kept image token). image_keep: list of (n_b,) bool, one per row,
    n_b = that row's image-token count, in sequence order."""
    is_img = input_ids == image_token_index
    keep = attention_mask.bool() & ~is_img
    for b, kb in enumerate(image_keep):
        n = int(is_img[b].sum())
        if kb.numel() != n:
            raise ValueError(f"row {b}: image mask has {kb.numel()} entries but the row holds {n} image tokens")
        keep[b, is_img[b]] = kb.to(keep.device).bool()
    return keep


def embed_inputs(model, input_ids, pixel_values=None, image_sizes=None, image_features=None):
    """Token embeddings (B,T,H) with the projected image features scattered at the image tokens (as model.forward).
    image_features: optional precomputed list of (n_i, H) (e.g. reused across iterations)."""
    cfg = model.config
    emb = model.language_model.model.embed_tokens
    is_img = input_ids == cfg.image_token_index
    ids = input_ids if 0 <= cfg.image_token_index < emb.num_embeddings else input_ids.masked_fill(is_img, 0)
    x = emb(ids)
    n_tok = int(is_img.sum())
    if image_features is None and pixel_values is not None:
        image_features = model.vision_features(pixel_values, image_sizes)
    if image_features is not None and len(image_features):
        feats = torch.cat(list(image_features))
        if feats.shape[0] != n_tok:
            raise ValueError(f"image tokens and image features do not match: input_ids hold {n_tok} tokens, the "
                             f"images give {feats.shape[0]} features")
        x = x.masked_scatter(is_img[..., None], feats.to(x.dtype))
    elif n_tok:
        raise ValueError(f"input_ids hold {n_tok} image tokens but no pixel_values / image_features were given")
    return x


def _imax(t) -> int:
    return int(t.max()) if t.numel() else 0


def _rope(model, pos, dtype):
    tc = model.config.text_config
    return rope_cos_sin(pos, tc.head_dim, tc.rope_theta, dtype)


# ---------------------------------------------------------------------------------------------------- dense reference
def dense_mask(attention_mask, keep, T_new: int | None = None) -> torch.Tensor:
    """attention_mask (B,Tk) real keys, keep (B,Tk) attendable keys -> (B,1,T_new,Tk) bool: causal & keep, plus the
    diagonal (each query sees itself, so masked or padded query rows stay finite)."""
    Tk = attention_mask.shape[1]
    T_new = Tk if T_new is None else T_new
    m = causal_mask(torch.ones_like(attention_mask), T_new, attention_mask.device)  # (B,1,T_new,Tk) causal + diag
    q_idx = torch.arange(Tk - T_new, Tk, device=keep.device)[:, None]
    diag = (torch.arange(Tk, device=keep.device)[None, :] == q_idx)[None, None]
    return (m & keep[:, None, None, :]) | diag


@torch.no_grad()
def dense_forward(model, input_ids, attention_mask, pixel_values=None, image_sizes=None, image_keep=None,
                  kv_cache: KVCache | None = None, image_features=None):
    """The reference: full sequence (B,T), masked image keys removed for every query at every layer.
    Returns (final-normed hidden (B,T,H), keep (B,T) attendable positions, position ids (B,T) =
    cumsum(attention_mask) - 1 for left padding). kv_cache: an optional nanoalign.model.KVCache to fill."""
    x = embed_inputs(model, input_ids, pixel_values, image_sizes, image_features)
    keep = attention_mask.bool() if image_keep is None else keep_positions(
        input_ids, attention_mask, model.config.image_token_index, image_keep)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = _rope(model, pos, x.dtype)
    mask = dense_mask(attention_mask, keep)
    for i, layer in enumerate(model.language_model.model.layers):
        x = layer(x, cos, sin, mask, kv_cache, i)
    if kv_cache is not None:
        kv_cache.length = input_ids.shape[1]
    return model.language_model.model.norm(x), keep, pos


# ---------------------------------------------------------------------------------------------------- ragged cache
class RaggedKVCache:
    """Per layer k, v (B,Hkv,C,D); row b holds lens[b] valid entries (right padded). next_pos (B,) = the original
    (uncompacted) RoPE position of the row's next token."""

    def __init__(self, n_layers: int, B: int, capacity: int, n_kv: int, head_dim: int, dtype, device):
        shape = (B, n_kv, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lens = torch.zeros(B, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=device)
        self.capacity = capacity

    @classmethod
    def for_model(cls, model, B: int, capacity: int, dtype, device) -> "RaggedKVCache":
        tc = model.config.text_config
        return cls(tc.num_hidden_layers, B, capacity, tc.num_key_value_heads, tc.head_dim, dtype, device)

    def fork(self, rows, capacity: int | None = None) -> "RaggedKVCache":
        """A new cache with rows `rows` (LongTensor, repeats allowed), optionally a larger capacity."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lens.device)
        cap = max(self.capacity if capacity is None else capacity, _imax(self.lens))
        new = object.__new__(RaggedKVCache)
        keep = min(cap, self.capacity)
        new.k, new.v = [], []
        for k, v in zip(self.k, self.v):
            shape = (len(rows), k.shape[1], cap, k.shape[3])
            nk, nv = k.new_zeros(shape), v.new_zeros(shape)
            nk[:, :, :keep] = k.index_select(0, rows)[:, :, :keep]
            nv[:, :, :keep] = v.index_select(0, rows)[:, :, :keep]
            new.k.append(nk)
            new.v.append(nv)
        new.lens, new.next_pos, new.capacity = self.lens[rows].clone(), self.next_pos[rows].clone(), cap
        return new


    def attend(self, layer: int, q, k, v, mask):
        """Called by LlamaAttention: write the new keys/values (B,Hkv,N,D) at each row's own slots (self.step, set by
        ragged_forward) and attend q (B,nh,N,D) over the row's valid slots -> (B,N,nh*D)."""
        bi, ii, si, Tk, end, kernel = self.step
        ck, cv = self.k[layer], self.v[layer]
        ck[bi, :, si] = k.transpose(1, 2)[bi, ii].to(ck.dtype)  # (nvalid,nkv,D)
        cv[bi, :, si] = v.transpose(1, 2)[bi, ii].to(cv.dtype)
        if kernel is not None:  # one query per row: the Triton decode kernel over the ragged cache
            B, nh, _, D = q.shape
            return kernel(q[:, :, 0], ck, cv, end).reshape(B, 1, nh * D)
        return attention(q, ck[:, :, :Tk], cv[:, :, :Tk], mask)


def _decode_kernel():
    try:
        from nanoalign.kernels.decode_attention import decode_attention
    except ImportError:  # triton missing: SDPA everywhere
        return None
    return decode_attention


def ragged_forward(model, cache: RaggedKVCache, x, n_new, pos, use_kernel: bool | None = None):
    """Append N new tokens to each row of the ragged cache and run the decoder on them.

    x (B,N,H) input embeddings, right padded; n_new (B,) how many of the N are real; pos (B,N) their original RoPE
    positions. Query i of row b sits at cache slot lens[b] + i and sees slots j <= lens[b] + i, j < lens[b] + n_new[b].
    Returns final-normed hidden (B,N,H) (rows i >= n_new[b] are garbage); cache.lens += n_new."""
    B, N, _ = x.shape
    dev = x.device
    start = cache.lens  # (B,)
    end = start + n_new
    if _imax(end) > cache.capacity:
        raise ValueError(f"RaggedKVCache capacity {cache.capacity} exceeded ({int(end.max())} tokens)")
    slots = start[:, None] + torch.arange(N, device=dev)[None, :]  # (B,N)
    one_step = N == 1 and bool((n_new == 1).all())
    if one_step:  # decode: row b writes slot start[b]
        bi, ii, si = torch.arange(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev), start
    else:
        valid = torch.arange(N, device=dev)[None, :] < n_new[:, None]  # (B,N)
        bi, ii = valid.nonzero(as_tuple=True)
        si = slots[bi, ii]
    Tk = max(_imax(end), 1)
    if use_kernel is None:
        use_kernel = x.is_cuda and one_step
    kernel = _decode_kernel() if use_kernel else None
    mask = None  # the kernel masks by the per-row lengths itself
    if kernel is None and one_step:
        mask = (torch.arange(Tk, device=dev)[None, :] < end[:, None])[:, None, None]  # (B,1,1,Tk)
    elif kernel is None:
        k_idx = torch.arange(Tk, device=dev)[None, None, :]  # (1,1,Tk)
        mask = (k_idx <= slots[:, :, None]) & (k_idx < end[:, None, None])  # (B,N,Tk)
        mask = mask | (k_idx == slots.clamp(max=Tk - 1)[:, :, None])  # padded queries stay finite
        mask = mask[:, None]  # (B,1,N,Tk)
    cos, sin = _rope(model, pos, x.dtype)
    cache.step = (bi, ii, si, Tk, end, kernel)  # where this call's keys go; read by cache.attend in every layer
    for li, layer in enumerate(model.language_model.model.layers):
        x = layer(x, cos, sin, mask, cache, li)
    cache.lens = end
    cache.next_pos = cache.next_pos + n_new
    return model.language_model.model.norm(x)


# ---------------------------------------------------------------------------------------------------- compacted path
@torch.no_grad()
def compact_prefill(model, input_ids, attention_mask, pixel_values=None, image_sizes=None, image_keep=None,
                    extra_capacity: int = 64, image_features=None):
    """Prefill the compacted sequences: text tokens + kept image tokens, original positions.

    input_ids / attention_mask (B,T) left padded (the Processor's output). Returns (cache, hidden (B,L,H),
    lens (B,), pos (B,L)); the row's last real hidden state is hidden[b, lens[b] - 1]. Capacity = L + extra."""
    x = embed_inputs(model, input_ids, pixel_values, image_sizes, image_features)  # (B,T,H)
    keep = attention_mask.bool() if image_keep is None else keep_positions(
        input_ids, attention_mask, model.config.image_token_index, image_keep)
    full_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B,T) original positions
    lens = keep.sum(1)  # (B,)
    B, L = input_ids.shape[0], max(_imax(lens), 1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :L]  # kept columns first, in order
    xc = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))  # (B,L,H)
    pos = full_pos.gather(1, order)  # (B,L)
    cache = RaggedKVCache.for_model(model, B, L + extra_capacity, x.dtype, x.device)
    hidden = ragged_forward(model, cache, xc, lens, pos, use_kernel=False)
    cache.next_pos = attention_mask.long().sum(1)  # the next token's original position
    return cache, hidden, lens, pos


def last_hidden(hidden, n):
    """hidden (B,N,H), n (B,) >= 1 -> (B,H) at index n - 1."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), (n - 1).clamp(min=0)]


@torch.no_grad()
def extend(model, cache: RaggedKVCache, token_lists: list[list[int]], prev_hidden):
    """Append a (possibly empty) token list to each row; returns each row's new last hidden (B,H) (prev_hidden for
    rows that got no tokens)."""
    B = len(token_lists)
    n = torch.tensor([len(t) for t in token_lists], dtype=torch.long, device=cache.lens.device)
    N = _imax(n)
    if N == 0:
        return prev_hidden
    ids = torch.zeros(B, N, dtype=torch.long, device=n.device)
    for b, t in enumerate(token_lists):
        ids[b, :len(t)] = torch.tensor(t, dtype=torch.long)
    x = model.language_model.model.embed_tokens(ids)
    pos = cache.next_pos[:, None] + torch.arange(N, device=n.device)[None, :]
    h = ragged_forward(model, cache, x, n, pos, use_kernel=False)
    return torch.where((n > 0)[:, None], last_hidden(h, n), prev_hidden)


@torch.no_grad()
def decode(model, cache: RaggedKVCache, hidden, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           eos_token_id=None, generator=None, stop_fn=None) -> list[list[int]]:
    """Sample up to max_new_tokens per row from the ragged cache; hidden (B,H) is each row's last hidden state.
    A row ends at EOS (kept) or when stop_fn(row, new_ids) is True. Finished rows leave the batch (the cache is
    compacted to the active rows), so a long branch does not make short ones pay. Returns the new ids per row."""
    B = hidden.shape[0]
    eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    out: list[list[int]] = [[] for _ in range(B)]
    active = list(range(B))
    need = _imax(cache.lens) + max_new_tokens
    if need > cache.capacity:
        cache = cache.fork(torch.arange(B), capacity=need)
    emb = model.language_model.model.embed_tokens
    for step in range(max_new_tokens):
        tok = sample_next(model.logits(hidden).float(), temperature, top_p, generator)  # (A,)
        still = []
        for j, b in enumerate(active):
            t = int(tok[j])
            out[b].append(t)
            if not (t in eos or (stop_fn is not None and stop_fn(b, out[b]))):
                still.append(j)
        if not still or step == max_new_tokens - 1:
            break
        if len(still) < len(active):
            sel = torch.tensor(still, dtype=torch.long, device=tok.device)
            cache = cache.fork(sel)
            tok = tok[sel]
            active = [active[j] for j in still]
        n = torch.ones(len(active), dtype=torch.long, device=tok.device)
        hidden = ragged_forward(model, cache, emb(tok)[:, None], n, cache.next_pos[:, None])[:, 0]
    return out


@torch.no_grad()
def generate_compact(model, input_ids, attention_mask, pixel_values=None, image_sizes=None, image_keep=None,
                     max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, eos_token_id=None,
                     generator=None, stop_fn=None, image_features=None) -> list[list[int]]:
    """Masked-image generation from a prompt batch through the compacted path (prefill + decode)."""
    cache, hidden, lens, _ = compact_prefill(model, input_ids, attention_mask, pixel_values, image_sizes, image_keep,
                                             max_new_tokens, image_features)
    return decode(model, cache, last_hidden(hidden, lens), max_new_tokens, temperature, top_p, eos_token_id,
                  generator, stop_fn)


@torch.no_grad()
def generate_dense(model, input_ids, attention_mask, pixel_values=None, image_sizes=None, image_keep=None,
                   max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, eos_token_id=None,
                   generator=None, image_features=None) -> list[list[int]]:
    """The same generation on the full sequence with the dense boolean mask (reference / benchmark baseline).
    Rows are not dropped when they finish (they keep producing tokens that are cut after EOS)."""
    B, T = input_ids.shape
    cache = KVCache(len(model.language_model.model.layers), capacity=T + max_new_tokens)
    h, keep, pos = dense_forward(model, input_ids, attention_mask, pixel_values, image_sizes, image_keep, cache,
                                 image_features)
    hidden = h[:, -1]
    next_pos = attention_mask.long().sum(1, keepdim=True)  # (B,1)
    eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    emb = model.language_model.model.embed_tokens
    for step in range(max_new_tokens):
        tok = sample_next(model.logits(hidden).float(), temperature, top_p, generator)
        for b in range(B):
            if not done[b]:
                out[b].append(int(tok[b]))
                done[b] = int(tok[b]) in eos
        if all(done) or step == max_new_tokens - 1:
            break
        keep = torch.cat([keep, keep.new_ones(B, 1)], 1)  # (B,Tk)
        mask = keep[:, None, None, :]  # (B,1,1,Tk): the new token sees every kept key and itself
        cos, sin = _rope(model, next_pos, hidden.dtype)
        x = emb(tok)[:, None]
        for i, layer in enumerate(model.language_model.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        cache.length += 1
        hidden = model.language_model.model.norm(x)[:, 0]
        next_pos = next_pos + 1
    return out
