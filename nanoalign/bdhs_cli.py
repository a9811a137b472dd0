"""The BDHS command line: `python -m nanoalign.bdhs` (the algorithm: nanoalign/bdhs.py).

Reads a data file with reference answers, writes one preference row per example to --out (JSONL, --data-format
prefs; appended to, so a rerun skips the ids already there and redoes a torn last line), and prints the paper's
Figure 10 table (responses non-similar after each iteration) and the counts of skipped or noted examples. Each
example's seeds come from --seed and its id (example_seed), so the rows do not depend on batching or resuming.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time

from nanoalign.bdhs import (DEFAULT_EMBEDDER, MAX_ITERS, NOISE_STEPS, OFFLINE_EMBEDDER, SIM_THRESHOLD, SIM_THRESHOLDS,
                            UNCALIBRATED, BDHSSettings, bdhs_rejected, resolve_embedder)
from nanoalign.engine import RHO_TH
from nanoalign.tokenizer import TEMPLATE_CHOICES


def example_seed(seed: int, example_id: str) -> int:
    """Stable per-example base seed (independent of batching and resuming)."""
    h = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x3FFFFFFF


def similarity_table(nonsimilar: list[int], n: int, max_iters: int) -> str:
    """Markdown table of the paper's Figure 10: responses already non-similar after each iteration."""
    lines = ["| iteration | guidance | non-similar | % of examples |", "|---|---|---|---|"]
    for t, c in enumerate(nonsimilar, 1):
        lines.append(f"| {t} | {'reference' if t < max_iters else 'none'} | {c} | {100.0 * c / max(n, 1):.1f} |")
    return "\n".join(lines)


def _progress(done, total, t0, extra=""):
    el = time.time() - t0
    rate = done / el if el > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    w = 30
    fill = int(w * done / max(total, 1))
    eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
    print(f"\r[{'#' * fill}{'.' * (w - fill)}] {done}/{total} {rate:.2f} ex/s ETA {eta_s} {extra}", end="",
          file=sys.stderr, flush=True)


def _finished_ids(path: str) -> set:
    done = set()
    if not os.path.isfile(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                done.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from an interrupted run is redone
    return done


def main(argv=None) -> int:
    from nanoalign.cli import Parser, missing_path
    p = Parser(prog="python -m nanoalign.bdhs",
                                description="BDHS rejected responses -> preference JSONL (--data-format prefs).")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help="data file with reference answers")
    p.add_argument("--data-format", default="llava", choices=["llava", "povid", "prefs", "rlhfv", "vlfeedback"],
                   help="format of --data; the reference is the chosen / first gpt answer")
    p.add_argument("--image-root", default=None, help="folder of the data's images (default: the data's folder)")
    p.add_argument("--out", required=True, help="output prefs JSONL (appended to: reruns skip finished ids)")
    p.add_argument("--rho-th", type=float, default=RHO_TH, help=f"mask threshold of Eq. 6 (default {RHO_TH})")
    p.add_argument("--sim-threshold", type=float, default=None,
                   help=f"resample while cosine similarity >= this (default: the embedder's, {SIM_THRESHOLD} for "
                        f"{DEFAULT_EMBEDDER})")
    p.add_argument("--max-iters", type=int, default=MAX_ITERS, help="iterations; the last one is guidance-free")
    p.add_argument("--noise-steps", type=int, default=None, help=f"POVID noise step k (paper {NOISE_STEPS}); off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                   help=f"sentence-transformers name or local path, or {OFFLINE_EMBEDDER} (offline package)")
    p.add_argument("--limit", type=int, default=None, help="first N examples only")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-sentence-tokens", type=int, default=48)
    p.add_argument("--max-free-tokens", type=int, default=256)
    p.add_argument("--template", default="auto", choices=TEMPLATE_CHOICES,
                   help="auto: the checkpoint's chat template if it has one, else vicuna_v1")
    args = p.parse_args(argv)

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if not 0 <= args.rho_th <= 1:
        return fail(f"--rho-th {args.rho_th}: must be in [0, 1]")
    if args.sim_threshold is not None and not -1 <= args.sim_threshold <= 1:
        return fail(f"--sim-threshold {args.sim_threshold}: must be in [-1, 1]")
    if args.max_iters < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 0):
        return fail("--max-iters and --batch-size must be >= 1, --limit >= 0")
    if args.noise_steps is not None and not 0 <= args.noise_steps < 1000:
        return fail(f"--noise-steps {args.noise_steps}: must be in [0, 1000)")
    from nanoalign.checkpoint import load_for_cli
    bad = missing_path([("--model", args.model), ("--data", args.data), ("--image-root", args.image_root)],
                       hub_ok=("--model",))  # a hub id org/name is fetched by load_for_cli
    if bad:
        return fail(bad)
    from nanoalign.data import load_examples, load_image
    try:
        examples, skipped = load_examples(args.data, args.data_format, args.image_root)
    except (FileNotFoundError, ValueError) as e:
        return fail(f"--data {args.data}: {e}")
    if skipped:
        print(str(skipped), file=sys.stderr)
    try:
        model, processor = load_for_cli(args.model)
        processor.resolve_template(args.template)
    except ValueError as e:
        return fail(f"--model {e}")
    try:
        embedder, used = resolve_embedder(args.embedder)
    except ValueError as e:
        return fail(f"--embedder {args.embedder}: {e}")
    threshold = args.sim_threshold if args.sim_threshold is not None else SIM_THRESHOLDS.get(used, SIM_THRESHOLD)
    print(f"embedder: {used}, similarity threshold {threshold}"
          + (" (given)" if args.sim_threshold is not None else
             " (not calibrated for this embedder: set --sim-threshold)" if used in UNCALIBRATED or
             used not in SIM_THRESHOLDS else " (its default)"), file=sys.stderr)
    settings = BDHSSettings(rho_th=args.rho_th, sim_threshold=threshold, max_iters=args.max_iters,
                            noise_steps=args.noise_steps, temperature=args.temperature, top_p=args.top_p,
                            max_sentence_tokens=args.max_sentence_tokens, max_free_tokens=args.max_free_tokens,
                            template=args.template, embedder=used)
    if args.limit is not None:
        examples = examples[:args.limit]
    finished = _finished_ids(args.out)
    todo = [e for e in examples if e.id not in finished]
    print(f"{len(examples)} examples, {len(examples) - len(todo)} already in {args.out}, {len(todo)} to do",
          file=sys.stderr)
    counts: dict = {}
    stats: dict = {}
    t0 = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        for c0 in range(0, len(todo), args.batch_size):
            chunk = todo[c0:c0 + args.batch_size]
            imgs, ok = [], []
            for e in chunk:
                try:
                    imgs.append(None if e.image is None else load_image(e, args.image_root))
                    ok.append(e)
                except ValueError as err:  # ImageError: missing_image / unreadable_image / image_too_large
                    reason = getattr(err, "reason", "unreadable_image")
                    counts[reason] = counts.get(reason, 0) + 1
            results = bdhs_rejected(model, processor, imgs, [e.prompt for e in ok], [e.chosen for e in ok],
                                    settings, embedder=embedder, seeds=[example_seed(args.seed, e.id) for e in ok],
                                    stats=stats) if ok else []
            for e, r in zip(ok, results):
                for n in r.notes:
                    if n in ("no_sentence_boundary", "all_image_tokens_masked"):
                        counts[n] = counts.get(n, 0) + 1
                if r.rejected is None:
                    counts[r.reason] = counts.get(r.reason, 0) + 1
                    continue
                if r.rejected.strip() == e.chosen.strip():
                    counts["identical_to_reference"] = counts.get("identical_to_reference", 0) + 1
                row = {"id": e.id, "image": e.image if isinstance(e.image, str) else None, "prompt": e.prompt,
                       "chosen": e.chosen, "rejected": r.rejected, "mask_seed": r.mask_seed,
                       "iteration": r.iteration, "similarity": round(r.similarity, 6), "guided": r.guided,
                       "kept_image_tokens": r.kept_image_tokens, "rho_th": settings.rho_th}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            _progress(min(c0 + args.batch_size, len(todo)), len(todo), t0)
    print(file=sys.stderr)
    n = stats.get("examples", 0)
    if n:
        print(f"non-similar responses per iteration (threshold {settings.sim_threshold}, {n} examples):")
        print(similarity_table(stats["nonsimilar"], n, settings.max_iters))
    for k, v in sorted(counts.items()):
        note = {"no_sentence_boundary": " (kept: treated as one sentence)",
                "all_image_tokens_masked": " (kept: generated from text alone)",
                "identical_to_reference": " (written; train.py skips such pairs)"}.get(k, " (skipped)")
        print(f"{k}: {v}{note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
