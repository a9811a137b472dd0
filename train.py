"""train.py -- preference alignment of LLaVA-style vision-language models, in one file.

    python train.py --algo dpo --model DIR --data pairs.jsonl --data-format prefs --out runs/dpo
    torchrun --standalone --nproc_per_node 2 train.py --algo ddpo --model DIR --data rlhf-v.parquet --data-format rlhfv

Every algorithm is a row of ALGOS below (loss formulas and papers: nanoalign/losses.py). One step, in stages, each a
plain function of its own module:
    batch       the data's examples of this step                                 nanoalign/batch.py
    rollout     responses made during training (POVID's noisy-self)              nanoalign/rollout.py
    reward      scores of those responses (none of today's algorithms)           -
    reference   reference log-probs: the cache, or the frozen reference model    nanoalign/refcache.py
    objective   the policy's loss                                                nanoalign/objective.py
Sections, top to bottom: the table, arguments, distributed init, model, data, reference, LoRA, resume, FSDP,
optimizer, the loop, save. Where this departs from the papers: the reference log-probs of the data's pairs come from
a cache computed once with the initial weights (RLHF-V does the same); responses made during training are scored by
a frozen reference model kept in memory, since they change every step.
"""
import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from nanoalign import evaltrain, rollout
from nanoalign import trainutil as tu
from nanoalign.batch import collate, encode_all, open_image
from nanoalign.checkpoint import load_pretrained, resolve_model
from nanoalign.data import FORMATS, load_examples
from nanoalign.lora import DEFAULT_TARGETS, apply_lora, load_lora_adapter, lora_modules
from nanoalign.objective import objective
from nanoalign.refcache import build_cache, reference_logps
from nanoalign.tokenizer import TEMPLATES


# ------------------------------------------------------------------------------------------------ the algorithms
class Algo(NamedTuple):
    """One row of the algorithm table: what the step's stages do for this --algo."""
    loss: str  # the objective: "nll" | "dpo" | "ipo" | "slic" (nanoalign/objective.py, formulas in losses.py)
    beta: float = 0.1  # default --beta (recorded in the run's config even where the loss has none)
    weights: str | None = None  # token weighting of the scores: None | "ddpo" (RLHF-V's gamma on corrected tokens)
    responses: str = "none"  # made during training (nanoalign/rollout.py): "none" | "noisy_self"
    reward: str | None = None  # what scores the responses made during training: None (an annotator, a reward model)
    data: str = "pairs"  # what each --data row gives: "pairs" (prompt, chosen, rejected) | "responses" (prompt, one)


ALGOS = {  # rho = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)]
    "sft": Algo("nll", data="responses"),  # next-token NLL of the response: the toy world's base model
    "dpo": Algo("dpo", 0.1),  # -log sigmoid(beta rho): Rafailov et al. 2023
    "ipo": Algo("ipo", 0.1),  # (rho - 1/(2 beta))^2: Azar et al. 2024
    "slic": Algo("slic", 0.1),  # max(0, 1 - beta rho): the SLiC-HF hinge (Zhao et al. 2023)
    "ddpo": Algo("dpo", 0.5, weights="ddpo"),  # DPO on gamma-weighted scores: RLHF-V (Yu et al. 2024)
    "povid": Algo("dpo", 0.1, responses="noisy_self"),  # + DPO against the noisy-self response: Zhou et al. 2024
}


# ----------------------------------------------------------------------------------------------------- arguments
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Help(argparse.RawTextHelpFormatter):
    """--help shows every option's default (those whose text does not already say it)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is argparse.SUPPRESS or action.option_strings == ["-h", "--help"]:
            return h
        return f"{h} (default: %(default)s)" if h else "(default: %(default)s)"


def parse_args(argv=None, toy_algo=None):
    """Command line -> namespace. Without --model/--data (the toy world's run) the toy's settings for the algorithm
    (toy_algo, else --algo; nanoalign.toy.run.train_defaults) are the defaults, so any option given overrides them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    g = p.add_argument_group("what to train")
    g.add_argument("--algo", default="ddpo", choices=list(ALGOS), help="the algorithm (default ddpo)")
    g.add_argument("--model", help="llava-hf checkpoint folder (config.json, *.safetensors, tokenizer.json) or a "
                   "Hugging Face hub id org/name (fetched into the hub cache; HF_HUB_OFFLINE=1: the cache only)")
    g.add_argument("--revision", default=None, help="hub branch, tag or commit of an org/name --model (default main)")
    g.add_argument("--data", help="data file")
    g.add_argument("--data-format", choices=FORMATS, default="prefs", help="format of --data (default prefs)")
    g.add_argument("--image-root", help="folder the data's image paths are relative to (default: the data's folder)")
    g.add_argument("--template", default="vicuna_v1", choices=TEMPLATES, help="prompt template (vicuna_v1: LLaVA-1.5's)")
    g.add_argument("--out", default=None, help="output folder (default runs/<algo>)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --max-steps is not set")
    g.add_argument("--batch-size", type=int, default=4, help="pairs (sft: examples) per rank per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate, per optimizer step")
    g.add_argument("--projector-lr", type=float, default=None, help="projector learning rate (default --lr)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, in optimizer steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial adapters and the data order")
    g = p.add_argument_group("model")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning (the paper: 128)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank: 256 at rank 128)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout probability")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names")
    g.add_argument("--freeze-vision", action="store_true", help="freeze the vision tower")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder activations in backward")
    g.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the weights (and of AdamW's "
                   "state); bf16/fp16 halve the weights' memory, the loss and log-prob sums stay fp32")
    g.add_argument("--amp", action="store_true", help="mixed precision: bf16 compute (torch.autocast "
                   "on 1 process; FSDP's param_dtype bf16, reduce fp32 under torchrun; FSDP on CUDA always does)")
    g = p.add_argument_group("preference losses")
    g.add_argument("--beta", type=float, default=None, help="beta (default: the algorithm's, see ALGOS)")
    g.add_argument("--gamma", type=float, default=5.0, help="DDPO weight of corrected tokens (RLHF-V: 5)")
    g.add_argument("--ddpo-average", action="store_true", help="DDPO score divided by N = |y_u| + gamma |y_c|")
    g.add_argument("--sft-weight", type=float, default=0.0, help="weight of an NLL term on the chosen response")
    g.add_argument("--noise-step", type=int, default=500, help="POVID diffusion step t of the noisy image")
    g.add_argument("--ref-cache", default=None, help="reference log-prob cache folder (default OUT/refcache)")
    g = p.add_argument_group("data and run")
    g.add_argument("--max-len", type=int, default=4096, help="max tokens of a sequence, in tokens; only responses "
                   "are cut")
    g.add_argument("--strict", action="store_true", help="stop at the first bad data row instead of skipping it")
    g.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N optimizer steps (0 = only "
                   "at the end)")
    g.add_argument("--keep", type=int, default=2, help="keep the newest K step checkpoints, in checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--wandb", default=None, help="log to this Weights & Biases project (needs wandb installed)")
    g.add_argument("--toy-cache", default=None, help="toy world cache folder (no --model/--data; default "
                   "~/.cache/nanoalign/toy/<hash>)")
    g.add_argument("--toy-seed", type=int, default=0, help="seed of the toy world and its SFT base model")
    evaltrain.add_args(p)
    args = p.parse_args(argv)
    if args.model is None and args.data is None:
        from nanoalign.toy.run import train_defaults
        p.set_defaults(**train_defaults(toy_algo or args.algo))
        args = p.parse_args(argv)
    if args.beta is None:
        args.beta = ALGOS[args.algo].beta
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.out is None:
        args.out = f"runs/{args.algo}"
    for name in ("batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if (args.model is None) != (args.data is None):
        p.error("--model and --data go together (give neither for the built-in toy-world run)")
    if evaltrain.check_args(args):
        p.error(evaltrain.check_args(args))
    return args


def main(args):
    algo = ALGOS[args.algo]
    # ------------------------------------------------------------------------------------------- distributed init
    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if distributed and not dist.is_initialized():  # main() may run more than once per process (toy pipeline)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = tu.rank(), tu.world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # same initial weights/adapters on every rank
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    t_run = time.time()

    # ------------------------------------------------------------------------------------------------------ model
    # --model: a folder, or a hub id org/name fetched into (or, offline, found in) the Hugging Face cache
    args.model = str(resolve_model(args.model, args.revision)) if rank == 0 or not distributed else args.model
    if distributed:  # rank 0 fetched it; the others then find it in the cache
        dist.barrier()
        args.model = str(resolve_model(args.model, args.revision))
    dtype = DTYPES[args.dtype]  # the weights' dtype; --amp: fp32 weights, bf16 compute
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp and not distributed else \
        contextlib.nullcontext()
    model, processor = load_pretrained(args.model, dtype=dtype)
    if processor is None:
        raise SystemExit(f"error: {args.model}: no tokenizer.json, cannot tokenize the data")
    model_config = model.config

    # ------------------------------------------------------------------------------------------------------- data
    examples, skipped = load_examples(args.data, args.data_format, args.image_root, strict=args.strict)
    tu.print0(f"data: {len(examples)} examples from {args.data} ({args.data_format}); {skipped.total()} rows skipped")
    if skipped.total():
        tu.print0(str(skipped))
    if algo.data == "pairs" and any(ex.rejected is None for ex in examples):
        raise SystemExit(f"error: --algo {args.algo} needs pairs, but {args.data} ({args.data_format}) has rows "
                         "without a rejected response")
    gamma = args.gamma if algo.weights == "ddpo" else None  # DDPO's token weights, set once at encoding
    encoded, _ = encode_all(examples, processor, args.image_root, args.template, args.max_len, gamma, args.strict,
                            log=tu.print0)
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = max(1, len(encoded) // global_batch)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    sides = ["chosen", "rejected"] if algo.data == "pairs" else ["chosen"]

    def batch_indices(step: int, micro: int) -> list[int]:
        """Examples of (step, micro-step) on this rank: a fresh seeded permutation each epoch, split so that the
        same global batch is used whatever the number of ranks (micro-step m on rank r takes chunk m*world + r)."""
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        start = pos * global_batch + (micro * world + rank) * args.batch_size
        return [order[i % len(order)] for i in range(start, start + args.batch_size)]

    # ------------------------------------------------------------------------------------------------ reference
    # The data's pairs are scored once with the initial weights (= the reference), keyed by token ids + image bytes
    # + image settings (nanoalign/refcache.py). Responses made during training change every step: a frozen copy.
    ref_cache, keys, reference = None, {}, None
    if algo.data == "pairs":
        ref_cache, keys = build_cache(model, examples, encoded, processor, args.model,
                                      args.ref_cache or out / "refcache", args.image_root, args.template,
                                      args.batch_size, device)
    if algo.responses != "none":
        reference, _ = load_pretrained(args.model, dtype=dtype)
        reference.requires_grad_(False)
    # evaluation during training: its held-out pairs are scored here with the initial weights (prefs)
    evaluator = evaltrain.Evaluator(args, model, processor, device, out) if args.eval_task else None

    # ---------------------------------------------------------------------------------------------- LoRA, freeze
    model.train()
    if args.lora_rank > 0:
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=args.lora_targets.split(","), prefix="language_model")
    if args.freeze_vision:
        model.vision_tower.requires_grad_(False)
    model.gradient_checkpointing = args.grad_checkpointing
    lora_layers = lora_modules(model)

    # ------------------------------------------------------------------------------------------------------ resume
    resume_from = tu.latest_checkpoint(out) if args.resume else None
    state = None
    if args.resume and resume_from is None:
        tu.print0(f"--resume: no checkpoint in {out}, starting from step 0")
    if resume_from is not None:
        state = tu.load_train_state(resume_from)
        if lora_layers:
            load_lora_adapter(model, str(resume_from / "adapter"))
        else:
            resumed, _ = load_pretrained(resume_from, dtype=dtype)
            model.load_state_dict(resumed.state_dict())
        tu.print0(f"resuming from {resume_from} (step {state['step']})")

    # -------------------------------------------------------------------------------------------------------- FSDP
    # Units: the vision tower, each decoder block, then the root (embeddings, projector, final norm, LM head).
    # The final norm + LM head stay in the root unit, not a unit of their own: the fused loss reads the LM head
    # weight directly (it never calls lm_head.forward), and the root's parameters stay unsharded between forward
    # and backward, so that weight is the full tensor there and its gradient is reduce-scattered with the root's.
    model.to(device)
    if distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if \
            (cuda or args.amp) and dtype == torch.float32 else MixedPrecisionPolicy()
        for m in [model, reference]:
            if m is None:
                continue
            fully_shard(m.vision_tower, mp_policy=mp)
            for layer in m.language_model.model.layers:
                fully_shard(layer, mp_policy=mp)
            fully_shard(m, mp_policy=mp)
    elif reference is not None:
        reference.to(device)

    # --------------------------------------------------------------------------------------------------- optimizer
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    projector = [p for n, p in trainable if n.startswith("multi_modal_projector.")]
    others = [p for n, p in trainable if not n.startswith("multi_modal_projector.")]
    groups = [{"params": others, "lr": args.lr}]
    if projector:
        groups.append({"params": projector, "lr": args.projector_lr or args.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: tu.cosine_with_warmup(s, max_steps, args.warmup_steps, args.min_lr_ratio))
    start_step = 0
    if state is not None:
        tu.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        tu.set_rng_state(state["rng"])
        start_step = state["step"]
    n_params = sum(p.numel() for _, p in trainable)
    precision = (f"weights {args.dtype}" + (", bf16 compute (--amp)" if args.amp or (distributed and cuda and
                                                                             dtype == torch.float32) else ""))
    tu.print0(tu.start_lines(algo=args.algo, model=args.model, data=args.data, n_examples=len(encoded), world=world,
                             global_batch=global_batch, max_steps=max_steps, start_step=start_step,
                             n_params=n_params, precision=precision, out=out, device=str(device),
                             eval_plan=evaluator.plan(start_step, max_steps) if evaluator else None))

    header = {"config": vars(args), "git_sha": tu.git_sha(), "argv": sys.argv, "world": world,
              "max_steps": max_steps, "model_config": model_config.to_dict()}
    log = tu.MetricsLog(out / "metrics.jsonl", header, start_step if state is not None else None)
    wandb = None
    if args.wandb and rank == 0:
        try:
            import wandb
            wandb.init(project=args.wandb, config=header)
        except ImportError:
            tu.print0("warning: --wandb given but wandb is not installed; logging to metrics.jsonl only")
            wandb = None

    # ------------------------------------------------------------------------------------------------------ loop
    records = []  # this run's metrics.jsonl records, for the summary
    if evaluator is not None and state is None:  # the initial policy: step 0 of the eval curves
        records.append({"step": 0, **evaluator.run(model, 0)})
        log.write(records[-1])
        if evaluator.improved(records[-1]):
            tu.save_checkpoint(out, "best", model, model_config, processor, lora_layers, step=0)
    progress = tu.Progress(max_steps, start_step)
    last_save = None
    for step in range(start_step, max_steps):
        t0 = time.time()
        sums, n_tokens = {}, 0
        for micro in range(args.grad_accum):
            # batch: P examples, rows [chosen | rejected] (sft: [chosen]); vision_always: a text-only batch still runs
            # the vision tower on a blank image (zero gradients), so 1 rank and N FSDP ranks update it alike
            idx = batch_indices(step, micro)
            items = [encoded[i] for i in idx]
            b = collate(items, sides, processor, [open_image(examples[it.index], args.image_root) for it in items],
                        vision_always=True)
            # rollout: responses made during training, appended as more blocks of P rejected rows
            if algo.responses == "noisy_self":
                b = rollout.noisy_self(model, items, b, processor, args.noise_step, device)
            # reward: none of today's algorithms scores its responses (Online-DPO's annotator, RLOO's reward: here)
            # reference: per-token reference log-probs of every response row
            ref = None
            if algo.data == "pairs":
                ref = reference_logps(b, [keys[it.index] for it in items], ref_cache, reference, device)
            # objective
            with amp:  # --amp on one process: bf16 matmuls; the loss and log-prob sums stay fp32 (nanoalign/ops.py)
                loss, metrics = objective(algo.loss, model, b, ref, len(items), device, beta=args.beta,
                                          sft_weight=args.sft_weight,
                                          average=args.ddpo_average and algo.weights == "ddpo")
            if not torch.isfinite(loss):
                raise SystemExit(f"error: non-finite loss {float(loss.detach())} at step {step + 1}, "
                                 f"micro-step {micro}, rank {rank}, examples {[examples[i].id for i in idx]}; stopping "
                                 f"before the optimizer step (last checkpoint: {last_save or 'none'})")
            (loss / args.grad_accum).backward()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / args.grad_accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / args.grad_accum
            n_tokens += int(b["attention_mask"].sum())
        grad_norm = tu.clip_grad_norm(model, args.clip)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        rec = {"step": step + 1, **{k: tu.all_mean(v) for k, v in sums.items()}, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tu.all_mean(n_tokens / (time.time() - t0)) * world,
               "peak_mem_mb": tu.peak_memory_mb(), "time_s": time.time() - t0}
        if algo.data == "pairs":
            rec["resp_len"] = tu.all_mean(float((b["labels"] != -100).sum(1).float().mean()))
        if evaluator is not None and evaluator.due(step + 1, max_steps):
            rec.update(evaluator.run(model, step + 1))
            if evaluator.improved(rec):
                tu.save_checkpoint(out, "best", model, model_config, processor, lora_layers, step=step + 1)
        log.write(rec)
        records.append(rec)
        if wandb is not None:
            wandb.log(rec, step=step + 1)
        if step == start_step:
            tu.print0(f"first step: {rec['time_s']:.1f}s; {max_steps - start_step} steps take about "
                      f"{rec['time_s'] * (max_steps - start_step) / 60:.1f} min (+ evaluations)")
        progress.update(tu.step_postfix(rec))
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < max_steps:
            last_save = tu.save_checkpoint(out, f"{tu.STEP_PREFIX}{step + 1:06d}", model, model_config, processor,
                                           lora_layers, optimizer, scheduler, step + 1, args, args.keep)
    progress.close()

    # -------------------------------------------------------------------------------------------------------- save
    final = tu.save_checkpoint(out, "final", model, model_config, processor, lora_layers, optimizer, scheduler,
                               max_steps, args)
    tu.print0(f"saved {final}")
    if wandb is not None:
        wandb.finish()  # flushes the run (WANDB_MODE=offline: OUT-independent ./wandb/offline-run-*, `wandb sync`)
    if rank == 0:
        plot = tu.write_plot(out)
        ev = (f"python -m nanoalign.eval --model {final} --task {args.eval_task} --data {args.eval_data} "
              f"--image-root {args.eval_image_root or Path(args.eval_data).resolve().parent} --out {out / 'eval'}"
              if args.eval_task in ("pope", "chair") else
              f"python -m nanoalign.eval --model {final} --task pope --data POPE.jsonl --image-root COCO_DIR "
              f"--out {out / 'eval'}")
        if args.eval_task == "chair":
            ev += f" --annotations {args.eval_annotations}"
        best = (evaluator.best_name, evaluator.best, out / "best") if evaluator and evaluator.best_name and \
            evaluator.best is not None else None
        print(tu.summary_lines(records, out=out, final=final, seconds=time.time() - t_run, plot=plot,
                               eval_command=ev, best=best), flush=True)
    return final


if __name__ == "__main__":
    _args = parse_args()
    try:
        if _args.model is None and _args.data is None:
            from nanoalign.toy.run import default_run
            default_run(_args, main, parse_args, list(ALGOS))
        else:
            main(_args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input: one line, not a traceback
        if os.environ.get("NANOALIGN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
