"""Examples -> token sequences -> padded batches for training.

One training sequence is  prompt + response. The prompt and response come from --template
(Processor.resolve_template):
  - the checkpoint's chat template ("auto" when it has one): the whole conversation rendered as transformers'
    apply_chat_template renders it (Processor.render_conversation) and tokenized as one text; the prompt is
    everything before the trained answer (= apply_chat_template(..., add_generation_prompt=True)), each answer ends
    with what the template puts after an assistant message (chatml <|im_end|>, Llama-3 <|eot_id|>, mistral </s>;
    the tokenizer's EOS when the template puts nothing there), so the policy learns to stop where generation stops;
  - a named template (vicuna_v1, ...; "auto" without a chat template): [BOS] template(prompt) + response + [EOS],
    later turns rendered as LLaVA's SeparatorStyle.TWO does: "... ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    (see later_turn_text).
`<image>` in the prompt is expanded to the image's n tokens. Labels are shifted so that `labels[t]` is the token
predicted from position t (the hidden state at t scores input_ids[t+1]); every position whose target is not an
answer token is -100 (image, prompt, later questions, padding). Per-token weights follow the labels (DDPO: gamma on
corrected tokens, 1 elsewhere, 0 where the label is -100).

Truncation never touches the image or the prompt: a response is cut to fit `max_len` (losing its EOS), and an
example whose image tokens plus prompt do not fit is rejected with the counted reason `prompt_too_long` -- never
silently cut (the "Image features and image tokens do not match" failure of TRL / LLaMA-Factory).

A preference batch of P pairs holds the chosen sequences in rows [0, P) and the rejected ones in rows [P, 2P): the
layout `nanoalign.ops.preference_loss` expects. Rows with and without an image mix freely in one batch: the images
present are processed once each and `image_index` maps every `<image>` occurrence (row-major) to its image.

Multi-turn: an example's `history` (earlier exchanges) is part of the prompt (never labelled); an SFT example's
`later_turns` follow its first answer in the same sequence, each answer (+ end of turn) labelled and each question
not, as LLaVA trains conversations.
"""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass

import torch
from PIL import Image

from nanoalign.data import Example, image_source, load_image
from nanoalign.ddpo import example_token_weights
from nanoalign.image import ImageError, exif_transpose_default, image_size
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
    chosen_labelled: list[bool] | None = None  # per chosen token: trained (True) or context (a later question)


class Unusable(ValueError):
    """An example that cannot be trained on; `reason` is the counted key. A ValueError, so one that surfaces outside
    the counted skips (an image whose header reads but whose pixels do not decode mid-run) is bad input: one line,
    exit 2, not a traceback."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def open_image(example: Example, image_root: str | None) -> Image.Image | None:
    """The example's image decoded by nanoalign.image.open_image (None for a text-only example); raises
    Unusable(missing_image / unreadable_image / image_too_large)."""
    if example.image is None:
        return None
    try:
        return load_image(example, image_root)
    except ImageError as e:  # e.g. unreadable at decode time although its header looked fine
        raise Unusable(e.reason, str(e)) from None


def _image_size(example: Example, image_root: str | None) -> tuple[int, int] | None:
    """(height, width) of the example's image from its header (no decode); None when text-only."""
    img = image_source(example, image_root)
    if img is None:
        return None
    try:
        return image_size(img)
    except ImageError as e:
        raise Unusable(e.reason, f"example {example.id}: {e}") from None


def image_bytes(example: Example, image_root: str | None) -> bytes | None:
    """The raw bytes of an example's image (for cache keys); None for text-only examples. With the EXIF setting
    on (nanoalign.image.exif_transpose_default) the bytes are prefixed by a marker, so the cache never mixes
    pixels decoded under the two settings."""
    img = example.image
    if img is None:
        return None
    if isinstance(img, bytes):
        data = img
    elif isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        with open(image_source(example, image_root), "rb") as f:
            data = f.read()
    return b"exif_transpose\0" + data if exif_transpose_default() else data


def _encode_response(tokenizer, text: str, eos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if eos and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
        offsets.append((len(text), len(text)))
    return ids, offsets


def later_turn_text(question: str, template: str) -> str:
    """A human turn after the first one. vicuna_v1 / llava_v1 / vicuna_nosys: "USER: {question} ASSISTANT:" (no
    system sentence again, as LLaVA's SeparatorStyle.TWO renders a conversation); raw: the question unchanged; any
    other template: build_prompt(question, template, with_image=False) (the whole single-turn wrapper)."""
    if template == "raw":
        return question
    if template in ("vicuna_v1", "llava_v1", "vicuna_nosys"):
        return build_prompt(question, "vicuna_nosys", with_image=False)
    return build_prompt(question, template, with_image=False)


def encode_prompt(processor, prompt: str, image_size: tuple[int, int] | None, template: str,
                  history=()) -> list[int]:
    """Prompt ids of a named template (vicuna_v1, ...): BOS + processor.build_prompt(first question) [+ answer EOS
    + later question ...], the <image> id expanded. history: earlier (human, assistant) exchanges before `prompt`.
    (The checkpoint's chat template: see _encode_chat.)"""
    tok = processor.tokenizer
    humans = [h for h, _ in history] + [prompt]
    # the first question gets the template's "<image>\n" unless a later one already carries the tag
    first_image = image_size is not None and not any(IMAGE_TOKEN in h for h in humans[1:])
    ids = tok.encode(processor.build_prompt(humans[0], template, with_image=first_image))
    for (_, answer), question in zip(history, humans[1:]):
        ids += _encode_response(tok, answer)[0] + tok.encode(later_turn_text(question, template), add_bos=False)
    return _expand_image(processor, ids, image_size)


def _expand_image(processor, ids: list[int], image_size: tuple[int, int] | None) -> list[int]:
    """Prompt ids with the one `<image>` id expanded to the image's tokens; Unusable(no_image_token /
    extra_image_token) when the prompt does not hold exactly one tag for an image (none without)."""
    n_tags = ids.count(processor.tokenizer.image_token_id)
    if image_size is None:
        if n_tags:
            raise Unusable("extra_image_token", f"{IMAGE_TOKEN} in a prompt without image")
        return ids
    if n_tags != 1:
        raise Unusable("no_image_token" if n_tags == 0 else "extra_image_token", f"{n_tags} {IMAGE_TOKEN} tags")
    return processor.expand_image_tokens(ids, [image_size])


def _encode_chat(processor, humans: list[str], answers: list[str], trained_from: int, with_image: bool):
    """A conversation through the checkpoint's chat template (Processor.render_conversation), as transformers'
    apply_chat_template renders and tokenizes it: prompt = everything before answer `trained_from` (its ids are
    apply_chat_template(those turns, add_generation_prompt=True)); response = the rest, from that answer on, each
    answer with the template's end of turn (chatml <|im_end|>, Llama-3 <|eot_id|>, mistral </s>; the tokenizer's
    EOS when the template ends a turn with nothing, as LLaVA trains), later user turns as context.
    Returns (prompt ids (image not expanded), response ids, labelled per response token (answer tokens True),
    character offsets of the response tokens relative to the trained answer's text)."""
    tok = processor.tokenizer
    try:
        pieces = processor.render_conversation(humans, answers, with_image)
    except ValueError as e:
        raise Unusable("chat_template_error", str(e)) from None
    k = 2 * trained_from + 1  # pieces alternate context, answer, context, answer, ...
    prompt_text = "".join(t for t, _ in pieces[:k])
    rest = "".join(t for t, _ in pieces[k:])
    prompt_ids = tok.encode(prompt_text)
    # tokenized as one text, as apply_chat_template does; the prompt's own ids must be its prefix (they are what
    # generation sees), else the response is tokenized on its own
    ids, offs = tok.encode_offsets(prompt_text + rest)
    n = len(prompt_ids)
    if ids[:n] == prompt_ids and all(a >= len(prompt_text) for a, _ in offs[n:]):
        ids, offs = ids[n:], [(a - len(prompt_text), b - len(prompt_text)) for a, b in offs[n:]]
    else:
        ids, offs = tok.encode_offsets(rest, add_bos=False)
    spans, pos = [], 0  # [start, end) of each answer piece in `rest`
    for t, is_answer in pieces[k:]:
        if is_answer:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    which = [next((j for j, (s, e) in enumerate(spans) if s <= a < e), -1) for a, _ in offs]  # answer of a token
    if not processor.answer_frame("checkpoint")[1] and tok.eos_id is not None:  # EOS after each answer's last token
        out = []
        for i, (t, o, w) in enumerate(zip(ids, offs, which)):
            out.append((t, o, w))
            if w >= 0 and (i + 1 == len(ids) or which[i + 1] != w):
                out.append((tok.eos_id, (o[1], o[1]), w))
        ids, offs, which = [x[0] for x in out], [x[1] for x in out], [x[2] for x in out]
    start = pieces[k][0].find(answers[trained_from])  # the answer's text inside its piece (DDPO spans)
    start = start if start >= 0 else len(pieces[k][0]) - len(pieces[k][0].lstrip())
    return prompt_ids, ids, [w >= 0 for w in which], [(a - start, b - start) for a, b in offs]


def encode_example(index: int, ex: Example, processor, image_root: str | None, template: str, max_len: int,
                   gamma: float | None = None) -> Encoded:
    """Tokenize one example; raises Unusable(reason) when it cannot be trained on. The image is not decoded here:
    its size comes from the file header. template: a --template choice (Processor.resolve_template): the
    checkpoint's chat template renders the whole conversation (_encode_chat), a named one as LLaVA does."""
    size = _image_size(ex, image_root)
    tok = processor.tokenizer
    labelled = rejected_ids = rejected_off = None
    if ex.chosen is None:  # the prompt only (data of an algorithm that makes its responses): no response ids
        return Encoded(index, _prompt_only_ids(processor, ex, size, template, max_len), [], None, None, None, size)
    if processor.resolve_template(template) == "checkpoint":
        h_humans, h_answers = [h for h, _ in ex.history], [a for _, a in ex.history]
        if ex.rejected is None:  # SFT: every answer from `chosen` on is trained, later questions are context
            humans = h_humans + [ex.prompt] + [q for q, _ in ex.later_turns]
            answers = h_answers + [ex.chosen] + [a for _, a in ex.later_turns]
            prompt_ids, chosen_ids, labelled, chosen_off = _encode_chat(processor, humans, answers, len(h_answers),
                                                                        size is not None)
            labelled = None if all(labelled) else labelled
        else:
            humans = h_humans + [ex.prompt]
            prompt_ids, chosen_ids, _, chosen_off = _encode_chat(processor, humans, h_answers + [ex.chosen],
                                                                 len(h_answers), size is not None)
            _, rejected_ids, _, rejected_off = _encode_chat(processor, humans, h_answers + [ex.rejected],
                                                            len(h_answers), size is not None)
        prompt_ids = _expand_image(processor, prompt_ids, size)
    else:
        prompt_ids = encode_prompt(processor, ex.prompt, size, template, ex.history)
        chosen_ids, chosen_off = _encode_response(tok, ex.chosen)
        if ex.later_turns:  # SFT conversation: [answer 1][question 2][answer 2]..., the questions not labelled
            labelled = [True] * len(chosen_ids)
            for question, answer in ex.later_turns:
                q = tok.encode(later_turn_text(question, template), add_bos=False)
                a = _encode_response(tok, answer)[0]
                chosen_ids += q + a
                labelled += [False] * len(q) + [True] * len(a)
        if ex.rejected is not None:
            rejected_ids, rejected_off = _encode_response(tok, ex.rejected)
    room = max_len - len(prompt_ids)
    if room < 1:
        raise Unusable("prompt_too_long", f"{ex.id}: image + prompt are {len(prompt_ids)} tokens > --max-len {max_len}")
    for side, ids in (("chosen", chosen_ids), ("rejected", rejected_ids or [])):
        if tok.image_token_id in ids:  # the tokenizer made an image token of an answer's text
            raise Unusable("image_token_in_response", f"{ex.id}: the {side} answer holds the image token")
    chosen_w = rejected_w = None
    if gamma is not None and rejected_ids is not None:
        chosen_w, rejected_w = example_token_weights(ex, chosen_ids, rejected_ids, gamma, chosen_off, rejected_off)
    if rejected_ids is not None and rejected_ids == chosen_ids:
        raise Unusable("identical_after_tokenization", f"{ex.id}: chosen and rejected have the same token ids")
    # Truncate responses only (a truncated response loses its EOS: the model is not taught to stop there).
    chosen_ids = chosen_ids[:room]
    chosen_w = chosen_w[:room] if chosen_w is not None else None
    labelled = labelled[:room] if labelled is not None else None
    if rejected_ids is not None:
        rejected_ids = rejected_ids[:room]
        rejected_w = rejected_w[:room] if rejected_w is not None else None
        if rejected_ids == chosen_ids:
            raise Unusable("identical_after_truncation", f"{ex.id}: chosen == rejected within --max-len {max_len}")
    return Encoded(index, prompt_ids, chosen_ids, rejected_ids, chosen_w, rejected_w, size, labelled)


def _prompt_only_ids(processor, ex: Example, size, template: str, max_len: int) -> list[int]:
    """The prompt ids encode_example gives the example's pairs (the chat template rendered up to its generation
    prompt, or a named template's prompt), image expanded; Unusable when they leave no room for a response."""
    if processor.resolve_template(template) == "checkpoint":
        try:
            pieces = processor.render_conversation([h for h, _ in ex.history] + [ex.prompt],
                                                   [a for _, a in ex.history], size is not None)
        except ValueError as e:
            raise Unusable("chat_template_error", str(e)) from None
        ids = _expand_image(processor, processor.tokenizer.encode("".join(t for t, _ in pieces)), size)
    else:
        ids = encode_prompt(processor, ex.prompt, size, template, ex.history)
    if len(ids) >= max_len:
        raise Unusable("prompt_too_long", f"{ex.id}: image + prompt are {len(ids)} tokens >= --max-len {max_len}")
    return ids


def encode_all(examples, processor, image_root, template, max_len, gamma=None, strict=False, log=print):
    """Encode every example; unusable ones are counted per reason (or raise with --strict). Logs the template
    used, and a note when the checkpoint's chat template ends a turn with a token generation does not stop at."""
    if processor.resolve_template(template) == "checkpoint":
        end = processor.answer_frame("checkpoint")[1]
        log(f"prompt template: the checkpoint's chat template ({processor.chat_template_source}); an answer ends "
            f"with {end or processor.tokenizer.tok.id_to_token(processor.tokenizer.eos_id)!r}")
        end_ids = processor.tokenizer.encode(end, add_bos=False) if end else []
        if end_ids and end_ids[-1] not in processor.end_ids:
            log(f"note: the chat template ends an answer with {end!r} (id {end_ids[-1]}), which is not an end id "
                f"of the checkpoint ({processor.end_ids}, from generation_config.json / config.json / the "
                f"tokenizer's EOS): generation will not stop there")
    else:
        log(f"prompt template: {processor.resolve_template(template)}")
    kept, reasons = [], Counter()
    for i, ex in enumerate(examples):
        try:
            kept.append(encode_example(i, ex, processor, image_root, template, max_len, gamma))
        except Unusable as r:
            if strict:
                raise ValueError(f"example {ex.id}: {r.reason}: {r}") from None
            reasons[r.reason] += 1
    for reason, n in sorted(reasons.items()):
        log(f"skipped {n} example(s) at tokenization: {reason}")
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
            pad_to: int | None = None, vision_always: bool = False) -> dict:
    """Right-padded batch of sequences prompt + response for each `which` in ("chosen", "rejected").

    Rows are ordered [all items' `which[0]`, all items' `which[1]`, ...], so for which=["chosen", "rejected"] the
    chosen sequences are rows [0, P) and the rejected ones rows [P, 2P). images[i] is item i's image or None
    (text-only); a batch may mix both.
    Returns input_ids (R,T), attention_mask (R,T), labels (R,T) (-100 off-response and on the later questions of a
    conversation), token_weights (R,T) float, pixel_values / image_sizes of the distinct images present (each processed
    once, an image object shared by several items once; None when no item has one) and image_index
    (n_rows_with_image,): the image of each `<image>` occurrence in row order, for the model's forward (the vision
    tower runs once per image, not once per row), and row_image (R,): each row's image among those present, -1 for a
    text-only row (select_rows uses it).
    vision_always: a batch without any image still carries one blank crop_size x crop_size image that no row uses
    (image_index empty): under FSDP every rank must run the vision tower every step, since its parameters are
    gathered and its gradients reduced collectively (the model then adds 0 x its features).
    """
    seqs, weights, label_rows = [], [], []
    for side in which:
        for it in items:
            resp = getattr(it, f"{side}_ids")
            w = getattr(it, f"{side}_w")
            w = [1.0] * len(resp) if w is None else w.tolist()
            labelled = getattr(it, f"{side}_labelled", None) or [True] * len(resp)
            ids = it.prompt_ids + resp
            n_p = len(it.prompt_ids)
            # position t predicts ids[t+1]: response token j is predicted at position n_p - 1 + j
            seqs.append(ids)
            label_rows.append([-100] * (n_p - 1) + [t if m else -100 for t, m in zip(resp, labelled)] + [-100])
            weights.append([0.0] * (n_p - 1) + [x if m else 0.0 for x, m in zip(w, labelled)] + [0.0])
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
    # one image object shown by several items (an RL rollout's k samples of a prompt, the two samples of an online
    # pair) is processed and run through the vision tower once: the rows index the same features
    pos, distinct = image_positions(images)
    batch["row_image"] = row_image(pos, len(which))
    if distinct:
        batch.update(processor.image_processor.process(distinct))
        batch["image_index"] = batch["row_image"][batch["row_image"] >= 0]
    elif vision_always:
        S = processor.image_processor.crop_size
        batch.update(processor.image_processor.process([Image.new("RGB", (S, S))]))
        batch["image_index"] = torch.zeros(0, dtype=torch.long)
    return batch


def image_positions(images: list) -> tuple[list[int], list]:
    """-> (pos, distinct): pos[i] the position of images[i] among the distinct image objects in order of first
    appearance (-1 for None), and those objects. The same object twice counts once (identity, not pixel equality:
    two files with equal pixels are two images). E.g. [a, None, a, b] -> ([0, -1, 0, 1], [a, b])."""
    first, pos, distinct = {}, [], []
    for im in images:
        if im is None:
            pos.append(-1)
            continue
        if id(im) not in first:
            first[id(im)] = len(distinct)
            distinct.append(im)
        pos.append(first[id(im)])
    return pos, distinct


def row_image(pos: list[int], n_sides: int) -> torch.Tensor:
    """(R,) long for a batch of n_sides blocks of len(pos) rows (row r shows item r % len(pos)): each row's image
    among the images of the batch (pos from image_positions), -1 for a text-only row.
    E.g. pos [0, -1, 1], 2 sides -> [0, -1, 1, 0, -1, 1]."""
    return torch.tensor(list(pos) * n_sides, dtype=torch.long)


def select_rows(batch: dict, rows, vision_always: bool = False) -> dict:
    """The batch restricted to `rows` (a slice or index tensor of rows) for a forward on part of it: per-row
    tensors cut, image_index recomputed from row_image (pixel_values kept whole, image_index points into them).
    When none of these rows has an image: pixel_values / image_sizes / image_index None, or with vision_always
    (FSDP, see collate) the images kept and image_index empty."""
    per_row = ("input_ids", "attention_mask", "labels", "token_weights", "row_image")
    out = {k: (v[rows] if k in per_row and v is not None else v) for k, v in batch.items()}
    ri = out.get("row_image")
    if ri is not None:
        has = ri >= 0
        if bool(has.any()) or (vision_always and out.get("pixel_values") is not None):
            out["image_index"] = ri[has]
        else:
            out["image_index"] = out["pixel_values"] = out["image_sizes"] = None
    return out


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
