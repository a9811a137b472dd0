"""The toy's preference pairs, made from the world's ground truth for each algorithm.

dpo / ipo / slic / ddpo: RLHF-V-style corrections of the base model's own sampled captions (corrected spans kept for
DDPO's dense weights), the best against the worst of several sampled captions by the oracle (VLFeedback-style), and
existence questions with the true answer chosen; povid: POVID-style one-fact corruptions of the ground-truth
captions; bdhs: nanoalign.bdhs rejected responses of the ground-truth captions. Why these pairs: docs/toy_world.md.
"""
import itertools
import json
import os
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from nanoalign import trainutil as tu
from nanoalign.toy.base import load_model
from nanoalign.toy.files import load_scenes
from nanoalign.toy.oracle import best_worst_pair, correction_pref, corrupt_answer, oracle_score
from nanoalign.toy.world import (CAPTION_PROMPT, PAIRED, answer_question, caption, cooccurrence, exist_question,
                                 groups, pope_negatives)


def write_prefs(path, rows):
    """Write rows (dicts) as the generic `prefs` JSONL: image, prompt, chosen, rejected, optional
    chosen_segments / rejected_segments as [[start, end], ...] character spans; keys at None are left out. Returns
    the number of rows; ValueError names a row that lacks a field or holds a span outside its text.
    Not nanoalign.data.write_prefs: that one writes Example records and always an "id" key, which these rows (and
    the default run's pairs.jsonl) do not have."""
    need = ("image", "prompt", "chosen", "rejected")
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            miss = [k for k in need if not isinstance(r.get(k), str)]
            if miss:
                raise ValueError(f"write_prefs: row {i} lacks string field(s) {miss}")
            for k in ("chosen_segments", "rejected_segments"):
                for seg in r.get(k) or []:
                    text = r[k.split("_")[0]]
                    if not (len(seg) == 2 and 0 <= seg[0] <= seg[1] <= len(text)):
                        raise ValueError(f"write_prefs: row {i} {k} has span {seg} outside its text (len {len(text)})")
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    return i + 1 if rows else 0


def existence_pairs(scenes, img_path, freq, cooc, per_scene, stats):
    """Ground-truth existence pairs for the scenes: per scene its adversarial negative (the absent partner /
    companion first), a present kind, its popular negative and another present kind, in that order, the first
    per_scene of them, each kind once (a popular negative that is also the adversarial one is asked once). Chosen
    the true answer ("Yes." / "No."), rejected the other one, the whole answer the corrected segment.

    Not RLHF-V-style corrections of the model's own wrong answers: on a grounded base those are the few hard cases,
    and DDPO on them lowered POPE (docs/toy_world.md). freq / cooc: cooccurrence of all training scenes (what POPE's
    popular / adversarial negatives are drawn from)."""
    rng = np.random.default_rng(11)
    rows = []
    for name, sc in scenes:
        absent = (pope_negatives(sc, "adversarial", 1, rng, freq, cooc)
                  + pope_negatives(sc, "popular", 1, rng, freq, cooc))
        present = [str(k) for k in rng.permutation(list(groups(sc)))[:2]]
        kinds = [k for pair in itertools.zip_longest(absent, present) for k in pair if k is not None]
        kinds = list(dict.fromkeys(kinds))  # the popular negative may be the adversarial one: ask it once
        for k in kinds[:per_scene]:
            q = exist_question(k)
            truth = answer_question(q, sc)
            other = "No." if truth == "Yes." else "Yes."
            rows.append({"image": img_path(name), "prompt": "<image>\n" + q, "chosen": truth, "rejected": other,
                         "chosen_segments": [[0, len(truth)]], "rejected_segments": [[0, len(other)]]})
            stats["yesno_" + truth[:-1].lower()] += 1
    stats["yesno_pairs"] += len(rows)
    return rows


def build_pairs(algo, base_dir, world, out_path, n_scenes, seed, samples=2, temperature=1.0, batch_size=32,
                max_new_tokens=128, rewrite_missing=False, template="vicuna_v1", yesno=0, ranked=0):
    """Preference rows (prefs JSONL, absolute image paths) for `algo` from the world's ground truth -> stats dict.
    Corrections (dpo, ipo, slic, ddpo): `samples` captions per scene and their RLHF-V-style corrections.
    rewrite_missing: a model caption with nothing to correct that still misses objects gets the ground-truth
    caption as its chosen response (no spans; the annotator rewrites it). yesno: existence questions per scene with
    ground-truth pairs (existence_pairs). ranked: also the best against the worst of `ranked` captions per scene
    by oracle_score (VLFeedback-style; the first `samples` of them are the corrected ones), no spans.
    Under torch.distributed the caption sampling is split over the ranks, so every rank must call this for those
    algorithms (the rows are the same as one process's); rank 0 writes the file."""
    from nanoalign.image import open_image
    scenes = list(load_scenes(world["scenes_train"]).items())
    freq, cooc = cooccurrence([sc for _, sc in scenes]) if yesno else (None, None)
    rng = np.random.default_rng([seed, 7])
    pick = sorted(rng.permutation(len(scenes))[:n_scenes].tolist())
    scenes = [scenes[i] for i in pick]
    img_path = lambda name: os.path.join(os.path.abspath(world["images"]), name)
    rows, stats = [], Counter()
    if algo in ("povid", "online-dpo", "online-bdhs", "rloo", "ppo", "grpo"):  # online and RL use the prompt (and
        for name, sc in scenes:  # the scene, for the oracle), online-bdhs the ground-truth caption as BDHS's reference
            gt = caption(sc)
            bad, span = corrupt_answer(gt, sc, rng)
            if span is None:
                stats["unchanged"] += 1
                continue
            rows.append({"image": img_path(name), "prompt": "<image>\n" + CAPTION_PROMPT, "chosen": gt,
                         "rejected": bad, **({"scene": sc} if algo != "povid" else {})})
    elif algo == "bdhs":
        try:
            from nanoalign import bdhs
            fn = bdhs.bdhs_rejected
        except (ImportError, AttributeError):
            raise SystemExit("error: --algo bdhs needs nanoalign.bdhs.bdhs_rejected, which is not available yet")
        model, processor = load_model(base_dir)
        settings = bdhs.BDHSSettings(embedder=getattr(bdhs, "OFFLINE_EMBEDDER", None), template=template)
        gen = torch.Generator().manual_seed(seed)
        bar = tu.Progress(len(scenes), 0, "bdhs pairs", "ex")
        for i in range(0, len(scenes), batch_size):
            part = scenes[i:i + batch_size]
            images = [open_image(img_path(n)) for n, _ in part]
            refs = [caption(sc) for _, sc in part]
            res = fn(model, processor, images, [CAPTION_PROMPT] * len(part), refs, settings, generator=gen,
                     seeds=[seed * 100003 + i + k for k in range(len(part))])
            for (name, sc), ref, r in zip(part, refs, res):
                if r.rejected is None or r.rejected.strip() == ref.strip():
                    stats["skipped"] += 1
                    continue
                rows.append({"image": img_path(name), "prompt": "<image>\n" + CAPTION_PROMPT, "chosen": ref,
                             "rejected": r.rejected})
            for _ in part:
                bar.update()
        bar.close()
    else:  # RLHF-V-style corrections of (and best-vs-worst pairs among) the model's own sampled captions
        from nanoalign.generate import generate_text
        n_caps = max(samples, ranked)
        blocks = list(range(0, len(scenes), batch_size))  # a block's samples depend on its start only: the ranks
        mine = blocks[tu.rank()::tu.world_size()]  # share the blocks and the pairs are those of one process
        n_mine = sum(len(scenes[i:i + batch_size]) for i in mine)  # this rank's share of the scenes
        bar = tu.Progress(n_mine * n_caps, 0, "caption pairs", "ex")
        by_block, error = {}, None
        try:
            model, processor = load_model(base_dir)
            for i in mine:
                part, block = scenes[i:i + batch_size], by_block.setdefault(i, [])
                images = [open_image(img_path(n)) for n, _ in part]
                drawn = []  # per sample: the captions of this block's scenes
                for s in range(n_caps):
                    caps = generate_text(model, processor, images, [CAPTION_PROMPT] * len(part), template,
                                         max_new_tokens=max_new_tokens, temperature=temperature,
                                         batch_size=batch_size, seed=seed * 1000003 + i * 7 + s)
                    drawn.append(caps)
                    for _ in part:
                        bar.update()
                    if s >= samples:
                        continue
                    for (name, sc), cap in zip(part, caps):
                        row = correction_pref(cap, sc, img_path(name))
                        if row is not None:  # a deletion is an empty span in the chosen text: nothing to weight
                            for k in ("chosen_segments", "rejected_segments"):
                                row[k] = [sp for sp in row[k] if sp[1] > sp[0]] or None
                        if row is None and rewrite_missing and oracle_score(cap, sc)["recall"] < 1:
                            row = {"image": img_path(name), "prompt": "<image>\n" + CAPTION_PROMPT,
                                   "chosen": caption(sc), "rejected": cap}
                            stats["rewritten"] += 1
                        if row is None:
                            stats["correct_caption"] += 1
                            continue
                        stats["companion"] += any(k in PAIRED and PAIRED[k] in groups(sc)
                                                  for k in oracle_score(cap, sc)["hallucinated"])
                        block.append(row)
                for j, (name, sc) in enumerate(part if ranked else []):
                    pair = best_worst_pair([caps[j] for caps in drawn], sc)
                    if pair is None:
                        stats["ranked_tie"] += 1
                        continue
                    block.append({"image": img_path(name), "prompt": "<image>\n" + CAPTION_PROMPT,
                                  "chosen": pair[0], "rejected": pair[1]})
                    stats["ranked"] += 1
        except (Exception, SystemExit) as e:  # told to every rank below instead of leaving the others waiting
            error = f"{type(e).__name__}: {e}"
        bar.close()
        if tu.world_size() > 1:
            got = [None] * tu.world_size()
            dist.all_gather_object(got, (by_block, stats, error))
            by_block = {i: r for b, _, _ in got for i, r in b.items()}
            stats = sum((st for _, st, _ in got), Counter())
            error = next((f"rank {r}: {e}" for r, (_, _, e) in enumerate(got) if e), None)
        if error:
            raise SystemExit(f"error: {algo} pairs: {error}")
        rows = [r for i in sorted(by_block) for r in by_block[i]]
        if yesno:
            rows += existence_pairs(scenes, img_path, freq, cooc, yesno, stats)
    if not rows:
        raise SystemExit(f"error: no {algo} preference pairs could be built from {len(scenes)} scenes ({dict(stats)})")
    if tu.rank() == 0:
        tmp = str(out_path) + ".tmp"
        write_prefs(tmp, rows)
        os.replace(tmp, out_path)
    return {"pairs": len(rows), "scenes": len(scenes), **stats}
