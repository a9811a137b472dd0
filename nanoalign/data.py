"""Data: one loader per published format -> `Example` records, counted skip reasons (DDPO weights: ddpo.py).

`load_examples(path, fmt, image_root=None, strict=False, needs="responses") -> (examples, SkipCounts)` with fmt one of

  rlhfv       RLHF-V parquet (openbmb/RLHF-V-Dataset): `image` {bytes, path} struct, `text` a JSON string with
              question / chosen / rejected. prompt = "<image>\\n" + question. Needs pyarrow.
  povid       POVID JSON list: {id, image, conversations: [{from: human, value: "<image>\\n..."}, {from: gpt, value},
              ...], rejected_conversations: [...]}. Images under image_root. The pair is taken at the first assistant
              turn where the two conversations differ: that turn's answers are chosen / rejected, the turns before it
              are the prompt (`history` + `prompt`). Differing later turns too: `differs_in_several_turns`.
  vlfeedback  VLFeedback JSONL: {id, prompt, img_path, completions: [{model, response, annotations: {Helpfulness,
              Visual Faithfulness, Ethical Considerations: {Rating, Rationale}}}]}. Every C(n, 2) pair of completions,
              ranked by the mean of the three ratings; ties skipped and counted (`rating_tie`, not an error in strict
              mode: they are part of the pairing rule); a completion with a missing or non-numeric rating is left out
              of every pair and counted (`nonnumeric_rating`).
  llava       LLaVA-Instruct JSON list for SFT: prompt = first human turn, chosen = first gpt turn, rejected None,
              later (human, gpt) exchanges in `later_turns`: every assistant turn is trained, with the earlier turns
              as context, in one sequence (as LLaVA does). Rows without `image` are text-only.
  prefs       generic preference JSONL (what the project's data tools write): {image, prompt, chosen, rejected,
              [history], [chosen_segments], [rejected_segments], [id], ...}; history is [[human, assistant], ...]
              before prompt; segments are [[start, end), ...] character spans of the response; every other key is
              kept in extra.

Conversations (povid, llava) must alternate human, gpt, ... ("user" / "assistant" too), else `turns_not_alternating`.

`<image>` placeholder: an example with an image holds `<image>` exactly once over all its human turns (a text-only
one none); rlhfv, vlfeedback and prefs put "<image>\\n" in front of the first question when it is absent (their text
often carries no placeholder: the image is a separate field), as LLaVA's data has it; povid and llava must already
have it (else `no_image_token`). `<image>` inside an answer would become an image token without image features:
the row is skipped (`image_token_in_response`). A list of several images is `multi_image` (a one-element list is
that image).

Image paths: relative paths are resolved against image_root (default: the data file's folder) and must stay inside
it after resolving symlinks (else `path_escape`). With image_root=None an absolute path is accepted as is. At load
time only existence, the pixel count (nanoalign.image.MAX_IMAGE_PIXELS, else `image_too_large`) and a cheap PIL
header check (`Image.open(...).verify()`) are done; pixels are decoded later by `load_image`
(nanoalign.image.open_image, the one opener of every entry point).

Text files must be UTF-8: a JSONL line that is not is `not_utf8`; a JSON list that is not stops, naming line and byte.

What a row must give is `needs` (NEEDS; train.py's ALGOS `data` column): "pairs" (prompt, chosen, rejected),
"responses" (prompt, chosen; a rejected kept when present), "prompts" (the prompt only, the responses neither read nor
checked: each format gives the prompt, history included, its pairs would have, one example per row; a `prefs` row
may be {image, prompt, [history], [id]}). A row short of them is skipped (`prompt_only`, `no_rejected`); a file with
no such row stops with one line naming `who` and the fields. Row ids (`id`, rlhfv `idx`) must be unique: a later row
with an id seen is `duplicate_id` (the reference cache and BDHS's resume key by id). Rows are named 1-based: "line N"
of a JSONL file, "item N" of a JSON list, "row N" of a parquet table.

Bad rows are skipped and counted per reason (SKIP_REASONS); strict=True raises ValueError naming file, row and reason
at the first bad row; a file with no usable example raises ValueError with the counts.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nanoalign.image import ImageError, image_size, open_image

FORMATS = ("rlhfv", "povid", "vlfeedback", "llava", "prefs")
IMAGE_TOKEN = "<image>"
SKIP_REASONS = {
    "malformed_json": "malformed JSON line",
    "not_utf8": "line is not UTF-8 text",
    "missing_field": "missing or mistyped field",
    "multi_image": "several images in one row (one image per row is supported)",
    "missing_image": "missing image file",
    "unreadable_image": "unreadable image",
    "image_too_large": "image has more pixels than nanoalign.image.MAX_IMAGE_PIXELS",
    "path_escape": "image path escapes image_root",
    "no_image_token": "no <image> in the prompt of an example with an image",
    "extra_image_token": "<image> more than once, or in a prompt without image",
    "image_token_in_response": "<image> inside a chosen / rejected / assistant answer",
    "turns_not_alternating": "conversation turns are not human, assistant, human, assistant, ...",
    "prompts_differ": "chosen and rejected conversations ask different questions",
    "differs_in_several_turns": "chosen and rejected conversations differ in more than one assistant turn",
    "empty_prompt": "no image and an empty question: nothing for the model to answer",
    "empty_chosen": "empty chosen",
    "empty_rejected": "empty rejected",
    "chosen_equals_rejected": "chosen identical to rejected",
    "nonnumeric_rating": "missing or non-numeric rating (completion left out)",
    "rating_tie": "tied ratings (pair skipped)",
    "bad_segments": "segment spans not [start, end) inside the response",
    "prompt_only": "no chosen response (a prompt-only row; this algorithm trains on the data's responses)",
    "no_rejected": "no rejected response (this algorithm trains on the data's pairs)",
    "duplicate_id": "id already used by an earlier row (the first is kept)",
}
# what each kind of algorithm (train.py's ALGOS `data` column) takes from a row, besides the prompt and image
NEEDS = {"pairs": ("chosen", "rejected"), "responses": ("chosen",), "prompts": ()}
NOT_FATAL = {"rating_tie"}  # reasons that strict mode does not turn into errors


@dataclass
class Example:
    id: str
    image: Any  # path str (resolved), bytes, PIL.Image, or None for text-only
    prompt: str  # holds "<image>" once iff there is an image
    chosen: str | None  # None when only the prompt is read (needs="prompts")
    rejected: str | None = None  # None for SFT rows
    chosen_segments: list[tuple[int, int]] | None = None  # character spans [start, end) of chosen
    rejected_segments: list[tuple[int, int]] | None = None
    extra: dict = field(default_factory=dict)
    # Multi-turn conversations. history: earlier (human, assistant) exchanges shown before `prompt` (context only);
    # the first human turn then holds the <image> tag instead of `prompt`. later_turns (SFT only): further
    # (human, assistant) exchanges after `chosen`, each assistant answer trained like `chosen`.
    history: list[tuple[str, str]] = field(default_factory=list)
    later_turns: list[tuple[str, str]] = field(default_factory=list)


class SkipCounts(Counter):
    """Counter reason -> number of skipped rows (or pairs / completions), with the first few row labels of each."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[str]] = {}

    def add(self, reason: str, row: str) -> None:
        self[reason] += 1
        if len(self.rows.setdefault(reason, [])) < 5:
            self.rows[reason].append(row)

    def total(self) -> int:
        return sum(self.values())

    def __str__(self) -> str:
        if not self:
            return "skipped: none"
        return "\n".join(f"skipped {n}: {SKIP_REASONS.get(r, r)} [{r}] (e.g. {', '.join(self.rows.get(r, []))})"
                         for r, n in sorted(self.items()))


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class _Ctx:
    """Per-file state: where images live, the counts, strict mode."""

    def __init__(self, path: str, image_root: str | None, strict: bool, verify_images: bool, needs: str):
        self.path, self.strict, self.verify, self.needs = path, strict, verify_images, needs
        self.explicit_root = image_root is not None
        self.root = os.path.realpath(image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
        self.counts = SkipCounts()
        self.checked: dict[str, _BadRow | None] = {}  # image path -> verify result (rows often share images)

    def responses(self, row: dict, keys=("chosen", "rejected")) -> tuple[str | None, str | None]:
        """The row's (chosen, rejected) as the run reads them: (None, None) under needs="prompts" (not read, not
        checked); raises _BadRow prompt_only / no_rejected when a response it needs is absent (None or no key),
        missing_field when one is not a string."""
        if self.needs == "prompts":
            return None, None
        c, r = (_text(row, k) if row.get(k) is not None else None for k in keys)
        if c is None:
            raise _BadRow("prompt_only", f"no {keys[0]!r}")
        if r is None and "rejected" in NEEDS[self.needs]:
            raise _BadRow("no_rejected", f"no {keys[1]!r}")
        return c, r

    def skip(self, row: str, reason: str, detail: str = "") -> None:
        if self.strict and reason not in NOT_FATAL:
            raise ValueError(f"{self.path}: {row}: {SKIP_REASONS[reason]} [{reason}]{': ' + detail if detail else ''}")
        self.counts.add(reason, row)

    def image_path(self, raw: Any) -> str:
        """Resolve and check an image path from the data; raises _BadRow."""
        if isinstance(raw, list) and len(raw) == 1:  # LLaVA-OneVision style ["a.jpg"]: one image
            raw = raw[0]
        if isinstance(raw, list) and len(raw) > 1:
            raise _BadRow("multi_image", f"{len(raw)} images")
        if not isinstance(raw, str) or not raw.strip():
            raise _BadRow("missing_field", "image path is not a non-empty string")
        try:
            full = resolve_image_path(raw, self.root, allow_absolute=not self.explicit_root)
        except ImageError as e:
            raise _BadRow(e.reason, str(e)) from None
        if self.verify:
            if full not in self.checked:
                try:
                    _verify_image(full)
                    self.checked[full] = None
                except _BadRow as e:
                    self.checked[full] = e
            if self.checked[full] is not None:
                raise self.checked[full]
        return full


def resolve_image_path(raw: str, root: str, allow_absolute: bool = False) -> str:
    """The one image-path check of every entry point (train's loaders, eval, ...): `raw` joined to `root` and
    resolved (symlinks followed) must stay inside realpath(root); an absolute `raw` is taken as is only with
    allow_absolute (train.py without --image-root). Returns the resolved path of an existing file; raises ImageError
    with reason path_escape or missing_image."""
    root = os.path.realpath(root)
    if os.path.isabs(raw) and allow_absolute:
        full = os.path.realpath(raw)
    else:
        full = os.path.realpath(os.path.join(root, raw))
        if os.path.commonpath([full, root]) != root:
            raise ImageError("path_escape", f"{raw!r} is outside {root}")
    if not os.path.isfile(full):
        raise ImageError("missing_image", full)
    return full


def _verify_image(src: Any) -> None:
    """Header checks without decoding the pixels: the pixel limit (image_too_large), then PIL's verify()."""
    from PIL import Image

    try:
        image_size(src)
    except ImageError as e:
        raise _BadRow(e.reason, str(e)) from None
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.verify()
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, SyntaxError, OSError, ...)
        raise _BadRow("unreadable_image", f"{type(e).__name__}: {e}") from None


def image_source(example: Example, image_root: str | None = None):
    """The example's image as the opener takes it: a path joined to image_root when relative, else as stored
    (bytes, a PIL image, an absolute path); None when text-only."""
    img = example.image
    if isinstance(img, str) and image_root is not None and not os.path.isabs(img):
        img = os.path.join(image_root, img)
    return img


def load_image(example: Example, image_root: str | None = None):
    """Decode the example's image to an RGB PIL image with nanoalign.image.open_image (relative paths are joined
    to image_root). Raises ImageError (a ValueError; `.reason` missing_image / unreadable_image / image_too_large)
    naming the example."""
    img = image_source(example, image_root)
    if img is None:
        raise ValueError(f"example {example.id}: has no image")
    try:
        return open_image(img)
    except ImageError as e:
        raise ImageError(e.reason, f"example {example.id}: {e}") from None


# ---------------------------------------------------------------------------------------------------- checks

def _text(row: dict, key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise _BadRow("missing_field", f"{key!r} is {type(v).__name__}, expected a string")
    return v


def _check_pair(prompt: str, has_image: bool, chosen: str, rejected: str | None, prepend: bool = False,
                history: list | tuple = (), later: list | tuple = ()) -> tuple[str, list[tuple[str, str]]]:
    """Validate an example's text; returns (prompt, history), the first human turn prefixed with "<image>\\n" when
    `prepend` and the image has no tag. history / later: (human, assistant) exchanges before / after. chosen None:
    only the prompt is read (its tags and history), later answers not checked. Raises _BadRow."""
    history = [tuple(t) for t in history]
    humans = [h for h, _ in history] + [prompt] + [h for h, _ in later]
    n = sum(h.count(IMAGE_TOKEN) for h in humans)
    if has_image and n == 0 and prepend:  # as LLaVA's data has it: the tag in front of the first question
        if history:
            history[0] = (IMAGE_TOKEN + "\n" + history[0][0], history[0][1])
        else:
            prompt = IMAGE_TOKEN + "\n" + prompt
        n = 1
    if has_image and n == 0:
        raise _BadRow("no_image_token")
    if n > 1 or (n == 1 and not has_image):
        raise _BadRow("extra_image_token", f"{n} x <image>, image {'present' if has_image else 'absent'}")
    if not has_image and not any(h.replace(IMAGE_TOKEN, "").strip() for h in humans):
        raise _BadRow("empty_prompt")
    answers = [a for _, a in history]  # the prompt's answers; the responses too unless only the prompt is read
    if chosen is not None:
        answers += [chosen] + ([rejected] if rejected is not None else []) + [a for _, a in later]
    if any(IMAGE_TOKEN in a for a in answers):  # it would become an image token with no image features
        raise _BadRow("image_token_in_response")
    if chosen is None:
        return prompt, history
    if not chosen.strip() or any(not a.strip() for _, a in later):
        raise _BadRow("empty_chosen")
    if rejected is not None:
        if not rejected.strip():
            raise _BadRow("empty_rejected")
        if chosen.strip() == rejected.strip():
            raise _BadRow("chosen_equals_rejected")
    return prompt, history


def _segments(row: dict, key: str, text: str) -> list[tuple[int, int]] | None:
    v = row.get(key)
    if v is None or text is None:
        return None
    try:
        spans = [(int(s), int(e)) for s, e in v]
        ok = all(isinstance(s, int) and isinstance(e, int) for s, e in v)
    except (TypeError, ValueError):
        raise _BadRow("bad_segments", f"{key} is not a list of [start, end] pairs") from None
    if not ok or any(not (0 <= s < e <= len(text)) for s, e in spans):
        raise _BadRow("bad_segments", f"{key}={v!r} not inside [0, {len(text)}]")
    return spans


HUMAN_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


def _conversation(conv: Any, key: str = "conversations", open_end: bool = False) -> list[tuple[str, str | None]]:
    """LLaVA-style [{from: human, value}, {from: gpt, value}, ...] -> [(human, assistant), ...]. Raises _BadRow:
    missing_field for a turn of the wrong shape or no assistant turn, turns_not_alternating when the roles are not
    human, assistant, human, assistant, ... (an answer before its question would be trained on the wrong one).
    open_end (only the prompt is read): a last unanswered question is allowed, its answer None."""
    if not isinstance(conv, list):
        raise _BadRow("missing_field", f"{key} is not a list")
    roles, values = [], []
    for k, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or not isinstance(t.get("from"), str):
            raise _BadRow("missing_field", f"{key}[{k}] is not {{from: str, value: str}}")
        roles.append("human" if t["from"] in HUMAN_ROLES else "gpt" if t["from"] in ASSISTANT_ROLES else t["from"])
        values.append(t["value"])
    if ("gpt" not in roles and not open_end) or "human" not in roles:
        raise _BadRow("missing_field", f"{key} lacks a human or gpt turn")
    for k, r in enumerate(roles):
        want = "human" if k % 2 == 0 else "gpt"
        if r != want:
            raise _BadRow("turns_not_alternating", f"{key}[{k}] is {conv[k]['from']!r}, expected {want}")
    if len(roles) % 2:
        if not open_end:
            raise _BadRow("turns_not_alternating", f"{key} ends with an unanswered human turn")
        values.append(None)
    return list(zip(values[0::2], values[1::2]))


def _split_pair(chosen: list[tuple[str, str]], rejected: list[tuple[str, str]]):
    """Two conversations -> (history, prompt, chosen answer, rejected answer) at the first assistant turn where they
    differ; everything before it is the prompt. Raises _BadRow: chosen_equals_rejected (no difference),
    prompts_differ (a human turn up to there differs), differs_in_several_turns (a later turn present in both
    differs too; a conversation that simply ends after the differing turn is fine)."""
    n = min(len(chosen), len(rejected))
    first = next((k for k in range(n) if chosen[k] != rejected[k]), None)
    if first is None:
        raise _BadRow("chosen_equals_rejected", "the conversations agree on every common turn")
    if chosen[first][0] != rejected[first][0]:
        raise _BadRow("prompts_differ", f"human turn {first}")
    later = [k for k in range(first + 1, n) if chosen[k] != rejected[k]]
    if later:
        raise _BadRow("differs_in_several_turns", f"assistant turns {first} and {later[0]} differ")
    return chosen[:first], chosen[first][0], chosen[first][1], rejected[first][1]


# ---------------------------------------------------------------------------------------------------- readers

def _not_utf8(path: str, raw: bytes, e: UnicodeDecodeError, line_offset: int = 0) -> str:
    line = line_offset + raw.count(b"\n", 0, e.start) + 1
    return (f"{path}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "re-save the file as UTF-8")


def _read_json_list(ctx: _Ctx) -> list[tuple[str, Any]]:
    with open(ctx.path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8(ctx.path, raw, e)) from None
    except json.JSONDecodeError as e:
        hint = " (one JSON document per line? that is JSONL: --data-format prefs or vlfeedback)" \
            if e.msg == "Extra data" else ""
        raise ValueError(f"{ctx.path}: not valid JSON (line {e.lineno}: {e.msg}){hint}") from None
    if not isinstance(data, list):
        raise ValueError(f"{ctx.path}: expected a JSON list of rows, found {type(data).__name__}")
    return [(f"item {i}", r) for i, r in enumerate(data, 1)]


def _read_jsonl(ctx: _Ctx) -> list[tuple[str, Any]]:
    rows = []  # a malformed line becomes a _BadRow in its place, so strict mode stops at the first bad row in order
    with open(ctx.path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                rows.append((f"line {n}", _BadRow("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1}")))
                continue
            if not line.strip():
                continue
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"line {n}", _BadRow("malformed_json", f"{e.msg} at column {e.colno}")))
    return rows


def _read_parquet(ctx: _Ctx) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading the RLHF-V parquet {ctx.path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(ctx.path)
    except Exception as e:
        raise ValueError(f"{ctx.path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return [(f"row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]


# ---------------------------------------------------------------------------------------------------- formats
# each parser: (ctx, row_label, row: dict) -> list[Example]; raises _BadRow for a bad row

def _parse_rlhfv(ctx, label, row):
    img = row.get("image")
    data = img.get("bytes") if isinstance(img, dict) else img
    if isinstance(data, (bytes, bytearray)) and data:
        data = bytes(data)
        if ctx.verify:
            _verify_image(data)
    elif isinstance(img, dict) and img.get("path"):  # no bytes inside: a path relative to image_root
        data = ctx.image_path(img["path"])
    else:
        raise _BadRow("missing_image", "no image bytes")
    try:
        text = json.loads(row["text"]) if isinstance(row.get("text"), str) else row.get("text")
    except json.JSONDecodeError as e:
        raise _BadRow("malformed_json", f"text: {e.msg}") from None
    if not isinstance(text, dict):
        raise _BadRow("missing_field", "text is not a JSON object")
    q, (c, r) = _text(text, "question"), ctx.responses(text)
    prompt, _ = _check_pair(q, True, c, r, prepend=True)
    extra = {k: row[k] for k in ("ds_name", "origin_dataset", "origin_split", "image_path") if k in row}
    return [Example(str(row.get("idx", label)), data, prompt, c, r, extra=extra)]


def _parse_povid(ctx, label, row):
    chosen = _conversation(row.get("conversations"))
    rejected = _conversation(row.get("rejected_conversations"), "rejected_conversations")
    history, prompt, c, r = _split_pair(chosen, rejected)  # the same prompt whatever the run reads
    c, r = (None, None) if ctx.needs == "prompts" else (c, r)
    image = ctx.image_path(row.get("image"))
    prompt, history = _check_pair(prompt, True, c, r, history=history)
    return [Example(str(row.get("id", label)), image, prompt, c, r, history=history)]


def _parse_llava(ctx, label, row):
    conv = _conversation(row.get("conversations"), open_end=ctx.needs == "prompts")
    image = ctx.image_path(row["image"]) if row.get("image") is not None else None
    later_tags = [k for k, (h, _) in enumerate(conv) if k and IMAGE_TOKEN in h]
    if image is not None and IMAGE_TOKEN not in conv[0][0] and len(later_tags) == 1:
        k = later_tags[0]  # the tag in a later question: moved to the front of the first, as LLaVA's preprocessing does
        h = conv[k][0].replace(IMAGE_TOKEN + "\n", "", 1) if IMAGE_TOKEN + "\n" in conv[k][0] else \
            conv[k][0].replace(IMAGE_TOKEN, "", 1)
        conv = [(IMAGE_TOKEN + "\n" + conv[0][0], conv[0][1])] + conv[1:k] + [(h.strip(), conv[k][1])] + conv[k + 1:]
    if ctx.needs == "prompts":  # the first question only, checked over the whole conversation's tags
        prompt, _ = _check_pair(conv[0][0], image is not None, None, None, later=conv[1:])
        return [Example(str(row.get("id", label)), image, prompt, None)]
    if ctx.needs == "pairs":
        raise _BadRow("no_rejected", "llava rows hold one answer per question")
    prompt, _ = _check_pair(conv[0][0], image is not None, conv[0][1], None, later=conv[1:])
    return [Example(str(row.get("id", label)), image, prompt, conv[0][1], None, later_turns=conv[1:])]


def _rating(completion: dict) -> float | None:
    ann = completion.get("annotations")
    if not isinstance(ann, dict):
        return None
    vals = []
    for aspect in ("Helpfulness", "Visual Faithfulness", "Ethical Considerations"):
        a = ann.get(aspect)
        try:
            vals.append(float(a["Rating"] if isinstance(a, dict) else a))
        except (TypeError, ValueError, KeyError):
            return None
    return sum(vals) / 3 if all(v == v for v in vals) else None  # v == v rejects NaN


def _parse_vlfeedback(ctx, label, row):
    prompt, comps = _text(row, "prompt"), row.get("completions")
    image = ctx.image_path(row.get("img_path"))
    if ctx.needs == "prompts":  # one example per row; the completions are not read
        return [Example(str(row.get("id", label)), image, _check_pair(prompt, True, None, None, prepend=True)[0], None)]
    if not isinstance(comps, list):
        raise _BadRow("missing_field", "completions is not a list")
    scored = []
    for k, c in enumerate(comps):
        s = _rating(c) if isinstance(c, dict) else None
        if s is None:
            ctx.skip(f"{label} completions[{k}]", "nonnumeric_rating")
        elif not isinstance(c.get("response"), str):
            ctx.skip(f"{label} completions[{k}]", "missing_field", "response is not a string")
        else:
            scored.append((k, s, c))
    out = []
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            (ki, si, _), (kj, sj, _) = scored[i], scored[j]
            pair = f"{label} completions[{ki}] vs [{kj}]"
            if si == sj:
                ctx.skip(pair, "rating_tie")
                continue
            (kc, sc, cc), (kr, sr, cr) = (scored[i], scored[j]) if si > sj else (scored[j], scored[i])
            try:
                p, _ = _check_pair(prompt, True, cc["response"], cr["response"], prepend=True)
            except _BadRow as e:
                ctx.skip(pair, e.reason, e.detail)
                continue
            out.append(Example(f"{row.get('id', label)}:{kc}>{kr}", image, p, cc["response"], cr["response"],
                               extra={"chosen_model": cc.get("model"), "rejected_model": cr.get("model"),
                                      "chosen_score": sc, "rejected_score": sr}))
    return out


PREFS_KEYS = ("id", "image", "prompt", "chosen", "rejected", "chosen_segments", "rejected_segments", "history")


def _parse_prefs(ctx, label, row):
    prompt, (chosen, rejected) = _text(row, "prompt"), ctx.responses(row)
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 and
                                                all(isinstance(x, str) for x in t) for t in history):
        raise _BadRow("missing_field", "history is not a list of [human, assistant] string pairs")
    image = ctx.image_path(row["image"]) if row.get("image") is not None else None
    prompt, history = _check_pair(prompt, image is not None, chosen, rejected, prepend=True, history=history)
    cs, rs = _segments(row, "chosen_segments", chosen), _segments(row, "rejected_segments", rejected)
    extra = {k: v for k, v in row.items() if k not in PREFS_KEYS}
    return [Example(str(row.get("id", label)), image, prompt, chosen, rejected, cs, rs, extra, history)]


_FORMATS = {  # format -> (reader, parser, the key of a row's id)
    "rlhfv": (_read_parquet, _parse_rlhfv, "idx"), "povid": (_read_json_list, _parse_povid, "id"),
    "vlfeedback": (_read_jsonl, _parse_vlfeedback, "id"), "llava": (_read_json_list, _parse_llava, "id"),
    "prefs": (_read_jsonl, _parse_prefs, "id")}


def load_examples(path: str, fmt: str, image_root: str | None = None, strict: bool = False,
                  verify_images: bool = True, needs: str = "responses", who: str = "this run"
                  ) -> tuple[list[Example], SkipCounts]:
    """Read a data file of format `fmt` (see the module docstring) -> (examples, skip counts). needs: a key of NEEDS,
    what each row must give; who: what needs it, for the message of a file without any such row (e.g. "--algo dpo").
    Raises ValueError (bad file, no usable row), FileNotFoundError."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} not found")
    if image_root is not None and not os.path.isdir(image_root):
        raise FileNotFoundError(f"image root {image_root} is not a directory")
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {', '.join(NEEDS)}, got {needs!r}")
    ctx = _Ctx(path, image_root, strict, verify_images, needs)
    read, parse, id_key = _FORMATS[fmt]
    rows = read(ctx)
    examples: list[Example] = []
    seen: dict[str, str] = {}  # row id -> label of the row that used it first
    for label, row in rows:
        try:
            if isinstance(row, _BadRow):
                raise row
            if not isinstance(row, dict):
                raise _BadRow("missing_field", "row is not an object")
            new = parse(ctx, label, row)
            rid = row.get(id_key) if new else None
            if rid is not None:
                if str(rid) in seen:
                    raise _BadRow("duplicate_id", f"{id_key} {rid!r} is also {seen[str(rid)]}'s")
                seen[str(rid)] = label
            examples.extend(new)
        except _BadRow as e:
            ctx.skip(label, e.reason, e.detail)
        except (KeyError, TypeError, AttributeError) as e:  # a row of the wrong shape
            ctx.skip(label, "missing_field", f"{type(e).__name__}: {e}")
    if not examples:
        counts = ", ".join(f"{r}={n}" for r, n in sorted(ctx.counts.items())) or "the file has no rows"
        if ctx.counts["prompt_only"] or ctx.counts["no_rejected"]:
            raise ValueError(f"{path}: {who} needs {', '.join(('prompt',) + NEEDS[needs])} in each row; none of its "
                             f"{len(rows)} rows (format {fmt}) has them (skipped: {counts})")
        raise ValueError(f"{path}: no usable example in {len(rows)} rows (format {fmt}); skipped: {counts}")
    return examples, ctx.counts


def write_prefs(path: str, examples: list[Example]) -> None:
    """Write examples as `prefs` JSONL (image paths as given; bytes / PIL images must be saved to files first).
    Written to a temporary name, then renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for e in examples:
            if e.image is not None and not isinstance(e.image, str):
                raise ValueError(f"write_prefs: example {e.id} holds its image as {type(e.image).__name__}; "
                                 "save it to a file and store the path")
            if e.rejected is None:
                raise ValueError(f"write_prefs: example {e.id} has no rejected response")
            row = {**e.extra, "id": e.id, "image": e.image, "prompt": e.prompt, "chosen": e.chosen,
                   "rejected": e.rejected}
            if e.chosen_segments is not None:
                row["chosen_segments"] = [list(x) for x in e.chosen_segments]
            if e.rejected_segments is not None:
                row["rejected_segments"] = [list(x) for x in e.rejected_segments]
            if e.history:
                row["history"] = [list(t) for t in e.history]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
