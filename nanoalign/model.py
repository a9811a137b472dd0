"""LLaVA 1.5 / 1.6 (LLaVA-NeXT) in plain torch: CLIP ViT + 2-layer projector + LLaMA decoder.

Module names equal the llava-hf hub checkpoint keys, so `model.state_dict()` can be saved as-is:
    vision_tower.vision_model.{embeddings, pre_layrnorm, encoder.layers[i], post_layernorm}
    multi_modal_projector.{linear_1, linear_2}
    language_model.model.{embed_tokens, layers[i], norm}   language_model.lm_head
    image_newline                                            (llava_next only)
Numerics follow transformers' modeling_clip / modeling_llama / modeling_llava(_next) (fp32 parity is tested in
tests/test_model.py); no code of theirs is used. `forward` returns final-normed hidden states, not logits: the
log-prob ops project only the labelled rows (see nanoalign/ops.py).

Shapes: B batch, T tokens, H text hidden, Hv vision hidden, P AnyRes patches (tiles + base), N vision tokens/tile.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from nanoalign.config_check import check_value as _check_value
from nanoalign.config_check import section as _section
from nanoalign.image import select_best_resolution, unpadded_bounds

SUPPORTED_MODEL_TYPES = ("llava", "llava_next")


# ---------------------------------------------------------------------------------------------------- config
def _pick(cls, d: dict, prefix: str = "") -> dict:
    """The dict's values for the fields of dataclass `cls`, each type- and range-checked (ValueError naming the key)."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object{f' for {prefix[:-1]}' if prefix else ''}, got {type(d).__name__}")
    for f in fields(cls):
        if f.name in d and d[f.name] is not None and f.name not in ("vision_config", "text_config"):
            _check_value(prefix, f.name, d[f.name], str(f.type))
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        c = cls(**_pick(cls, d, "vision_config."))
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"key vision_config.hidden_size: {c.hidden_size} is not a multiple of "
                             f"num_attention_heads {c.num_attention_heads}")
        return c

    def to_dict(self) -> dict:
        return {"model_type": "clip_vision_model", **asdict(self)}


@dataclass
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        kw = _pick(cls, d, "text_config.")
        if kw.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"text_config.model_type {kw['model_type']!r} is not supported (llama or mistral)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"text_config rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        if "rope_theta" in rope:  # transformers-5 form: text_config.rope_parameters.rope_theta
            kw["rope_theta"] = rope["rope_theta"]
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rope_theta")
        # transformers 5 reads rope_parameters; older versions read rope_theta (kept out: 5.x configs are strict).
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        return d


@dataclass
class LlavaConfig:
    model_type: str = "llava"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    pad_token_id: int | None = None
    vision_feature_layer: int | list = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_grid_pinpoints: list | None = None  # llava_next: [[h, w], ...]
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    image_seq_length: int = 576

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r} in config (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        kw = _pick(cls, d)
        if "image_token_id" in d and "image_token_index" not in d:
            kw["image_token_index"] = d["image_token_id"]
        if "image_token_id" in d:
            _check_value("", "image_token_id", d["image_token_id"], "int")
        kw["vision_config"] = VisionConfig.from_dict(_section(d, "vision_config"))
        kw["text_config"] = TextConfig.from_dict(_section(d, "text_config"))
        if kw.get("pad_token_id") is None:
            kw["pad_token_id"] = kw["text_config"].pad_token_id
        kw["tie_word_embeddings"] = bool(d.get("tie_word_embeddings")) or kw["text_config"].tie_word_embeddings
        if mt == "llava_next" and not kw.get("image_grid_pinpoints"):
            kw["image_grid_pinpoints"] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        cfg = cls(**kw)
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} "
                             "is not supported ('default' or 'full')")
        return cfg

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["vision_config"] = self.vision_config.to_dict()
        d["text_config"] = self.text_config.to_dict()
        d["architectures"] = ["LlavaNextForConditionalGeneration" if self.model_type == "llava_next"
                              else "LlavaForConditionalGeneration"]
        if self.model_type != "llava_next":
            d.pop("image_grid_pinpoints")
        return d


# ---------------------------------------------------------------------------------------------------- helpers
_ACT = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


def _act(name: str):
    if name not in _ACT:
        raise ValueError(f"activation {name!r} is not supported ({', '.join(_ACT)})")
    return _ACT[name]


def _flash_attn_func():
    """flash_attn_func if flash-attn is installed (CUDA machines only), else None."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


_FLASH = _flash_attn_func()


def attention(q, k, v, mask=None, is_causal=False):
    """q (B,Hq,Tq,D), k/v (B,Hkv,Tk,D), mask (B,1,Tq,Tk) bool (True = attend) or None -> (B,Tq,Hq*D).

    flash-attn only on CUDA, half precision, and without a padding mask (pure causal or full attention)."""
    B, Hq, Tq, D = q.shape
    if _FLASH is not None and q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        out = _FLASH(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal)  # (B,Tq,Hq,D)
        return out.reshape(B, Tq, Hq * D)
    gqa = k.shape[1] != Hq  # grouped-query attention: each kv head serves Hq / Hkv query heads
    if gqa and q.is_cuda and mask is not None:
        # CUDA's fused kernels take enable_gqa only without a mask (else SDPA falls back to the math kernel): repeat
        # each kv head for its group of query heads instead (a (B,Hq,Tk,D) copy of k and v)
        rep = Hq // k.shape[1]
        k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, Hq, k.shape[2], D)
        v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, Hq, v.shape[2], D)
        gqa = False
    # enable_gqa: SDPA maps query head h to kv head h // (Hq / Hkv) itself, without the copy (the same outputs bit
    # for bit on CPU; the kv gradients differ only in summation order)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                         enable_gqa=gqa)
    return out.transpose(1, 2).reshape(B, Tq, Hq * D)


# ---------------------------------------------------------------------------------------------------- CLIP ViT
class CLIPEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.image_size, self.patch_size = c.image_size, c.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixel_values):  # (B,3,S,S) -> (B, 1+N, Hv)
        S = self.image_size
        if pixel_values.shape[-2:] != (S, S):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])}, the vision tower expects {S}x{S}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B,Hv,S/p,S/p)
        x = x.flatten(2).transpose(1, 2)  # (B,N,Hv) row-major over the patch grid
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x):  # (B,T,Hv), bidirectional
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v))


class CLIPMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.act = _act(c.hidden_act)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(c) for _ in range(c.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # (sic) the hub name
        self.encoder = CLIPEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # unused by LLaVA, kept for keys

    def hidden_states(self, pixel_values, layers: list[int]) -> list[torch.Tensor]:
        """The hidden states at `layers` (indices into [embeddings, layer 1, ..., layer L] as transformers counts
        them, negative allowed), each (B, 1+N, Hv). Layers past the deepest one asked for are not run."""
        n = len(self.encoder.layers) + 1
        idx = [i + n if i < 0 else i for i in layers]
        if any(not 0 <= i < n for i in idx):
            raise ValueError(f"vision_feature_layer {layers} out of range for {n - 1} vision layers")
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        hs = [h]
        for layer in self.encoder.layers[: max(idx)]:
            h = layer(h)
            hs.append(h)
        return [hs[i] for i in idx]


class VisionTower(nn.Module):  # holds the `vision_model.` level of the hub key names
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(c)

    def forward(self, pixel_values, layers: list[int]) -> list[torch.Tensor]:
        # called as a module (not vision_model.hidden_states directly) so that FSDP's hooks on this unit run
        return self.vision_model.hidden_states(pixel_values, layers)


class Projector(nn.Module):
    def __init__(self, c: LlavaConfig, in_features: int):
        super().__init__()
        H = c.text_config.hidden_size
        self.linear_1 = nn.Linear(in_features, H, bias=c.multimodal_projector_bias)
        self.act = _act(c.projector_hidden_act)
        self.linear_2 = nn.Linear(H, H, bias=c.multimodal_projector_bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------------- LLaMA
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalise in fp32, scale in the input dtype (as LLaMA does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """position_ids (B,T) -> cos, sin (B,1,T,D): the half-split ("rotate_half") RoPE of LLaMA."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B,T,D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B,1,T,D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B,h,T,D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.nh, self.nkv, self.hd, self.theta = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta
        b = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=b)

    def forward(self, x, cos, sin, mask, kv=None, out_cols=None):  # x (B,T,H)
        """out_cols (B,M) long, optional: queries only at these columns (keys and values at all T) -> (B,M,H)."""
        B, T, _ = x.shape
        if out_cols is not None:
            x_q = x.gather(1, out_cols[..., None].expand(-1, -1, x.shape[-1]))  # (B,M,H)
            i = out_cols[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])  # (B,1,M,D)
            q = apply_rope(self.q_proj(x_q).view(B, -1, self.nh, self.hd).transpose(1, 2), cos.gather(2, i),
                           sin.gather(2, i))  # (B,nh,M,D)
        else:
            q = apply_rope(self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2), cos, sin)  # (B,nh,T,D)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B,nkv,T,D)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        if kv is not None:  # generation: nanoalign.engine's LayerKV writes the new keys at its slots and attends
            return self.o_proj(kv.attend(q, k, v, mask))
        return self.o_proj(attention(q, k, v, mask, is_causal=mask is None))


class LlamaMLP(nn.Module):  # SwiGLU
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = _act(c.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv=None, out_cols=None):
        """x (B,T,H) -> (B,T,H). Generation: kv (nanoalign.engine.LayerKV) holds the cache; out_cols (B,M) long: only
        these columns' outputs are needed (a prefill's last layer: each row's last token), so the queries, attention
        output and MLP run on M tokens instead of T (mask then (B,1,M,Tk)) -> (B,M,H); keys and values still cover
        all T (they go to the cache)."""
        h = self.input_layernorm(x)
        if out_cols is not None:
            x = x.gather(1, out_cols[..., None].expand(-1, -1, x.shape[-1]))  # (B,M,H) the residual stream kept
        x = x + self.self_attn(h, cos, sin, mask, kv, out_cols)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaForCausalLM(nn.Module):  # only holds the `model.` / `lm_head.` level of the hub key names
    def __init__(self, c: TextConfig):
        super().__init__()
        self.model = LlamaModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)


def causal_mask(attention_mask, T: int, device) -> torch.Tensor | None:
    """attention_mask (B,Tk) 1 = real token over cached + new keys -> bool (B,1,T,Tk), True = may attend.
    Query i (the last T of Tk) sees key j iff j <= Tk - T + i and key j is real; each query always sees itself,
    so padded query rows stay finite (their outputs are never used)."""
    B, Tk = attention_mask.shape
    q_idx = torch.arange(Tk - T, Tk, device=device)[:, None]  # (T,1) absolute index of each query
    k_idx = torch.arange(Tk, device=device)[None, :]  # (1,Tk)
    m = (k_idx <= q_idx)[None] & attention_mask.bool()[:, None, :]  # (B,T,Tk)
    m = m | (k_idx == q_idx)[None]
    return m[:, None]


# ---------------------------------------------------------------------------------------------------- AnyRes
# ---------------------------------------------------------------------------------------------------- LLaVA
class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        vc, tc = config.vision_config, config.text_config
        self.vision_tower = VisionTower(vc)
        n_feat = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.multi_modal_projector = Projector(config, vc.hidden_size * n_feat)
        self.language_model = LlamaForCausalLM(tc)
        if config.model_type == "llava_next":
            self.image_newline = nn.Parameter(torch.zeros(tc.hidden_size))
        self.tie_weights()
        self.gradient_checkpointing = False  # checkpoint each decoder layer when training

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight

    @property
    def lm_head_weight(self) -> torch.Tensor:  # (V,H)
        return self.language_model.lm_head.weight

    def logits(self, hidden):  # (...,H) -> (...,V)
        return F.linear(hidden, self.lm_head_weight)

    # ------------------------------------------------------------------ images
    def _grid(self, image_size) -> tuple[int, int]:
        """AnyRes tile grid (rows, cols) of an image of (height, width)."""
        S = self.config.vision_config.image_size
        ph, pw = select_best_resolution(image_size, self.config.image_grid_pinpoints)
        return ph // S, pw // S

    def num_image_features(self, image_size=None) -> int:
        """Number of image tokens the model consumes for one image of (height, width)."""
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        n = side * side + (self.config.vision_feature_select_strategy == "full")
        if self.config.model_type != "llava_next":
            return n
        gh, gw = self._grid(image_size)
        r0, r1, c0, c1 = unpadded_bounds(image_size, gh * side, gw * side)
        return n + (r1 - r0) * (c1 - c0 + 1)

    def _encode(self, pixel_values):  # (n,3,S,S) -> (n, N, H): vision tower + select + projector
        layers = self.config.vision_feature_layer
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        hs = self.vision_tower(pixel_values, layer_list)
        x = torch.cat(hs, dim=-1)  # (n, 1+N, Hv * n_layers)
        if self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]  # drop CLS
        return self.multi_modal_projector(x)

    def vision_features(self, pixel_values, image_sizes=None) -> list[torch.Tensor]:
        """Projected image features, one (n_i, H) tensor per image, AnyRes-packed for llava_next.

        llava: pixel_values (B_img,3,S,S). llava_next: pixel_values (B_img,P_max,3,S,S) zero-padded over patches
        (or a list of (P_i,3,S,S)), image_sizes (B_img,2) original (height, width). Packing per image:
        base tile (N tokens), then the tile grid as one (gh*side, gw*side) map with the AnyRes padding rows or
        columns cut off and image_newline appended after each row."""
        if self.config.model_type != "llava_next":
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be (B_img,3,S,S) for llava, got {tuple(pixel_values.shape)}")
            return list(self._encode(pixel_values))
        if image_sizes is None:
            raise ValueError("image_sizes (B_img,2) is required for llava_next")
        if self.config.vision_feature_select_strategy == "full":
            raise ValueError("vision_feature_select_strategy 'full' cannot be AnyRes-packed (the CLS token)")
        sizes = [tuple(int(v) for v in s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes)
                                                     else image_sizes)]
        grids = [self._grid(s) for s in sizes]
        n_patches = [gh * gw + 1 for gh, gw in grids]
        if torch.is_tensor(pixel_values) and pixel_values.dim() == 4:  # patches of all images concatenated
            if pixel_values.shape[0] != sum(n_patches):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patches, image_sizes need "
                                 f"{sum(n_patches)}")
            pixel_values = pixel_values.split(n_patches)
        if len(sizes) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images in pixel_values but {len(sizes)} image_sizes")
        chunks = []
        for pv, n in zip(pixel_values, n_patches):  # pv (P_max,3,S,S)
            if pv.dim() != 4 or pv.shape[0] < n:
                raise ValueError(f"pixel_values holds {tuple(pv.shape)} for an image that needs {n} patches")
            chunks.append(pv[:n])
        feats = self._encode(torch.cat(chunks)).split(n_patches)  # each (P_i, N, H)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        out = []
        for f, size, (gh, gw) in zip(feats, sizes, grids):
            base, tiles = f[0], f[1:]  # (N,H), (gh*gw,N,H)
            H = tiles.shape[-1]
            grid = tiles.view(gh, gw, side, side, H).permute(0, 2, 1, 3, 4).reshape(gh * side, gw * side, H)
            r0, r1, c0, c1 = unpadded_bounds(size, gh * side, gw * side)
            grid = grid[r0:r1, c0:c1]  # (h', w', H)
            nl = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, H)
            grid = torch.cat([grid, nl], dim=1).reshape(-1, H)  # (h' * (w'+1), H)
            out.append(torch.cat([base, grid]))
        return out

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids, pixel_values=None, image_sizes=None, image_index=None, image_features=None):
        """input_ids (B,T) -> input embeddings (B,T,H), the projected image features at the image tokens.

        image_index (n_uses,) long, optional: the image (row of pixel_values) used by each `<image>` occurrence in
        row-major order, so an image shared by several rows (chosen and rejected of a pair) runs through the vision
        tower once; by default every occurrence has its own image, in order. image_features: a precomputed list of
        (n_i, H) instead of pixel_values."""
        lm = self.language_model.model
        is_img = input_ids == self.config.image_token_index  # (B,T)
        idx = self.config.image_token_index
        if not 0 <= idx < lm.embed_tokens.num_embeddings:  # e.g. liuhaotian's -200: keep the lookup in range
            input_ids = input_ids.masked_fill(is_img, 0)
        x = lm.embed_tokens(input_ids)  # (B,T,H)
        n_tok = int(is_img.sum())
        if image_features is None and pixel_values is not None:
            all_features = self.vision_features(pixel_values, image_sizes)  # list of (n_i, H)
            image_features = all_features if image_index is None else [all_features[i] for i in image_index.tolist()]
            if not image_features:  # no row uses an image (batch.collate's vision_always): under FSDP every rank must
                x = x + 0.0 * sum(f.sum() for f in all_features)  # run the tower and reduce its (zero) gradients
        if image_features is not None and len(image_features):
            feats = torch.cat(list(image_features))  # (n_feat, H)
            if n_tok != feats.shape[0]:
                raise ValueError(f"image tokens and image features do not match: input_ids hold {n_tok} tokens "
                                 f"with image_token_index {self.config.image_token_index}, the images give "
                                 f"{feats.shape[0]} features")
            x = x.masked_scatter(is_img[..., None], feats.to(x.dtype))
        elif n_tok:
            raise ValueError(f"input_ids hold {n_tok} image tokens but no pixel_values were given")
        return x

    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                image_index=None, kv=None):
        """input_ids (B,T) -> final-normed hidden states (B,T,H). Generation (KV cache): nanoalign.engine.

        attention_mask (B,T), 1 = real token (left padding). position_ids (B,T) default: from the attention mask
        (cumsum - 1), else arange(T). image_index: see embed. kv: an object whose attend(q, k, v, mask) every
        layer's attention calls instead of plain attention (nanoalign.forward's packed shared prompts)."""
        B, T = input_ids.shape
        x = self.embed(input_ids, pixel_values, image_sizes, image_index)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(T, device=x.device).expand(B, T)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, expected {(B, T)}")
            mask = causal_mask(attention_mask, T, x.device)
        cos, sin = rope_cos_sin(position_ids, self.config.text_config.head_dim, self.config.text_config.rope_theta,
                                x.dtype)
        lm = self.language_model.model
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in lm.layers:
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv)
        return lm.norm(x)
