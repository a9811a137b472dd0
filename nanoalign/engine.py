"""The generation engine: one KV cache, prefill / extend / decode and sampling as small functions (gpt-fast's shape).

Every decode in nanoalign goes through here: `nanoalign.generate` (CLI, generate_text, the toy's samplers), BDHS
(`nanoalign.bdhs`: compacted masked-image prefill, forked sentence branches, ragged extend) and training-time
rollouts (`sample`).

The cache (`KVCache`) is storage plus three per-row tensors: `lens` (slots written), `keys` (which written slots may be
attended: False at left padding or at a BDHS-masked image token) and `next_pos` (the RoPE position of the row's next
token). One layout serves both uses:
- dense: the left-padded prompt at slots [0, T) of every row, padding written but not attendable (generate, rollouts,
  the BDHS reference path);
- ragged (compacted): only the attendable tokens, right padded, each row its own length; survivors keep their
  original RoPE positions (BDHS: at rho_th 0.99 about 1% of the image tokens remain, so prefill and every decode step
  attend over ~20x fewer keys). A key no query may see has no effect, so both layouts give the same outputs.
`forward_cached` computes where each call's new tokens go (slots) and the attention mask from those tensors and hands
both explicitly to every layer (`LayerKV`); the layers never read or change cache state.

Attention: SDPA over the cache's first Tk slots with a (B,1,N,Tk) mask, or no mask (plain causal / full) when every
key is visible -- bitwise the same on CPU. A left-padded rollout batch is prefilled ragged (right padded), where plain
causal attention is exact for every real token: no (B,1,T,T) mask, so SDPA skips the blocks above the diagonal. One
new token per row on CUDA over a ragged cache uses the Triton kernel nanoalign.kernels.decode_attention (per-row
lengths, GQA, online softmax).
Prefill cost (profiled in docs/log.md, 2026-11-30 late): rows run in chunks of PREFILL_TOKENS tokens; a rollout's
prefill runs the last decoder layer on each row's last token only (the cache needs every token's keys and values,
sampling needs one hidden state per row); a dense call writes the cache as one slice copy.

FSDP2 (torch.distributed.fsdp.fully_shard: the vision tower, each decoder block and the root each a unit, as train.py
shards the policy): the engine calls the units as modules (`model.vision_tower(...)`, `layer(...)`), whose forward
hooks all-gather their parameters, and reads the root's weights directly (embeddings, projector, final norm, LM head),
so `gathered` all-gathers the root once for the whole call. For the blocks it offers two ways:
- whole=True (the default): every unit is unsharded once per rollout (`unshard()`) and kept so
  (`set_reshard_after_forward(False)`) until the rollout ends (`reshard()`, FSDP's settings restored). Memory: the full
  parameters on every rank for the rollout's duration (7B in bf16: +14 GB per rank) besides the cache; communication:
  one all-gather of the model per rollout, whatever the number of tokens.
- whole=False: only the root is gathered; each block all-gathers its parameters in its forward hook and frees them
  after, at every prefill, extend and decode step. Memory: one block (plus FSDP's prefetch) at a time; communication:
  the whole model per decode step, i.e. max_new_tokens all-gathers of the model (7B bf16, 128 tokens: ~1.8 TB), which
  only pays off when the full parameters do not fit.
Shapes: B rows, T prompt length, L compacted length, N new tokens, H hidden, Hkv kv heads, D head dim, C capacity,
V vocabulary.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

from nanoalign.model import attention, rope_cos_sin

RHO_TH = 0.99
# Prefill runs the prompt batch through the decoder in row chunks of about this many tokens: the per-token work is
# the same, but the (rows*T, intermediate) MLP buffers and the (rows, heads, T, D) attention inputs stay small (on CPU
# the elementwise ops of a 16 x 1336-token batch took 2-3x longer per token than in 3-row chunks: buffers over glibc's
# 32 MB mmap threshold are fresh pages on every allocation). Peak activation memory drops likewise.
PREFILL_TOKENS = 4096


# ---------------------------------------------------------------------------------------------------- sampling
def sample_next(logits, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None):
    """logits (B,V) fp32 -> token ids (B,). temperature 0: argmax. Otherwise nucleus sampling (Holtzman et al. 2020,
    "The Curious Case of Neural Text Degeneration", arXiv:1904.09751): p = softmax(logits / temperature), restricted
    to the smallest set of most likely tokens whose mass reaches top_p (the most likely token always stays), then one
    draw per row from `generator` (torch.multinomial renormalises the kept mass); a list of B generators: row b draws
    from generator[b] alone, so its samples do not depend on the other rows of the batch (online rollouts)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # the 256 most likely tokens, sorted (topk, not a sort of the whole vocabulary: 302 ms vs 38 ms for 16 x 32064
        # on this CPU); when every row's top 256 hold top_p of the mass, every token past them is cut anyway (cumsum
        # over non-negative terms never decreases): the same kept set and probabilities as a full sort. Otherwise (a
        # flat distribution, e.g. a random model's) the whole vocabulary is sorted.
        V = probs.shape[-1]
        p_sorted, idx = probs.topk(min(256, V), dim=-1)  # (B,k) descending
        if not bool((p_sorted.cumsum(-1)[:, -1] >= top_p).all()):
            p_sorted, idx = probs.sort(dim=-1, descending=True)
        before = p_sorted.cumsum(-1) - p_sorted  # mass of the strictly more likely tokens
        p_sorted = p_sorted.masked_fill(before >= top_p, 0.0)  # the first token always survives
        probs = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------- the cache
class KVCache:
    """Per layer k, v (B,Hkv,C,D); per row lens (B,) slots written, keys (B,C) bool attendable slots, next_pos (B,)
    the next token's RoPE position. Written by forward_cached only."""

    def __init__(self, k: list, v: list, lens, keys, next_pos):
        self.k, self.v, self.lens, self.keys, self.next_pos = k, v, lens, keys, next_pos

    @classmethod
    def empty(cls, model, batch: int, capacity: int, dtype, device) -> "KVCache":
        tc = model.config.text_config
        shape = (batch, tc.num_key_value_heads, capacity, tc.head_dim)
        n = tc.num_hidden_layers
        zeros = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        long = torch.zeros(batch, dtype=torch.long, device=device)
        return cls([zeros() for _ in range(n)], [zeros() for _ in range(n)], long,
                   torch.zeros(batch, capacity, dtype=torch.bool, device=device), long.clone())

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def fork(self, rows, capacity: int | None = None) -> "KVCache":
        """A new cache holding rows `rows` (LongTensor, repeats allowed: several continuations of one prefix), with
        an optional larger capacity (never below the longest row)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lens.device)
        cap = max(self.capacity if capacity is None else capacity, _imax(self.lens))
        keep = min(cap, self.capacity)

        def take(t):  # (B,...,C,...) -> (len(rows),...,cap,...) along the slot dimension
            dim = 2 if t.dim() == 4 else 1
            shape = list(t.shape)
            shape[0], shape[dim] = len(rows), cap
            new = t.new_zeros(shape)
            new.narrow(dim, 0, keep).copy_(t.index_select(0, rows).narrow(dim, 0, keep))
            return new

        return KVCache([take(k) for k in self.k], [take(v) for v in self.v], self.lens[rows].clone(),
                       take(self.keys), self.next_pos[rows].clone())


class LayerKV(NamedTuple):
    """One layer's cache and where this call writes: handed to LlamaAttention, which calls attend()."""
    k: torch.Tensor  # (B,Hkv,C,D)
    v: torch.Tensor
    rows: torch.Tensor  # (n,) row of each new token that is written (padding of a ragged call is not)
    cols: torch.Tensor  # (n,) its index among the N new tokens
    slots: torch.Tensor  # (n,) its cache slot
    n_keys: int  # Tk: queries attend slots [0, Tk)
    kernel_lens: torch.Tensor | None  # (B,) with one query per row: the Triton decode kernel over lens keys
    start: int | None  # every row writes all N new tokens at slots [start, start + N) (dense layout), else None

    def attend(self, q, k, v, mask):
        """Write the new keys/values (B,Hkv,N,D) at their slots; attend q (B,nh,N,D) over the cache -> (B,N,nh*D)."""
        N = k.shape[2]
        if self.start is not None:  # one slice copy instead of gathering and scattering n = B*N (Hkv,D) rows
            self.k[:, :, self.start:self.start + N] = k
            self.v[:, :, self.start:self.start + N] = v
            if self.start == 0 and N == self.n_keys and k.dtype == self.k.dtype:
                # the new tokens are all the keys (prefill into an empty cache): attend over them as computed, not
                # over the strided slice of the cache just written (the same values)
                return attention(q, k, v, mask, is_causal=mask is None and q.shape[2] == N)
        else:
            self.k[self.rows, :, self.slots] = k.transpose(1, 2)[self.rows, self.cols].to(self.k.dtype)  # (n,Hkv,D)
            self.v[self.rows, :, self.slots] = v.transpose(1, 2)[self.rows, self.cols].to(self.v.dtype)
        if self.kernel_lens is not None:
            from nanoalign.kernels.decode_attention import decode_attention
            B, nh, _, D = q.shape
            return decode_attention(q[:, :, 0], self.k, self.v, self.kernel_lens).reshape(B, 1, nh * D)
        Tk = self.n_keys
        return attention(q, self.k[:, :, :Tk], self.v[:, :, :Tk], mask, is_causal=mask is None and q.shape[2] == Tk)


def _imax(t) -> int:
    return int(t.max()) if t.numel() else 0


def _has_triton() -> bool:
    try:
        import nanoalign.kernels.decode_attention  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- forward
def forward_cached(model, cache: KVCache, x, pos, n_new=None, visible=None, use_kernel: bool | None = None,
                   out_cols=None):
    """Append N new tokens to every row at its next free slots and run the decoder on them.

    x (B,N,H) input embeddings; pos (B,N) their RoPE positions; n_new (B,) how many of the N are real (right padded;
    None = all); visible (B,N) bool which of them later queries may attend (None = the real ones; False at left
    padding or a masked image token). Query i of row b sits at slot lens[b] + i and sees the attendable slots up to
    its own (and always itself, so padded rows stay finite). Returns final-normed hidden (B,N,H) (rows i >= n_new[b]
    are garbage); lens += n_new, next_pos += n_new. use_kernel None: the Triton kernel on CUDA when it applies.
    out_cols (B,M) long, optional: only these columns' hidden states are wanted -> (B,M,H); every layer still writes
    all N keys/values, but the last one runs its queries, attention output and MLP on the M columns alone (a
    prefill needs each row's last token only: 1/num_layers of the prefill's query-side work saved)."""
    B, N, _ = x.shape
    dev = x.device
    ar = torch.arange(N, device=dev)
    real = torch.ones(B, N, dtype=torch.bool, device=dev) if n_new is None else ar[None, :] < n_new[:, None]
    n = real.sum(1)
    start, end = cache.lens, cache.lens + n
    if _imax(end) > cache.capacity:
        raise ValueError(f"KVCache capacity {cache.capacity} exceeded ({_imax(end)} tokens)")
    slots = start[:, None] + ar[None, :]  # (B,N)
    rows, cols = real.nonzero(as_tuple=True)
    s0 = int(start[0]) if B else 0
    common = s0 if n_new is None and bool((start == s0).all()) else None  # dense: one slot range for every row
    if common is not None:
        cache.keys[:, common:common + N] = True if visible is None else visible.bool()
    else:
        cache.keys[rows, slots[rows, cols]] = (real if visible is None else visible.bool() & real)[rows, cols]
    Tk = max(_imax(end), 1)
    keys = cache.keys[:, :Tk]  # (B,Tk)
    all_visible = bool(keys.all())
    kernel_lens = None
    if n_new is None and all_visible and (N == 1 or N == Tk):
        mask = None  # every key visible to every query: full (one new token) or plain causal (prefill)
    elif N == Tk and visible is None and not bool(start.any()):
        # right-padded rows into an empty cache, every real token attendable (the ragged prefill): real query i sees
        # exactly slots 0..i, so plain causal attention is exact for it (queries past n_new are garbage anyway), and
        # SDPA's causal path skips the blocks above the diagonal: about half the work of the same mask given
        # explicitly (3 x 1336 tokens, 8 heads, CPU: 0.53 s vs 1.00 s)
        mask = None
    elif N == 1:
        mask = keys[:, None, None, :]  # (B,1,1,Tk): the new token's own key is set above
        if (dev.type == "cuda" if use_kernel is None else use_kernel) and _has_triton() \
                and bool((keys.sum(1) == end).all()):  # no holes (ragged layout): the kernel masks by length alone
            kernel_lens, mask = end, None
    else:
        k_idx = torch.arange(Tk, device=dev)[None, None, :]  # (1,1,Tk)
        mask = (k_idx <= slots[:, :, None]) & keys[:, None, :]  # (B,N,Tk)
        mask = (mask | (k_idx == slots.clamp(max=Tk - 1)[:, :, None]))[:, None]  # (B,1,N,Tk)
    out_mask = None
    if out_cols is not None:  # the wanted columns' rows of the mask above, built for them alone: (B,1,M,Tk)
        q_slots = slots.gather(1, out_cols)  # (B,M)
        k_idx = torch.arange(Tk, device=dev)[None, None, :]
        out_mask = (k_idx <= q_slots[:, :, None]) & keys[:, None, :]
        out_mask = (out_mask | (k_idx == q_slots.clamp(max=Tk - 1)[:, :, None]))[:, None]
    tc = model.config.text_config
    cos, sin = rope_cos_sin(pos, tc.head_dim, tc.rope_theta, x.dtype)
    write_slots = slots[rows, cols]
    layers = model.language_model.model.layers
    for i, layer in enumerate(layers):
        kv = LayerKV(cache.k[i], cache.v[i], rows, cols, write_slots, Tk, kernel_lens, common)
        if out_cols is not None and i == len(layers) - 1:
            x = layer(x, cos, sin, out_mask, kv, out_cols)  # (B,M,H)
        else:
            x = layer(x, cos, sin, mask, kv)
    cache.lens = end
    cache.next_pos = cache.next_pos + n
    return model.language_model.model.norm(x)


def last_hidden(hidden, n):
    """hidden (B,N,H), n (B,) >= 1 -> (B,H) at index n - 1."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), (n - 1).clamp(min=0)]


# ---------------------------------------------------------------------------------------------------- prefill
class Prefill(NamedTuple):
    cache: KVCache
    hidden: torch.Tensor  # (B,T,H) dense or (B,L,H) compacted, final-normed; (B,1,H) with all_hidden=False
    last: torch.Tensor  # (B,H) each row's last real hidden state (its next-token logits come from here)
    pos: torch.Tensor  # (B,T) / (B,L) RoPE positions of `hidden`'s columns


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


def _forward_rows(model, cache: KVCache, x, pos, n_new=None, visible=None, out_cols=None):
    """forward_cached (no kernel) in row chunks of about PREFILL_TOKENS tokens, each chunk writing its rows of `cache`
    through views (rows are independent: the same outputs as one call). x (B,N,H) -> final-normed hidden (B,N,H),
    or (B,M,H) at out_cols (B,M).
    FSDP2 with gather_whole=False all-gathers every block once per chunk."""
    B, N, _ = x.shape
    step = max(1, PREFILL_TOKENS // max(N, 1))
    if step >= B:
        return forward_cached(model, cache, x, pos, n_new=n_new, visible=visible, use_kernel=False, out_cols=out_cols)
    out = x.new_zeros(x.shape if out_cols is None else (B, out_cols.shape[1], x.shape[2]))
    for r in range(0, B, step):
        rs = slice(r, r + step)
        # ragged rows: the chunk's columns up to its own longest row (the rest is padding)
        n = N if n_new is None else max(_imax(n_new[rs]), 1)
        sub = KVCache([k[rs] for k in cache.k], [v[rs] for v in cache.v], cache.lens[rs], cache.keys[rs],
                      cache.next_pos[rs])
        h = forward_cached(model, sub, x[rs, :n], pos[rs, :n], None if n_new is None else n_new[rs],
                           None if visible is None else visible[rs, :n], use_kernel=False,
                           out_cols=None if out_cols is None else out_cols[rs])
        if out_cols is None:
            out[rs, :n] = h
        else:
            out[rs] = h
        cache.lens[rs], cache.next_pos[rs] = sub.lens, sub.next_pos  # forward_cached replaced the views' tensors
    return out


@torch.no_grad()
def prefill(model, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, extra: int = 0,
            image_keep=None, image_features=None, compact: bool = False, all_hidden: bool = True) -> Prefill:
    """Run the prompt batch (B,T), left padded (the Processor's output), into a new cache with `extra` free slots.

    image_keep: optional list of (n_b,) bool per row, False = that image token is removed from attention for every
    query (BDHS, Eq. 6). compact=False keeps the dense layout (padding and masked tokens written, not attendable);
    compact=True drops them (ragged rows, original positions). image_features: precomputed list of (n_i,H).
    all_hidden=False: the last layer computes each row's last real token alone (what sampling needs; the cache is
    the same), so Prefill.hidden is (B,1,H) == `last`."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    x = model.embed(input_ids, pixel_values, image_sizes, image_features=image_features)  # (B,T,H)
    keep = attention_mask.bool() if image_keep is None else keep_positions(
        input_ids, attention_mask, model.config.image_token_index, image_keep)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B,T) positions count real tokens
    B = input_ids.shape[0]
    if compact:
        lens = keep.sum(1)  # (B,)
        L = max(_imax(lens), 1)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :L]  # kept columns first, in order
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))  # (B,L,H)
        pos = pos.gather(1, order)
        cache = KVCache.empty(model, B, L + extra, x.dtype, x.device)
        out_cols = None if all_hidden else (lens - 1).clamp(min=0)[:, None]
        hidden = _forward_rows(model, cache, x, pos, n_new=lens, out_cols=out_cols)
        last = last_hidden(hidden, lens) if all_hidden else hidden[:, 0]
    else:
        cache = KVCache.empty(model, B, input_ids.shape[1] + extra, x.dtype, x.device)
        T = input_ids.shape[1]
        out_cols = None if all_hidden else torch.full((B, 1), T - 1, dtype=torch.long, device=x.device)
        hidden = _forward_rows(model, cache, x, pos, visible=keep, out_cols=out_cols)
        last = hidden[:, -1]
    cache.next_pos = attention_mask.long().sum(1)  # the next token's position
    return Prefill(cache, hidden, last, pos)


@torch.no_grad()
def extend(model, cache: KVCache, token_lists: list[list[int]], prev_last):
    """Append a (possibly empty) token list to each row; returns each row's new last hidden (B,H) (prev_last for
    rows that got no tokens)."""
    B = len(token_lists)
    n = torch.tensor([len(t) for t in token_lists], dtype=torch.long, device=cache.lens.device)
    N = _imax(n)
    if N == 0:
        return prev_last
    ids = torch.zeros(B, N, dtype=torch.long, device=n.device)
    for b, t in enumerate(token_lists):
        ids[b, :len(t)] = torch.tensor(t, dtype=torch.long)
    x = model.language_model.model.embed_tokens(ids)
    pos = cache.next_pos[:, None] + torch.arange(N, device=n.device)[None, :]
    h = forward_cached(model, cache, x, pos, n_new=n, use_kernel=False)
    return torch.where((n > 0)[:, None], last_hidden(h, n), prev_last)


# ---------------------------------------------------------------------------------------------------- decode
def decode_step(model, cache: KVCache, tok):
    """tok (B,) -> the final-normed hidden (B,H) after appending it to every row."""
    x = model.language_model.model.embed_tokens(tok)[:, None]  # (B,1,H)
    return forward_cached(model, cache, x, cache.next_pos[:, None])[:, 0]


@torch.no_grad()
def decode(model, cache: KVCache, last, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           end_ids=(), generator: torch.Generator | None = None, stop_fn=None, pad_id: int = 0,
           drop_finished: bool = False) -> tuple[list[list[int]], list[bool]]:
    """Sample up to max_new_tokens per row; last (B,H) is each row's last hidden state.

    A row ends at its first token in `end_ids` (kept) or when stop_fn(row, new_ids) is True. Returns (ids per row,
    ended per row: True = stopped by an end id or stop_fn, False = cut at max_new_tokens). Stops when every row has
    ended. drop_finished=False: every row is sampled at every step (finished rows are fed pad_id), so the random
    stream of a row does not depend on when the others end. drop_finished=True: finished rows leave the batch (the
    cache is forked to the active rows), so a long row does not make short ones pay (BDHS)."""
    B = last.shape[0]
    end = set(end_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    ended = [False] * B
    active = list(range(B))  # rows of `out` behind the cache's rows
    need = _imax(cache.lens) + max_new_tokens
    if need > cache.capacity:
        cache = cache.fork(torch.arange(B), capacity=need)
    hidden = last
    for step in range(max_new_tokens):
        gen = [generator[b] for b in active] if isinstance(generator, (list, tuple)) else generator  # per row
        tok = sample_next(model.logits(hidden).float(), temperature, top_p, gen)  # (A,)
        done = torch.tensor([ended[b] for b in active], device=tok.device)  # rows that ended before this step
        still = []
        for j, b in enumerate(active):
            if ended[b]:
                continue
            t = int(tok[j])
            out[b].append(t)
            ended[b] = t in end or (stop_fn is not None and stop_fn(b, out[b]))
            if not ended[b]:
                still.append(j)
        if not still or step == max_new_tokens - 1:
            break
        if drop_finished and len(still) < len(active):
            sel = torch.tensor(still, dtype=torch.long, device=tok.device)
            cache, tok, active = cache.fork(sel), tok[sel], [active[j] for j in still]
        elif not drop_finished:
            tok = tok.masked_fill(done, pad_id)
        hidden = decode_step(model, cache, tok)
    return out, ended


class Rollout(NamedTuple):
    ids: list[list[int]]  # per response: new token ids, up to and including the first end id
    ended: list[bool]  # True = ended by an end id (or stop_fn); False = cut at max_new_tokens


@torch.no_grad()
def generate(model, batch: dict, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             end_ids=(), generator: torch.Generator | None = None, n_per_prompt: int = 1, stop_fn=None,
             pad_id: int = 0, image_keep=None, image_features=None, compact: bool = False) -> Rollout:
    """Responses for a prompt batch: batch = the Processor's dict (input_ids / attention_mask (B,T) left padded,
    pixel_values, image_sizes), on the model's device. Each prompt is prefilled once and its cache forked into
    n_per_prompt rows; response i * n_per_prompt + j is prompt i's j-th. Greedy when temperature == 0.
    image_keep / image_features / compact: see prefill (compact also drops finished rows, as BDHS does).
    A left-padded batch without image_keep is prefilled in the ragged layout (padding dropped): its prefill is then
    plain causal attention (see forward_cached) instead of an explicit (B,1,T,T) mask; the same outputs.
    Runs in the model's current mode; `sample` is the entry point for a policy being trained."""
    if n_per_prompt < 1 or max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: n_per_prompt {n_per_prompt} (>= 1), max_new_tokens {max_new_tokens} (>= 0), "
                         f"temperature {temperature} (>= 0), top_p {top_p} (in (0, 1])")
    ids, am = batch["input_ids"], batch.get("attention_mask")
    ragged = compact or (image_keep is None and am is not None and not bool(am.bool().all()))
    pre = prefill(model, ids, am, batch.get("pixel_values"), batch.get("image_sizes"), max_new_tokens, image_keep,
                  image_features, ragged, all_hidden=False)
    cache, last = pre.cache, pre.last
    if n_per_prompt > 1:
        rows = torch.arange(ids.shape[0], device=last.device).repeat_interleave(n_per_prompt)
        cache, last = cache.fork(rows), last[rows]
    out, ended = decode(model, cache, last, max_new_tokens, temperature, top_p, end_ids, generator, stop_fn, pad_id,
                        drop_finished=compact)
    return Rollout(out, ended)


# ---------------------------------------------------------------------------------------------------- policy
@contextmanager
def gathered(model, whole: bool = True):
    """FSDP2: the parameters the engine needs, all-gathered for the duration (see the module docstring for the two
    ways and their costs); nothing for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    if model is not units[0]:
        raise ValueError("gathered: pass the root module that fully_shard was applied to last")
    # FSDP makes the first unit to run forward the root; the engine runs blocks on their own, so the root is settled
    # here (what the root's first forward would do).
    model._get_fsdp_state()._lazy_init()
    todo = units if whole else [model]
    for m in todo:
        m.unshard()
        if whole:
            m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in todo:
            if whole:  # FSDP's defaults: blocks reshard after forward, the root keeps its parameters for backward
                m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


@contextmanager
def inference(model, whole: bool = True):
    """Eval mode (dropout off), no gradients, FSDP parameters gathered; the training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), gathered(model, whole):
            yield model
    finally:
        model.train(was_training)


def sample(policy, batch: dict, n_per_prompt: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 64, end_ids=(), generator: torch.Generator | None = None, pad_id: int = 0,
           stop_fn=None, gather_whole: bool = True) -> Rollout:
    """Rollouts: n_per_prompt responses per prompt of `batch` (the Processor's dict, left padded) from the policy,
    batched and KV-cached, in eval mode with dropout off and without gradients (train mode restored after), on a
    plain or an FSDP2-sharded policy (gather_whole: see the module docstring). Same ids as `generate`."""
    dev = policy.language_model.model.embed_tokens.weight.device
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    with inference(policy, gather_whole):
        return generate(policy, batch, max_new_tokens, temperature, top_p, end_ids, generator, n_per_prompt,
                        stop_fn, pad_id)


# ---------------------------------------------------------------------------------------------------- BDHS mask
def sample_image_mask(n_tokens: int, rho_th: float = RHO_TH, generator: torch.Generator | None = None,
                      device="cpu") -> torch.Tensor:
    """BDHS's image-token mask (Amirloo et al. 2024, "Understanding Alignment in Multimodal LLMs", arXiv:2407.02477,
    Eq. 6): u ~ U(0,1)^n, masked where u < rho_th. Returns keep (n,) bool, True = the embedding stays visible.
    rho_th = 0 keeps all, rho_th = 1 masks all (u < 1 always). Default 0.99: the paper reports its final results "at
    rho_th close to 1"; the value itself is lost in our text of its footnote 2."""
    if not 0.0 <= rho_th <= 1.0:
        raise ValueError(f"rho_th must be in [0, 1], got {rho_th}")
    u = torch.rand(n_tokens, generator=generator)
    return (u >= rho_th).to(device)
