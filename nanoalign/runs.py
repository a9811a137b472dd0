"""The run folder (--out): what train.py checks before it trains, so a run never mixes with another one, and what it
writes there besides checkpoints (metrics.jsonl, curves.png) and prints about it.

    add_args(parser)              train.py's options of the run folder: checkpoints, --resume, --overwrite
    given_options(parser, argv)   the options typed on the command line (whatever their value)
    check_args(parser, args, argv)  arguments that make no sense -> parser.error (exit 2) with the reason
    prepare_out(args, world)      -> "new" | "resume" | "finished"; lock, refusals, the resume settings check
    lock(folder), release(folder) an exclusive lock on folder/.lock for the life of the run (also the toy cache)
    interrupted_line(out, argv)   Ctrl-C: where the last checkpoint is and the --resume command
    MetricsLog(path, header, resume_step)  OUT/metrics.jsonl, one line per step (rank 0); git_sha() for its header
    start_wandb(project, config)  the wandb module after wandb.init, or None when it is not installed
    start_lines(...), summary_lines(records, ...), write_plot(out), eval_command(args, final, out, reward_model)
                                  the run's first lines and its last (outputs, curves.png, how to evaluate it)

A folder "holds a run" when it has metrics.jsonl, a step-* folder or final/. Without --resume or --overwrite such a
folder is refused. With --resume the saved run's settings (train_state.json's args and world size) are compared with
the new ones: every difference that makes exact resumption impossible is named in one line, unless
--allow-changed is given; a finished run (final/ exists) says so and train.py exits 0; with other settings (say a
larger --max-steps) it is refused, as is another --algo even with --allow-changed.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from nanoalign import trainutil as tu

# settings that may change across a resume without changing any step's numbers
RESUME_FREE = {"out", "resume", "overwrite", "allow_changed", "wandb", "save_every", "keep", "strict", "ref_cache",
               "grad_checkpointing", "toy_cache", "skip_nonfinite", "non_default", "no_signal_limit"}

# argument -> (test, reason); None (unset) passes every test
_FINITE = lambda v: math.isfinite(v)
ARG_RULES = {
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "grad_accum": (lambda v: v >= 1, "must be >= 1"),
    "max_steps": (lambda v: v >= 1, "must be >= 1 (leave it out to train --epochs over the data)"),
    "epochs": (lambda v: _FINITE(v) and v > 0, "must be a finite number > 0"),
    "lr": (lambda v: _FINITE(v) and v > 0, "must be a finite number > 0"),
    "projector_lr": (lambda v: _FINITE(v) and v > 0, "must be a finite number > 0"),
    "weight_decay": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0"),
    "warmup_steps": (lambda v: v >= 0, "must be >= 0"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "clip": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0 (0 = off)"),
    "lora_rank": (lambda v: v >= 0, "must be >= 0 (0 = full fine-tuning)"),
    "lora_alpha": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "beta": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0 (ipo: > 0)"),
    "gamma": (lambda v: _FINITE(v) and v > 0, "must be a finite number > 0"),
    "sft_weight": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0"),
    "noise_step": (lambda v: 0 <= v < 1000, "must be in [0, 999] (diffusion steps of the noise schedule)"),
    "max_len": (lambda v: v >= 1, "must be >= 1"),
    "save_every": (lambda v: v >= 0, "must be >= 0 (0 = only at the end)"),
    "keep": (lambda v: v >= 1, "must be >= 1 (the newest step checkpoints kept)"),
    "k": (lambda v: v >= 1, "must be >= 1 (samples per prompt; rloo and grpo need >= 2)"),
    "temperature": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0 (0 = greedy)"),
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "reward_norm": (lambda v: v >= 0, "must be >= 0"),
    "clip_ratio": (lambda v: _FINITE(v) and v > 0, "must be a finite number > 0"),
    "ppo_epochs": (lambda v: v >= 1, "must be >= 1"),
    "ppo_minibatches": (lambda v: v >= 1, "must be >= 1 (minibatches per PPO epoch)"),
    "vf_coef": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0"),
    "clip_value": (lambda v: _FINITE(v) and v > 0, "must be a finite number > 0"),
    "gamma_ppo": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "lam": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)"),
    "alpha": (lambda v: 0 <= v <= 1, "must be in [0, 1] (the probability of the offline pair)"),
    "guard_len_min": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0 (tokens)"),
    "guard_len_max": (lambda v: v > 0, "must be > 0 (tokens; inf = off)"),
    "guard_entropy": (lambda v: _FINITE(v) and v >= 0, "must be a finite number >= 0 (nats per token)"),
    "guard_kl": (lambda v: v > 0, "must be > 0 (nats; inf = off)"),
    "no_signal_limit": (lambda v: v >= 0, "must be >= 0 (0 = no check)"),
    "eval_every": (lambda v: v >= 0, "must be >= 0 (0 = only before and after)"),
    "eval_limit": (lambda v: v >= 1, "must be >= 1"),
    "eval_max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "eval_batch_size": (lambda v: v >= 1, "must be >= 1"),
}
ANY_VALUE = ("seed", "toy_seed")  # the numeric options every value of which is fine (a test holds the rest to a rule)


def add_args(p) -> None:
    """train.py's option group of the run folder."""
    g = p.add_argument_group("the run folder --out: checkpoints and resume (nanoalign/runs.py)")
    g.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N optimizer steps (0 = only "
                   "at the end)")
    g.add_argument("--keep", type=int, default=2, help="keep the newest K step checkpoints, in checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (deletes it)")
    g.add_argument("--allow-changed", action="store_true", help="--resume even with settings that differ")


# options read only with (or without) another: given otherwise (at any value), an option does nothing.
# name -> (test of the namespace, why not); the eval_* ones only with --model/--data (the toy picks its evaluation)
_LORA = (lambda a: a.lora_rank > 0, "does nothing without --lora-rank")
_FULL = (lambda a: not a.lora_rank, "does nothing with --lora-rank (LoRA trains only its adapters)")
_TOY = (lambda a: a.model is None, "does nothing with --model/--data (only the toy-world run reads it)")
ONLY_WITH = {
    "lora_alpha": _LORA, "lora_dropout": _LORA, "lora_targets": _LORA, "projector_lr": _FULL, "freeze_vision": _FULL,
    "toy_cache": _TOY, "toy_seed": _TOY,
    "annotator_both_orders": (lambda a: str(a.annotator).startswith("vlm:"), "does nothing without --annotator vlm:"),
    **{k: (lambda a: a.eval_task is not None, "does nothing without --eval-task")
       for k in ("eval_every", "eval_limit", "eval_image_root", "eval_batch_size")},
    "eval_annotations": (lambda a: a.eval_task == "chair", "does nothing without --eval-task chair"),
    "eval_synonyms": (lambda a: a.eval_task == "chair", "does nothing without --eval-task chair"),
    "eval_data_format": (lambda a: a.eval_task == "prefs", "does nothing without --eval-task prefs"),
    "eval_max_new_tokens": (lambda a: a.eval_task in ("pope", "chair"), "does nothing without --eval-task pope or "
                                                                         "chair"),
}


def _given(name: str, v) -> str:
    """An option as the user gave it: `--name`, `--name value` (3, not 3.0)."""
    return f"--{name.replace('_', '-')}" + ("" if v is True else f" {v:g}" if isinstance(v, float) else f" {v}")


def given_options(parser, argv) -> set[str]:
    """The dests of the options typed in argv (None: sys.argv[1:]), whatever their value: an option typed at its
    default value is still given (a user who typed it expects it to be read). Abbreviations and --x=v forms count."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)  # argparse sets a default only where the namespace lacks the attribute
    return {k for k, v in vars(ns).items() if v is not unset}


def check_args(parser, args, argv=None, only_for: dict | None = None) -> None:
    """parser.error (exit 2, one line) for the first argument that makes no sense: a value (ARG_RULES), a
    combination, then an option given in argv (given_options: typed, at any value) that the run would not read:
    only_for {name: [algorithms that read it]} (train.ONLY_FOR; --eval-task prefs reads --beta too), ONLY_WITH."""
    for name, (ok, reason) in ARG_RULES.items():
        v = getattr(args, name, None)
        if v is not None and not ok(v):
            parser.error(f"{_given(name, v)}: {reason}")
    dtype = getattr(args, "dtype", "fp32")
    if getattr(args, "amp", False) and dtype != "fp32":
        parser.error(f"--amp keeps fp32 weights and computes in bf16; it does not combine with --dtype {dtype} (drop "
                     "--amp: bf16/fp16 weights already compute in their dtype)")
    if dtype == "fp16" and getattr(args, "algo", None) in ("rloo", "ppo", "grpo"):
        parser.error(f"--dtype fp16: --algo {args.algo}'s update has no loss scaling (fp16 gradients under 6e-8 would "
                     "flush to zero); use --dtype bf16 or --amp")
    if dtype == "fp16" and not args.lora_rank:
        parser.error("--dtype fp16 trains only LoRA adapters (give --lora-rank; AdamW on fp16 weights gives NaN); for "
                     "full fine-tuning use --dtype bf16, or --amp (fp32 weights, bf16 compute)")
    if getattr(args, "algo", None) == "ipo" and args.beta == 0:
        parser.error("--beta 0: ipo's target margin is 1/(2 beta); beta must be > 0")
    if getattr(args, "algo", None) in ("rloo", "grpo") and args.k < 2:
        parser.error(f"--k {args.k}: {args.algo} compares each sample with the others of its prompt; k must be >= 2")
    if getattr(args, "algo", None) == "ppo" and (args.batch_size * args.k * args.grad_accum) % args.ppo_minibatches:
        parser.error(f"--ppo-minibatches {args.ppo_minibatches}: must divide a rank's rollouts per step, --batch-size "
                     f"x --k x --grad-accum = {args.batch_size} x {args.k} x {args.grad_accum} = "
                     f"{args.batch_size * args.k * args.grad_accum}")
    given = given_options(parser, argv)
    for name, algos in (only_for or {}).items():
        if name in given and args.algo not in algos and not (name == "beta" and args.eval_task == "prefs"):
            parser.error(f"{_given(name, getattr(args, name))}: used only by --algo {', '.join(algos)}, not by "
                         f"{args.algo}")
    for name, (ok, why) in ONLY_WITH.items():
        if name in given and not ok(args) and not (args.model is None and name.startswith("eval_")):
            parser.error(f"{_given(name, getattr(args, name))}: {why}")


_LOCKS: dict[str, int] = {}


def lock(folder: Path) -> None:
    """Take folder/.lock (flock, exclusive, non-blocking) until the process exits; ValueError naming the holder when
    another process has it. Taking it again in the same process is a no-op."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _LOCKS:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"{folder} is in use by another run (pid {holder}, lock {folder / '.lock'}); wait for it "
                         "to end or use another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def release(folder: Path) -> None:
    """Give up folder/.lock (the run is over); no-op when this process does not hold it."""
    fd = _LOCKS.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)


def holds_run(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() or (out / "final").exists() or any(out.glob(tu.STEP_PREFIX + "*"))


def remove_partial_saves(out: Path) -> list[Path]:
    """Remove temporary folders of saves killed mid-way (`.NAME.tmp-PID`, `.NAME.old-PID`, `NAME.tmp-PID`)."""
    gone = []
    for p in list(out.glob(".*.tmp-*")) + list(out.glob(".*.old-*")) + list(out.glob("*.tmp-*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
        elif p.name.startswith(".metrics.jsonl.tmp-"):
            p.unlink(missing_ok=True)
    return gone


def _norm(name, v):
    if name in ("model", "data", "image_root") and v is not None:
        return str(Path(v).resolve())
    return v


def changed_settings(saved: dict, now: dict, saved_world, world: int) -> list[str]:
    """`name: saved -> now` for each setting that differs and breaks exact resumption. An option the saved run does
    not know (added by a later version) that is at its default now (not in now["non_default"], train.parse_args)
    keeps the old behaviour: not a change."""
    given = set(now["non_default"]) if "non_default" in now else None
    diffs = []
    for k in sorted(set(saved) | set(now)):
        if k in RESUME_FREE or (k not in saved and given is not None and k not in given):
            continue
        a, b = _norm(k, saved.get(k)), _norm(k, now.get(k))
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            diffs.append(f"--{k.replace('_', '-')}: {a} -> {b}")
    if saved_world is not None and saved_world != world:
        diffs.append(f"world size: {saved_world} -> {world}")
    return diffs


def prepare_out(args, world: int) -> str:
    """Check --out (and --ref-cache) before anything is loaded -> "new", "resume" or "finished". Rank 0 takes the
    lock and removes partial saves; every rank runs the read-only checks alike. ValueError (one line) on refusal."""
    out = Path(args.out)
    for flag, p in (("--out", out), ("--ref-cache", args.ref_cache)):
        if p is not None and Path(p).exists() and not Path(p).is_dir():
            raise ValueError(f"{flag} {p}: is a file, not a folder")
    if tu.rank() == 0:
        lock(out)
        for p in remove_partial_saves(out):
            tu.print0(f"removed {p} (a save interrupted earlier)")
    if getattr(args, "overwrite", False):  # decided on the flag alone, so every rank reaches the barrier
        if tu.rank() == 0 and out.exists():
            for p in [out / "final", *out.glob(tu.STEP_PREFIX + "*")]:
                shutil.rmtree(p, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        _barrier()
        return "new"
    if not out.exists() or not holds_run(out):
        return "new"
    if not args.resume:
        raise ValueError(f"--out {out} holds a run (metrics.jsonl / step-* / final); add --resume to continue it "
                         "or --overwrite to start over")
    ckpt = out / "final" if (out / "final" / tu.TRAIN_STATE).is_file() else tu.latest_checkpoint(out)
    if ckpt is None:
        return "resume"
    state = tu.load_train_state(ckpt)
    diffs = changed_settings(state.get("args") or {}, vars(args), state.get("world"), world)
    saved_algo = (state.get("args") or {}).get("algo")
    if saved_algo is not None and saved_algo != getattr(args, "algo", saved_algo):  # even with --allow-changed
        raise ValueError(f"--resume: {ckpt} is a --algo {saved_algo} run; --algo {args.algo} cannot continue it (its "
                         f"train state is another algorithm's): start a new run with --model {out / 'final'} or a "
                         f"step folder's weights, and another --out")
    if diffs and ckpt.name == "final":  # a finished run is not extended: say so instead of 'nothing to do'
        raise ValueError(f"--resume: {out} is finished ({ckpt}); --resume continues an interrupted run, it does not "
                         f"extend a finished one ({'; '.join(diffs)}): start a new run with --model {ckpt} and "
                         "another --out")
    if diffs and not getattr(args, "allow_changed", False):
        raise ValueError(f"--resume: {ckpt} was trained with other settings ({'; '.join(diffs)}): exact resumption "
                         "is impossible; give --allow-changed to continue anyway, or use another --out")
    if diffs:
        tu.print0(f"warning: --resume --allow-changed: {'; '.join(diffs)}")
    if ckpt.name == "final":
        release(out)
        return "finished"
    return "resume"


def _barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def interrupted_line(out, argv: list[str]) -> str:
    """The one line printed on Ctrl-C."""
    ckpt = tu.latest_checkpoint(Path(out)) if out else None
    cmd = " ".join(shlex.quote(a) for a in argv)
    if "--resume" not in argv:
        cmd += " --resume"
    where = f"last checkpoint: {ckpt}" if ckpt else "no checkpoint saved yet"
    return f"interrupted; {where}; continue with: python {cmd}"


# ---------------------------------------------------------------------------------- the run's first and last lines
def start_lines(*, algo: str, model: str, data: str, n_examples: int, world: int, global_batch: int,
                max_steps: int, start_step: int, n_params: float, precision: str, out: Path, device: str,
                eval_plan: str | None = None) -> str:
    """The first lines of a run: what it will do, on what, and where its outputs go."""
    lines = [f"run: {algo} on {n_examples} examples of {data}, model {model}",
             f"     {max_steps - start_step} optimizer steps (of {max_steps}; global batch {global_batch} = "
             f"{global_batch // world} per rank x {world} rank(s)), {n_params / 1e6:.2f}M trainable parameters, "
             f"{device}, {precision}",
             f"     outputs: {out}/final (checkpoint), {out}/metrics.jsonl (one line per step), {out}/curves.png",
             "     time: the first step's duration and the ETA follow (progress line)"]
    if eval_plan:
        lines.append("     " + eval_plan)
    return "\n".join(lines)


def summary_lines(records: list[dict], *, out: Path, final: Path, seconds: float, plot: str | None,
                  eval_command: str, best: tuple[str, float, Path] | None = None) -> str:
    """The end of a run: steps, time, tokens/s, the final metrics and the best eval, first vs last reward accuracy
    (means over the first and last max(1, steps // 10) steps, at most 10), where the outputs are, the command that
    evaluates the result. records: the run's metrics.jsonl records (step lines, eval lines)."""
    steps = [r for r in records if "loss" in r]
    lines = [f"done: {len(steps)} steps in {seconds / 60:.1f} min"]
    if steps:
        tps = sum(r.get("tokens_per_s", r.get("train_tokens_per_s", 0)) for r in steps) / len(steps)
        lines[0] += f", {tps:.0f} tokens/s (mean over steps)"
        last = steps[-1]
        lines.append("  final: " + ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "accuracy", "margin", "reward",
                                                                            "reward_mean", "kl") if k in last))
        acc = [r["accuracy"] for r in steps if "accuracy" in r]
        if acc:
            k = min(10, max(1, len(acc) // 10))
            lines.append(f"  reward accuracy: first {k} step(s) {sum(acc[:k]) / k:.3f} -> last {k} step(s) "
                         f"{sum(acc[-k:]) / k:.3f}")
    evals = [r for r in records if any(key.startswith("eval/") for key in r)]
    if evals:
        first, last = evals[0], evals[-1]
        keys = [k for k in last if k.startswith("eval/")]
        lines.append(f"  eval: step {first['step']} -> step {last['step']}: " + ", ".join(
            f"{k[5:]} {first.get(k, float('nan')):.4g} -> {last[k]:.4g}" for k in keys))
    if best is not None:
        lines.append(f"  best {best[0]} {best[1]:.4g}: {best[2]}")
    lines.append(f"  checkpoint: {final}")
    lines.append(f"  metrics:    {out / 'metrics.jsonl'}")
    lines.append(f"  plot:       {plot}" if plot else "  plot:       (matplotlib not installed: pip install "
                 f"matplotlib; python -m nanoalign.plot {out / 'metrics.jsonl'})")
    lines.append(f"  evaluate:   {eval_command}")
    return "\n".join(lines)


def write_plot(out: Path) -> str | None:
    """OUT/curves.png from OUT/metrics.jsonl (nanoalign.plot) -> its path, or None without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from nanoalign.plot import plot_runs, read_run
    header, rows = read_run(str(out / "metrics.jsonl"))
    algo = str(header.get("config", {}).get("algo", ""))
    plot_runs({out.name or "run": rows}, str(out / "curves.png"), algos={out.name or "run": algo})
    return str(out / "curves.png")


def eval_command(args, final: Path, out: Path, reward_model: bool) -> str:
    """The command that evaluates the run's result, for its last lines: eval_rm for a reward model, eval on the run's
    own --eval-data for --eval-task pope / chair, else a POPE command with placeholders."""
    if reward_model:
        return f"python -m nanoalign.eval_rm --model {final} --data HELDOUT_PAIRS.jsonl"
    if args.eval_task not in ("pope", "chair"):
        return f"python -m nanoalign.eval --model {final} --task pope --data POPE.jsonl --image-root COCO_DIR " \
               f"--out {out / 'eval'}"
    root = args.eval_image_root or Path(args.eval_data).resolve().parent
    return (f"python -m nanoalign.eval --model {final} --task {args.eval_task} --data {args.eval_data} --image-root "
            f"{root} --out {out / 'eval'}" + (f" --annotations {args.eval_annotations}" if args.eval_task == "chair"
                                               else ""))


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def start_wandb(project: str, config: dict):
    """The wandb module after wandb.init(project, config), or None with a warning when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        tu.print0("warning: --wandb given but wandb is not installed; logging to metrics.jsonl only")
        return None
    wandb.init(project=project, config=config)
    return wandb


class MetricsLog:
    """OUT/metrics.jsonl: a header line (config, git SHA, argv), then one JSON object per step (rank 0 only).
    On resume, lines of steps beyond the resumed step are dropped so the file stays one line per step; the file is
    rewritten atomically (temp file + rename), and a torn line (a kill mid-write) is dropped with a warning naming
    the file and line."""

    def __init__(self, path: Path, header: dict, resume_step: int | None):
        self.path = path
        if tu.rank() != 0:
            return
        lines = []
        if resume_step is not None and path.exists():
            for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    tu.print0(f"warning: {path}:{no}: torn or unreadable line dropped ({line[:40]!r})")
                    continue
                if "step" not in rec or rec["step"] <= resume_step:
                    lines.append(line)
        else:
            lines.append(json.dumps({"header": header}))
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)

    def write(self, rec: dict) -> None:
        if tu.rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
