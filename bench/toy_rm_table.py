"""The Apple study's Table 7 in miniature: reward models trained on one family of preference data, evaluated on
held-out pairs of every family, on the toy world.

    python bench/toy_rm_table.py [--toy-cache DIR] [--toy-seed 0] [--steps 150] [--out runs/rm_table]
        [--families caption yesno povid] [--heldout-scenes 300]

Amirloo et al. 2024 (arXiv:2407.02477, Sec. 5.5, Table 7) train reward models on POVID, RLHF-V and VLFeedback pairs
and find that each is near-perfect on its own family's held-out pairs and poor on the others (POVID-trained: 0.99 on
POVID, 0.24 on RLHF-V). The toy world has three families of the same kinds, all from ground truth:
  caption  the SFT base's own sampled captions: RLHF-V-style corrections and the best against the worst of 8
           samples by the oracle score (what `--algo dpo` trains on; like RLHF-V / VLFeedback);
  yesno    existence questions "Is there a K in the image?" with the true against the false one-word answer;
  povid    the ground-truth caption against a copy with an object swapped for a hallucinated one (POVID-style).
Training pairs come from the training scenes, held-out pairs from the held-out (evaluation) scenes, which no model
was trained on. Each family trains one reward model (`train.py --algo rm`, same steps, lr and batch), then
`nanoalign.eval_rm` scores every model on every held-out family. Writes OUT/pairs/*.jsonl, OUT/rm_<family>/ (the
runs), OUT/table.md and OUT/table.json; finished parts are reused, so an interrupted run continues.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py and nanoalign/ live at the repo root
import train  # noqa: E402
from nanoalign import eval_rm  # noqa: E402
from nanoalign.toy import base as toy_base  # noqa: E402
from nanoalign.toy.pairs import build_pairs  # noqa: E402
from nanoalign.toy.run import ALIGN  # noqa: E402

FAMILIES = ("caption", "yesno", "povid")


def read_jsonl_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def family_pairs(family, base, world, out_path, n_scenes, seed):
    """Write the family's pairs for the scenes of world["scenes_train"] to out_path -> number of rows."""
    if Path(out_path).is_file():
        return len(read_jsonl_rows(out_path))
    al = ALIGN["default"]
    tmp = Path(str(out_path) + ".all")
    if family == "povid":
        build_pairs("povid", base, world, tmp, n_scenes, seed)
        rows = read_jsonl_rows(tmp)
    else:  # one sampling run gives both: caption rows ask for a description, yes/no rows ask "Is there ..."
        build_pairs("dpo", base, world, tmp, n_scenes, seed, samples=al["samples"], temperature=al["temperature"],
                    template=toy_base.SETTINGS["template"], yesno=al["yesno"], ranked=al["ranked"])
        is_yesno = lambda r: r["prompt"].split("\n", 1)[-1].startswith("Is there")
        rows = [r for r in read_jsonl_rows(tmp) if is_yesno(r) == (family == "yesno")]
    tmp.unlink()
    with open(str(out_path) + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    Path(str(out_path) + ".tmp").replace(out_path)
    return len(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy-cache", default=None, help="toy world cache (default: the toy run's)")
    p.add_argument("--toy-seed", type=int, default=0)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--train-scenes", type=int, default=1000, help="training scenes the pairs are made from")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each reward model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/rm_table")
    args = p.parse_args(argv)
    for name in ("train_scenes", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    out = Path(args.out)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    settings = dict(toy_base.SETTINGS)
    cache = toy_base.cache_dir({**settings, "toy_seed": args.toy_seed}, args.toy_cache)
    world, base = toy_base.prepare_base(train.main, train.parse_args, cache, settings, args.toy_seed)
    heldout_world = {**world, "scenes_train": world["scenes_eval"]}  # build_pairs reads its scenes from this key
    n_eval = len(read_jsonl_rows(world["scenes_eval"]))
    files = {}
    for fam in args.families:
        files[fam, "train"] = out / "pairs" / f"{fam}_train.jsonl"
        files[fam, "heldout"] = out / "pairs" / f"{fam}_heldout.jsonl"
        n_tr = family_pairs(fam, base, world, files[fam, "train"], args.train_scenes, args.seed)
        n_ho = family_pairs(fam, base, heldout_world, files[fam, "heldout"], n_eval, args.seed + 1)
        print(f"rm table: {fam}: {n_tr} training pairs, {n_ho} held-out pairs", flush=True)
    models = []
    for fam in args.families:
        run = out / f"rm_{fam}"
        if not (run / "final").is_dir():
            shutil.rmtree(run, ignore_errors=True)  # a run killed before its end: start it again
            train.main(train.parse_args([
                "--algo", "rm", "--model", str(base), "--data", str(files[fam, "train"]), "--data-format", "prefs",
                "--template", settings["template"], "--max-steps", str(args.steps), "--batch-size",
                str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed), "--out", str(run),
                "--save-every", "0"]))
        models.append(str(run / "final"))
    eargs = eval_rm.parse_args([a for m in models for a in ("--model", m)] +
                               [a for fam in args.families for a in ("--data", str(files[fam, "heldout"]))])
    with torch.no_grad():
        res = eval_rm.evaluate(eargs)
    (out / "table.json").write_text(json.dumps(res, indent=1))
    table = eval_rm.markdown_table(res)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
