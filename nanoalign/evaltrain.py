"""Evaluation during training: the policy on a held-out file every --eval-every steps, before the first step and after
the last, with the evaluators of `python -m nanoalign.eval` (POPE, CHAIR; formulas: nanoalign/metrics.py) or on
held-out preference pairs (accuracy and implicit-reward margin, through ops.preference_loss).

    python train.py ... --eval-data pope.jsonl --eval-task pope --eval-every 50 [--eval-limit 500] [--keep-best pope_f1]

Every rank evaluates a share of the examples (example i on rank i % world), greedy (temperature 0); the shares are
padded so that every rank runs the same number of batches (under FSDP each batch gathers the parameters, a
collective), the rows are gathered and summarised on every rank. Results are `eval/<name>` keys of the step's line
of OUT/metrics.jsonl (step 0: the initial policy), so `python -m nanoalign.plot` draws them beside the losses:
    pope   eval/pope_accuracy, eval/pope_f1, eval/pope_precision, eval/pope_recall, eval/pope_yes_ratio
    chair  eval/chair_i, eval/chair_s, eval/chair_recall, eval/chair_length (words per caption)
    prefs  eval/pref_accuracy (share of pairs with reward_chosen > reward_rejected), eval/pref_margin (mean beta*rho)
prefs scores the pairs with the run's --beta against the initial weights (scored once, like the training pairs'
reference cache, into OUT/refcache-eval). --keep-best NAME keeps OUT/best, the checkpoint of the best eval/NAME so far
(lower is better for chair_i and chair_s, higher for every other metric).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from nanoalign import eval as E
from nanoalign import trainutil as tu

TASKS = ("pope", "chair", "prefs")
NAMES = {"pope": ["pope_accuracy", "pope_f1", "pope_precision", "pope_recall", "pope_yes_ratio"],
         "chair": ["chair_i", "chair_s", "chair_recall", "chair_length"],
         "prefs": ["pref_accuracy", "pref_margin"]}
LOWER_IS_BETTER = {"chair_i", "chair_s"}


def add_args(p) -> None:
    """train.py's option group for evaluation during training."""
    g = p.add_argument_group("evaluation during training (nanoalign/evaltrain.py)")
    g.add_argument("--eval-data", default=None, help="held-out file: POPE / CHAIR question rows (JSONL) or pairs "
                   "(--eval-task prefs, format --eval-data-format) (default: none, no evaluation)")
    g.add_argument("--eval-task", default=None, choices=TASKS, help="what --eval-data holds (default: none)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N optimizer steps, in steps; also "
                   "before the first step and after the last (default 0: only before and after)")
    g.add_argument("--eval-limit", type=int, default=None, help="first K examples of --eval-data (default: all)")
    g.add_argument("--eval-image-root", default=None, help="folder of the eval images (default: --eval-data's "
                   "folder)")
    g.add_argument("--eval-annotations", default=None, help="CHAIR: COCO instances/captions JSON of the objects "
                   "(default: none; required for --eval-task chair)")
    g.add_argument("--eval-synonyms", default=None, help="CHAIR: JSON {category: [phrases]} (default: COCO's)")
    g.add_argument("--eval-data-format", default="prefs", help="prefs: format of --eval-data (default prefs)")
    g.add_argument("--eval-max-new-tokens", type=int, default=None, help="generated tokens per answer, in tokens "
                   f"(default: {E.DEFAULT_MAX_NEW_TOKENS['pope']} for pope, {E.DEFAULT_MAX_NEW_TOKENS['chair']} for "
                   "chair)")
    g.add_argument("--eval-batch-size", type=int, default=8, help="examples per rank per batch (default 8)")
    g.add_argument("--keep-best", default=None, help="keep OUT/best: the checkpoint of the best eval metric of that "
                   "name, e.g. chair_i, pope_f1, pref_accuracy (default: none)")


def check_args(args) -> str | None:
    """The eval options' consistency -> an error line, or None (their values: nanoalign.runs.ARG_RULES)."""
    if (args.eval_data is None) != (args.eval_task is None):
        return "--eval-data and --eval-task go together"
    if args.eval_task == "chair" and not args.eval_annotations:
        return "--eval-task chair needs --eval-annotations (the COCO objects of each image)"
    if args.keep_best is not None:
        name = args.keep_best.removeprefix("eval/")
        if args.eval_task is None or name not in NAMES[args.eval_task]:
            known = ", ".join(NAMES[args.eval_task]) if args.eval_task else "none without --eval-task"
            return f"--keep-best {args.keep_best}: not a metric of --eval-task {args.eval_task} (known: {known})"
    return None


class Evaluator:
    """The held-out examples of one run and what evaluating them needs. Built once before LoRA and FSDP (prefs
    scores its pairs with the initial weights there); `run(model, step)` -> {"eval/<name>": float} on every rank."""

    def __init__(self, args, model, processor, device, out: Path):
        self.task, self.every, self.template, self.processor, self.device = (args.eval_task, args.eval_every,
                                                                              args.template, processor, device)
        self.batch_size, self.beta = args.eval_batch_size, args.beta
        self.max_new_tokens = args.eval_max_new_tokens or E.DEFAULT_MAX_NEW_TOKENS.get(self.task, 0)
        self.best_name = args.keep_best.removeprefix("eval/") if args.keep_best else None
        self.best, self.seconds = None, []
        root = args.eval_image_root or str(Path(args.eval_data).resolve().parent)
        bad = Counter()
        self.synonyms = None
        if self.task == "pope":
            self.examples = E.dedupe(E.load_pope([args.eval_data], root, bad), bad)
        elif self.task == "chair":
            if args.eval_synonyms:
                self.synonyms = json.loads(Path(args.eval_synonyms).read_text())
            self.examples, _ = E.load_chair([args.eval_data], root, args.eval_annotations, bad, self.synonyms)
        else:
            self._prepare_pairs(args, model, processor, root, device, out)
        self.examples = self.examples[:args.eval_limit] if args.eval_limit else self.examples
        if not self.examples:
            raise ValueError(f"--eval-data {args.eval_data}: no usable {self.task} example "
                             f"({dict(bad) or 'empty file'})")
        self.bad = {k: v for k, v in bad.items() if v}

    def _prepare_pairs(self, args, model, processor, root, device, out):
        from nanoalign.batch import encode_all
        from nanoalign.data import load_examples
        from nanoalign.refcache import build_cache
        pairs, skipped = load_examples(args.eval_data, args.eval_data_format, root)
        if any(ex.rejected is None for ex in pairs):
            raise ValueError(f"--eval-data {args.eval_data}: rows without a rejected response; --eval-task prefs "
                             "needs pairs")
        pairs = pairs[:args.eval_limit] if args.eval_limit else pairs
        encoded, _ = encode_all(pairs, processor, root, args.template, args.max_len, log=tu.print0)
        self.pairs, self.root = pairs, root
        self.ref_cache, self.keys = build_cache(model, pairs, encoded, processor, args.model, out / "refcache-eval",
                                                root, args.template, args.batch_size, device)
        self.examples = encoded

    # ------------------------------------------------------------------------------------------------------ when
    def due(self, step: int, max_steps: int) -> bool:
        """Evaluate after optimizer step `step` (1-based)? Every `every` steps and after the last."""
        return step == max_steps or (self.every > 0 and step % self.every == 0)

    def n_evals(self, start_step: int, max_steps: int) -> int:
        return 1 + sum(self.due(s, max_steps) for s in range(start_step + 1, max_steps + 1))

    def plan(self, start_step: int, max_steps: int) -> str:
        """The start line: what is evaluated, how often, how much per rank."""
        world = tu.world_size()
        per_rank = -(-len(self.examples) // world)
        how = (f"greedy, up to {self.max_new_tokens} new tokens" if self.task != "prefs" else
               f"accuracy and margin at beta {self.beta:g}")
        return (f"eval: {self.task} on {len(self.examples)} held-out examples ({per_rank} per rank, {how}), "
                f"{self.n_evals(start_step, max_steps)} times (step {start_step}, every {self.every or '-'} steps, "
                f"the last){'; keeps the best ' + self.best_name + ' in best/' if self.best_name else ''}; "
                "time per eval: printed after the first")

    # ------------------------------------------------------------------------------------------------------ run
    def run(self, model, step: int) -> dict:
        """Evaluate `model` (plain or FSDP-sharded; every rank calls this) -> {"eval/<name>": float}."""
        t0 = time.time()
        world, rank = tu.world_size(), tu.rank()
        share = list(range(rank, len(self.examples), world))
        n_batches = -(-(-(-len(self.examples) // world)) // self.batch_size)  # the same on every rank
        rows = self._pairs(model, share, n_batches) if self.task == "prefs" else self._generate(model, share,
                                                                                                 n_batches)
        if dist.is_initialized() and world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        out = {f"eval/{k}": v for k, v in self._summary(rows).items()}
        self.seconds.append(time.time() - t0)
        if len(self.seconds) == 1:
            tu.print0(f"eval at step {step}: {self.seconds[0]:.1f}s per eval")
        return out

    def _generate(self, model, share, n_batches):
        from nanoalign.generate import generate_text
        from nanoalign.image import ImageError, open_image
        rows, bad = [], Counter()
        for b in range(n_batches):
            idx = share[b * self.batch_size:(b + 1) * self.batch_size]
            pad = not idx  # this rank's share is used up: one example, answer dropped, so the gathers pair up
            exs = [self.examples[i] for i in (idx or [0])]
            images, keep = [], []
            for ex in exs:
                try:
                    images.append(open_image(ex["image"]))
                    keep.append(ex)
                except ImageError as e:
                    bad[e.reason] += 1
                    images.append(None)
                    keep.append(None)
            prompts = [ex["prompt"] if ex else "" for ex in keep]
            answers = generate_text(model, self.processor, images, prompts, self.template,
                                    max_new_tokens=self.max_new_tokens, batch_size=len(prompts))
            if pad:
                continue
            for ex, im, ans in zip(keep, images, answers):
                if ex is not None:
                    ex = dict(ex, synonyms=self.synonyms) if self.synonyms else ex
                    rows.append(E._result_row(self.task, ex, str(ans), None, im, bad))
        return rows

    @torch.no_grad()
    def _pairs(self, model, share, n_batches):
        from nanoalign.batch import collate, open_image
        from nanoalign.forward import forward
        from nanoalign.ops import preference_loss
        from nanoalign.refcache import reference_logps
        was_training = model.training
        model.eval()
        rows = []
        for b in range(n_batches):
            idx = share[b * self.batch_size:(b + 1) * self.batch_size]
            items = [self.examples[i] for i in (idx or [0])]
            batch = collate(items, ["chosen", "rejected"], self.processor,
                            [open_image(self.pairs[it.index], self.root) for it in items], vision_always=True)
            ref = reference_logps(batch, [self.keys[it.index] for it in items], self.ref_cache, None, self.device)
            h = forward(model, batch, self.device)  # (2P, T, H)
            labels = batch["labels"].to(self.device)
            _, m = preference_loss(h, model.lm_head_weight, labels, batch["token_weights"].to(self.device),
                                   ref.to(self.device), loss_type="dpo", beta=self.beta)
            if idx:
                rows += [{"accuracy": float(a), "margin": float(g)} for a, g in zip(m["accuracy"], m["margin"])]
        model.train(was_training)
        return rows

    def _summary(self, rows) -> dict:
        if self.task == "prefs":
            n = max(1, len(rows))
            return {"pref_accuracy": sum(r["accuracy"] for r in rows) / n, "pref_margin": sum(r["margin"] for r in rows) / n}
        s = E.summarize(self.task, rows, self.synonyms)
        if self.task == "pope":
            out = {f"pope_{k}": s[k] for k in ("accuracy", "f1", "precision", "recall", "yes_ratio")}
        else:
            out = {"chair_i": s["chair_i"], "chair_s": s["chair_s"], "chair_recall": s["recall"],
                   "chair_length": s["mean_length"]}
        return {k: v for k, v in out.items() if v is not None}  # None: a ratio over zero rows, not logged

    # ------------------------------------------------------------------------------------------------------ best
    def improved(self, metrics: dict) -> bool:
        """Is metrics' --keep-best value the best so far? (False without --keep-best or without the key)"""
        v = metrics.get(f"eval/{self.best_name}") if self.best_name else None
        if v is None:
            return False
        better = self.best is None or (v < self.best if self.best_name in LOWER_IS_BETTER else v > self.best)
        if better:
            self.best = v
        return better
