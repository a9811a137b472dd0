"""Draw a run's curves: `python -m nanoalign.plot OUT/metrics.jsonl [more.jsonl ...] [--out curves.png]`.

One panel per logged quantity (loss, rewards, margin, accuracy, learning rate, grad norm, ...), one line per run,
the step on the x axis. Needs matplotlib (`pip install nanoalign[plot]`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Panels in this order when present; other numeric keys follow alphabetically.
PREFERRED = ["loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "logp_chosen", "logp_rejected",
             "nll", "sft_nll", "resp_len", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"]
SKIP = {"step", "time_s"}


def read_metrics(path: str) -> list[dict]:
    """The per-step records of a metrics.jsonl (the header line and unreadable lines are left out, and counted)."""
    rows, bad = [], 0
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and "step" in rec:
            rows.append(rec)
    if bad:
        print(f"warning: {path}: {bad} unreadable line(s) skipped", file=sys.stderr)
    return rows


def plot_runs(runs: dict[str, list[dict]], out: str, smooth: int = 1) -> list[str]:
    """Plot every numeric key of the runs into a grid of panels saved as `out`; returns the keys drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {k for rows in runs.values() for r in rows for k, v in r.items()
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in PREFERRED if k in keys] + sorted(keys - set(PREFERRED))
    if not keys:
        raise ValueError("no numeric metrics to plot")
    cols = min(4, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if smooth > 1:  # trailing moving average
                ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(ys))]
            ax.plot(xs, ys, label=name, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return keys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl file(s) written by train.py")
    p.add_argument("--out", default=None, help="PNG to write (default: curves.png beside the first file)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in steps")
    args = p.parse_args(argv)
    runs = {}
    for m in args.metrics:
        if not Path(m).is_file():
            print(f"error: {m}: no such file", file=sys.stderr)
            return 2
        rows = read_metrics(m)
        if not rows:
            print(f"error: {m}: no per-step records (is it a train.py metrics.jsonl?)", file=sys.stderr)
            return 2
        runs[Path(m).parent.name or m] = rows
    out = args.out or str(Path(args.metrics[0]).with_name("curves.png"))
    try:
        keys = plot_runs(runs, out, args.smooth)
    except ImportError:
        print("error: plotting needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(keys)} panels, {len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
