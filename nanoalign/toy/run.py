"""The default run of train.py: the whole pipeline on the toy visual world.

    torchrun --standalone --nproc_per_node 2 train.py --algo ddpo [--out DIR] [--max-steps N] [--seed S]

Without --model/--data, train.py parses its options with `train_defaults(algo)` as their defaults (the alignment's
steps, lr, batch size, beta and sft_weight of ALIGN; any option given on the command line overrides them, even at
train.py's own default value) and calls `default_run(args, main, parse_args, ALGOS)`:
  1. world, tokenizer and SFT base model (nanoalign.toy.base.prepare_base), cached under --toy-cache (default
     ~/.cache/nanoalign/toy/<hash of the settings>);
  2. preference pairs for --algo from ground truth (nanoalign.toy.pairs.build_pairs), written to OUT/pairs.jsonl;
  3. alignment: train.py's main with --algo on those pairs and every other option of the command line, --out OUT
     (default runs/<algo>); the toy owns data, model, output and template;
  4. evaluation of base and aligned model on the held-out scenes (nanoalign.toy.evaluate, greedy);
  5. a before/after table on stdout and OUT/summary.json {"before": {...}, "after": {...}, ...}.
Under torchrun the alignment run is collective (every rank calls main: FSDP2 over gloo); the SFT base is trained by
rank 0 alone in a plain child process; the ranks share the caption sampling of the dpo/ipo/slic/ddpo pairs; world,
the other pairs and evaluation run on rank 0 (for povid and bdhs the base evaluation runs on rank 1 while rank 0
builds the pairs) and the others wait on a broadcast. The recipe and why it is built this way: docs/toy_world.md.
"""
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanoalign import runs
from nanoalign import trainutil as tu
from nanoalign.toy import base as toy_base
from nanoalign.toy.base import Threads, cache_dir, cores, fingerprint, in_parallel, on_rank, prepare_base, to_argv
from nanoalign.toy.evaluate import evaluate, table
from nanoalign.toy.pairs import build_pairs

# algo -> alignment settings (not part of the cache key). steps, lr, batch (global: split over the ranks), beta and
# sft_weight become train.py's defaults (train_defaults); the rest say how build_pairs makes the pairs: RLHF-V
# corrections of `samples` sampled captions per scene, the best against the worst of `ranked` (dpo/ipo/slic/ddpo),
# `yesno` existence pairs per scene, from `pair_scenes` training scenes. Why these values: docs/toy_world.md.
ALIGN = {
    "default": {"steps": 240, "lr": 1e-4, "batch": 32, "pair_scenes": 1000, "samples": 2, "ranked": 8,
                "temperature": 0.7, "yesno": 2, "sft_weight": 1.0},
    "dpo": {"beta": 0.3},
    "ddpo": {"beta": 0.3, "lr": 2e-4},
    "ppo": {"lr": 2.5e-5},  # 1e-4 / --ppo-epochs: 4 Adam steps per batch of rollouts; at 1e-4 the captions collapsed
}
COLD_MIN, CACHED_MIN = "about 12 min", "about 2 min"  # the ddpo default run on 2 idle cores (docs/log.md)
EVAL_LIMIT = 100  # held-out scenes evaluated (CHAIR) during the alignment, 8 times; the final table uses all
TOY_ONLY_ALGOS = {"bdhs": "dpo"}  # toy algorithm -> the train.py algorithm that aligns on its pairs
_TOY_OWNED = ("algo", "model", "data", "data_format", "image_root", "template", "out", "toy_cache", "toy_seed")


def train_defaults(algo):
    """train.py option defaults of the toy run of `algo` -> {max_steps, lr, batch_size, warmup_steps, temperature,
    max_new_tokens, [beta, gamma, sft_weight]}. batch_size is ALIGN's global batch over the WORLD_SIZE ranks of
    torchrun (1 without it); warmup_steps None: default_run then warms up for min(5, steps // 4) steps. Online and
    RL rollouts sample as the offline pairs' captions are sampled (ALIGN's temperature and length: train.py's
    64-token default would cut a toy caption short). train.py applies each only where --algo reads it (its
    ONLY_FOR table), so the toy's defaults never trip its refusal of an option the algorithm does not use."""
    al = {**ALIGN["default"], **ALIGN.get(algo, {})}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    out = {"max_steps": al["steps"], "lr": al["lr"], "batch_size": max(1, al["batch"] // world_size),
           "warmup_steps": None, "temperature": al["temperature"], "max_new_tokens": al.get("max_new_tokens", 128)}
    out.update({k: al[k] for k in ("beta", "gamma", "sft_weight") if k in al})
    return out


def away_from_defaults(options: dict, parse_args, algo: str) -> dict:
    """The options whose values differ from train.py's own defaults for --algo with --model/--data. train.py refuses
    an option the run would not read whenever it is given, at any value (runs.check_args), so the alignment run's
    command line leaves train.py's defaults out, as a user would."""
    plain = vars(parse_args(["--algo", algo, "--model", "m", "--data", "d"], check=False))
    return {k: v for k, v in options.items() if k not in plain or v != plain[k]}


def default_run(args, train_main, parse_args, algos, settings=None):
    """The toy pipeline for `args` (train.py's namespace, parsed with train_defaults(args.algo) as defaults) ->
    the summary dict, on every rank. train_main / parse_args: train.py's main and parse_args; algos: train.py's
    algorithm table ALGOS (name -> row; TOY_ONLY_ALGOS adds names of its own); settings: overrides of
    nanoalign.toy.base.SETTINGS. Raises ValueError for an unknown algorithm."""
    algo = args.algo
    if algo not in algos and algo not in TOY_ONLY_ALGOS:
        raise ValueError(f"toy run: unknown --algo {algo!r} (known: {', '.join([*algos, *TOY_ONLY_ALGOS])})")
    tu.init_distributed(torch.cuda.is_available())  # a long timeout: rank 0 trains the base alone
    settings = {**toy_base.SETTINGS, **(settings or {})}
    toy_seed = args.toy_seed or 0
    cache = cache_dir({**settings, "toy_seed": toy_seed}, args.toy_cache)
    if tu.rank() == 0:
        runs.lock(cache)  # one toy pipeline per cache at a time
    out = Path(args.out)
    t_start = time.time()
    cached = (cache / "base" / "final").is_dir()
    tu.print0(f"toy: no --model/--data: the built-in toy world run of {algo} (docs/toy_world.md)\n"
              f"toy: {'reusing' if cached else 'building'} the toy world and its SFT base model in {cache} "
              f"(--toy-cache); measured on 2 idle cores: {COLD_MIN} cold, {CACHED_MIN} cached (docs/log.md)\n"
              f"toy: {cores()} thread(s) per working rank (OMP_NUM_THREADS, else every core), "
              f"{tu.world_size()} rank(s); outputs in {out}")
    times = {}
    world, base = prepare_base(train_main, parse_args, cache, settings, toy_seed)
    times["world_and_base_s"] = time.time() - t_start
    al = {**ALIGN["default"], **ALIGN.get(algo, {})}
    steps = args.max_steps or al["steps"]
    # the alignment settings this run uses (ALIGN's unless the command line gave others), recorded in the summary
    al.update(steps=steps, lr=args.lr, batch=args.batch_size * tu.world_size())
    al.update({k: getattr(args, k) for k in ("beta", "gamma", "sft_weight") if k in al})
    mnt = settings["eval_max_new_tokens"]
    before_dir = cache / "base_eval"

    def eval_before(alone=True):  # alone: the other ranks wait, so it takes every core
        with Threads(cores() if alone else 1):
            return evaluate(base, world, before_dir, mnt, template=settings["template"])

    before = None
    if algo == "sft":
        before = on_rank(eval_before)
        after, pairs = before, None
    else:
        pairs_path = out / "pairs.jsonl"

        def pairs_step():
            out.mkdir(parents=True, exist_ok=True)
            t = time.time()
            with Threads(1 if tu.world_size() > 1 else cores()):
                st = build_pairs(algo, base, world, pairs_path, al["pair_scenes"], args.seed, al["samples"],
                                 al["temperature"], max_new_tokens=al.get("max_new_tokens", 128),
                                 rewrite_missing=al.get("rewrite_missing", False), template=settings["template"],
                                 yesno=al.get("yesno", 0), ranked=al.get("ranked", 0))
            st["seconds"] = time.time() - t
            return st

        t = time.time()
        if tu.world_size() > 1 and algo not in ("povid", "bdhs", "online-dpo", "online-bdhs"):  # the ranks share the sampling (build_pairs), then
            pair_stats = pairs_step()  # one evaluates the base
            before = on_rank(eval_before)
        elif tu.world_size() > 1:  # rank 0 builds the pairs while rank 1 evaluates the base
            pair_stats, before = in_parallel([pairs_step, lambda: eval_before(alone=False)])
        else:
            pair_stats = pairs_step()
            before = eval_before()
        times["pairs_and_base_eval_s"] = time.time() - t
        tu.print0(f"toy: {pair_stats['pairs']} {algo} pairs ({pair_stats})")
        t = time.time()
        # every option of the command line reaches the alignment run (the toy's defaults or the user's values); the
        # toy owns data, model, output and template
        train_algo = TOY_ONLY_ALGOS.get(algo, algo)
        aargs = away_from_defaults({k: v for k, v in vars(args).items() if k not in _TOY_OWNED}, parse_args,
                                   train_algo)
        if aargs.get("annotator") is None and algos[train_algo].reward == "annotator":  # the toy's judge on the
            aargs["annotator"] = f"oracle:{world['scenes_train']}"  # training scenes (online-dpo / mixed-dpo)
        aargs.update(algo=TOY_ONLY_ALGOS.get(algo, algo), model=base, data=pairs_path, data_format="prefs", out=out,
                     max_steps=steps, template=settings["template"],
                     warmup_steps=min(5, steps // 4) if args.warmup_steps is None else args.warmup_steps)
        if args.eval_task is None:  # on by default: CHAIR of the held-out scenes during training (its curve)
            aargs.update(eval_data=world["chair_questions"], eval_task="chair", eval_annotations=world["chair_coco"],
                         eval_synonyms=world["synonyms"], eval_image_root=world["images"],
                         eval_max_new_tokens=mnt, eval_limit=args.eval_limit or EVAL_LIMIT,
                         eval_every=args.eval_every or max(1, steps // 8))
        final = train_main(parse_args(to_argv(aargs)))
        times["align_s"] = time.time() - t
        pairs = pair_stats

        def eval_after():
            shutil.rmtree(out / "eval_after", ignore_errors=True)  # results of an earlier run in the same --out
            with Threads(cores()):
                return evaluate(final, world, out / "eval_after", mnt, template=settings["template"])

        t = time.time()
        after = on_rank(eval_after)
        times["eval_after_s"] = time.time() - t
    times["total_s"] = time.time() - t_start
    if before.get("yesno_auc", 1.0) < 0.75:  # see yesno_auc: the grounding stage has not left its plateau
        tu.print0(f"toy: warning: the SFT base is blind to yes/no questions (yes/no AUC {before['yesno_auc']:.2f}, "
                  f"grounded bases reach 0.85-0.99): POPE cannot improve. Its grounding stage escapes its plateau at "
                  f"a data-order-dependent step: another --toy-seed builds another world and base (~10 min; "
                  f"docs/toy_world.md)")
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
