"""The built-in default of train.py: the whole pipeline on the toy visual world (issue 6).

    torchrun --standalone --nproc_per_node 2 train.py --algo ddpo [--out DIR] [--max-steps N] [--seed S]

without --model/--data runs `default_run(args, train.main)`:
  1. world + tokenizer + a freshly initialised tiny LLaVA (nanoalign.toyworld), cached under --toy-cache
     (default ~/.cache/nanoalign/toy/<hash of the settings and TOY_VERSION>);
  2. the SFT base model in two train.main --algo sft stages (each cached there too): the world's captions + QA
     (sft.json) from init, then grounding (sft_ground.json: the same mix plus more existence questions) from there;
  3. preference pairs from ground truth: dpo/ipo/slic/ddpo = RLHF-V-style corrections of the base model's own
     sampled captions of training scenes (corrected spans recorded for DDPO's dense weights), the best against the
     worst of several sampled captions by the oracle (VLFeedback-style), and ground-truth existence pairs about
     those scenes (_existence_pairs); povid =
     POVID-style one-fact corruptions of ground-truth captions; bdhs = nanoalign.bdhs rejected responses of the
     ground-truth captions (trained with the DPO loss);
  4. alignment: train.main with the asked --algo on those pairs, --out OUT (default runs/<algo>);
  5. evaluation of base and aligned on held-out scenes through nanoalign.eval.run_task (greedy): CHAIR_i, CHAIR_s,
     Recall, mean caption length, POPE accuracy / F1 per split;
  6. a before/after table on stdout and OUT/summary.json {"before": {...}, "after": {...}, ...}.
Under torchrun the alignment run is collective (every rank calls train.main: FSDP2 over gloo); the SFT base model is
trained by rank 0 alone in a plain child process (`_train_alone`: 5x faster at this size); the ranks share the
caption sampling of the dpo/ipo/slic/ddpo pairs; world, the other pairs and evaluation run on rank 0 (for povid and
bdhs the base evaluation runs on rank 1 while rank 0 builds the pairs) and the others wait on a broadcast.

Why the base recipe looks the way it does (each measured on the way to a grounded base, see the README): the vision
tower is pretrained for 800 steps (200 left per-cell kind accuracy at 90% and the decoder never used the image);
10,000 training scenes (with 2,000 the decoder memorised caption text instead of looking); 5 of the 7 short questions
per image are yes/no existence questions; the vicuna_nosys template (the 72-token system sentence would double every
sequence); and the grounding stage: after the first stage the decoder describes scenes from the image but looks
nothing up by the kind a question names (yes/no answers and short-QA colors at chance: probe ROC AUC 0.47), and
4,000 more steps with the extra existence questions, learning rate warmed up again, make it answer from the image
(AUC 0.89 on the default base) while its captions improve too. It leaves that plateau suddenly, at a step that
depends on the data order: 2,000 steps were enough in three of five measured runs, 3,000 in a fourth.
Per-algorithm alignment settings (lr, steps, pairs, beta) are in ALIGN; any option of train.py the user sets
(--lr, --batch-size, --max-steps, --beta, --ddpo-average, ...) overrides them or joins the alignment run.
"""
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanoalign import toyworld as tw
from nanoalign import trainutil as tu

TOY_VERSION = 3
SETTINGS = {  # everything the cached world and base depend on (why these values: README, "The toy world")
    "n_train": 10000, "n_eval": 300, "qa_per_image": 7, "exist_per_image": 5, "vocab_size": 512, "kind": "llava",
    "init_std": 0.02, "patch_size": 16, "vision_hidden": 128, "vision_steps": 800, "freeze_vision": True,
    "template": "vicuna_nosys", "sft_steps": 5000, "ground_steps": 4000, "sft_batch": 16, "sft_lr": 1e-3,
    "sft_warmup": 30, "eval_max_new_tokens": 96,
}
# algo -> alignment settings (not part of the cache key); batch is global (split over the ranks). The caption pairs
# of dpo/ipo/slic/ddpo: RLHF-V corrections of `samples` sampled captions per scene plus the best against the worst of
# `ranked` (build_pairs); `yesno` existence pairs per scene. Measured with DDPO on the default base, CHAIR_i / Recall
# change at seeds 0 / 1 / 2 (README, "The toy world", for the rest): corrections only, beta 0.3, lr 1e-4, yesno 4
# (the previous default): -16.2% / -4.8, -15.1% / -5.2; + ranked 8: -22.4% / +0.4, -16.3% / -2.7; + lr 2e-4:
# -32.9% / -2.3, -18.3% / -6.3, -29.3% / -4.8; + yesno 2 (now): -33.4% / -4.0, -30.3% / -4.0, -28.6% / -4.6.
# This was tuned on the 300 held-out scenes the table reports; bench/toy_vote_curve.py --fresh scores new ones.
ALIGN = {
    "default": {"steps": 240, "lr": 1e-4, "batch": 32, "pair_scenes": 1000, "samples": 2, "ranked": 8,
                "temperature": 0.7, "yesno": 2, "sft_weight": 1.0},
    "dpo": {"beta": 0.3},
    "ddpo": {"beta": 0.3, "lr": 2e-4},
}


# ------------------------------------------------------------------------------------------------- distributed
def _on_rank(fn, src=0):
    """Run fn() on rank `src` only; every rank returns its result (the others wait on the broadcast). An exception
    on src stops every rank with its message instead of leaving them in a barrier."""
    res = [None, None]
    if tu.rank() == src:
        try:
            res = [True, fn()]
        except (Exception, SystemExit) as e:
            res = [False, f"{type(e).__name__}: {e}"]
    if dist.is_initialized():
        dist.broadcast_object_list(res, src=src)
    if not res[0]:
        raise SystemExit(f"error: toy pipeline (rank {src}): {res[1]}")
    return res[1]


def _in_parallel(fns):
    """Rank r runs fns[r] (ranks beyond len(fns) run nothing); every rank returns the list of all results."""
    mine = [None, None]
    if tu.rank() < len(fns):
        try:
            mine = [True, fns[tu.rank()]()]
        except (Exception, SystemExit) as e:
            mine = [False, f"{type(e).__name__}: {e}"]
    got = [mine]
    if dist.is_initialized():
        got = [None] * tu.world_size()
        dist.all_gather_object(got, mine)
    for r, (ok, res) in enumerate(got[:len(fns)]):
        if not ok:
            raise SystemExit(f"error: toy pipeline (rank {r}): {res}")
    return [res for _, res in got[:len(fns)]]


class _Threads:
    """Use every core on a rank that works alone (the others wait), then restore."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *a):
        torch.set_num_threads(self.old)


# ------------------------------------------------------------------------------------------------- the cache
def cache_key(settings):
    blob = json.dumps({**settings, "toy_version": TOY_VERSION, "world_version": tw.VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_dir(settings, root=None):
    root = Path(root) if root else Path(os.path.expanduser("~/.cache/nanoalign/toy"))
    return root / f"{cache_key(settings)}"


def init_checkpoint(world, path, settings, seed):
    """A freshly initialised tiny LLaVA in the llava-hf layout with processor files: N(0, init_std) for every
    Linear / Embedding / position / class embedding, zero biases, unit norms."""
    from nanoalign.checkpoint import save_state_dict
    from nanoalign.model import LlavaConfig, LlavaModel
    from nanoalign.tokenizer import Processor
    cfg_dict = json.loads(Path(world["config"]).read_text())
    if settings["kind"] != "llava":
        cfg_dict = tw.toy_config(settings["kind"], cfg_dict["text_config"]["vocab_size"])
    # one 16px patch per grid cell: an object lies in exactly one image token, which makes grounding learnable in
    # minutes (toy_config's 8px patches split every object over 4 tokens and the LM learnt to ignore them)
    vc = cfg_dict["vision_config"]
    ps, hv = settings.get("patch_size", vc["patch_size"]), settings.get("vision_hidden", vc["hidden_size"])
    vc.update(patch_size=ps, hidden_size=hv, intermediate_size=4 * hv, projection_dim=hv)
    cfg_dict["image_seq_length"] = (vc["image_size"] // ps) ** 2
    config = LlavaConfig.from_dict(cfg_dict)
    torch.manual_seed(seed)
    model = LlavaModel(config)
    std = settings["init_std"]
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif "norm" in name or "layrnorm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith("image_newline"):
            torch.nn.init.normal_(p, std=std)
        else:
            torch.nn.init.normal_(p, std=std)
    world_dir = str(Path(world["tokenizer"]).parent)
    processor = Processor.from_pretrained(world_dir, cfg_dict)
    save_state_dict(config, model.state_dict(), processor, path)
    return path


def pretrain_vision(path, world, steps=300, lr=2e-3, batch=64, seed=0):
    """The toy world's "CLIP": train the vision tower of the checkpoint at `path` (in place) to tell, at every
    image token, the kind / color / size of the object in that grid cell (or none), with a linear head that is then
    thrown away. Real LLaVA starts from a pretrained CLIP tower; without this, a from-scratch tower collapses under
    the language loss (measured: a linear probe of kind-at-cell fell from 75% at init to 68% after 600 SFT steps,
    majority 66%) and the decoder never learns to look. Returns the probe accuracy on the last batch."""
    from PIL import Image
    from nanoalign.checkpoint import save_pretrained
    model, processor = _load_model(path)
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    if side != tw.GRID:
        raise ValueError(f"pretrain_vision: needs one patch per grid cell (patch {tw.CELL}), got patch {vc.patch_size}")
    kinds, colors, sizes = ["none", *tw.KINDS], ["none", *tw.COLORS], ["none", *tw.SIZES]
    scenes = list(tw.load_scenes(world["scenes_train"]).items())
    pix = processor.image_processor.process([Image.open(os.path.join(world["images"], n)).convert("RGB")
                                             for n, _ in scenes])["pixel_values"]  # (N,3,S,S)
    labels = torch.zeros(len(scenes), side * side, 3, dtype=torch.long)  # (N, cells, kind/color/size)
    for i, (_, sc) in enumerate(scenes):
        for o in sc["objects"]:
            labels[i, o["cell"]] = torch.tensor([kinds.index(o["kind"]), colors.index(o["color"]),
                                                 sizes.index(o["size"])])
    torch.manual_seed(seed)
    head = torch.nn.Linear(vc.hidden_size, len(kinds) + len(colors) + len(sizes))
    tower = model.vision_tower
    tower.train()
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.0)
    layer = model.config.vision_feature_layer
    g = torch.Generator().manual_seed(seed)
    bar = _bar(steps, "vision pretraining")
    acc = 0.0
    for step in range(steps):
        idx = torch.randint(0, len(scenes), (batch,), generator=g)
        h = tower(pix[idx], [layer])[0][:, 1:]  # (B, cells, Hv), CLS dropped as the projector sees it
        out = head(h)
        parts = out.split([len(kinds), len(colors), len(sizes)], -1)
        y = labels[idx]
        loss = sum(torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), y[..., j].reshape(-1))
                   for j, o in enumerate(parts))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.step()
        acc = float((parts[0].argmax(-1) == y[..., 0]).float().mean())
        bar.update(f"loss {float(loss.detach()):.3f} kind acc {acc:.2f}")
    bar.close()
    model.eval()
    save_pretrained(model, processor, path)
    return acc


def fingerprint(cache):
    """What "same seed, same numbers" rests on, for comparing runs across machines: sha256 (first 16 hex digits) of
    the world's SFT data (both stages) and tokenizer, the initial, first-stage and SFT base weights, plus the CPU's
    SIMD level and the versions that do the arithmetic. Measured: one machine reproduces its base bit for bit, cold or
    cached; the same command on a machine with another CPU trained a different base, and which input differed was
    not recorded."""
    import platform

    def sha(path):
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return None
        return h.hexdigest()[:16]
    cache = Path(cache)
    return {"world_sft": sha(cache / "world" / "sft.json"), "world_sft_ground": sha(cache / "world" / "sft_ground.json"),
            "tokenizer": sha(cache / "world" / "tokenizer.json"), "init": sha(cache / "init" / "model.safetensors"),
            "sft_mix": sha(cache / "sft_mix" / "final" / "model.safetensors"),
            "base": sha(cache / "base" / "final" / "model.safetensors"),
            "cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(), "torch": torch.__version__,
            "numpy": np.__version__}


def _done(path):
    return Path(path, "DONE.json").is_file()


def _mark(path, info):
    Path(path).mkdir(parents=True, exist_ok=True)
    Path(path, "DONE.json").write_text(json.dumps(info, indent=1))


# ------------------------------------------------------------------------------------------------- pairs
def _load_model(path):
    from nanoalign.checkpoint import load_pretrained
    model, processor = load_pretrained(path)
    model.eval()
    return model, processor


def _bar(total, desc):
    from nanoalign.trainutil import Progress
    return Progress(total, 0, desc, "ex")


def _existence_pairs(scenes, img_path, freq, cooc, per_scene, stats):
    """Ground-truth existence pairs for the scenes: per scene its adversarial negative (the absent partner /
    companion first), a present kind, its popular negative and another present kind, in that order, the first
    per_scene of them, each kind once (a popular negative that is also the adversarial one is asked once). Chosen
    the true answer ("Yes." / "No."), rejected the other one, the whole answer the corrected segment.

    Why not RLHF-V-style corrections of the model's own wrong answers (what this was until TOY_VERSION 3): on a
    grounded base those are the few hard cases (502 pairs from 4,000 questions), and DDPO on them took POPE
    adversarial accuracy from 80.7 to 65.9 and random from 86.1 to 63.9; these pairs, the same questions with the
    truth, raised adversarial accuracy to 84.6 (README, "The toy world"). freq / cooc: tw.cooccurrence of all
    training scenes (what POPE's popular / adversarial negatives are drawn from)."""
    rng = np.random.default_rng(11)
    rows = []
    for name, sc in scenes:
        absent = (tw.pope_negatives(sc, "adversarial", 1, rng, freq, cooc)
                  + tw.pope_negatives(sc, "popular", 1, rng, freq, cooc))
        present = [str(k) for k in rng.permutation(list(tw.groups(sc)))[:2]]
        kinds = [k for pair in itertools.zip_longest(absent, present) for k in pair if k is not None]
        kinds = list(dict.fromkeys(kinds))  # the popular negative may be the adversarial one: ask it once
        for k in kinds[:per_scene]:
            q = tw.exist_question(k)
            truth = tw.answer_question(q, sc)
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
    ground-truth pairs (_existence_pairs). ranked: also the best against the worst of `ranked` captions per scene
    by tw.oracle_score (VLFeedback-style; the first `samples` of them are the corrected ones), no spans.
    Under torch.distributed the caption sampling is split over the ranks, so every rank must call this for those
    algorithms (the rows are the same as one process's); rank 0 writes the file."""
    from PIL import Image
    scenes = list(tw.load_scenes(world["scenes_train"]).items())
    freq, cooc = tw.cooccurrence([sc for _, sc in scenes]) if yesno else (None, None)
    rng = np.random.default_rng([seed, 7])
    pick = sorted(rng.permutation(len(scenes))[:n_scenes].tolist())
    scenes = [scenes[i] for i in pick]
    img_path = lambda name: os.path.join(os.path.abspath(world["images"]), name)
    rows, stats = [], Counter()
    if algo == "povid":
        for name, sc in scenes:
            gt = tw.caption(sc)
            bad, span = tw.corrupt_answer(gt, sc, rng)
            if span is None:
                stats["unchanged"] += 1
                continue
            rows.append({"image": img_path(name), "prompt": "<image>\n" + tw.CAPTION_PROMPT, "chosen": gt,
                         "rejected": bad})
    elif algo == "bdhs":
        try:
            from nanoalign import bdhs
            fn = bdhs.bdhs_rejected
        except (ImportError, AttributeError):
            raise SystemExit("error: --algo bdhs needs nanoalign.bdhs.bdhs_rejected, which is not available yet")
        model, processor = _load_model(base_dir)
        settings = bdhs.BDHSSettings(embedder=getattr(bdhs, "OFFLINE_EMBEDDER", None), template=template)
        gen = torch.Generator().manual_seed(seed)
        bar = _bar(len(scenes), "bdhs pairs")
        for i in range(0, len(scenes), batch_size):
            part = scenes[i:i + batch_size]
            images = [Image.open(img_path(n)).convert("RGB") for n, _ in part]
            refs = [tw.caption(sc) for _, sc in part]
            res = fn(model, processor, images, [tw.CAPTION_PROMPT] * len(part), refs, settings, generator=gen,
                     seeds=[seed * 100003 + i + k for k in range(len(part))])
            for (name, sc), ref, r in zip(part, refs, res):
                if r.rejected is None or r.rejected.strip() == ref.strip():
                    stats["skipped"] += 1
                    continue
                rows.append({"image": img_path(name), "prompt": "<image>\n" + tw.CAPTION_PROMPT, "chosen": ref,
                             "rejected": r.rejected})
            for _ in part:
                bar.update()
        bar.close()
    else:  # RLHF-V-style corrections of (and best-vs-worst pairs among) the model's own sampled captions
        from nanoalign.generate import generate_text
        n_caps = max(samples, ranked)
        blocks = list(range(0, len(scenes), batch_size))  # a block's samples depend on its start only: the ranks
        mine = blocks[tu.rank()::tu.world_size()]  # share the blocks and the pairs are those of one process
        bar = _bar(sum(len(scenes[i:i + batch_size]) for i in mine) * n_caps, "caption pairs")  # this rank's share
        by_block, error = {}, None
        try:
            model, processor = _load_model(base_dir)
            for i in mine:
                part, block = scenes[i:i + batch_size], by_block.setdefault(i, [])
                images = [Image.open(img_path(n)).convert("RGB") for n, _ in part]
                drawn = []  # per sample: the captions of this block's scenes
                for s in range(n_caps):
                    caps = generate_text(model, processor, images, [tw.CAPTION_PROMPT] * len(part), template,
                                         max_new_tokens=max_new_tokens, temperature=temperature,
                                         batch_size=batch_size, seed=seed * 1000003 + i * 7 + s)
                    drawn.append(caps)
                    for _ in part:
                        bar.update()
                    if s >= samples:
                        continue
                    for (name, sc), cap in zip(part, caps):
                        row = tw.correction_pref(cap, sc, img_path(name))
                        if row is not None:  # a deletion is an empty span in the chosen text: nothing to weight
                            for k in ("chosen_segments", "rejected_segments"):
                                row[k] = [sp for sp in row[k] if sp[1] > sp[0]] or None
                        if row is None and rewrite_missing and tw.oracle_score(cap, sc)["recall"] < 1:
                            row = {"image": img_path(name), "prompt": "<image>\n" + tw.CAPTION_PROMPT,
                                   "chosen": tw.caption(sc), "rejected": cap}
                            stats["rewritten"] += 1
                        if row is None:
                            stats["correct_caption"] += 1
                            continue
                        stats["companion"] += any(k in tw.PAIRED and tw.PAIRED[k] in tw.groups(sc)
                                                  for k in tw.oracle_score(cap, sc)["hallucinated"])
                        block.append(row)
                for j, (name, sc) in enumerate(part if ranked else []):
                    pair = tw.best_worst_pair([caps[j] for caps in drawn], sc)
                    if pair is None:
                        stats["ranked_tie"] += 1
                        continue
                    block.append({"image": img_path(name), "prompt": "<image>\n" + tw.CAPTION_PROMPT,
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
            rows += _existence_pairs(scenes, img_path, freq, cooc, yesno, stats)
    if not rows:
        raise SystemExit(f"error: no {algo} preference pairs could be built from {len(scenes)} scenes ({dict(stats)})")
    if tu.rank() == 0:
        tmp = str(out_path) + ".tmp"
        tw.write_prefs(tmp, rows)
        os.replace(tmp, out_path)
    return {"pairs": len(rows), "scenes": len(scenes), **stats}


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(model_dir, world, out_dir, max_new_tokens=96, batch_size=32, progress=True, template="vicuna_v1"):
    """CHAIR (captions) and POPE (yes/no) of a checkpoint on the held-out scenes -> flat metrics dict."""
    from nanoalign import eval as E
    from nanoalign.generate import generate_text
    model, processor = _load_model(model_dir)
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
    0.5 is a model blind to the question (the toy base before its grounding stage: 0.47); POPE's accuracies move
    only once this is high (README, "The toy world")."""
    from PIL import Image
    from nanoalign.tokenizer import build_prompt
    tok = processor.tokenizer
    yes, no = tok.encode("Yes", add_bos=False)[0], tok.encode("No", add_bos=False)[0]
    scores, present, companion = [], [], []
    items = []
    for name, sc in list(tw.load_scenes(world["scenes_eval"]).items())[:n_scenes]:
        gs = tw.groups(sc)
        items += [(name, k) for k in tw.KINDS]
        present += [k in gs for k in tw.KINDS]
        companion += [k not in gs and any(tw.PAIRED.get(p) == k for p in gs) for k in tw.KINDS]
    images = {}
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            part = items[i:i + batch_size]
            for n, _ in part:
                if n not in images:
                    images[n] = Image.open(os.path.join(world["images"], n)).convert("RGB")
            texts = [build_prompt(tw.exist_question(k), template) for _, k in part]
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
    present kind was (the caption should have stopped)}; these two count a kind's first mention only.
    Measured on the default base: DDPO on corrections only removed 60% of the extra ones and 15% of the others, the
    default pairs 67% and 30% (README, "The toy world")."""
    n = c = instead = extra = captions = 0
    with open(results_path) as f:
        for r in map(json.loads, filter(str.strip, f)):
            captions += 1
            gt, halluc = set(r.get("gt_objects") or []), r.get("hallucinated") or []
            n += len(halluc)  # CHAIR's list: a kind once per mention
            c += sum(tw.PAIRED.get(k) in gt for k in halluc)
            named = set()
            for k in (m["kind"] for m in tw._parse(r.get("answer") or "")):
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
    lines = ["| metric | before (SFT) | after | change |", "|---|---|---|---|"]
    for k in COLUMNS:
        if k in before and k in after:
            pct = k != "mean_length"
            f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.1f}")
            lines.append(f"| {k} | {f(before[k])} | {f(after[k])} | {f(after[k] - before[k])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the run
def _argv(d):
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def prepare_base(train_main, cache, settings, toy_seed, progress=True):
    """Steps 1-2 (collective): world, tokenizer, init checkpoint, SFT base; all cached -> (world paths, base dir)."""
    cache = Path(cache)
    t0 = time.time()

    def world_step():
        with _Threads(os.cpu_count() or 1):
            world = tw.build_world(str(cache / "world"), settings["n_train"], settings["n_eval"], toy_seed,
                                   settings["qa_per_image"], settings["vocab_size"], settings["exist_per_image"])
            if not _done(cache / "init"):
                init_checkpoint(world, cache / "init", settings, toy_seed)
                acc = pretrain_vision(cache / "init", world, settings["vision_steps"], seed=toy_seed) \
                    if settings["vision_steps"] else None
                _mark(cache / "init", {"vision_kind_acc": acc})
        return world

    world = _on_rank(world_step)
    base = cache / "base"
    if _done(base):
        tu.print0(f"toy: reusing the SFT base model {base / 'final'} (world and base cached in {cache})")
        return world, base / "final"
    tu.print0(f"toy: world ready in {time.time() - t0:.0f}s ({cache / 'world'}); training the SFT base model")
    # two SFT stages, each cached: the full mix from init, then grounding (the mix plus more existence questions,
    # from a fresh warm-up) from there; with ground_steps 0 the first stage is the base
    stages = ([("sft_mix", world["sft"], settings["sft_steps"]), ("base", world["sft_ground"], settings["ground_steps"])]
              if settings["ground_steps"] else [("base", world["sft"], settings["sft_steps"])])
    flags = ["--freeze-vision"] if settings["freeze_vision"] else []
    start = cache / "init"
    for i, (name, data, steps) in enumerate(stages):
        out = cache / name
        if not _done(out):
            tu.print0(f"toy: SFT stage {i + 1}/{len(stages)}: {steps} steps on {Path(data).name}")
            t1 = time.time()
            sargs = {"algo": "sft", "model": start, "data": data, "data_format": "llava", "image_root": world["images"],
                     "out": out, "max_steps": steps, "batch_size": settings["sft_batch"], "lr": settings["sft_lr"],
                     "warmup_steps": settings["sft_warmup"], "min_lr_ratio": 0.05, "seed": toy_seed,
                     "template": settings["template"]}
            if tu.world_size() == 1:
                train_main(_parse(sargs, flags))
            else:  # rank 0 alone (see _train_alone); the others wait
                _on_rank(lambda: _train_alone(train_main, _argv(sargs) + flags))
            if tu.rank() == 0:
                _mark(out, {"seconds": time.time() - t1, "settings": settings})
            _on_rank(lambda: None)
        start = out / "final"
    return world, base / "final"


_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _train_alone(train_main, argv):
    """Run train.py with argv as one plain process using every core. The tiny SFT base trains 5x faster that way
    than with FSDP over gloo on 2 CPU ranks (measured: 13.9 vs 2.8 steps/s at global batch 16): at 0.9M trainable
    parameters each step's collectives cost more than its compute."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV and not k.startswith("TORCHELASTIC")}
    env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    script = Path(sys.modules[train_main.__module__].__file__).resolve()
    r = subprocess.run([sys.executable, str(script), *argv], env=env)
    if r.returncode != 0:
        raise RuntimeError(f"the SFT base run ({script.name} {' '.join(argv[:2])} ...) exited with {r.returncode}")


_PARSE = []
# train.py options the toy run sets itself (lr, batch size and steps: from ALIGN unless the user gave them, above)
_TOY_OWNED = {"algo", "model", "data", "data_format", "image_root", "template", "out", "toy_cache", "toy_seed", "lr",
              "batch_size", "max_steps", "epochs", "seed"}


def _parse(d, flags=()):
    return _PARSE[0](_argv(d) + list(flags))


def default_run(args, train_main, settings=None, parse_args=None):
    """The toy pipeline for args (train.py's namespace); returns the summary dict (on every rank)."""
    if parse_args is None:  # train.py's parser, from the module that defines train_main
        parse_args = getattr(sys.modules.get(getattr(train_main, "__module__", "")), "parse_args", None)
        if parse_args is None:
            import train
            parse_args = train.parse_args
    _PARSE[:] = [parse_args]
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    settings = {**SETTINGS, **(settings or {})}
    algo = args.algo
    toy_seed = getattr(args, "toy_seed", None) or 0
    cache = cache_dir({**settings, "toy_seed": toy_seed}, getattr(args, "toy_cache", None))
    out = Path(args.out)
    t_start = time.time()
    times = {}
    world, base = prepare_base(train_main, cache, settings, toy_seed)
    times["world_and_base_s"] = time.time() - t_start
    al = {**ALIGN["default"], **ALIGN.get(algo, {})}
    align_algo = "dpo" if algo == "bdhs" else algo
    # the options the user gave (train.parse_args records them; for a namespace made elsewhere: those that differ
    # from train.py's defaults)
    if hasattr(args, "given"):
        given = set(args.given)
    else:
        defaults = vars(parse_args(["--algo", align_algo]))
        given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    if "lr" in given:
        al["lr"] = args.lr
    if "batch_size" in given:
        al["batch"] = args.batch_size * tu.world_size()  # the user's --batch-size is per rank, as in train.py
    steps = args.max_steps or al["steps"]
    mnt = settings["eval_max_new_tokens"]
    before_dir = cache / "base_eval"

    def eval_before(alone=True):  # alone: the other ranks wait, so it takes every core
        with _Threads((os.cpu_count() or 1) if alone else 1):
            return evaluate(base, world, before_dir, mnt, template=settings["template"])

    before = None
    if algo == "sft":
        before = _on_rank(eval_before)
        after, pairs = before, None
    else:
        pairs_path = out / "pairs.jsonl"

        def pairs_step():
            out.mkdir(parents=True, exist_ok=True)
            t = time.time()
            with _Threads(1 if tu.world_size() > 1 else (os.cpu_count() or 1)):
                st = build_pairs(algo, base, world, pairs_path, al["pair_scenes"], args.seed, al["samples"],
                                 al["temperature"], max_new_tokens=al.get("max_new_tokens", 128),
                                 rewrite_missing=al.get("rewrite_missing", False), template=settings["template"],
                                 yesno=al.get("yesno", 0), ranked=al.get("ranked", 0))
            st["seconds"] = time.time() - t
            return st

        t = time.time()
        if tu.world_size() > 1 and algo not in ("povid", "bdhs"):  # the ranks share the sampling (build_pairs), then
            pair_stats = pairs_step()  # one evaluates the base
            before = _on_rank(eval_before)
        elif tu.world_size() > 1:  # rank 0 builds the pairs while rank 1 evaluates the base
            pair_stats, before = _in_parallel([pairs_step, lambda: eval_before(alone=False)])
        else:
            pair_stats = pairs_step()
            before = eval_before()
        times["pairs_and_base_eval_s"] = time.time() - t
        tu.print0(f"toy: {pair_stats['pairs']} {algo} pairs ({pair_stats})")
        t = time.time()
        aargs = {"algo": align_algo, "model": base, "data": pairs_path,
                 "data_format": "prefs", "out": out, "max_steps": steps, "batch_size": max(1, al["batch"] // tu.world_size()), "lr": al["lr"],
                 "seed": args.seed, "warmup_steps": min(5, steps // 4), "template": settings["template"]}
        aargs.update({k: al[k] for k in ("beta", "gamma", "sft_weight") if k in al})
        # every other option of train.py the user gave reaches this run too (even at train.py's default value, as
        # --sft-weight 0): --ddpo-average, --warmup-steps, --lora-rank, ... (the toy owns data, model, output, template)
        flags = []
        for k in sorted(given - _TOY_OWNED):
            v = getattr(args, k)
            if isinstance(v, bool):
                flags += [f"--{k.replace('_', '-')}"] if v else []
            else:
                aargs[k] = v
        final = train_main(_parse(aargs, flags))
        times["align_s"] = time.time() - t
        pairs = pair_stats

        def eval_after():
            shutil.rmtree(out / "eval_after", ignore_errors=True)  # results of an earlier run in the same --out
            with _Threads(os.cpu_count() or 1):
                return evaluate(final, world, out / "eval_after", mnt, template=settings["template"])

        t = time.time()
        after = _on_rank(eval_after)
        times["eval_after_s"] = time.time() - t
    times["total_s"] = time.time() - t_start
    if before.get("yesno_auc", 1.0) < 0.75:  # see yesno_auc: the grounding stage has not left its plateau
        tu.print0(f"toy: warning: the SFT base is blind to yes/no questions (yes/no AUC {before['yesno_auc']:.2f}, "
                  f"grounded bases reach 0.85-0.99): POPE cannot improve. Its grounding stage escapes its plateau at "
                  f"a data-order-dependent step: another --toy-seed builds another world and base (~10 min; README, "
                  f"'The toy world')")
    summary = {"algo": algo, "seed": args.seed, "toy_seed": toy_seed, "steps": steps if algo != "sft" else 0,
               "before": before, "after": after, "pairs": pairs, "align": al, "settings": settings,
               "cache": str(cache), "times": times, "fingerprint": fingerprint(cache)}
    if tu.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"\ntoy world, {algo} ({steps if algo != 'sft' else 0} steps, seed {args.seed}); held-out scenes, "
              f"metrics in %:\n{table(before, after)}\nwrote {out / 'summary.json'} "
              f"({times['total_s']:.0f}s)", flush=True)
    return summary
