"""Draw a run's curves: `python -m nanoalign.plot OUT/metrics.jsonl [more.jsonl ...] [--out curves.png]`.

One panel per logged quantity (loss, rewards, margin, accuracy, learning rate, grad norm, ...), one line per run,
the step on the x axis (integer ticks). Quantities that never change (a constant learning rate) are listed under the
figure instead of drawn. When the compared runs use different losses (DPO's ~0.7 next to IPO's ~25), the loss gets
one panel per algorithm, so no curve is flattened by another's scale. Evaluation metrics logged during training
(`eval/...` keys) come after the training ones, drawn with markers at the steps they were measured.
`--keys margin,accuracy,eval/` draws only those (in that order).
Runs are named by the shortest trailing part of their folder path that tells them apart (`a/dpo`, `b/dpo`).
Needs matplotlib (`pip install nanoalign[plot]`).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# Panels in this order when present; other numeric keys follow alphabetically, then the eval/... keys.
PREFERRED = ["loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "logp_chosen", "logp_rejected",
             "nll", "sft_nll", "resp_len", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"]
SKIP = {"step", "time_s"}


def read_run(path: str) -> tuple[dict, list[dict]]:
    """(header, per-step records) of a metrics.jsonl; unreadable lines are left out and counted in one warning.
    Raises ValueError naming the file when it is not text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file (byte {e.start} is not UTF-8); expected train.py's "
                         "metrics.jsonl") from None
    header, rows, bad = {}, [], 0
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and "step" in rec:
            rows.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get("header"), dict):
            header = rec["header"]
    if bad:
        print(f"warning: {path}: {bad} unreadable line(s) skipped", file=sys.stderr)
    return header, rows


def read_metrics(path: str) -> list[dict]:
    """The per-step records of a metrics.jsonl (see read_run)."""
    return read_run(path)[1]


def run_names(paths: list[str]) -> list[str]:
    """A name per metrics file: the shortest trailing part of its folder that differs from every other's
    (`a/dpo` and `b/dpo` -> "a/dpo", "b/dpo"; `runs/dpo`, `runs/ipo` -> "dpo", "ipo"). Raises ValueError when two
    paths are the same file."""
    folders = [Path(p).resolve().parent for p in paths]
    for i, f in enumerate(folders):
        for j in range(i):
            if Path(paths[i]).resolve() == Path(paths[j]).resolve():
                raise ValueError(f"{paths[i]}: given twice")
    names = []
    for i, f in enumerate(folders):
        parts = f.parts
        for n in range(1, len(parts) + 1):
            tail = parts[-n:]
            if all(g.parts[-n:] != tail for j, g in enumerate(folders) if j != i):
                break
        names.append("/".join(tail))
    return names


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def panels(runs: dict[str, list[dict]], algos: dict[str, str] | None = None,
           only: list[str] | None = None) -> tuple[list[tuple[str, list]], dict]:
    """Which panels to draw: a list of (title, [(run name, key)]) and the constant quantities {key: value} left out.
    `algos` maps run name -> algorithm; with several algorithms the loss panel is split per algorithm. `only`: the
    keys to draw, in that order (a name ending in "/" selects every key it starts, e.g. "eval/"); raises ValueError
    naming a selector that matches no numeric key."""
    algos = algos or {}
    keys = {k for rows in runs.values() for r in rows for k, v in r.items() if k not in SKIP and _numeric(v)}
    if only:
        picked = []
        for sel in only:
            hits = sorted(k for k in keys if k.startswith(sel)) if sel.endswith("/") else [sel] if sel in keys else []
            if not hits:
                raise ValueError(f"--keys {sel}: no such numeric metric (have: {', '.join(sorted(keys))})")
            picked += [k for k in hits if k not in picked]
        return [(k, [(n, k) for n in runs]) for k in picked], {}
    constant = {}
    for k in sorted(keys):
        values = {r[k] for rows in runs.values() for r in rows if _numeric(r.get(k))}
        if len(values) == 1 and not k.startswith("eval/") and k != "loss":
            constant[k] = values.pop()
    keys -= set(constant)
    train = [k for k in PREFERRED if k in keys] + sorted(k for k in keys - set(PREFERRED) if not k.startswith("eval/"))
    evals = sorted(k for k in keys if k.startswith("eval/"))
    out = []
    for k in train + evals:
        groups = sorted({algos.get(n, "") for n in runs}) if k == "loss" else [""]
        if len(groups) > 1:  # one axis per loss scale
            out += [(f"loss ({g or '?'})", [(n, k) for n in runs if algos.get(n, "") == g]) for g in groups]
        else:
            out.append((k, [(n, k) for n in runs]))
    return out, constant


def plot_runs(runs: dict[str, list[dict]], out: str, smooth: int = 1, algos: dict[str, str] | None = None,
              only: list[str] | None = None) -> list[str]:
    """Plot the runs into a grid of panels saved as `out` (`only`: the keys, see panels); returns the titles drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    chosen, constant = panels(runs, algos, only)
    if not chosen:
        raise ValueError("no numeric metrics to plot")
    cols = min(4, len(chosen))
    rows_n = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n + (0.4 if constant else 0)), squeeze=False)
    for ax, (title, series) in zip(axes.flat, chosen):
        for name, key in series:
            pts = [(r["step"], r[key]) for r in runs[name] if _numeric(r.get(key))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if smooth > 1 and not key.startswith("eval/"):  # trailing moving average
                ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(ys))]
            ax.plot(xs, ys, label=name, linewidth=1.2, marker="o" if key.startswith("eval/") else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    if constant:
        fig.text(0.01, 0.005, "constant: " + ", ".join(f"{k} = {v:g}" for k, v in constant.items()), fontsize=8)
    fig.tight_layout(rect=(0, 0.03 if constant else 0, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [t for t, _ in chosen]


def main(argv=None) -> int:
    from nanoalign.cli import Parser, missing_path
    p = Parser(prog="python -m nanoalign.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl file(s) written by train.py")
    p.add_argument("--out", default=None, help="PNG to write (default: curves.png beside the first file)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (default 1: none)")
    p.add_argument("--keys", default=None, help="comma-separated metrics to draw, in order; 'eval/' draws every "
                   "eval key (default: every metric that changes)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error("--smooth must be >= 1")
    runs, algos = {}, {}
    bad = missing_path([("metrics", m) for m in args.metrics])
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        names = run_names(args.metrics)
        for name, m in zip(names, args.metrics):
            if not Path(m).is_file():
                raise ValueError(f"{m}: no such file")
            header, rows = read_run(m)
            if not rows:
                raise ValueError(f"{m}: no per-step records (is it a train.py metrics.jsonl?)")
            runs[name] = rows
            algos[name] = str(header.get("config", {}).get("algo", ""))
        out = args.out or str(Path(args.metrics[0]).with_name("curves.png"))
        only = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys is not None else None
        if only == []:
            raise ValueError(f"--keys {args.keys!r}: no metric named (comma-separated names, e.g. loss,margin,eval/)")
        titles = plot_runs(runs, out, args.smooth, algos, only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: plotting needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(titles)} panels, {len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
