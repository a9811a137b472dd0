"""train.py -- preference alignment of LLaVA-style vision-language models, in one file.

    python train.py --algo dpo --model DIR --data pairs.jsonl --data-format prefs --out runs/dpo
    python train.py --algo rm --model DIR --data pairs.jsonl --out runs/rm         (reward model: runs/rm/final)
    python train.py --algo grpo --model DIR --data prompts.jsonl --reward rm:runs/rm/final --k 4 --out runs/grpo
    torchrun --standalone --nproc_per_node 2 train.py --algo ddpo --model DIR --data rlhf-v.parquet --data-format rlhfv

Every algorithm is a row of ALGOS below (loss formulas and papers: nanoalign/losses.py). One step, in stages, each a
plain function of its own module:
    batch       the data's examples of this step                                 nanoalign/batch.py
    rollout     responses made during training (POVID, online pairs, BDHS; RL)   nanoalign/rollout.py, rlstep.py
    reward      scores of those responses (annotators; RL's --reward)            nanoalign/annotate.py, reward.py
    reference   reference log-probs: the cache, or the frozen reference model    nanoalign/refcache.py
    objective   the policy's loss                                                nanoalign/objective.py
Sections, top to bottom: the table, arguments, distributed init, model, data, reference, LoRA, resume, FSDP,
optimizer, the loop, save. Where this departs from the papers: the reference log-probs of the data's pairs come from
a cache computed once with the initial weights (RLHF-V does the same); responses made during training are scored by
a frozen reference model kept in memory, since they change every step.
"""
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from nanoalign import evaltrain, rl, rlstep, rollout, runs
from nanoalign.cli import DefaultsHelp, Parser, missing_path, run, spec_path
from nanoalign import trainutil as tu
from nanoalign.annotate import load_annotator
from nanoalign.batch import collate, encode_all, open_image
from nanoalign.checkpoint import check_finite, load_pretrained, resolve_model
from nanoalign.data import FORMATS, load_examples
from nanoalign.lora import DEFAULT_TARGETS, adapters_off, apply_lora, load_lora_adapter, lora_modules
from nanoalign.objective import objective, pair_mean_over_ranks
from nanoalign.refcache import build_cache, reference_logps
from nanoalign.reward import check_oracle, load_reward, reward_head, save_reward_head
from nanoalign.tokenizer import TEMPLATE_CHOICES


# ------------------------------------------------------------------------------------------------ the algorithms
class Algo(NamedTuple):
    """One row of the algorithm table: what the step's stages do for this --algo."""
    loss: str  # the objective: "nll" | "dpo" | "ipo" | "slic" (objective.py) | "bt" | "rloo" | "ppo" | "grpo" (rlstep.py)
    beta: float = 0.1  # default --beta (recorded in the run's config even where the loss has none)
    weights: str | None = None  # token weighting of the scores: None | "ddpo" (RLHF-V's gamma on corrected tokens)
    responses: str = "none"  # made during training: "none" | "noisy_self" | rollout.ONLINE (rollout.py)
    #                          | "k_samples" (RL: k samples per prompt, rlstep.py)
    reward: str | None = None  # what scores them: None | "annotator" (--annotator) | "reward" (--reward's spec)
    data: str = "pairs"  # what each --data row must give (nanoalign.data.NEEDS): "pairs" (prompt, chosen, rejected)
    #                      | "responses" (prompt, chosen)
    #                      | "prompts" (only the prompt is used)


ALGOS = {  # rho = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)]
    "sft": Algo("nll", data="responses"),  # next-token NLL of the response: the toy world's base model
    "dpo": Algo("dpo", 0.1),  # -log sigmoid(beta rho): Rafailov et al. 2023
    "ipo": Algo("ipo", 0.1),  # (rho - 1/(2 beta))^2: Azar et al. 2024
    "slic": Algo("slic", 0.1),  # max(0, 1 - beta rho): the SLiC-HF hinge (Zhao et al. 2023)
    "ddpo": Algo("dpo", 0.5, weights="ddpo"),  # DPO on gamma-weighted scores: RLHF-V (Yu et al. 2024)
    "povid": Algo("dpo", 0.1, responses="noisy_self"),  # + DPO against the noisy-self response: Zhou et al. 2024
    # online (Amirloo et al. 2024, arXiv:2407.02477, Sec. 3.4, Eq. 4-5): pairs made by the current policy each step
    "online-dpo": Algo("dpo", 0.1, responses="sampled", reward="annotator", data="prompts"),  # 2 samples, annotated
    "mixed-dpo": Algo("dpo", 0.1, responses="mixed", reward="annotator"),  # data pair w.p. --alpha, else online
    "online-bdhs": Algo("dpo", 0.1, responses="bdhs", data="responses"),  # + DPO against BDHS of the current policy
    "rm": Algo("bt", 0.0),  # reward model, -log sigmoid(r_w - r_l): Eq. 1 of Amirloo et al. 2024 (reward.py)
    # RL (formulas: nanoalign/rl.py): k samples per prompt scored by --reward, KL to the frozen reference (beta)
    "rloo": Algo("rloo", 0.05, responses="k_samples", reward="reward", data="prompts"),  # Ahmadian et al. 2024
    "ppo": Algo("ppo", 0.05, responses="k_samples", reward="reward", data="prompts"),  # Schulman et al. 2017
    "grpo": Algo("grpo", 0.04, responses="k_samples", reward="reward", data="prompts"),  # Shao et al. 2024
}
RL = ("rloo", "ppo", "grpo")


def _rows(**col) -> list[str]:
    """Names of the table's rows whose columns hold the given values (a tuple: any of them)."""
    ok = lambda v, want: v in want if isinstance(want, tuple) else v == want  # noqa: E731
    return [n for n, a in ALGOS.items() if all(ok(getattr(a, k), w) for k, w in col.items())]


PREF = _rows(loss=("dpo", "ipo", "slic"))  # the preference losses (objective.py)
SAMPLING = _rows(responses=("sampled", "mixed", "k_samples"))  # the policy samples at --temperature (BDHS: its own)
# options that only some rows read -> those rows; set away from its default for another --algo, an option would do
# nothing, so runs.check_args refuses it with one line (the toy's defaults, train_defaults, apply only where read)
ONLY_FOR = {
    "beta": PREF + list(RL), "sft_weight": PREF, "gamma": _rows(weights="ddpo"), "ddpo_average": _rows(weights="ddpo"),
    "noise_step": _rows(responses="noisy_self"), "ref_cache": _rows(data="pairs", loss=("dpo", "ipo", "slic"),
                                                                      responses=("none", "noisy_self")),
    "temperature": SAMPLING, "max_new_tokens": SAMPLING, "top_p": SAMPLING,
    "annotator": _rows(reward="annotator"), "annotator_both_orders": _rows(reward="annotator"),
    "alpha": _rows(responses="mixed"), "bdhs_embedder": _rows(responses="bdhs"),
    "no_signal_limit": _rows(responses=("sampled", "mixed", "bdhs", "k_samples")),
    **{k: list(RL) for k in ("reward", "k", "guard_len_min", "guard_len_max", "guard_entropy", "guard_kl",
                             "stop_on_collapse")},
    "reward_norm": ["rloo"], "grpo_loss": ["grpo"], "clip_ratio": ["ppo", "grpo"],
    **{k: ["ppo"] for k in ("ppo_epochs", "ppo_minibatches", "vf_coef", "clip_value", "gamma_ppo", "lam",
                            "kl_estimator", "no_whiten_rewards")},
}


# ----------------------------------------------------------------------------------------------------- arguments
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("model", "data", "image_root", "eval_data", "eval_image_root", "eval_annotations", "eval_synonyms")  # exist


def parse_args(argv=None, toy_algo=None, check=True):
    """Command line -> namespace. Without --model/--data (the toy world's run) the toy's settings for the algorithm
    (toy_algo, else --algo; nanoalign.toy.run.train_defaults) are the defaults, so any option given overrides them.
    check=False: no refusals (the toy reads train.py's defaults for its alignment run's command line this way)."""
    p = Parser(prog="python train.py", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    g = p.add_argument_group("what to train")
    g.add_argument("--algo", default="ddpo", choices=list(ALGOS), help="the algorithm (default ddpo)")
    g.add_argument("--model", help="llava-hf checkpoint folder (config.json, *.safetensors, tokenizer.json) or a "
                   "Hugging Face hub id org/name (fetched into the hub cache; HF_HUB_OFFLINE=1: the cache only)")
    g.add_argument("--revision", default=None, help="hub branch, tag or commit of an org/name --model (default main)")
    g.add_argument("--data", help="data file")
    g.add_argument("--data-format", choices=FORMATS, default="prefs", help="format of --data (default prefs)")
    g.add_argument("--image-root", help="folder the data's image paths are relative to (default: the data's folder)")
    g.add_argument("--template", default="auto", choices=TEMPLATE_CHOICES,
                   help="prompt template: auto = the checkpoint's chat template if it has one, else vicuna_v1")
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
    g.add_argument("--min-lr-ratio", type=float, default=None, help="cosine floor as a fraction of --lr (default 0; "
                   "rloo/ppo/grpo: 1 = constant lr after the warm-up, Appendix A)")
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
                   "state); bf16/fp16 halve the weights' memory, the loss and log-prob sums stay fp32; fp16 only "
                   "with --lora-rank (fp32 adapters, dynamic loss scaling; docs/scaling.md)")
    g.add_argument("--amp", action="store_true", help="mixed precision: bf16 compute (torch.autocast "
                   "on 1 process; FSDP's param_dtype bf16, reduce fp32 under torchrun; FSDP on CUDA always does)")
    g = p.add_argument_group("preference losses")
    g.add_argument("--beta", type=float, default=None, help="beta (default: the algorithm's, see ALGOS)")
    g.add_argument("--gamma", type=float, default=5.0, help="DDPO weight of corrected tokens (RLHF-V: 5)")
    g.add_argument("--ddpo-average", action="store_true", help="DDPO score divided by N = |y_u| + gamma |y_c|")
    g.add_argument("--sft-weight", type=float, default=0.0, help="weight of an NLL term on the chosen response")
    g.add_argument("--noise-step", type=int, default=500, help="POVID diffusion step t of the noisy image")
    g.add_argument("--ref-cache", default=None, help="reference log-prob cache folder (default OUT/refcache)")
    g = p.add_argument_group("rollouts (responses made during training: online algorithms and RL)")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus top-p (default 1.0: off)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="rollout response length limit, tokens (default 64)")
    g = p.add_argument_group("online algorithms (online-dpo, mixed-dpo, online-bdhs)")
    g.add_argument("--annotator", default=None, help="oracle[:SCENES.jsonl] | rm:PATH | vlm:PATH (nanoalign/annotate.py"
                   "; default oracle on the toy world)")
    g.add_argument("--annotator-both-orders", action="store_true", help="vlm: ask in both orders, keep agreements")
    g.add_argument("--alpha", type=float, default=0.5, help="mixed-dpo: probability of the offline pair (default 0.5: our choice)")
    g.add_argument("--bdhs-embedder", default="bow", help="online-bdhs similarity embedder: bow (built-in bag of "
                   "words) or a sentence-transformers name/folder")
    g = p.add_argument_group("reward model and RL (rm, rloo, ppo, grpo; nanoalign/rlstep.py)")
    g.add_argument("--reward", default=None, help="rm:PATH | oracle[:SCENES.jsonl] | module:function (RL; toy: oracle)")
    g.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    g.add_argument("--reward-norm", type=int, default=32, help="RLOO: prompts sampled before training for the "
                   "reward mean/std (0 = no normalization)")
    g.add_argument("--grpo-loss", default="grpo", choices=rl.AGGREGATIONS, help="GRPO loss aggregation")
    g.add_argument("--clip-ratio", type=float, default=0.2, help="PPO/GRPO ratio clip epsilon")
    g.add_argument("--ppo-epochs", type=int, default=4, help="PPO passes over each batch of rollouts")
    g.add_argument("--ppo-minibatches", type=int, default=1, help="PPO: each pass split into M minibatches of "
                   "rollouts, one optimizer step each (TRL's num_mini_batches); M divides --batch-size x --k x "
                   "--grad-accum (a rank's rollouts per step)")
    g.add_argument("--vf-coef", type=float, default=0.1, help="PPO value-loss weight")
    g.add_argument("--clip-value", type=float, default=0.2, help="PPO value clip (reward units)")
    g.add_argument("--gamma-ppo", type=float, default=1.0, help="PPO/GAE discount")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    g.add_argument("--kl-estimator", default="k1", choices=("k1", "k3"), help="PPO's per-token KL penalty")
    g.add_argument("--no-whiten-rewards", action="store_true", help="PPO: no whitening of the token rewards")
    g.add_argument("--guard-len-min", type=float, default=1.0, help="collapse guard: min mean response length")
    g.add_argument("--guard-len-max", type=float, default=float("inf"), help="collapse guard: max mean response "
                   "length (tokens)")
    g.add_argument("--guard-entropy", type=float, default=0.01, help="collapse guard: min entropy (nats/token)")
    g.add_argument("--guard-kl", type=float, default=20.0, help="collapse guard: max sequence KL (nats)")
    g.add_argument("--no-signal-limit", type=int, default=64, help="stop (exit 2) a run that has nothing to learn "
                   "from: online-dpo / mixed-dpo / online-bdhs when the first N pairs sampled were all dropped (the "
                   "annotator's verdict unparseable, tie, inconsistent; identical responses; ...); rloo / grpo when "
                   "each of the first N prompts got one reward for all its --k samples (ppo: all samples of each "
                   "micro-batch), so the advantages hold no reward signal. Counted over steps and ranks since the "
                   "run started or resumed, checked after each step. A run that ends with nothing learned exits 2 as "
                   "well, without final/; 0 = neither check (default 64)")
    g.add_argument("--stop-on-collapse", action="store_true", help="stop before the update of a step that crosses "
                   "a guard bound (the newest --save-every checkpoint is the last good one)")
    g = p.add_argument_group("data and run")
    g.add_argument("--max-len", type=int, default=4096, help="max tokens of a sequence, in tokens; only responses "
                   "are cut")
    g.add_argument("--strict", action="store_true", help="stop at the first bad data row instead of skipping it")
    g.add_argument("--skip-nonfinite", action="store_true", help="skip a step with non-finite gradients, not stop")
    g.add_argument("--wandb", default=None, help="log to this Weights & Biases project (needs wandb installed)")
    g.add_argument("--toy-cache", default=None, help="toy world cache folder (no --model/--data; default "
                   "~/.cache/nanoalign/toy/<hash>)")
    g.add_argument("--toy-seed", type=int, default=0, help="seed of the toy world and its SFT base model")
    runs.add_args(p)
    evaltrain.add_args(p)
    args = p.parse_args(argv)
    # the defaults that follow --algo and --lora-rank: beta, the cosine floor (rloo/ppo/grpo: a constant lr after the
    # warm-up, Appendix A), the output folder, LoRA's alpha
    p.set_defaults(beta=ALGOS[args.algo].beta, min_lr_ratio=1.0 if args.algo in RL else 0.0, out=f"runs/{args.algo}",
                   lora_alpha=2.0 * args.lora_rank)
    if args.model is None and args.data is None:  # the toy's settings, for the options this --algo reads
        from nanoalign.toy.run import train_defaults
        p.set_defaults(**{k: v for k, v in train_defaults(toy_algo or args.algo).items()
                          if args.algo in ONLY_FOR.get(k, ALGOS)})
    args = p.parse_args(argv)
    # options away from their defaults: --resume of a run saved by an older version, which lacks the newer options,
    # counts a newer option as changed only when it is one of these (runs.changed_settings)
    args.non_default = sorted(k for k, v in vars(args).items() if v != p.get_default(k))
    if not check:
        return args
    if args.algo in RL and args.reward is None:
        if args.model is not None:
            p.error(f"--algo {args.algo} needs --reward (rm:PATH, oracle[:SCENES] or module:function)")
        args.reward = "oracle"
    if (args.model is None) != (args.data is None):
        p.error("--model and --data go together (give neither for the built-in toy-world run)")
    runs.check_args(p, args, argv, ONLY_FOR)  # values, combinations, options given that the run would not read
    if evaltrain.check_args(args):
        p.error(evaltrain.check_args(args))
    return args


def check_paths(args) -> None:
    """ValueError `no such file or folder: P (--option)` for the first path option (or --reward / --annotator spec's
    path) that does not exist: before any model loads, and before the toy world is built for a toy run."""
    bad = missing_path([(f"--{k.replace('_', '-')}", getattr(args, k)) for k in PATHS] + [
        ("--reward", spec_path(args.reward)),
        ("--annotator", spec_path(args.annotator, "--annotator"))], hub_ok=("--model",))
    if bad:
        raise ValueError(bad)


def main(args):
    algo = ALGOS[args.algo]
    # ------------------------------------------------------------------------------------------- distributed init
    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    tu.init_distributed(cuda)  # main() may run more than once per process (toy pipeline)
    rank, world = tu.rank(), tu.world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # same initial weights/adapters on every rank
    check_paths(args)
    out = Path(args.out)
    if runs.prepare_out(args, world) == "finished":  # lock, refusals, the resume settings check
        tu.print0(f"{out}: this run is finished ({out / 'final'}); nothing to do")
        return out / "final"
    t_run = time.time()

    # ------------------------------------------------------------------------------------------------------ model
    # --model: a folder, or a hub id org/name fetched into (or, offline, found in) the Hugging Face cache
    args.model = str(resolve_model(args.model, args.revision)) if rank == 0 or not distributed else args.model
    if distributed:  # rank 0 fetched it; the others then find it in the cache
        dist.barrier()
        args.model = str(resolve_model(args.model, args.revision))
    dtype = DTYPES[args.dtype]  # the weights' dtype; --amp: fp32 weights, bf16 compute (combinations: runs.check_args)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp and not distributed else \
        nullcontext()
    # fp16 (5 exponent bits): gradients under 6e-8 flush to zero, so the loss is scaled before backward and the
    # gradients unscaled before clipping (dynamic: halved on overflow, that step skipped). bf16 has fp32's exponent
    # range and needs none; the scaler is then a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model, processor = load_pretrained(args.model, dtype=dtype)
    if processor is None:
        raise ValueError(f"{args.model}: no tokenizer.json, cannot tokenize the data")
    model_config = model.config
    check_finite(model, args.model)  # a NaN checkpoint: named here, not as a NaN loss at step 1

    # ------------------------------------------------------------------------------------------------------- data
    # what a row must hold is the table's data column: pairs, responses (a chosen), or prompts (only the prompt is
    # read; the responses are made during training); rows short of it are counted skips (nanoalign/data.py)
    examples, skipped = load_examples(args.data, args.data_format, args.image_root, strict=args.strict,
                                      needs=algo.data, who=f"--algo {args.algo}")
    tu.print0(f"data: {len(examples)} examples from {args.data} ({args.data_format}); {skipped.total()} rows skipped")
    if skipped.total():
        tu.print0(str(skipped))
    check_oracle(args.reward if algo.reward == "reward" else None, examples, args.data)  # the toy's judge: scenes
    check_oracle(args.annotator if algo.reward == "annotator" else None, examples, args.data, "--annotator")
    gamma = args.gamma if algo.weights == "ddpo" else None  # DDPO's token weights, set once at encoding
    encoded, _ = encode_all(examples, processor, args.image_root, args.template, args.max_len, gamma, args.strict,
                            log=tu.print0)
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = max(1, len(encoded) // global_batch)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    sides = ["chosen", "rejected"] if algo.data == "pairs" else ["chosen"]
    online = algo.responses in rollout.ONLINE  # pairs made each step: online_settings, the annotator, no ref cache
    annotator, online_settings = None, None
    if algo.reward == "annotator":
        if args.annotator is None:
            raise ValueError(f"--algo {args.algo} needs --annotator (oracle[:SCENES], rm:PATH or vlm:PATH)")
        annotator = load_annotator(args.annotator, processor.tokenizer, device, args.annotator_both_orders,
                                   args.template)
    if online:
        from nanoalign.bdhs import BDHSSettings, load_embedder
        embedder = None
        if algo.responses == "bdhs":
            embedder = rollout.BowEmbedder() if args.bdhs_embedder == "bow" else load_embedder(args.bdhs_embedder)
        online_settings = rollout.OnlineSettings(args.temperature, args.top_p, args.max_new_tokens, args.alpha,
                                                 BDHSSettings(template=args.template), embedder)

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
    if algo.data == "pairs" and algo.loss != "bt" and not online:
        ref_cache, keys = build_cache(model, examples, encoded, processor, args.model,
                                      args.ref_cache or out / "refcache", args.image_root, args.template,
                                      args.batch_size, device)
    if algo.responses != "none" and not (online and args.lora_rank > 0):  # online + LoRA: the adapters switched off
        reference, _ = load_pretrained(args.model, dtype=dtype)
        reference.requires_grad_(False)
    # reward model head (rm) / value head (ppo): a plain Linear(H, 1) beside the sharded model, gradients all-reduced
    head = reward_head(model_config.text_config.hidden_size, torch.Generator().manual_seed(args.seed),
                       zero=algo.loss == "ppo").to(device) if algo.loss in ("bt", "ppo") else None  # ppo: V = 0
    reward_fn = load_reward(args.reward, processor.tokenizer, device, args.max_len) if algo.reward == "reward" else None
    # evaluation during training: its held-out pairs are scored here with the initial weights (prefs)
    evaluator = evaltrain.Evaluator(args, model, processor, device, out) if args.eval_task else None

    # ---------------------------------------------------------------------------------------------- LoRA, freeze
    model.train()
    if args.lora_rank > 0:
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=args.lora_targets.split(","), prefix="language_model",
                   dtype=torch.float32 if dtype == torch.float16 else None)  # fp16: fp32 adapters (AdamW in fp16: NaN)
    if args.freeze_vision:
        model.vision_tower.requires_grad_(False)
    for name in tu.unused_parameters(model):  # never in the forward (LLaVA's last CLIP layer): never trained
        model.get_parameter(name).requires_grad_(False)
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
        if head is not None:  # the reward model's / PPO's value head, as trained up to the checkpoint
            if state["head"] is None:
                raise ValueError(f"{resume_from}: the training state holds no head for --algo {args.algo}")
            head.load_state_dict(state["head"])
        tu.print0(f"resuming from {resume_from} (step {state['step']})")

    # -------------------------------------------------------------------------------------------------------- FSDP
    model.to(device)
    if distributed:  # FSDP2 units (trainutil.fully_shard_llava); fp32 weights on CUDA or --amp: bf16 compute
        tu.fully_shard_llava([model, reference], bf16_compute=(cuda or args.amp) and dtype == torch.float32)
    elif reference is not None:
        reference.to(device)

    # --------------------------------------------------------------------------------------------------- optimizer
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # fp16: only the fp32 adapters
    optimizer = tu.adamw(trainable, args.lr, args.projector_lr, args.weight_decay)  # every state there from step 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: tu.cosine_with_warmup(s, max_steps, args.warmup_steps, args.min_lr_ratio))
    head_optimizer = head_schedule = None  # the head's own AdamW: FSDP's optimizer state knows only the model's
    if head is not None:
        head_optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        head_schedule = torch.optim.lr_scheduler.LambdaLR(head_optimizer, scheduler.lr_lambdas[0])
    start_step = 0
    if state is not None:
        tu.load_optimizers(state, model, optimizer, scheduler, head_optimizer, head_schedule)
        if evaluator is not None:  # best/ is replaced only by a better eval than the run's best so far
            evaluator.best = state["values"].get("eval_best")
        if scaler.is_enabled() and "scaler" in state["values"]:
            scaler.load_state_dict(state["values"]["scaler"])
        tu.set_rng_state(state["rng"])
        start_step = state["step"]
    n_params = sum(p.numel() for _, p in trainable)
    precision = (f"weights {args.dtype}" + (", bf16 compute (--amp)" if args.amp or (distributed and cuda and
                                                                             dtype == torch.float32) else ""))
    tu.print0(runs.start_lines(algo=args.algo, model=args.model, data=args.data, n_examples=len(encoded), world=world,
                               global_batch=global_batch, max_steps=max_steps, start_step=start_step,
                               n_params=n_params, precision=precision, out=out, device=str(device),
                               eval_plan=evaluator.plan(start_step, max_steps) if evaluator else None))

    header = {"config": vars(args), "git_sha": runs.git_sha(), "argv": sys.argv, "world": world,
              "max_steps": max_steps, "model_config": model_config.to_dict()}
    log = runs.MetricsLog(out / "metrics.jsonl", header, start_step if state is not None else None)
    wandb = runs.start_wandb(args.wandb, header) if args.wandb and rank == 0 else None

    reward_norm = (0.0, 1.0)
    if algo.loss == "rloo" and args.reward_norm > 0:  # Appendix A: reward mean/std over the data, before training
        if state is not None and "reward_norm" in state["values"]:  # measured with the initial policy: kept in the
            reward_norm = tuple(state["values"]["reward_norm"])  # training state, never re-measured on --resume
        else:
            reward_norm = rlstep.reward_stats_before_training(
                model, reward_fn, encoded, examples, lambda it: open_image(examples[it.index], args.image_root),
                processor, args, device, args.reward_norm)
        tu.print0(f"reward normalization: mean {reward_norm[0]:.4f}, std {reward_norm[1]:.4f}")

    def save(name: str, step: int, keep: int | None = None) -> Path:
        """A checkpoint with the whole training state: what a later step depends on, for an exact --resume."""
        values = {"reward_norm": list(reward_norm)}
        if evaluator is not None:
            values["eval_best"] = evaluator.best
        if scaler.is_enabled():  # fp16: the loss scale and its growth count (a resume after an overflow continues them)
            values["scaler"] = scaler.state_dict()
        return tu.save_checkpoint(out, name, model, model_config, processor, lora_layers, optimizer, scheduler, step,
                                  args, keep, head, head_optimizer, head_schedule, values)

    # ------------------------------------------------------------------------------------------------------ loop
    records = []  # this run's metrics.jsonl records, for the summary
    if evaluator is not None and state is None:  # the initial policy: step 0 of the eval curves
        records.append({"step": 0, **evaluator.run(model, 0)})
        log.write(records[-1])
        if evaluator.improved(records[-1]):
            tu.save_checkpoint(out, "best", model, model_config, processor, lora_layers, step=0)
    progress = tu.Progress(max_steps, start_step)
    last_save = None
    seen = Counter()  # --no-signal-limit: online: STAT_KEYS; RL: prompts / flat; both: steps (this run's, all ranks)

    def end_step(rec: dict, step: int) -> Path | None:
        """Every branch's end of a step: evaluation, the metrics line, the progress bar, the --save-every
        checkpoint (-> its path, else None)."""
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
            return save(f"{tu.STEP_PREFIX}{step + 1:06d}", step + 1, args.keep)
        return None

    for step in range(start_step, max_steps):
        t0 = time.time()
        sums, n_tokens, step_ids, ostats = {}, 0, [], Counter()
        if algo.responses == "k_samples":  # RL: rollouts of every micro-step, then the updates (ppo: --ppo-epochs
            rolls = []  # passes over them, each in --ppo-minibatches optimizer steps; rloo, grpo: 1 update)
            for micro in range(args.grad_accum):
                idx = batch_indices(step, micro)  # chunk micro*world + rank: 1 rank and N ranks sample alike
                step_ids += [examples[encoded[i].index].id for i in idx]
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + micro * world + rank)
                rolls.append(rlstep.make_rollout(
                    algo.loss, model, reference, reward_fn, [encoded[i] for i in idx],
                    [examples[encoded[i].index] for i in idx],
                    [open_image(examples[encoded[i].index], args.image_root) for i in idx], processor, args, gen,
                    device, head, reward_norm))
            rm = {k: sum(r["metrics"][k] for r in rolls) / len(rolls) for k in rolls[0]["metrics"]}
            warnings = rlstep.collapse_warnings({k: tu.all_mean(v) for k, v in rm.items()}, args)
            for w in warnings:
                tu.print0(f"warning: step {step + 1}: collapse guard: {w}")
            if warnings and args.stop_on_collapse:
                raise SystemExit(f"error: collapse guard at step {step + 1} ({'; '.join(warnings)}); stopping "
                                 f"before its update (last good checkpoint: {last_save or 'none'})")
            t1 = time.time()
            epochs, n_mb = (args.ppo_epochs, args.ppo_minibatches) if algo.loss == "ppo" else (1, 1)
            skipped = 0
            for epoch in range(epochs):
                order = rlstep.minibatch_order(sum(len(r["rewards"]) for r in rolls), args.seed, step, epoch)
                for mb, pieces in enumerate(rlstep.minibatches(rolls, n_mb, order)):  # reshuffled each epoch
                    where = (f"step {step + 1}" + (f" (update {epoch * n_mb + mb + 1} of {epochs * n_mb})" if
                                                   epochs * n_mb > 1 else "") +
                             f", rank {rank}, examples {step_ids} (last checkpoint: {last_save or 'none'})")
                    for piece, share in pieces:  # share: minibatch rows / piece rows (M = 1: --grad-accum)
                        with amp:  # --amp on one process: bf16 matmuls, as in the preference step below
                            loss, metrics = rlstep.rl_objective(algo.loss, model, piece, args, device, head)
                        tu.check_loss(loss, where)
                        (loss / share).backward()
                        if epoch == 0:  # the metrics of the first pass (PPO: its first minibatch before it moved)
                            for k, v in {"loss": loss.detach(), **metrics}.items():
                                sums[k] = sums.get(k, 0.0) + float(v) / (share * n_mb)
                            n_tokens += int(piece["b"]["attention_mask"].sum())
                    norm = tu.optimizer_step(model, optimizer, head, head_optimizer, args.clip, where,
                                             args.skip_nonfinite)
                    if norm is None:  # --skip-nonfinite: this update skipped, the others of the step go on
                        skipped += 1
                    else:
                        grad_norm = norm  # the step's last update's
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            tu.step_schedules(skipped < epochs * n_mb, scheduler, head_schedule)
            sums.update({k: v for k, v in rm.items() if k not in ("rollout_tokens", "rollout_s")})
            rec = {"step": step + 1, **{k: tu.all_mean(v) for k, v in sums.items()}, "lr": lr,
                   "grad_norm": grad_norm if skipped < epochs * n_mb else float("nan"),
                   "rollout_tokens_per_s": tu.all_mean(rm["rollout_tokens"] * len(rolls) / (t1 - t0)) * world,
                   "train_tokens_per_s": tu.all_mean(n_tokens / (time.time() - t1)) * world,
                   "peak_mem_mb": tu.peak_memory_mb(), "time_s": time.time() - t0}
            flat = tu.all_mean(sum(r["flat_prompts"] for r in rolls)) * world  # prompts without a reward signal
            rec["flat_share"] = flat / (len(step_ids) * world)
            if skipped:
                rec["skipped"] = f"{skipped} of {epochs * n_mb} updates: non-finite gradients (--skip-nonfinite)"
            last_save = end_step(rec, step) or last_save
            seen.update(steps=1, applied=skipped < epochs * n_mb, prompts=len(step_ids) * world, flat=round(flat),
                        reward_sum=rec["reward_mean"])
            stop = rlstep.no_signal(seen, args.no_signal_limit, step + 1, args.algo, args.reward)
            if stop:
                progress.close()
                raise tu.Stop(stop)
            continue
        for micro in range(args.grad_accum):
            idx = batch_indices(step, micro)
            step_ids += [examples[encoded[i].index].id for i in idx]
            items = [encoded[i] for i in idx]
            images = [open_image(examples[it.index], args.image_root) for it in items]  # opened once per micro-step
            if online:  # rollout + reward: the policy's samples ordered by the annotator, or BDHS; the batch of the
                # kept pairs, rows [chosen | rejected..] (the data's pairs are collated there, for mixed-dpo)
                gens = [rollout.prompt_generator(args.seed, step, examples[it.index].id, device) for it in items]
                b, items, st = rollout.online(algo.responses, model, items, [examples[it.index] for it in items],
                                              images, processor, annotator, online_settings, gens)
                ostats.update(st)
            else:  # batch: P examples, rows [chosen | rejected] (sft: [chosen]); vision_always: a text-only batch
                # still runs the vision tower on a blank image (zero gradients), so 1 rank and N FSDP ranks update it
                # alike. (reward: RL scores its samples in rlstep.make_rollout above)
                b = collate(items, sides, processor, images, vision_always=True)
                if algo.responses == "noisy_self":  # rollout: POVID's response, appended as P more rejected rows
                    b = rollout.noisy_self(model, items, b, processor, args.noise_step, device)
            # reference: per-token reference log-probs of every response row (online + LoRA: adapters off)
            ref = None
            if online:
                with adapters_off(model) if reference is None else nullcontext():
                    ref = reference_logps(b, None, None, reference or model, device)
            elif algo.data == "pairs" and algo.loss != "bt":
                ref = reference_logps(b, [keys[it.index] for it in items], ref_cache, reference, device)
            # objective
            with amp:  # --amp on one process: bf16 matmuls; the loss and log-prob sums stay fp32 (nanoalign/ops.py)
                if algo.loss == "bt":  # reward model: Bradley-Terry on the head's rewards (no reference)
                    loss, metrics = rlstep.rm_objective(model, head, b, len(items), device)
                else:
                    loss, metrics = objective(algo.loss, model, b, ref, len(items), device, beta=args.beta,
                                              sft_weight=args.sft_weight,
                                              average=args.ddpo_average and algo.weights == "ddpo")
            tu.check_loss(loss, f"step {step + 1}, micro-step {micro}, rank {rank}, examples {step_ids[-len(idx):]} "
                                f"(last checkpoint: {last_save or 'none'})")
            if online:  # the mean over the pairs kept on every rank (a placeholder batch: weight 0, for FSDP)
                loss, metrics = pair_mean_over_ranks(loss, metrics, 0 if st["placeholder"] else len(items))
            scaler.scale(loss / args.grad_accum).backward()  # fp16: times the loss scale; else unchanged
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / args.grad_accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / args.grad_accum
            n_tokens += int(b["attention_mask"].sum())
        if online:  # the online stages' counts summed over ranks (same keys on every rank)
            total = {k: tu.all_mean(float(ostats[k])) * world for k in rollout.STAT_KEYS}
            seen.update({k: round(v) for k, v in total.items() if k != "rollout_s"}, steps=1)
        skip = online and total["online"] + total["offline"] == 0  # no pair on any rank
        where = f"step {step + 1}, rank {rank}, examples {step_ids} (last checkpoint: {last_save or 'none'})"
        grad_norm = tu.optimizer_step(model, optimizer, head, head_optimizer, args.clip, where, args.skip_nonfinite,
                                      apply=not skip, scaler=scaler)  # None: skipped (fp16 overflow, --skip-nonfinite)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler's, or a resumed run's)
        tu.step_schedules(grad_norm is not None and not skip, scheduler, head_schedule)
        seen.update(steps=not online, applied=grad_norm is not None and not skip)  # (online: counted above)
        if grad_norm is None:
            continue

        rec = {"step": step + 1, **{k: tu.all_mean(v) for k, v in sums.items()}, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tu.all_mean(n_tokens / (time.time() - t0)) * world,
               "peak_mem_mb": tu.peak_memory_mb(), "time_s": time.time() - t0}
        if scaler.is_enabled():
            rec["loss_scale"] = scaler.get_scale()  # the scale the next step uses
        if online:
            rec.update(rollout.online_metrics(total, rec, args.beta, world))
            rec["train_s"] = rec["time_s"] - rec["rollout_s"]
            if skip:
                rec["skipped"] = "no pair left after annotation on any rank: no optimizer step"
                tu.print0(f"step {step + 1}: {rec['skipped']}")
        if algo.data == "pairs":
            rec["resp_len"] = tu.all_mean(float((b["labels"] != -100).sum(1).float().mean()))
        last_save = end_step(rec, step) or last_save
        stop = online and rollout.nothing_kept(seen, args.no_signal_limit, step + 1, args.algo, args.annotator)
        if stop:
            progress.close()
            raise tu.Stop(stop)
    progress.close()
    # a run that learned nothing fails (exit 2, no final/): no step updated the model (each skipped: no online pair,
    # --skip-nonfinite), or no RL prompt had a reward signal. --no-signal-limit 0: online and RL runs not checked
    checked = args.no_signal_limit or not (online or algo.responses == "k_samples")
    stop = None
    if checked and online:
        stop = rollout.nothing_kept(seen, 0, max_steps, args.algo, args.annotator, end=True)
    elif checked and algo.responses == "k_samples":
        stop = rlstep.no_signal(seen, 0, max_steps, args.algo, args.reward, end=True)
    if checked and not stop and seen["steps"] and not seen["applied"]:
        stop = (f"error: {args.algo}: none of the run's {seen['steps']} steps updated the model (each was skipped, "
                "see the lines above): nothing was learned, final/ is not saved")
    if stop:
        raise tu.Stop(stop)

    # -------------------------------------------------------------------------------------------------------- save
    final = save("final", max_steps)
    if algo.loss == "bt" and rank == 0:  # the head beside the checkpoint (the folder still loads as llava-hf)
        save_reward_head(final, head, processor.tokenizer, args.template, train_data=args.data)
    tu.print0(f"saved {final}")
    if wandb is not None:
        wandb.finish()  # flushes the run (WANDB_MODE=offline: OUT-independent ./wandb/offline-run-*, `wandb sync`)
    if rank == 0:
        best = (evaluator.best_name, evaluator.best, out / "best") if evaluator and evaluator.best_name and \
            evaluator.best is not None else None
        print(runs.summary_lines(records, out=out, final=final, seconds=time.time() - t_run, plot=runs.write_plot(out),
                                 eval_command=runs.eval_command(args, final, out, algo.loss == "bt"), best=best),
              flush=True)
    runs.release(out)
    return final


if __name__ == "__main__":
    _args = parse_args()
    if _args.model is None and _args.data is None:  # the built-in toy-world run (nanoalign/toy/run.py)
        from nanoalign.toy.run import default_run
        body = lambda: (check_paths(_args), default_run(_args, main, parse_args, ALGOS))  # noqa: E731
    else:
        body = lambda: main(_args)  # noqa: E731
    run(body, lambda: runs.interrupted_line(_args.out, sys.argv))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
