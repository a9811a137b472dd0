"""Load and save LLaVA checkpoints (safetensors only, never pickle).

Reads config.json (model_type llava or llava_next) and model.safetensors or a sharded model.safetensors.index.json.
Accepted key layouts, all mapped to our module names (== the llava-hf hub layout):
    hub            language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
                   multi_modal_projector.*, image_newline
    transformers 5 vision_tower.* (no `vision_model.`), model.language_model.*, model.vision_tower.*,
                   model.multi_modal_projector.*, lm_head.*, model.image_newline
    liuhaotian     model.layers.* / model.embed_tokens.* / model.norm.*, lm_head.*, model.mm_projector.{0,2}.*,
                   model.vision_tower.vision_tower.vision_model.*, model.image_newline
Saves the hub layout (config.json that transformers 5.x loads + model.safetensors) into `<path>.tmp-<pid>`, then
renames it into place; an existing checkpoint at `path` stays intact until that rename. The processor files of the
folder the processor was loaded from (tokenizer, processor_config.json / preprocessor_config.json, chat template,
generation_config.json) are written back unchanged (tokenizer.Processor.save), so transformers' AutoProcessor and
apply_chat_template treat the saved folder exactly as the source.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoalign.model import LlavaConfig, LlavaModel

# (old prefix, new prefix), first match wins: longer / more specific prefixes first.
_PREFIXES = [
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),  # liuhaotian
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),  # transformers 5 with the model. prefix
    ("vision_tower.vision_model.", "vision_tower.vision_model."),  # hub
    ("vision_tower.", "vision_tower.vision_model."),  # transformers 5.23 save_pretrained
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),  # liuhaotian
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.image_newline", "image_newline"),
    ("image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),  # liuhaotian decoder: model.layers.* / model.embed_tokens.* / model.norm.*
]
# buffers some checkpoints carry and we recompute
_IGNORED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")


def canonical_key(key: str) -> str:
    """Any accepted checkpoint key -> our (hub) module key; unknown keys come back unchanged."""
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def read_config(path) -> LlavaConfig:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not found (a checkpoint directory needs config.json)")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    try:
        return LlavaConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: {e}") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif single.is_file():
        files = [single]
    else:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {bins[0]}: pickle checkpoints are not read, convert to safetensors)" if bins else ""
        raise FileNotFoundError(f"{single}: not found, and no model.safetensors.index.json either{hint}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: shard listed in {index.name} not found")
    return files


def load_state_dict(path, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory under their canonical (hub) keys, cast to `dtype` if floating."""
    return _read_weights(Path(path), dtype, device)[0]


def _read_weights(path: Path, dtype, device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (canonical key -> tensor, canonical key -> key as stored in the file)."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key.endswith(_IGNORED_SUFFIXES):
                        continue
                    new = canonical_key(key)
                    if new in out:
                        raise ValueError(f"{f}: keys {origin[new]!r} and {key!r} both map to {new!r}")
                    t = sf.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[new], origin[new] = t.to(device), key
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{f}: truncated or corrupt safetensors file ({msg})") from None
    return out, origin


def _listing(keys, n=5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})"
    return ", ".join(keys[:n]) + more


@contextlib.contextmanager
def _skip_init():
    """Make nn.init's fills no-ops while a model whose weights are about to be loaded is built: on the meta device
    they do nothing useful, and a random fill there imports torch._dynamo (about 3 s per process)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *a, **kw: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja"]


def is_hub_id(name) -> bool:
    """`org/name` that is not an existing path: two non-empty parts, no leading . or ~, no file suffix."""
    text, path = str(name), Path(name)
    parts = text.split("/")
    return (not path.exists() and len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and not path.suffix)


def resolve_model(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A --model argument -> a local checkpoint folder.

    An existing folder is returned as it is. Otherwise `org/name` is a Hugging Face hub id: the files of
    HUB_PATTERNS (safetensors weights, config, tokenizer and processor files; never pickles) are fetched by
    huggingface_hub.snapshot_download into the hub cache (HF_HOME / HF_HUB_CACHE) at `revision` (a branch, tag or
    commit; default main), or found there without network when HF_HUB_OFFLINE=1. Errors: ValueError with one line
    (not a folder and not an org/name id; not in the cache while offline; the download failed)."""
    path = Path(name)
    if path.is_dir():
        return path
    text = str(name)
    if not is_hub_id(name):
        raise ValueError(f"{text}: checkpoint directory not found (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{text}: not a local folder, and huggingface_hub is not installed to fetch it") from None
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline and not cached, unknown repo or revision, network errors: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set and it is not in the hub cache)" if offline else ""
        raise ValueError(f"{text}: cannot fetch from the Hugging Face hub{hint}: {type(e).__name__}: {first}") \
            from None


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """Checkpoint directory -> (LlavaModel in eval mode, Processor or None).

    The processor needs nanoalign.tokenizer / nanoalign.image and tokenizer.json; without them it is None."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    config = read_config(path)
    sd, origin = _read_weights(path, dtype, device)
    if config.tie_word_embeddings:
        sd.pop("language_model.lm_head.weight", None)
    with torch.device("meta"), _skip_init():
        model = LlavaModel(config)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight")
    missing, unexpected = expected.keys() - sd.keys(), sd.keys() - expected.keys()
    if missing:
        hint = (" (original LLaVA checkpoints keep the CLIP tower apart: add its weights first)"
                if all(k.startswith("vision_tower.") for k in missing) else "")
        raise ValueError(f"{path}: checkpoint is missing {len(missing)} keys: {_listing(missing)}{hint}")
    if unexpected:
        named = [k if origin[k] == k else f"{origin[k]} (read as {k})" for k in unexpected]
        raise ValueError(f"{path}: checkpoint has {len(unexpected)} unexpected keys: {_listing(named)}")
    for k, t in sd.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: weight {origin[k]} has dtype {t.dtype}; a model weight must be floating point")
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{path}: shape mismatch for {k}: expected {tuple(expected[k].shape)}, "
                             f"found {tuple(t.shape)}")
    model.load_state_dict(sd, strict=False, assign=True)  # tied lm_head is re-tied below
    model.tie_weights()
    model.eval()
    return model, _load_processor(path, config, model)


def check_finite(model, path) -> None:
    """ValueError naming the checkpoint and its first tensors holding NaN or inf: such weights give non-finite
    logits (an empty answer from generation, a NaN loss at training's first step)."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" ... ({len(bad)} in all)" if len(bad) > 3 else ""
        raise ValueError(f"{path}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}{more}")


def load_for_cli(path, revision: str | None = None):
    """load_pretrained for the command lines (generate, bdhs, eval): (model, processor), or a ValueError
    with one line naming the folder -- a missing or broken checkpoint, one without tokenizer.json (every CLI
    tokenizes prompts), or one with non-finite weights. `path` may be a hub id org/name (resolve_model)."""
    try:
        model, processor = load_pretrained(resolve_model(path, revision))
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}: {(str(e).splitlines() or [''])[0]}") from None
    if processor is None:
        raise ValueError(f"{path}: no tokenizer.json in the checkpoint folder (needed to tokenize prompts)")
    check_finite(model, path)  # non-finite logits are an error, not an empty answer
    return model, processor


def _load_processor(path: Path, config: LlavaConfig, model: LlavaModel):
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        from nanoalign.tokenizer import Processor
    except ImportError:
        return None
    processor = Processor.from_pretrained(str(path), config)
    rows = model.language_model.model.embed_tokens.weight.shape[0]
    if processor.tokenizer.vocab_size > rows:
        raise ValueError(f"{path / 'tokenizer.json'}: tokenizer has {processor.tokenizer.vocab_size} tokens but "
                         f"the model's embedding has only {rows} rows")
    return processor


def save_pretrained(model: LlavaModel, processor, path) -> None:
    """Write config.json + model.safetensors (hub layout) [+ the processor's files, see Processor.save] atomically
    to `path`."""
    save_state_dict(model.config, model.state_dict(), processor, path)


def save_state_dict(config: LlavaConfig, state_dict: dict, processor, path) -> None:
    """save_pretrained from a config and a full (hub-keyed) state dict, e.g. one gathered from FSDP on rank 0.

    Written into `<path>.tmp-<pid>` first; an existing `path` is moved aside only for the final rename."""
    path = Path(path)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        sd = dict(state_dict)
        if config.tie_word_embeddings:
            sd.pop("language_model.lm_head.weight", None)  # shared with embed_tokens; safetensors refuses aliases
        sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if processor is not None:
            processor.save(tmp)
        old = None
        if path.exists():
            old = path.parent / f"{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old, path)  # put the previous checkpoint back
            raise
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
