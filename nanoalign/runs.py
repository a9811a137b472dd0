"""The run folder (--out): what train.py checks before it trains, so a run never mixes with another one.

    check_args(parser, args)      arguments that make no sense -> parser.error (exit 2) with the reason
    prepare_out(args, world)      -> "new" | "resume" | "finished"; lock, refusals, the resume settings check
    lock(folder), release(folder) an exclusive lock on folder/.lock for the life of the run (also the toy cache)
    interrupted_line(out, argv)   Ctrl-C: where the last checkpoint is and the --resume command

A folder "holds a run" when it has metrics.jsonl, a step-* folder or final/. Without --resume or --overwrite such a
folder is refused. With --resume the saved run's settings (train_state.json's args and world size) are compared with
the new ones: every difference that makes exact resumption impossible is named in one line, unless
--allow-changed is given; a finished run (final/ exists) says so and train.py exits 0.
"""
from __future__ import annotations

import fcntl
import math
import os
import shlex
import shutil
from pathlib import Path

from nanoalign import trainutil as tu

# settings that may change across a resume without changing any step's numbers
RESUME_FREE = {"out", "resume", "overwrite", "allow_changed", "wandb", "save_every", "keep", "strict", "ref_cache",
               "grad_checkpointing", "toy_cache", "skip_nonfinite", "non_default"}

# argument -> (test, reason); None (unset) passes every test
_FINITE = lambda v: math.isfinite(v)
ARG_RULES = {
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
}


def check_args(parser, args) -> None:
    """parser.error (exit 2, one line) for the first argument that makes no sense."""
    for name, (ok, reason) in ARG_RULES.items():
        v = getattr(args, name, None)
        if v is not None and not ok(v):
            parser.error(f"--{name.replace('_', '-')} {v}: {reason}")
    if getattr(args, "algo", None) == "ipo" and args.beta == 0:
        parser.error("--beta 0: ipo's target margin is 1/(2 beta); beta must be > 0")
    if getattr(args, "algo", None) in ("rloo", "grpo") and args.k < 2:
        parser.error(f"--k {args.k}: {args.algo} compares each sample with the others of its prompt; k must be >= 2")
    if getattr(args, "algo", None) == "ppo" and (args.batch_size * args.k * args.grad_accum) % args.ppo_minibatches:
        parser.error(f"--ppo-minibatches {args.ppo_minibatches}: must divide a rank's rollouts per step, --batch-size "
                     f"x --k x --grad-accum = {args.batch_size} x {args.k} x {args.grad_accum} = "
                     f"{args.batch_size * args.k * args.grad_accum}")


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
