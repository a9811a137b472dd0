"""Held-out accuracy of reward models, and the train-set x eval-set table of the Apple study's Table 7.

    python -m nanoalign.eval_rm --model runs/rm_povid/final --model runs/rm_rlhfv/final \\
        --data povid_heldout.json --data-format povid --data rlhfv_heldout.parquet --data-format rlhfv \\
        [--image-root DIR ...] [--json table.json] [--batch-size 8] [--max-len 4096] [--limit N]

Accuracy of a reward model on a set of preference pairs (Amirloo et al. 2024, arXiv:2407.02477, Sec. 5.5: "its
ability to differentiate the chosen from the rejected response") = the fraction of pairs with r(chosen) > r(rejected);
a tie counts as wrong and is counted apart. Each model tokenizes with its own tokenizer and the template recorded in
its head file. --data / --data-format / --image-root pair up in order (one --data-format or --image-root may serve
every --data). Rows are the models (labelled with the train_data recorded at training, else the folder), columns the
data sets. Prints the markdown table; --json writes every cell (accuracy, pairs, ties, mean margin, skipped rows).
Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from nanoalign.batch import encode_all
from nanoalign.checkpoint import is_hub_id, resolve_model
from nanoalign.cli import Parser, missing_path
from nanoalign.data import FORMATS, load_examples
from nanoalign.reward import load_reward_model, pair_rewards


def parse_args(argv=None):
    p = Parser(prog="python -m nanoalign.eval_rm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="reward model folder (repeat for several)")
    p.add_argument("--data", action="append", required=True, help="held-out pairs file (repeat for several)")
    p.add_argument("--data-format", action="append", choices=FORMATS, help="format of each --data (default prefs)")
    p.add_argument("--image-root", action="append", help="image folder of each --data (default: the data's folder)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    p.add_argument("--max-len", type=int, default=4096, help="max tokens of a sequence; only responses are cut")
    p.add_argument("--limit", type=int, default=None, help="first N pairs of each data set only")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    n = len(args.data)
    for name in ("data_format", "image_root"):
        given = getattr(args, name)
        if given is None:
            setattr(args, name, [None if name == "image_root" else "prefs"] * n)
        elif len(given) == 1:
            setattr(args, name, given * n)
        elif len(given) != n:
            p.error(f"--{name.replace('_', '-')} given {len(given)} times for {n} --data "
                    "(give it once, or once per --data)")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    return args


def evaluate(args, log=print) -> dict:
    """{"models": [...], "data": [...], "results": [one dict per (model, data)]}; raises ValueError on bad input."""
    data = []
    for path, fmt, root in zip(args.data, args.data_format, args.image_root):
        examples, skipped = load_examples(path, fmt, root, needs="pairs", who="reward-model accuracy")
        if skipped["no_rejected"]:  # rows named from 1 (line N / item N / row N), as training names them
            raise ValueError(f"{path} ({fmt}): {skipped['no_rejected']} row(s) without a rejected response, the first "
                             f"at {skipped.rows['no_rejected'][0]}; reward-model accuracy needs pairs")
        data.append((path, fmt, root, examples[:args.limit] if args.limit else examples, skipped.total()))
    labels = _short_names(args.data)
    out = {"models": [], "data": [{"path": p, "format": f, "label": lab} for (p, f, *_), lab in zip(data, labels)],
           "results": []}
    for model_path in args.model:
        # a folder, or a hub id org/name (fetched into the hub cache); a missing folder is load_reward_model's error
        rm = load_reward_model(str(resolve_model(model_path)) if is_hub_id(model_path) else model_path,
                               max_len=args.max_len)
        train_data = rm.meta.get("train_data")
        out["models"].append({"path": model_path, "train_data": train_data})
        for (path, fmt, root, examples, n_skipped), label in zip(data, labels):
            encoded, rejected = encode_all(examples, rm.processor, root, rm.template, args.max_len,
                                           log=lambda *a: None)
            rc, rr = pair_rewards(rm, examples, encoded, root, args.batch_size)
            margin = rc - rr
            res = {"model": model_path, "train_data": train_data, "data": path, "data_label": label,
                   "data_format": fmt, "pairs": len(encoded), "accuracy": float((margin > 0).float().mean()),
                   "ties": int((margin == 0).sum()), "mean_margin": float(margin.mean()),
                   "skipped_rows": n_skipped, "unusable_pairs": sum(rejected.values())}
            out["results"].append(res)
            log(f"{model_path} on {label}: accuracy {res['accuracy']:.3f} ({res['pairs']} pairs)")
        del rm
    return out


def _short_names(paths: list[str]) -> list[str]:
    """File names when they are unique, else the paths as given."""
    names = [os.path.basename(p) for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def markdown_table(out: dict) -> str:
    """| reward model | train data | <eval set 1> | ... |, one row per model, accuracy per cell (the Table 7 layout)."""
    cols = [d["label"] for d in out["data"]]
    cell = {(r["model"], r["data_label"]): r for r in out["results"]}
    lines = ["| reward model | train data | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for m in out["models"]:
        accs = [f"{cell[(m['path'], c)]['accuracy']:.2f}" for c in cols]
        lines.append(f"| {m['path']} | {m['train_data'] or '?'} | " + " | ".join(accs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    bad = missing_path([("--model", m) for m in args.model] + [("--data", d) for d in args.data] +
                       [("--image-root", r) for r in args.image_root], hub_ok=("--model",))
    if bad:  # one line before any model loads
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        with torch.no_grad():
            out = evaluate(args, log=lambda s: print(s, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("NANOALIGN_DEBUG"):
            raise
        print(f"error: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
        return 2
    print(markdown_table(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
