"""The seeds' table in miniature: SFT base vs every alignment algorithm on the toy world, several seeds.

    python bench/toy_reproduce.py [--algos dpo ipo ...] [--seeds 0 1 2] [--max-steps N] [--out runs/reproduce]
        [--toy-cache DIR] [--toy-seed S]

Every run shares one cached world and SFT base model (nanoalign.toy); a seed changes the preference pairs (the
base model's sampled captions / the corruptions) and the alignment's data order. Writes OUT/<algo>-s<seed>/ (the
runs, each with its summary.json), OUT/results.md (mean +- sample standard deviation over seeds, metrics in %) and
OUT/results.png. Finished runs (summary.json present) are reused, so an interrupted reproduction continues.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py and nanoalign/ live at the repo root
import train  # noqa: E402
from nanoalign.toy import run as toy_run  # noqa: E402

METRICS = [("chair_i", "CHAIR_i", True), ("chair_s", "CHAIR_s", True), ("recall", "Recall", True),
           ("mean_length", "Len", False), ("pope_adversarial_acc", "POPE adv acc", True),
           ("pope_adversarial_f1", "POPE adv F1", True), ("pope_popular_acc", "POPE pop acc", True),
           ("pope_random_acc", "POPE rand acc", True), ("yesno_auc", "Y/N AUC", True)]


def available_algos():
    """The algorithms of train.py's table that align a model (not sft, rm), plus bdhs when nanoalign.bdhs has its
    library function."""
    algos = [name for name in train.ALGOS if name not in ("sft", "rm")]  # rm trains a reward model, not a captioner
    try:
        from nanoalign import bdhs
        if hasattr(bdhs, "bdhs_rejected"):
            algos.append("bdhs")
    except ImportError:
        pass
    return algos


def run_one(algo, seed, out, max_steps, toy_cache, toy_seed, settings=None):
    """The toy run of algo at seed into OUT/<algo>-s<seed> (reused when its summary.json exists) -> its summary."""
    path = Path(out) / f"{algo}-s{seed}"
    if (path / "summary.json").is_file():
        return json.loads((path / "summary.json").read_text())
    argv = ["--algo", toy_run.TOY_ONLY_ALGOS.get(algo, algo), "--seed", str(seed), "--out", str(path),
            "--toy-seed", str(toy_seed)]
    if max_steps:
        argv += ["--max-steps", str(max_steps)]
    if toy_cache:
        argv += ["--toy-cache", str(toy_cache)]
    args = train.parse_args(argv, toy_algo=algo)  # bdhs: train.py has no such --algo; its pairs align with dpo
    args.algo = algo
    return toy_run.default_run(args, train.main, train.parse_args, train.ALGOS, settings=settings)


def _fmt(vals, pct):
    vals = np.asarray([v for v in vals if v is not None], float) * (100 if pct else 1)
    if not len(vals):
        return "-"
    sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
    return f"{vals.mean():.1f} ± {sd:.1f}"


def results_table(runs):
    """runs: {algo: [summary, ...]} -> markdown (first row: the SFT base, from the runs' `before`)."""
    head = "| model | seeds | " + " | ".join(name for _, name, _ in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 2) + "|"]
    first = next(iter(runs.values()))
    rows = [("SFT base", [s["before"] for s in first])] + [(a, [s["after"] for s in ss]) for a, ss in runs.items()]
    for name, objs in rows:
        cells = [_fmt([o.get(k) for o in objs], pct) for k, _, pct in METRICS]
        lines.append(f"| {name} | {len(objs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["SFT base", *runs]
    first = next(iter(runs.values()))
    objs = [[s["before"] for s in first]] + [[s["after"] for s in ss] for ss in runs.values()]
    keys = [("chair_i", "CHAIR_i (lower is better)"), ("recall", "Recall"),
            ("pope_adversarial_acc", "POPE adversarial accuracy")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (k, title) in zip(axes, keys):
        vals = [np.asarray([o[k] for o in oo], float) * 100 for oo in objs]
        ax.bar(range(len(names)), [v.mean() for v in vals], yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in vals],
               color=["gray"] + ["C0"] * (len(names) - 1), capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/toy_reproduce.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", nargs="+", default=None, help="default: every available algorithm")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=None, help="alignment steps (default: the toy's per-algo budget)")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--toy-cache", default=None)
    p.add_argument("--toy-seed", type=int, default=0)
    a = p.parse_args(argv)
    known = available_algos()
    algos = a.algos or known
    bad = [x for x in algos if x not in known]
    if bad:
        print(f"error: --algos: unknown or unavailable {bad}; available: {known}", file=sys.stderr)
        return 2
    if a.max_steps is not None and a.max_steps < 1:
        print("error: --max-steps must be >= 1", file=sys.stderr)
        return 2
    runs = {algo: [] for algo in algos}
    for s in a.seeds:  # seed-major: an interrupted reproduction has every algorithm at the first seeds
        for algo in algos:
            runs[algo].append(run_one(algo, s, a.out, a.max_steps, a.toy_cache, a.toy_seed))
    md = results_table(runs)
    out = Path(a.out)
    cmd = "python bench/toy_reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.md").write_text(f"`{cmd.strip()}`\n\nHeld-out toy scenes, metrics in % (mean ± std over seeds "
                                    f"{a.seeds}).\n\n{md}\n")
    plot(runs, out / "results.png")
    print(md)
    print(f"wrote {out / 'results.md'} and {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
