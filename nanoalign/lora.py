"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), written here, saved in PEFT's layout.

A wrapped linear layer computes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

with W, b frozen, A initialised like nn.Linear (kaiming-uniform, a=sqrt(5)) and B zeros, so a fresh adapter is the
identity -- the same initialisation as PEFT's default. `merge_lora` folds the update into W (W += scaling * B @ A);
`unmerge_lora` restores W (exactly, from a copy kept at merge time, unless the merge was done with
`keep_base=False`, in which case the update is subtracted and W is restored up to rounding, as PEFT does).

State-dict keys. `LoRALinear` registers the frozen base parameters directly as `weight` / `bias`, so a wrapped
module `language_model.model.layers.0.self_attn.q_proj` still has `...q_proj.weight` -- the hub key. Its adapter
parameters appear as `...q_proj.lora_A` / `...q_proj.lora_B` while unmerged; after `merge_lora(model)`,
`model.state_dict()` has the plain hub keys only, so any checkpoint writer saves a normal checkpoint. Without
touching the model, `merged_state_dict(model)` gives the same merged hub-layout dict.

On disk (PEFT layout, loads with `peft.PeftModel.from_pretrained`):
    DIR/adapter_config.json        peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, bias "none", ...
    DIR/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight (r, in), .lora_B.weight (out, r)
When `apply_lora` was restricted with `prefix`, target_modules is written as a regex (PEFT full-matches a string
target against each module name) so that PEFT wraps the same modules and not, say, the vision tower's q_proj.
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Parameters: weight (out, in), bias (out,) or None,
    lora_A (r, in), lora_B (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"lora rank must be > 0, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        # the base parameters are re-registered here (same tensors) so the state-dict key stays `<path>.weight`
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)  # e.g. fp32 adapters on a bf16 base
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # adapters_off: the base layer alone (the frozen initial policy = the reference)
        self._base_copy: torch.Tensor | None = None  # exact copy of W while merged (keep_base=True)
        self.register_state_dict_post_hook(_drop_adapter_keys_when_merged)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), computed in fp32 and cast to the weight dtype."""
        d = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return d.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise RuntimeError("adapters_off on a merged LoRA layer: unmerge first")
            return y
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self, keep_base: bool = True) -> None:
        if self.merged:
            return
        self._base_copy = self.weight.detach().clone() if keep_base else None
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._base_copy is not None:
            self.weight.copy_(self._base_copy)
        else:
            self.weight.sub_(self.delta_weight())
        self._base_copy = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _drop_adapter_keys_when_merged(module, state_dict, prefix, local_metadata) -> None:
    """While merged, W already holds the update: state_dict() gives plain hub keys only (a merged model saves as a
    normal checkpoint). Unmerged (training), the adapter keys stay so training state round-trips."""
    if module.merged:
        state_dict.pop(prefix + "lora_A", None)
        state_dict.pop(prefix + "lora_B", None)


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must full-match the module name; a list entry must equal it or be a suffix
    after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_off(model: nn.Module):
    """Within the block every LoRA layer of `model` computes its frozen base layer alone, W x + b: with LoRA the
    policy's initial weights, i.e. the reference of DPO-style objectives (Online-DPO's KL anchor), without a second
    copy in memory. Raises RuntimeError at forward on a merged layer. Restores the previous state after."""
    layers = list(lora_modules(model).values())
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


def apply_lora(model: nn.Module, rank: int = 128, alpha: float = 256.0, dropout: float = 0.0,
               target_modules: list[str] | str | None = None, prefix: str | None = None,
               freeze_base: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap every nn.Linear whose name matches `target_modules` (name suffixes, or one regex string) and, when
    `prefix` is given, starts with it (e.g. "language_model."). With `freeze_base` every non-LoRA parameter of the
    model is frozen. `dtype` is the adapters' dtype (default: the wrapped weight's). Returns the model (changed
    in place)."""
    targets = list(DEFAULT_TARGETS) if target_modules is None else target_modules
    if isinstance(targets, (list, tuple)) and not targets:
        raise ValueError("apply_lora: target_modules is empty")
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _matches(n, targets) and (prefix is None or n.startswith(prefix))]
    if not names:
        raise ValueError(f"apply_lora: no nn.Linear matches target_modules={targets!r} prefix={prefix!r}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:
        _set_submodule(model, n, LoRALinear(model.get_submodule(n), rank, alpha, dropout, dtype))
    model._lora_spec = dict(rank=int(rank), alpha=float(alpha), dropout=float(dropout),
                            target_modules=list(targets) if not isinstance(targets, str) else targets, prefix=prefix)
    return model


def merge_lora(model: nn.Module, keep_base: bool = True) -> nn.Module:
    """Fold every adapter into its weight (in place). keep_base=True keeps a copy of W so unmerge is exact."""
    for m in lora_modules(model).values():
        m.merge(keep_base=keep_base)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def is_lora_key(key: str) -> bool:
    return key.endswith(".lora_A") or key.endswith(".lora_B")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our internal adapter tensors: {'<path>.lora_A': (r, in), '<path>.lora_B': (out, r)} (detached)."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"{n}.lora_A"] = m.lora_A.detach()
        out[f"{n}.lora_B"] = m.lora_B.detach()
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the plain (hub) layout with every adapter folded into its weight; the model is not
    changed. Use this to save a full checkpoint of a LoRA-trained model."""
    sd = {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}
    for n, m in lora_modules(model).items():
        if not m.merged:
            sd[f"{n}.weight"] = m.weight.detach() + m.delta_weight()
    return sd


@torch.no_grad()
def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A plain state dict that still holds `<path>.lora_A` / `<path>.lora_B` (e.g. the full state dict gathered from
    an FSDP-sharded model) -> hub layout: W + scaling * B @ A (fp32 math, cast back), adapter keys dropped.
    scaling = alpha / rank."""
    out = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
    for k in state_dict:
        if k.endswith(".lora_A"):
            path = k[: -len(".lora_A")]
            w, a, b = out.get(f"{path}.weight"), state_dict[k], state_dict.get(f"{path}.lora_B")
            if w is None or b is None:
                raise ValueError(f"merge_lora_state_dict: {k} has no matching {path}.weight / {path}.lora_B")
            out[f"{path}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def _peft_target_modules(spec: dict) -> list[str] | str:
    targets = spec["target_modules"]
    if spec.get("prefix") is None:
        return targets
    suffix = targets if isinstance(targets, str) else "(" + "|".join(re.escape(t) for t in targets) + ")"
    return rf"(.*\.)?{re.escape(spec['prefix'].rstrip('.'))}\..*\.{suffix}"


def save_lora_adapter(model: nn.Module, out_dir: str, base_model_path: str | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write DIR/adapter_config.json + DIR/adapter_model.safetensors in PEFT's layout (written to a temporary name,
    then renamed). `state_dict`: take the adapter tensors from this full state dict instead of the modules (an
    FSDP-sharded model's modules hold only shards; train.py passes the gathered full state dict)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_lora_adapter: the model has no LoRA layers (call apply_lora first)")
    spec = getattr(model, "_lora_spec", None) or dict(
        rank=next(iter(mods.values())).rank, alpha=next(iter(mods.values())).alpha, dropout=0.0,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in mods}), prefix=None)
    ranks = {m.rank for m in mods.values()}
    if len(ranks) != 1:
        raise ValueError(f"save_lora_adapter: mixed ranks {sorted(ranks)} are not supported")
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_path,
        "r": spec["rank"], "lora_alpha": spec["alpha"], "lora_dropout": spec["dropout"],
        "target_modules": _peft_target_modules(spec), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    tensors = {}
    for n, m in mods.items():
        a, b = (m.lora_A, m.lora_B) if state_dict is None else (state_dict[f"{n}.lora_A"], state_dict[f"{n}.lora_B"])
        tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    os.makedirs(out_dir, exist_ok=True)
    tmp_w = os.path.join(out_dir, ADAPTER_WEIGHTS + ".tmp")
    tmp_c = os.path.join(out_dir, ADAPTER_CONFIG + ".tmp")
    save_file(tensors, tmp_w, metadata={"format": "pt"})
    with open(tmp_c, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp_w, os.path.join(out_dir, ADAPTER_WEIGHTS))
    os.replace(tmp_c, os.path.join(out_dir, ADAPTER_CONFIG))


def load_lora_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model`. If the model has no LoRA layers yet, the layers named
    in the adapter file are wrapped first with the config's r / lora_alpha / lora_dropout. Errors name the file and
    the offending keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    w_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_lora_adapter: {p} not found")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"load_lora_adapter: {cfg_path} is not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"load_lora_adapter: {cfg_path} has peft_type={cfg.get('peft_type')!r}, expected 'LORA'")
    for k in ("r", "lora_alpha"):
        if k not in cfg:
            raise ValueError(f"load_lora_adapter: {cfg_path} lacks {k!r}")
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("bias", "none") != "none":
        raise ValueError(f"load_lora_adapter: {cfg_path} uses DoRA / rank or alpha patterns / LoRA bias: unsupported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scaling alpha/sqrt(r) == (alpha*sqrt(r))/r
    try:
        raw = load_file(w_path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"load_lora_adapter: {w_path} is not a readable safetensors file ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.default)?\.weight", k)
        if m is None:
            raise ValueError(f"load_lora_adapter: unexpected key {k!r} in {w_path}")
        tensors[f"{m.group(1)}.{m.group(2)}"] = v
    paths = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if not lora_modules(model):
        missing = [p for p in paths if not isinstance(_get(model, p), nn.Linear)]
        if missing:
            raise ValueError(f"load_lora_adapter: {w_path} names modules that are not nn.Linear in the model: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for prm in model.parameters():
            prm.requires_grad_(False)
        for p in paths:
            _set_submodule(model, p, LoRALinear(model.get_submodule(p), r, alpha, float(cfg.get("lora_dropout", 0))))
        model._lora_spec = dict(rank=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0)),
                                target_modules=cfg.get("target_modules") or sorted({p.rsplit(".", 1)[-1] for p in paths}),
                                prefix=None)
    mods = lora_modules(model)
    expected = {f"{n}.{x}" for n in mods for x in ("lora_A", "lora_B")}
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"load_lora_adapter: {w_path} does not match the model's LoRA layers: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, m in mods.items():
            for x in ("lora_A", "lora_B"):
                dst, src = getattr(m, x), tensors[f"{n}.{x}"]
                if tuple(dst.shape) != tuple(src.shape):
                    raise ValueError(f"load_lora_adapter: {n}.{x} shape mismatch: expected {tuple(dst.shape)}, "
                                     f"found {tuple(src.shape)} in {w_path}")
                if m.merged:
                    raise ValueError(f"load_lora_adapter: {n} is merged; unmerge_lora(model) first")
                dst.copy_(src.to(dst.dtype))
            m.alpha, m.scaling = alpha, alpha / m.rank
    return model


def _get(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None

