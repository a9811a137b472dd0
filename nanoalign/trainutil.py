"""What train.py needs besides the training loop: rank helpers, the schedule, gradient clipping, checkpoints and
resume, metrics, the progress bar.

Checkpoint folder (one per save, `OUT/step-000123`, and `OUT/final`):
    config.json, model.safetensors, tokenizer.json, preprocessor_config.json   -- llava-hf layout, loads in transformers
                                                                                  (LoRA runs: adapters merged in)
    adapter/adapter_config.json, adapter/adapter_model.safetensors             -- LoRA runs only, PEFT layout
    train_state.pt   optimizer (full, unsharded), scheduler, step, RNG states of every rank, args
The folder is written under a temporary name and renamed at the end, so a crash mid-save leaves the previous
checkpoint whole; only the newest `keep` step folders are kept.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanoalign.checkpoint import save_state_dict
from nanoalign.lora import merge_lora_state_dict, save_lora_adapter

STEP_PREFIX = "step-"


# ------------------------------------------------------------------------------------------------ distributed

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*a, **kw):
    if rank() == 0:
        print(*a, **kw, flush=True)


def all_mean(x: float) -> float:
    """Mean of a python float over ranks."""
    if not dist.is_initialized():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world_size()


# ------------------------------------------------------------------------------------------------ schedule

def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1 over `warmup` steps, then cosine down to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the gradients' global L2 norm to max_norm (0 = no clipping); returns the norm before clipping (the
    whole model's, FSDP shards included)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


# ------------------------------------------------------------------------------------------------ state dicts

def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's parameters as plain CPU tensors on every rank (FSDP shards gathered)."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(model, optimizer) -> dict:
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def rng_states() -> list:
    """Every rank's torch RNG state (gathered on all ranks)."""
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [mine]
    out = [None] * world_size()
    dist.all_gather_object(out, mine)
    return out


def set_rng_state(states: list) -> None:
    if len(states) != world_size():
        print0(f"warning: checkpoint has RNG states of {len(states)} ranks, this run has {world_size()}: "
               "random draws after resume will differ from the uninterrupted run")
        return
    mine = states[rank()]
    torch.set_rng_state(mine["cpu"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])


# ------------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(out_dir: Path, name: str, model, model_config, processor, lora_layers: dict, optimizer=None,
                    scheduler=None, step: int = 0, args=None, keep: int | None = None) -> Path:
    """Write OUT/name atomically (collective: every rank must call it; rank 0 writes)."""
    sd = full_state_dict(model)
    opt = optimizer_state(model, optimizer) if optimizer is not None else None
    rngs = rng_states()
    path = out_dir / name
    if rank() == 0:
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        scaling = next(iter(lora_layers.values())).scaling if lora_layers else 1.0
        # itself atomic; tmp becomes the checkpoint only at the rename below
        save_state_dict(model_config, merge_lora_state_dict(sd, scaling), processor, tmp)
        if lora_layers:
            save_lora_adapter(model, str(tmp / "adapter"), state_dict=sd)
        if optimizer is not None:
            torch.save({"step": step, "optimizer": opt, "scheduler": scheduler.state_dict() if scheduler else None,
                        "rng": rngs, "args": vars(args) if args is not None else None}, tmp / "train_state.pt")
        if path.exists():
            old = out_dir / f".{name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        if keep is not None and name.startswith(STEP_PREFIX):
            steps = sorted(p for p in out_dir.glob(STEP_PREFIX + "*") if p.is_dir())
            for old in steps[:-keep] if keep > 0 else steps:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted(p for p in out_dir.glob(STEP_PREFIX + "*") if (p / "train_state.pt").is_file())
    return steps[-1] if steps else None


def load_train_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{ckpt / 'train_state.pt'}: cannot read the training state ({e})") from None


# ------------------------------------------------------------------------------------------------ logging

def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Progress:
    """The one progress bar (training steps, evaluation, pair making, BDHS). On a terminal: tqdm when installed, else
    one stderr line `desc n/total rate unit/s ETA postfix` redrawn in place (at most every 0.1 s). Into a log file or
    pipe: one plain line per `every` updates (default: about 20 lines per run) and at the end, never a carriage
    return, so a CI log reads top to bottom.

    total / initial: counts of `unit`; enabled: draw it (default: on rank 0 only; pass False to silence, True to
    draw on every rank). update(postfix, n) advances by n units.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "train", unit: str = "step",
                 enabled: bool | None = None, every: int | None = None):
        self.total, self.n, self.t0, self.start, self.bar = total, initial, time.time(), initial, None
        self.desc, self.unit = desc, unit
        self.enabled = rank() == 0 if enabled is None else enabled
        self.tty = sys.stderr.isatty()
        self.every = every or max(1, (total - initial) // 20)
        self.last = 0.0
        if self.enabled and self.tty:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                                dynamic_ncols=True, mininterval=0.1)
            except ImportError:
                pass

    def line(self, postfix: str = "") -> str:
        """`desc n/total rate unit/s ETA 1m05s postfix` of the updates so far."""
        rate = (self.n - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
        return f"{self.desc} {self.n}/{self.total} {rate:.2f} {self.unit}/s ETA {eta_s} {postfix}".rstrip()

    def update(self, postfix: str = "", n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
        elif self.tty:
            if time.time() - self.last >= 0.1 or self.n >= self.total:
                self.last = time.time()
                print("\r" + self.line(postfix), end="", file=sys.stderr, flush=True)
        elif (self.n - self.start) % self.every < n or self.n >= self.total:
            print(self.line(postfix), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            print(file=sys.stderr)


def step_postfix(rec: dict) -> str:
    """The progress line's metrics of a metrics.jsonl record: loss, reward accuracy and margin (preference losses),
    reward and KL (RL, when logged), tokens/s, and the newest eval metrics."""
    parts = [f"loss {rec['loss']:.4f}"]
    for key, label, fmt in (("accuracy", "acc", ".2f"), ("margin", "margin", ".3f"), ("reward", "reward", ".3f"),
                            ("kl", "kl", ".4f")):
        if isinstance(rec.get(key), (int, float)):
            parts.append(f"{label} {rec[key]:{fmt}}")
    parts.append(f"{rec.get('tokens_per_s', 0):.0f} tok/s")
    parts += [f"{k} {v:.3f}" for k, v in rec.items() if k.startswith("eval/") and isinstance(v, (int, float))][:2]
    return " | ".join(parts)


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
        tps = sum(r.get("tokens_per_s", 0) for r in steps) / len(steps)
        lines[0] += f", {tps:.0f} tokens/s (mean over steps)"
        last = steps[-1]
        lines.append("  final: " + ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "accuracy", "margin", "reward",
                                                                            "kl") if k in last))
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


class MetricsLog:
    """OUT/metrics.jsonl: a header line (config, git SHA, argv), then one JSON object per step (rank 0 only).
    On resume, lines of steps beyond the resumed step are dropped so the file stays one line per step."""

    def __init__(self, path: Path, header: dict, resume_step: int | None):
        self.path = path
        if rank() != 0:
            return
        lines = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if "step" not in rec or rec["step"] <= resume_step:
                    lines.append(line)
        else:
            lines.append(json.dumps({"header": header}))
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, rec: dict) -> None:
        if rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
