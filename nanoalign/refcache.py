"""Reference log-prob cache: score every example once with the reference model, then train without it.

RLHF-V precomputes the reference model's log-probs once and caches them *per token*, so the DDPO weight gamma can
change without recomputing anything; TRL refuses `precompute_ref_log_probs` for vision data sets. Here the cache is
one safetensors file per reference checkpoint:

    CACHE_DIR/ref-<checkpoint fingerprint>.safetensors
        "<example key>.c" -> float32 (n_chosen_tokens,)    log p_ref of each scored chosen token, in order
        "<example key>.r" -> float32 (n_rejected_tokens,)  the same for the rejected response

The example key hashes exactly what the reference model sees: the chosen and rejected token ids (so the prompt
template, the tokenizer, truncation and the number of image tokens are all in it), the image bytes, the image
processing settings and the resolved template's text (the chat template's source, not the name "auto"). A changed
example, checkpoint, template or setting is a new key, hence a recompute; stale keys are simply never read. The
checkpoint fingerprint hashes config.json, every safetensors header and samples of every safetensors file's content
(hashing 14 GB of a 7B checkpoint in full takes longer than scoring a small data set).

The step's reference stage is `reference_logps`: cached rows for the data's pairs, a frozen reference model for the
responses made during training (they change every step). `build_cache` fills the cache before training.
Departure from the papers: offline algorithms never load a reference model (RLHF-V does the same).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from nanoalign.batch import collate, image_bytes, open_image, scatter_response_values
from nanoalign.forward import forward, response_logps
from nanoalign.ops import token_logprobs
from nanoalign.trainutil import print0, rank, world_size


def checkpoint_fingerprint(model_dir: str | os.PathLike) -> str:
    """A short hash of a checkpoint folder: config.json, safetensors headers and 18 content samples per file."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    config = model_dir / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file to fingerprint")
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode() + str(size).encode())
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, 1 << 24)))
            # 16 evenly spaced 64 KiB samples plus the first and last MiB of the tensor data.
            offsets = [0, max(0, size - (1 << 20))] + [size * i // 17 for i in range(1, 17)]
            for off in offsets:
                fh.seek(off)
                h.update(fh.read(1 << 20 if off in offsets[:2] else 1 << 16))
    return h.hexdigest()[:20]


def example_key(chosen_ids, rejected_ids, image_bytes: bytes | None, settings: dict) -> str:
    """Hash of what the reference model sees for one pair (token ids, image bytes, image settings)."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(b"c" + torch.as_tensor(list(chosen_ids), dtype=torch.int64).numpy().tobytes())
    h.update(b"r" + torch.as_tensor(list(rejected_ids), dtype=torch.int64).numpy().tobytes())
    h.update(b"i" + (hashlib.sha256(image_bytes).digest() if image_bytes is not None else b"none"))
    return h.hexdigest()[:32]


def example_keys(examples: list, encoded: list, processor, image_root, template: str) -> dict:
    """it.index -> example_key of every encoded pair. The settings hashed with the ids: the image processor's and
    the resolved template's text (Processor.template_text: the chat template's Jinja source, not the name "auto"),
    so a changed chat template never reuses stale reference log-probs even where the ids happen to agree."""
    settings = {"image_processor": processor.image_processor.to_dict(), "template": processor.template_text(template)}
    return {it.index: example_key(it.prompt_ids + it.chosen_ids, it.prompt_ids + it.rejected_ids,
                                  image_bytes(examples[it.index], image_root), settings) for it in encoded}


class RefLogpCache:
    """A dict from example key to (chosen, rejected) per-token reference log-probs, stored in one safetensors file."""

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str):
        self.path = Path(cache_dir) / f"ref-{fingerprint}.safetensors"
        self.fingerprint = fingerprint
        self.entries: dict[str, torch.Tensor] = {}
        if self.path.exists():
            try:
                self.entries = load_file(str(self.path))
            except Exception as e:  # a truncated cache is only a recompute, never a failed run
                print(f"warning: reference cache {self.path} is unreadable ({e}); recomputing it")
                self.entries = {}

    def __contains__(self, key: str) -> bool:
        return f"{key}.c" in self.entries and f"{key}.r" in self.entries

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.entries[f"{key}.c"], self.entries[f"{key}.r"]

    def put(self, key: str, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> None:
        self.entries[f"{key}.c"] = chosen_logps.detach().float().cpu().contiguous()
        self.entries[f"{key}.r"] = rejected_logps.detach().float().cpu().contiguous()

    def save(self) -> None:
        """Write atomically: a crash mid-save leaves the previous cache file whole."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        save_file(self.entries, str(tmp), metadata={"fingerprint": self.fingerprint})
        os.replace(tmp, self.path)


def build_cache(model, examples: list, encoded: list, processor, model_dir, cache_dir, image_root, template: str,
                batch_size: int, device) -> tuple[RefLogpCache, dict]:
    """Score every pair not yet cached with `model` (the initial weights = the reference) and save the cache.

    Collective under torch.distributed: each rank scores every world_size-th missing pair, the ranks exchange their
    entries, rank 0 writes the file. encoded: batch.encode_all's kept examples (it.index indexes `examples`).
    Returns (cache, keys): keys maps it.index -> example key, for `reference_logps`. Leaves `model` in eval mode.
    """
    cache = RefLogpCache(cache_dir, checkpoint_fingerprint(model_dir))
    keys = example_keys(examples, encoded, processor, image_root, template)
    todo = [it for it in encoded if keys[it.index] not in cache]
    mine = todo[rank()::world_size()]
    print0(f"reference log-probs: {len(encoded) - len(todo)} cached, {len(todo)} to compute ({cache.path})")
    new = {}
    model.to(device).eval()
    for i in range(0, len(mine), batch_size):
        items = mine[i:i + batch_size]
        b = collate(items, ["chosen", "rejected"], processor, [open_image(examples[it.index], image_root)
                                                                for it in items])
        logp = response_logps(model, b, device)  # 2P rows: chosen then rejected
        for k, it in enumerate(items):
            new[keys[it.index]] = (logp[k], logp[len(items) + k])
    if dist.is_initialized():
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, new)
        new = {k: v for part in gathered for k, v in part.items()}
    for k, (c, r) in new.items():
        cache.put(k, c, r)
    if todo and rank() == 0:
        cache.save()
    return cache, keys


def reference_logps(b: dict, keys: list[str] | None, cache: RefLogpCache | None, reference, device) -> torch.Tensor:
    """Per-token reference log-probs (R, T) float32 on CPU, 0 off-response, of a batch laid out in blocks of P rows
    [chosen | data rejected | made during training ...] (nanoalign/rollout.py).
    With a cache, rows [0:2P] (P = len(keys), the examples' `build_cache` keys) are read from it; every other row
    comes from a forward of the frozen `reference` model (needed only when there is such a row; None otherwise).
    Raises ValueError when a cached entry does not match the batch's labelled tokens (stale cache).
    """
    n_cached = 0 if cache is None else 2 * len(keys)
    parts = []
    if cache is not None:
        cached = [cache.get(k) for k in keys]  # (chosen, rejected) per pair
        parts.append(scatter_response_values(b["labels"][:n_cached], [c for c, _ in cached] +
                                             [r for _, r in cached]))  # (2P, T)
    if b["labels"].shape[0] > n_cached:
        with torch.no_grad():
            h = forward(reference, b, device, rows=slice(n_cached, None))  # (R - n_cached, T, H)
            parts.append(token_logprobs(h, reference.lm_head_weight, b["labels"][n_cached:].to(device)).cpu())
    return torch.cat(parts, 0) if len(parts) > 1 else parts[0]
