"""The toy's evaluation: CHAIR and POPE on the held-out scenes, the yes/no probe, where hallucinations come from.

`evaluate(model_dir, world, out_dir, ...)` -> flat metrics dict (through nanoalign.eval.run_task, greedy);
`table(before, after)` the before/after markdown table of the default run. What each metric shows: docs/toy_world.md.
"""
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from nanoalign.toy.base import load_model
from nanoalign.toy.files import load_scenes
from nanoalign.toy.oracle import parse
from nanoalign.toy.world import KINDS, PAIRED, exist_question, groups


def evaluate(model_dir, world, out_dir, max_new_tokens=96, batch_size=32, progress=True, template="vicuna_v1"):
    """CHAIR (captions) and POPE (yes/no) of a checkpoint on the held-out scenes -> flat metrics dict."""
    from nanoalign import eval as E
    from nanoalign.generate import generate_text
    model, processor = load_model(model_dir)
    memo = {}

    def gen(max_new):
        def fn(images, prompts):
            keys = [(p, hashlib.sha1(im.tobytes()).hexdigest()) for im, p in zip(images, prompts)]
            todo = [i for i, k in enumerate(keys) if k not in memo]
            if todo:
                outs = generate_text(model, processor, [images[i] for i in todo], [prompts[i] for i in todo],
                                     template, max_new_tokens=max_new, batch_size=batch_size)
                memo.update({keys[i]: o for i, o in zip(todo, outs)})
            return [memo[k] for k in keys]
        return fn

    bad = Counter()
    root = world["images"]
    syn = json.loads(Path(world["synonyms"]).read_text())
    chair_ex, _ = E.load_chair([world["chair_questions"]], root, world["chair_coco"], bad, syn)
    chair = E.run_task("chair", chair_ex, gen(max_new_tokens), Path(out_dir, "chair"), batch_size=batch_size,
                       synonyms=syn, bad=bad, progress=progress, name="chair")
    pope_ex = E.dedupe(E.load_pope([world["pope"]], root, bad), bad)
    pope = E.run_task("pope", pope_ex, gen(4), Path(out_dir, "pope"), batch_size=batch_size * 2, bad=bad,
                      progress=progress, name="pope")
    out = {k: chair[k] for k in ("chair_i", "chair_s", "recall", "mean_length")}
    out.update(pope_acc=pope["accuracy"], pope_f1=pope["f1"])
    for split, m in pope.get("splits", {}).items():
        out[f"pope_{split}_acc"], out[f"pope_{split}_f1"] = m["accuracy"], m["f1"]
    out.update(hallucination_kinds(Path(out_dir, "chair", "results.jsonl")))
    out.update(yesno_auc(model, processor, world, template, batch_size=batch_size))
    return out


def yesno_auc(model, processor, world, template, n_scenes=100, batch_size=32):
    """Existence grounding without sampling: for the first n_scenes held-out scenes and every kind K, the score
    logit("Yes") - logit("No") at the answer's first token of "Is there a K in the image?" -> {"yesno_auc": ROC AUC of
    present vs absent kinds, "yesno_auc_companion": present vs absent partners/companions of present kinds}.
    0.5 is a model blind to the question (the toy base before its grounding stage); POPE's accuracies move only once
    this is high (docs/toy_world.md)."""
    from nanoalign.image import open_image
    from nanoalign.tokenizer import build_prompt
    tok = processor.tokenizer
    yes, no = tok.encode("Yes", add_bos=False)[0], tok.encode("No", add_bos=False)[0]
    scores, present, companion = [], [], []
    items = []
    for name, sc in list(load_scenes(world["scenes_eval"]).items())[:n_scenes]:
        gs = groups(sc)
        items += [(name, k) for k in KINDS]
        present += [k in gs for k in KINDS]
        companion += [k not in gs and any(PAIRED.get(p) == k for p in gs) for k in KINDS]
    images = {}
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            part = items[i:i + batch_size]
            for n, _ in part:
                if n not in images:
                    images[n] = open_image(os.path.join(world["images"], n))
            texts = [build_prompt(exist_question(k), template) for _, k in part]
            enc = processor(texts, [images[n] for n, _ in part], padding_side="left")
            h = model(enc["input_ids"], enc["pixel_values"], attention_mask=enc["attention_mask"])
            lg = model.logits(h[:, -1]).float()
            scores += (lg[:, yes] - lg[:, no]).tolist()
    s, pos, comp = np.array(scores), np.array(present), np.array(companion)

    def auc(a, b):  # P(score of a random positive > of a random negative), ties half
        if not len(a) or not len(b):
            return float("nan")
        return float((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())
    return {"yesno_auc": auc(s[pos], s[~pos]), "yesno_auc_companion": auc(s[pos], s[comp])}


def hallucination_kinds(results_path):
    """Where the hallucinated objects of CHAIR's captions come from -> {"companion_fraction": share that is the absent
    partner/companion of an object in the scene, "halluc_instead": hallucinated kinds per caption named while a
    present kind was still unnamed (a wrong kind instead of a real one), "halluc_extra": per caption, named once every
    present kind was (the caption should have stopped)}; these two count a kind's first mention only. Why these
    two: pairs remove the one kind far more easily than the other (docs/toy_world.md)."""
    n = c = instead = extra = captions = 0
    with open(results_path) as f:
        for r in map(json.loads, filter(str.strip, f)):
            captions += 1
            gt, halluc = set(r.get("gt_objects") or []), r.get("hallucinated") or []
            n += len(halluc)  # CHAIR's list: a kind once per mention
            c += sum(PAIRED.get(k) in gt for k in halluc)
            named = set()
            for k in (m["kind"] for m in parse(r.get("answer") or "")):
                if k in halluc and k not in named:
                    extra += gt <= named
                    instead += not gt <= named
                named.add(k)
    return {"companion_fraction": c / n if n else 0.0, "halluc_instead": instead / max(1, captions),
            "halluc_extra": extra / max(1, captions)}


COLUMNS = ["chair_i", "chair_s", "recall", "mean_length", "pope_random_acc", "pope_popular_acc",
           "pope_adversarial_acc", "pope_adversarial_f1", "yesno_auc", "yesno_auc_companion", "companion_fraction",
           "halluc_instead", "halluc_extra"]


def table(before, after):
    """The before/after markdown table of the metrics in COLUMNS that both dicts hold (in %, mean_length in words)."""
    lines = ["| metric | before (SFT) | after | change |", "|---|---|---|---|"]
    for k in COLUMNS:
        if k in before and k in after:
            pct = k != "mean_length"
            f = (lambda v: "n/a" if v is None else f"{100 * v:.1f}") if pct else \
                (lambda v: "n/a" if v is None else f"{v:.1f}")  # None: a ratio over zero rows (metrics.py)
            change = None if before[k] is None or after[k] is None else after[k] - before[k]
            lines.append(f"| {k} | {f(before[k])} | {f(after[k])} | {f(change)} |")
    return "\n".join(lines)
