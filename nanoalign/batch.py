"""Examples -> token sequences -> padded batches for training.

One training sequence is  [BOS] template(prompt with <image> expanded to n image tokens) + response + [EOS].
Labels are shifted so that `labels[t]` is the token predicted from position t (the hidden state at t scores
input_ids[t+1]); every position whose target is not a response token is -100 (image, prompt, padding). Per-token
weights follow the labels (DDPO: gamma on corrected tokens, 1 elsewhere, 0 where the label is -100).

Truncation never touches the image or the prompt: a response is cut to fit `max_len` (losing its EOS), and an
example whose image tokens plus prompt do not fit is rejected with the counted reason `prompt_too_long` -- never
silently cut (the "Image features and image tokens do not match" failure of TRL / LLaMA-Factory).

A preference batch of P pairs holds the chosen sequences in rows [0, P) and the rejected ones in rows [P, 2P): the
layout `nanoalign.ops.preference_loss` expects.
"""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass

import torch
from PIL import Image

from nanoalign.data import Example, example_token_weights, load_image
from nanoalign.tokenizer import IMAGE_TOKEN, build_prompt


@dataclass
class Encoded:
    """One example, tokenized. Response ids exclude the prompt; weights are per response token."""
    index: int  # position in the data set
    prompt_ids: list[int]  # BOS + template, <image> already expanded
    chosen_ids: list[int]  # response tokens (+ EOS unless truncated)
    rejected_ids: list[int] | None
    chosen_w: torch.Tensor | None  # (len(chosen_ids),) DDPO weights, None = all ones
    rejected_w: torch.Tensor | None
    image_size: tuple[int, int] | None  # (height, width) of the image


class Unusable(Exception):
    """An example that cannot be trained on; `reason` is the counted key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def open_image(example: Example, image_root: str | None) -> Image.Image | None:
    if example.image is None:
        return None
    try:
        return load_image(example, image_root)
    except Exception as e:  # unreadable at decode time although its header looked fine
        raise Unusable("unreadable_image", f"{example.id}: {e}") from e


def image_bytes(example: Example, image_root: str | None) -> bytes | None:
    """The raw bytes of an example's image (for cache keys); None for text-only examples."""
    img = example.image
    if img is None:
        return None
    if isinstance(img, bytes):
        return img
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    with open(img, "rb") as f:
        return f.read()


def _encode_response(tokenizer, text: str, eos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if eos and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
        offsets.append((len(text), len(text)))
    return ids, offsets


def encode_prompt(processor, prompt: str, image_size: tuple[int, int] | None, template: str) -> list[int]:
    """BOS + template(prompt), the <image> id expanded by Processor.expand_image_tokens."""
    tok = processor.tokenizer
    ids = tok.encode(build_prompt(prompt, template, with_image=image_size is not None))
    n_tags = ids.count(tok.image_token_id)
    if image_size is None:
        if n_tags:
            raise Unusable("extra_image_token", f"{IMAGE_TOKEN} in a prompt without image")
        return ids
    if n_tags != 1:
        raise Unusable("no_image_token" if n_tags == 0 else "extra_image_token", f"{n_tags} {IMAGE_TOKEN} tags")
    return processor.expand_image_tokens(ids, [image_size])


def encode_example(index: int, ex: Example, processor, image_root: str | None, template: str, max_len: int,
                   gamma: float | None = None) -> Encoded:
    """Tokenize one example; raises Unusable(reason) when it cannot be trained on."""
    img = open_image(ex, image_root)
    size = (img.height, img.width) if img is not None else None
    prompt_ids = encode_prompt(processor, ex.prompt, size, template)
    room = max_len - len(prompt_ids)
    if room < 1:
        raise Unusable("prompt_too_long", f"{ex.id}: image + prompt are {len(prompt_ids)} tokens > --max-len {max_len}")
    tok = processor.tokenizer
    chosen_ids, chosen_off = _encode_response(tok, ex.chosen)
    rejected_ids = rejected_off = None
    if ex.rejected is not None:
        rejected_ids, rejected_off = _encode_response(tok, ex.rejected)
    chosen_w = rejected_w = None
    if gamma is not None and rejected_ids is not None:
        chosen_w, rejected_w = example_token_weights(ex, chosen_ids, rejected_ids, gamma, chosen_off, rejected_off)
    # Truncate responses only (a truncated response loses its EOS: the model is not taught to stop there).
    chosen_ids = chosen_ids[:room]
    chosen_w = chosen_w[:room] if chosen_w is not None else None
    if rejected_ids is not None:
        rejected_ids = rejected_ids[:room]
        rejected_w = rejected_w[:room] if rejected_w is not None else None
        if rejected_ids == chosen_ids:
            raise Unusable("identical_after_truncation", f"{ex.id}: chosen == rejected within --max-len")
    return Encoded(index, prompt_ids, chosen_ids, rejected_ids, chosen_w, rejected_w, size)


def encode_all(examples, processor, image_root, template, max_len, gamma=None, strict=False, log=print):
    """Encode every example; rejected ones are counted per reason (or raise with --strict)."""
    kept, reasons = [], Counter()
    for i, ex in enumerate(examples):
        try:
            kept.append(encode_example(i, ex, processor, image_root, template, max_len, gamma))
        except Unusable as r:
            if strict:
                raise ValueError(f"example {ex.id}: {r.reason}: {r}") from None
            reasons[r.reason] += 1
    for reason, n in sorted(reasons.items()):
        log(f"rejected {n} example(s): {reason}")
    if not kept:
        raise ValueError(f"no example left to train on after tokenization ({dict(reasons)})")
    return kept, reasons


def _pad_rows(rows: list[list[int]], value) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long if isinstance(value, int) else torch.float32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.as_tensor(r, dtype=out.dtype)
    return out


def collate(items: list[Encoded], which: list[str], processor, images: list[Image.Image | None],
            pad_to: int | None = None) -> dict:
    """Right-padded batch of sequences prompt + response for each `which` in ("chosen", "rejected").

    Rows are ordered [all items' `which[0]`, all items' `which[1]`, ...], so for which=["chosen", "rejected"] the
    chosen sequences are rows [0, P) and the rejected ones rows [P, 2P).
    Returns input_ids (R,T), attention_mask (R,T), labels (R,T) (-100 off-response), token_weights (R,T) float,
    pixel_values / image_sizes of the len(items) images (each processed once) and image_index (R,): the image of
    each row, for the model's forward (the vision tower then runs once per image, not once per row).
    """
    seqs, weights, label_rows = [], [], []
    for side in which:
        for it in items:
            resp = getattr(it, f"{side}_ids")
            w = getattr(it, f"{side}_w")
            w = [1.0] * len(resp) if w is None else w.tolist()
            ids = it.prompt_ids + resp
            n_p = len(it.prompt_ids)
            # position t predicts ids[t+1]: response token j is predicted at position n_p - 1 + j
            seqs.append(ids)
            label_rows.append([-100] * (n_p - 1) + resp + [-100])
            weights.append([0.0] * (n_p - 1) + w + [0.0])
    pad = processor.pad_id
    batch = {
        "input_ids": _pad_rows(seqs, pad),
        "attention_mask": _pad_rows([[1] * len(s) for s in seqs], 0),
        "labels": _pad_rows(label_rows, -100),
        "token_weights": _pad_rows(weights, 0.0),
        "pixel_values": None,
        "image_sizes": None,
        "image_index": None,
    }
    if pad_to is not None and batch["input_ids"].shape[1] < pad_to:
        extra = pad_to - batch["input_ids"].shape[1]
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
        batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=-100)
        batch["token_weights"] = torch.nn.functional.pad(batch["token_weights"], (0, extra), value=0.0)
    present = [im for im in images if im is not None]
    if present:
        if len(present) != len(images):
            raise ValueError("collate: a batch mixes examples with and without images")
        batch.update(processor.image_processor.process(present))
        batch["image_index"] = torch.arange(len(items)).repeat(len(which))  # row r uses image r % len(items)
    return batch


def scatter_response_values(labels: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """Place per-row response values (e.g. cached reference log-probs, one 1-D tensor per row, in order) at the
    labelled positions of a (R,T) labels tensor; 0 elsewhere."""
    out = torch.zeros(labels.shape, dtype=torch.float32)
    for r, v in enumerate(values):
        pos = (labels[r] != -100).nonzero(as_tuple=True)[0]
        if len(pos) != len(v):
            raise ValueError(f"row {r}: {len(v)} cached values for {len(pos)} labelled tokens (stale cache?)")
        out[r, pos] = v.float()
    return out
