"""Does alignment move a toy model's precision/recall curve, or only its point on that curve?

    python bench/toy_vote_curve.py --model ~/.cache/nanoalign/toy/<hash>/base/final --model runs/ddpo/final

For each checkpoint, on the toy world's 300 held-out scenes (or --fresh N new ones):
- the greedy captions' object Recall and CHAIR_i (the point the toy evaluation reports);
- the curve of self-consistency: --samples captions sampled at --temperature, and the kinds named in at least t of
  them (t = 1..samples) scored as a caption would be. It shows what the model knows about the scene's objects
  whatever the order it names them in;
- at each hallucinated kind of the greedy captions (first mention), teacher-forced on the caption up to its noun:
  the probability of the hallucinated kind and of all present kinds not yet named (left out when two kinds share
  a first token, as in the tests' tiny tokenizer).
Scores count each kind once per caption (a vote has no repeats), so greedy CHAIR_i comes out above the evaluation's,
which counts every mention (default SFT base: 15.1 against 13.3). Writes OUT.csv and OUT.png (matplotlib) and prints
the numbers.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoalign.toy import world as tw  # noqa: E402
from nanoalign.toy.base import SETTINGS, cache_dir, load_model  # noqa: E402
from nanoalign.toy.files import load_scenes  # noqa: E402
from nanoalign.toy.oracle import parse  # noqa: E402


def score(named, present):
    """named, present: (scenes, kinds) bool arrays -> (Recall, CHAIR_i) in %."""
    hit, wrong = (named & present).sum(), (named & ~present).sum()
    return 100 * hit / max(1, present.sum()), 100 * wrong / max(1, hit + wrong)


def named_kinds(caption):
    return {m["kind"] for m in parse(caption)}


def held_out(world, fresh=0):
    """The world's held-out scenes and images, or with fresh > 0 that many eval-split scenes beyond them (drawn and
    rendered here: no run has been evaluated, let alone tuned, on them) -> [(name, scene)], [PIL image]."""
    from PIL import Image

    from nanoalign.image import open_image
    scenes = list(load_scenes(world / "scenes_eval.jsonl").items())
    if fresh:
        n = len(scenes)
        scenes = [(f"fresh_{n + i}", sc) for i, sc in enumerate(tw.make_scenes(n + fresh, 0, "eval")[n:])]
        return scenes, [Image.fromarray(tw.render(sc)) for _, sc in scenes]
    return scenes, [open_image(world / "images" / name) for name, _ in scenes]


def curve(model_dir, world, samples, temperature, template, batch_size=64, fresh=0):
    """-> dict(greedy=(R, C), votes=[(t, R, C)], p_halluc, p_present, n_halluc) for one checkpoint."""
    from nanoalign.generate import generate_text
    from nanoalign.tokenizer import build_prompt
    model, processor = load_model(model_dir)
    scenes, images = held_out(world, fresh)
    present = np.array([[k in tw.groups(sc) for k in tw.KINDS] for _, sc in scenes])
    prompts = [tw.CAPTION_PROMPT] * len(scenes)

    def named(captions):
        return np.array([[k in named_kinds(c) for k in tw.KINDS] for c in captions])
    greedy = generate_text(model, processor, images, prompts, template, max_new_tokens=96, batch_size=batch_size)
    votes = np.zeros(present.shape, int)
    for s in range(samples):
        votes += named(generate_text(model, processor, images, prompts, template, max_new_tokens=96,
                                     temperature=temperature, batch_size=batch_size, seed=s))
    # teacher-forced choice at each hallucinated noun of the greedy captions
    tok = processor.tokenizer
    first = {}  # first token of " kind" / " kinds" -> kinds (the default world's tokenizer keeps them apart)
    for k in tw.KINDS:
        for form in (k, tw.PLURALS[k]):
            first.setdefault(tok.encode(" " + form, add_bos=False)[0], set()).add(k)
    shared = any(len(v) > 1 for v in first.values())  # then the next token does not say the kind: no probabilities
    p_h, p_p = [], []
    with torch.no_grad():
        for (_, sc), image, cap in zip(scenes, images, [] if shared else greedy):
            gs, said = tw.groups(sc), set()
            for m in parse(cap):
                k = m["kind"]
                if k != "__total__" and k not in gs and k not in said:
                    text = build_prompt(tw.CAPTION_PROMPT, template) + " " + cap[:m["noun"][0]].rstrip()
                    enc = processor([text], [image])
                    h = model(enc["input_ids"], enc["pixel_values"], attention_mask=enc["attention_mask"])
                    p = torch.softmax(model.logits(h[:, -1]).float(), -1)[0]
                    pk = {next(iter(v)): 0.0 for v in first.values()}
                    for t, v in first.items():
                        pk[next(iter(v))] += float(p[t])
                    p_h.append(pk[k])
                    p_p.append(sum(pk[g] for g in gs if g not in said))
                said.add(k)
    return {"greedy": score(named(greedy), present),
            "votes": [(t, *score(votes >= t, present)) for t in range(1, samples + 1)],
            "p_halluc": float(np.mean(p_h)) if p_h else float("nan"),
            "p_present": float(np.mean(p_p)) if p_p else float("nan"), "n_halluc": len(p_h)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="toy checkpoint folder (repeat to compare)")
    ap.add_argument("--label", action="append", help="a name per --model (default: the folder names)")
    ap.add_argument("--toy-cache", default=None, help="toy cache folder (default: the default world's)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--fresh", type=int, default=0, help="score N new held-out scenes instead of the world's 300")
    ap.add_argument("--out", default="bench/results/toy_vote_curve", help="writes OUT.csv and OUT.png")
    a = ap.parse_args(argv)
    labels = a.label or [Path(m).parent.name if Path(m).name == "final" else Path(m).name for m in a.model]
    if len(labels) != len(a.model):
        ap.error(f"{len(a.model)} --model but {len(labels)} --label")
    world = cache_dir({**SETTINGS, "toy_seed": 0}, a.toy_cache) / "world"
    if not (world / "scenes_eval.jsonl").is_file():
        raise SystemExit(f"error: {world}: no toy world here; run `train.py` once (or give --toy-cache)")
    torch.set_num_threads(os.cpu_count() or 1)
    rows, results = [], {}
    for label, m in zip(labels, a.model):
        if not (Path(m) / "config.json").is_file():
            raise SystemExit(f"error: --model {m}: no config.json (a checkpoint folder, as OUT/final)")
        r = results[label] = curve(m, world, a.samples, a.temperature, SETTINGS["template"], fresh=a.fresh)
        rows.append((label, "greedy", "", *r["greedy"]))
        rows += [(label, "votes", t, rc, ch) for t, rc, ch in r["votes"]]
        probs = (f"at its {r['n_halluc']} hallucinated nouns p(wrong kind) {r['p_halluc']:.2f}, p(present unnamed "
                 f"kinds) {r['p_present']:.2f}" if r["n_halluc"] else "no kind probabilities (no hallucinated noun, "
                 "or kinds share a first token in this tokenizer)")
        print(f"{label}: greedy Recall {r['greedy'][0]:.1f} CHAIR_i {r['greedy'][1]:.1f}; {probs}")
        print("  votes >= t of " + str(a.samples) + ": " + ", ".join(f"{t}: {rc:.1f}/{ch:.1f}"
                                                                     for t, rc, ch in r["votes"]) + " (Recall/CHAIR_i)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "kind", "min_votes", "recall", "chair_i"])
        w.writerows([(lab, kind, t, f"{rc:.2f}", f"{ch:.2f}") for lab, kind, t, rc, ch in rows])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out.with_suffix('.csv')} (no matplotlib: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (label, r) in enumerate(results.items()):
        c = f"C{i}"
        ax.plot([v[2] for v in r["votes"]], [v[1] for v in r["votes"]], "-o", ms=3, color=c,
                label=f"{label}: kinds in >= t of {a.samples} samples (T {a.temperature})")
        ax.plot([r["greedy"][1]], [r["greedy"][0]], "*", ms=14, color=c, label=f"{label}: greedy captions")
    ax.set_xlabel("CHAIR_i (%)")
    ax.set_ylabel("object Recall (%)")
    ax.set_title(f"toy world, {a.fresh} fresh held-out scenes" if a.fresh else "toy world, 300 held-out scenes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
