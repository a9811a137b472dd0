"""Batched text generation for LLaVA models, and the generation CLI.

    python -m nanoalign.generate --model DIR --image PATH --prompt TEXT
        [--template auto|checkpoint|vicuna_v1|llava_v1|raw] [--max-new-tokens N] [--temperature T] [--top-p P]
        [--seed S] [--stop STR ...] [--ids]

prints the generated text, or with --ids the generated token ids (space-separated, one line, up to and including
the first end-of-turn id). `--template auto` (default) uses the checkpoint's chat template when it has one,
else vicuna_v1; `--template raw` passes the prompt unchanged (it must contain `<image>`); vicuna_v1 wraps it in LLaVA's
conversation format and puts "<image>\\n" in front when the prompt has none. Bad input -> "error: ..." and exit 2.
Greedy when temperature == 0; otherwise temperature + top-p sampling from a torch.Generator seeded with --seed.
"""
from __future__ import annotations

import sys

import torch

from nanoalign import engine
from nanoalign.tokenizer import IMAGE_TOKEN, TEMPLATE_CHOICES


@torch.no_grad()
def generate_ids(model, processor, images, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, stop=None,
                 generator=None, end_ids=None) -> list[list[int]]:
    """One batch: already-templated prompts (+ one image or None each) -> generated ids per row, up to and including
    the first end id (end_ids: a list of token ids, default processor.end_ids: every end-of-turn id of the
    checkpoint); through nanoalign.engine."""
    tok = processor.tokenizer
    enc = processor(prompts, images, padding_side="left")
    params = next(model.parameters())
    if enc["pixel_values"] is not None:
        enc["pixel_values"] = enc["pixel_values"].to(dtype=params.dtype)
    stop_fn = None
    if stop:
        def stop_fn(row, new_ids):  # one row's new ids so far -> stop?
            text = tok.decode(new_ids)
            return any(s in text for s in stop)
    end_ids = processor.end_ids if end_ids is None else list(end_ids)
    return engine.sample(model, enc, 1, temperature, top_p, max_new_tokens, end_ids, generator, processor.pad_id,
                         stop_fn).ids


def generate_text(model, processor, images, prompts, template="auto", max_new_tokens=64, temperature=0.0,
                  top_p=1.0, stop=None, batch_size=8, seed=0, end_ids=None) -> list[str]:
    """Answer each prompt about its image (None = text only); returns the decoded answers, cut before the first
    stop string when `stop` (a string or list of strings) is given. Runs in batches of `batch_size`, left-padded."""
    if images is None:
        images = [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"generate_text: {len(prompts)} prompts but {len(images)} images")
    if isinstance(stop, str):
        stop = [stop]
    texts = [processor.build_prompt(p, template, with_image=im is not None) for p, im in zip(prompts, images)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    answers = []
    for i in range(0, len(texts), batch_size):
        rows = generate_ids(model, processor, images[i:i + batch_size], texts[i:i + batch_size], max_new_tokens,
                            temperature, top_p, stop, generator, end_ids)
        for ids in rows:
            text = processor.tokenizer.decode(ids)
            for s in stop or []:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            answers.append(text.strip())
    return answers


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from nanoalign.cli import Parser, missing_path
    p = Parser(prog="python -m nanoalign.generate", description="Generate an answer about an image.")
    p.add_argument("--model", required=True, help="checkpoint dir (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question (with --template raw: the full prompt with <image>)")
    p.add_argument("--template", default="auto", choices=TEMPLATE_CHOICES,
                   help="auto: the checkpoint's chat template if it has one, else vicuna_v1; "
                        "checkpoint: its own; or a named one")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ids", action="store_true", help="print the generated token ids instead of the text")
    args = p.parse_args(argv)

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    bad = missing_path([("--model", args.model), ("--image", args.image)], hub_ok=("--model",))
    if bad:  # a hub id org/name is fetched by load_for_cli
        return fail(bad)
    if args.max_new_tokens < 1:
        return fail(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not args.temperature >= 0 or args.temperature == float("inf") or not 0 < args.top_p <= 1:  # NaN fails >=
        return fail("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.template == "raw" and IMAGE_TOKEN not in args.prompt:
        return fail(f"--prompt has no {IMAGE_TOKEN} (required with --template raw)")
    from nanoalign.image import ImageError, open_image
    try:
        image = open_image(args.image)  # the one opener: as train, eval and bdhs decode images
    except ImageError as e:  # missing file, not an image, truncated data, over the pixel limit
        first = (str(e).splitlines() or [""])[0]
        return fail(f"--image {args.image}: cannot read image ({e.reason}: {first})")
    from nanoalign.checkpoint import load_for_cli
    try:
        model, processor = load_for_cli(args.model)
    except ValueError as e:
        return fail(f"--model {e}")
    try:
        prompt = processor.build_prompt(args.prompt, args.template)
    except ValueError as e:
        return fail(str(e))
    if prompt.count(IMAGE_TOKEN) != 1:
        return fail(f"--prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tags; exactly one is needed for one image")
    generator = torch.Generator().manual_seed(args.seed)
    try:
        ids = generate_ids(model, processor, [image], [prompt], args.max_new_tokens, args.temperature, args.top_p,
                           args.stop, generator)[0]
    except ValueError as e:
        return fail(str(e))
    if args.ids:
        print(" ".join(str(i) for i in ids))
    else:
        text = processor.tokenizer.decode(ids)
        for s in args.stop or []:
            text = text.split(s)[0] if s in text else text
        print(text.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
