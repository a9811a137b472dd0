"""train.py -- preference alignment of LLaVA-style vision-language models, in one file.

    python train.py --algo dpo --model DIR --data pairs.jsonl --data-format prefs --out runs/dpo
    torchrun --standalone --nproc_per_node 2 train.py --algo ddpo --model DIR --data rlhf-v.parquet --data-format rlhfv

Algorithms (the loss formulas, their papers and our departures are in nanoalign/losses.py and nanoalign/ops.py):
    sft     next-token NLL on the chosen response (how the toy world's base model is made)
    dpo     -log sigmoid(beta * rho)                         rho = policy/reference log-ratio margin (chosen - rejected)
    ipo     (rho - 1/(2 beta))^2                             Azar et al. 2024
    slic    max(0, 1 - beta * rho)                           SLiC-HF hinge
    ddpo    dpo on RLHF-V's dense scores: gamma on corrected tokens (explicit spans, else a token diff)
    povid   0.5 * dpo(chosen, data rejected) + 0.5 * dpo(chosen, noisy-self rejected): the noisy-self rejected
            response is the policy's teacher-forced argmax under a diffusion-noised image (POVID; paper 000 Eq. 5)

Sections, top to bottom: arguments, distributed init, model, data, reference log-probs, FSDP, optimizer, resume,
the rollout hook, the loop, save. Everything shared with other entry points lives in nanoalign/.
Where this departs from the papers: the reference log-probs of offline algorithms come from a cache computed once
with the initial weights (RLHF-V does the same); POVID's noisy-self reference log-probs come from a frozen reference
model kept in memory, since that response changes every step.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanoalign import trainutil as tu
from nanoalign.batch import collate, encode_all, image_bytes, open_image, scatter_response_values
from nanoalign.checkpoint import load_pretrained
from nanoalign.data import FORMATS, load_examples
from nanoalign.lora import DEFAULT_TARGETS, apply_lora, load_lora_adapter, lora_modules
from nanoalign.noise import noisy_pixel_values
from nanoalign.ops import preference_loss, token_logprobs
from nanoalign.refcache import RefLogpCache, checkpoint_fingerprint, example_key
from nanoalign.tokenizer import TEMPLATES

PREFERENCE_ALGOS = {"dpo": "dpo", "ipo": "ipo", "slic": "slic", "ddpo": "ddpo", "povid": "dpo"}  # algo -> loss
ROLLOUT_ALGOS = {"povid"}  # the one place that says which algorithms make responses during training
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "slic": 0.1, "ddpo": 0.5, "povid": 0.1}  # ddpo: RLHF-V's 0.5


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None, toy_algo=None):
    """Command line -> namespace. Without --model/--data (the toy world's run) the toy's settings for the algorithm
    (toy_algo, else --algo; nanoalign.toy.run.train_defaults) are the defaults, so any option given overrides them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--algo", default="ddpo", choices=["sft", *PREFERENCE_ALGOS], help="the algorithm (default ddpo)")
    g.add_argument("--model", help="llava-hf checkpoint folder (config.json, *.safetensors, tokenizer.json)")
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
    g.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    g.add_argument("--projector-lr", type=float, default=None, help="projector learning rate (default --lr)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning (the paper: 128)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank: 256 at rank 128)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names")
    g.add_argument("--freeze-vision", action="store_true", help="freeze the vision tower")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder activations in backward")
    g = p.add_argument_group("preference losses")
    g.add_argument("--beta", type=float, default=None, help="beta (default: dpo/ipo/slic/povid 0.1, ddpo 0.5)")
    g.add_argument("--gamma", type=float, default=5.0, help="DDPO weight of corrected tokens (RLHF-V: 5)")
    g.add_argument("--ddpo-average", action="store_true", help="DDPO score divided by N = |y_u| + gamma |y_c|")
    g.add_argument("--sft-weight", type=float, default=0.0, help="weight of an NLL term on the chosen response")
    g.add_argument("--noise-step", type=int, default=500, help="POVID diffusion step t of the noisy image")
    g.add_argument("--ref-cache", default=None, help="reference log-prob cache folder (default OUT/refcache)")
    g = p.add_argument_group("data and run")
    g.add_argument("--max-len", type=int, default=4096, help="max tokens of a sequence; only responses are cut")
    g.add_argument("--strict", action="store_true", help="stop at the first bad data row instead of skipping it")
    g.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps (0 = only at the end)")
    g.add_argument("--keep", type=int, default=2, help="keep the newest K step checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--wandb", default=None, help="log to this Weights & Biases project (needs wandb installed)")
    g.add_argument("--toy-cache", default=None, help="toy world cache folder (no --model/--data; default "
                   "~/.cache/nanoalign/toy/<hash>)")
    g.add_argument("--toy-seed", type=int, default=0, help="seed of the toy world and its SFT base model")
    args = p.parse_args(argv)
    if args.model is None and args.data is None:
        from nanoalign.toy.run import train_defaults
        p.set_defaults(**train_defaults(toy_algo or args.algo))
        args = p.parse_args(argv)
    if args.beta is None:
        args.beta = DEFAULT_BETA.get(args.algo, 0.1)
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.out is None:
        args.out = f"runs/{args.algo}"
    for name in ("batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if (args.model is None) != (args.data is None):
        p.error("--model and --data go together (give neither for the built-in toy-world run)")
    return args


def main(args):
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
    preference = args.algo in PREFERENCE_ALGOS

    # ------------------------------------------------------------------------------------------------------ model
    model, processor = load_pretrained(args.model, dtype=torch.float32)
    if processor is None:
        raise SystemExit(f"error: {args.model}: no tokenizer.json, cannot tokenize the data")
    model_config = model.config

    # ------------------------------------------------------------------------------------------------------- data
    examples, skipped = load_examples(args.data, args.data_format, args.image_root, strict=args.strict)
    tu.print0(f"data: {len(examples)} examples from {args.data} ({args.data_format}); {skipped.total()} rows skipped")
    if skipped.total():
        tu.print0(str(skipped))
    if preference and any(ex.rejected is None for ex in examples):
        raise SystemExit(f"error: --algo {args.algo} needs pairs, but {args.data} ({args.data_format}) has rows "
                         "without a rejected response")
    gamma = args.gamma if args.algo == "ddpo" else None
    encoded, _ = encode_all(examples, processor, args.image_root, args.template, args.max_len, gamma, args.strict,
                            log=tu.print0)
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = max(1, len(encoded) // global_batch)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))

    def batch_indices(step: int, micro: int) -> list[int]:
        """Examples of (step, micro-step) on this rank: a fresh seeded permutation each epoch, split so that the
        same global batch is used whatever the number of ranks (micro-step m on rank r takes chunk m*world + r)."""
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        start = pos * global_batch + (micro * world + rank) * args.batch_size
        return [order[i % len(order)] for i in range(start, start + args.batch_size)]

    def make_batch(indices, sides):
        items = [encoded[i] for i in indices]
        images = [open_image(examples[it.index], args.image_root) for it in items]
        return items, images, collate(items, sides, processor, images)

    # ------------------------------------------------------------------------------------- reference log-probs
    # Offline algorithms score every pair once with the initial weights (= the reference) and never load a
    # reference model; entries are keyed by token ids + image bytes + image settings (nanoalign/refcache.py).
    ref_cache, keys = None, {}
    if preference:
        cache_dir = Path(args.ref_cache or out / "refcache")
        ref_cache = RefLogpCache(cache_dir, checkpoint_fingerprint(args.model))
        settings = {"image_processor": processor.image_processor.to_dict(), "template": args.template}
        for it in encoded:
            ex = examples[it.index]
            keys[it.index] = example_key(it.prompt_ids + it.chosen_ids, it.prompt_ids + it.rejected_ids,
                                         image_bytes(ex, args.image_root), settings)
        todo = [pos for pos, it in enumerate(encoded) if keys[it.index] not in ref_cache]  # positions in encoded
        mine = todo[rank::world]
        tu.print0(f"reference log-probs: {len(encoded) - len(todo)} cached, {len(todo)} to compute "
                  f"({ref_cache.path})")
        new = {}
        model.to(device).eval()
        with torch.no_grad():
            for i in range(0, len(mine), args.batch_size):
                items, _, b = make_batch(mine[i:i + args.batch_size], ["chosen", "rejected"])
                logp = response_logps(model, b, device)
                P = len(items)
                for k, it in enumerate(items):
                    new[keys[it.index]] = (logp[k], logp[P + k])
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, new)
            new = {k: v for part in gathered for k, v in part.items()}
        for k, (c, r) in new.items():
            ref_cache.put(k, c, r)
        if todo and rank == 0:
            ref_cache.save()

    ref_model = None
    if args.algo in ROLLOUT_ALGOS:  # POVID's noisy-self rejected changes every step: score it with a frozen copy
        ref_model, _ = load_pretrained(args.model, dtype=torch.float32)
        ref_model.requires_grad_(False)

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
            resumed, _ = load_pretrained(resume_from, dtype=torch.float32)
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
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else \
            MixedPrecisionPolicy()
        for m in [model, ref_model]:
            if m is None:
                continue
            fully_shard(m.vision_tower, mp_policy=mp)
            for layer in m.language_model.model.layers:
                fully_shard(layer, mp_policy=mp)
            fully_shard(m, mp_policy=mp)
    elif ref_model is not None:
        ref_model.to(device)

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
    tu.print0(f"{args.algo}: {len(encoded)} examples, {world} rank(s), global batch {global_batch}, "
              f"{max_steps} steps, {n_params / 1e6:.2f}M trainable parameters")

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

    # --------------------------------------------------------------------------------------------- rollout hook
    def rollout(items, images, b):
        """The one place where algorithms make responses during training (online / mixed / RL issues plug in
        here). POVID: run the chosen tokens under a noised image and take the policy's argmax at every response
        position (teacher forcing); those tokens, scored under the clean image, are the noisy-self rejected.
        Returns the batch with rows [chosen | data rejected | noisy-self] and the reference log-probs of the last."""
        P = len(items)
        noisy = b["pixel_values"]
        if noisy is not None:  # a fresh draw every call, as POVID does
            ip = processor.image_processor
            noisy = noisy_pixel_values(noisy, ip.image_mean, ip.image_std, args.noise_step)
        with torch.no_grad():
            h = forward(model, {**b, "pixel_values": noisy}, device, rows=slice(0, P))  # (P,T,H) chosen rows
            scored = b["labels"][:P].to(device) != -100  # (P,T)
            logits = h[scored].float() @ model.lm_head_weight.float().T  # (n_scored, V): response rows only
            if 0 <= model_config.image_token_index < logits.shape[1]:
                logits[:, model_config.image_token_index] = -float("inf")  # never emit the image placeholder
            argmax = logits.argmax(-1).cpu()  # (n_scored,)
        for it, toks in zip(items, argmax.split(scored.sum(1).tolist())):
            it.noisy_ids, it.noisy_w = toks.tolist(), None
        b3 = collate(items, ["chosen", "rejected", "noisy"], processor, [None] * P)  # text only, then the images:
        b3.update(pixel_values=b["pixel_values"], image_sizes=b["image_sizes"],
                  image_index=None if b["image_index"] is None else torch.arange(P).repeat(3))
        with torch.no_grad():
            hr = forward(ref_model, b3, device, rows=slice(2 * P, 3 * P))
            ref_noisy = token_logprobs(hr, ref_model.lm_head_weight, b3["labels"][2 * P:].to(device)).cpu()
        return b3, ref_noisy

    # ------------------------------------------------------------------------------------------------------ loop
    progress = tu.Progress(max_steps, start_step)
    loss_fn = PREFERENCE_ALGOS.get(args.algo)
    last_save = None
    for step in range(start_step, max_steps):
        t0 = time.time()
        sums, n_tokens = {}, 0
        for micro in range(args.grad_accum):
            idx = batch_indices(step, micro)
            if args.algo == "sft":
                items, _, b = make_batch(idx, ["chosen"])
                h = forward(model, b, device)
                labels = b["labels"].to(device)
                logp = token_logprobs(h, model.lm_head_weight, labels)  # (R,T), never (R,T,V) logits
                loss = -logp.sum() / (labels != -100).sum().clamp_min(1)  # token-mean NLL of the responses
                metrics = {}
            else:
                items, images, b = make_batch(idx, ["chosen", "rejected"])
                P = len(items)
                cached = [ref_cache.get(keys[it.index]) for it in items]  # (chosen, rejected) per pair
                ref = scatter_response_values(b["labels"], [c for c, _ in cached] + [r for _, r in cached])
                if args.algo in ROLLOUT_ALGOS:
                    b, ref_noisy = rollout(items, images, b)
                    ref = torch.cat([torch.nn.functional.pad(ref, (0, b["labels"].shape[1] - ref.shape[1])),
                                     ref_noisy], 0)
                h = forward(model, b, device)  # (2P or 3P, T, H)
                labels, w, ref = b["labels"].to(device), b["token_weights"].to(device), ref.to(device)
                rejected_sets = [P] + ([2 * P] if args.algo in ROLLOUT_ALGOS else [])
                loss, metrics = 0.0, {}
                for r0 in rejected_sets:  # povid: the mean of DPO against the data's rejected and the noisy-self one
                    rows = slice(None, 2 * P) if r0 == P else torch.cat([torch.arange(P), torch.arange(r0, r0 + P)])
                    l, m = preference_loss(h[rows], model.lm_head_weight, labels[rows], w[rows], ref[rows],
                                           loss_type=loss_fn, beta=args.beta, sft_weight=args.sft_weight,
                                           average=args.ddpo_average and args.algo == "ddpo")
                    loss = loss + l / len(rejected_sets)
                    for k, v in m.items():
                        metrics[k] = metrics.get(k, 0) + v.float().mean() / len(rejected_sets)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: non-finite loss {float(loss.detach())} at step {step + 1}, micro-step {micro}, "
                                 f"rank {rank}, examples {[examples[i].id for i in idx]}; stopping before the "
                                 f"optimizer step (last checkpoint: {last_save or 'none'})")
            (loss / args.grad_accum).backward()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / args.grad_accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / args.grad_accum
            n_tokens += int(b["attention_mask"].sum())
        grad_norm = clip_grad_norm(model, args.clip)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        rec = {"step": step + 1, **{k: tu.all_mean(v) for k, v in sums.items()}, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tu.all_mean(n_tokens / (time.time() - t0)) * world,
               "peak_mem_mb": tu.peak_memory_mb(), "time_s": time.time() - t0}
        if preference:
            rec["resp_len"] = tu.all_mean(float((b["labels"] != -100).sum(1).float().mean()))
        log.write(rec)
        if wandb is not None:
            wandb.log(rec, step=step + 1)
        progress.update(f"loss {rec['loss']:.4f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < max_steps:
            last_save = tu.save_checkpoint(out, f"{tu.STEP_PREFIX}{step + 1:06d}", model, model_config, processor,
                                           lora_layers, optimizer, scheduler, step + 1, args, args.keep)
    progress.close()

    # -------------------------------------------------------------------------------------------------------- save
    final = tu.save_checkpoint(out, "final", model, model_config, processor, lora_layers, optimizer, scheduler,
                               max_steps, args)
    tu.print0(f"saved {final}")
    return final


def forward(model, b: dict, device, rows=slice(None)):
    """Hidden states (R,T,H) of the batch rows `rows` (a slice), each image through the vision tower once."""
    to = lambda x: None if x is None else x.to(device)
    return model(b["input_ids"][rows].to(device), to(b["pixel_values"]), to(b["image_sizes"]),
                 b["attention_mask"][rows].to(device),
                 image_index=None if b["image_index"] is None else to(b["image_index"][rows]))


@torch.no_grad()
def response_logps(model, b, device) -> list[torch.Tensor]:
    """Per-row 1-D tensors of log p(response token) under `model` (used for the reference cache)."""
    h = forward(model, b, device)
    labels = b["labels"].to(device)
    logp = token_logprobs(h, model.lm_head_weight, labels).cpu()
    return [logp[r][labels[r].cpu() != -100] for r in range(logp.shape[0])]


def clip_grad_norm(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


if __name__ == "__main__":
    _args = parse_args()
    try:
        if _args.model is None and _args.data is None:
            from nanoalign.toy.run import default_run
            default_run(_args, main, parse_args, list(PREFERENCE_ALGOS))
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
