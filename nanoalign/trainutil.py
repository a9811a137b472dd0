"""What train.py needs besides the training loop: rank helpers, the optimizer and its schedule, FSDP units, the
optimizer step with its checks, checkpoints and resume, the progress bar (the run folder, its metrics.jsonl and its
first and last lines: nanoalign/runs.py).

Checkpoint folder (one per save, `OUT/step-000123`, and `OUT/final`):
    config.json, model.safetensors, tokenizer.json, preprocessor_config.json   -- llava-hf layout, loads in transformers
                                                                                  (LoRA runs: adapters merged in)
    adapter/adapter_config.json, adapter/adapter_model.safetensors             -- LoRA runs only, PEFT layout
    train_state.json         step, scheduler, optimizer param groups and non-tensor state, args, world size; the
                             head's optimizer and scheduler the same way; `values`: plain numbers a step depends on
                             (RLOO's reward mean/std measured before step 1, the best eval metric so far,
                             fp16's GradScaler state: loss scale and growth count)
    train_state.safetensors  optimizer tensors (full, unsharded: `optimizer.<i>.<name>`), RNG states (`rng.<rank>.<k>`),
                             the head beside the model (the reward model's or PPO's value head: `head.<name>`) and its
                             AdamW's tensors (`head_optimizer.<i>.<name>`)
Nothing is unpickled: a `train_state.pt` (the old pickle format, or a planted one) is refused with one line.
The folder is written under a temporary name and renamed at the end, so a crash mid-save leaves the previous
checkpoint whole; only the newest `keep` step folders are kept.
"""
from __future__ import annotations

import datetime
import errno
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from safetensors.torch import load_file, save_file

from nanoalign.checkpoint import save_state_dict
from nanoalign.lora import merge_lora_state_dict, save_lora_adapter

STEP_PREFIX = "step-"


# ------------------------------------------------------------------------------------------------ distributed

def init_distributed(cuda: bool) -> None:
    """Join torchrun's process group (idempotent). Timeout: NANOALIGN_PG_TIMEOUT_MIN minutes (default 240), not the
    30-minute default, since a long single-rank phase (the toy's SFT base training on rank 0 while the others wait
    in a broadcast) takes longer than that on a busy CPU machine."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    die_with_launcher()
    minutes = float(os.environ.get("NANOALIGN_PG_TIMEOUT_MIN", "240"))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))


def die_with_launcher() -> None:
    """A worker started by torchrun gets SIGKILL when its launcher dies (Linux prctl PR_SET_PDEATHSIG), so no
    orphaned rank keeps training into an --out that a new run takes over."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


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


def step_schedules(stepped: bool, *schedules) -> None:
    """One training step of the lr schedules (None skipped), only when the optimizer stepped: a step whose every
    update was skipped (fp16 overflow, --skip-nonfinite, no pair left) leaves them where they are, so the schedule
    counts optimizer steps (and torch warns of no scheduler step before an optimizer step)."""
    for s in schedules if stepped else ():
        if s is not None:
            s.step()


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


# ------------------------------------------------------------------------------------------------ what trains

def unused_parameters(model) -> list[str]:
    """Names of parameters the model's forward can never use, so they never get a gradient: the vision layers past
    the deepest one `vision_feature_layer` reads (LLaVA reads layer -2: the last CLIP layer is unused) and the
    vision tower's post_layernorm. train.py freezes them: no optimizer state, nothing to save or load for them."""
    vm = model.vision_tower.vision_model
    n = len(vm.encoder.layers) + 1
    layers = model.config.vision_feature_layer
    deepest = max(i + n if i < 0 else i for i in ([layers] if isinstance(layers, int) else layers))
    names = [f"vision_tower.vision_model.post_layernorm.{k}" for k, _ in vm.post_layernorm.named_parameters()]
    for i in range(deepest, n - 1):
        names += [f"vision_tower.vision_model.encoder.layers.{i}.{k}" for k, _ in vm.encoder.layers[i].named_parameters()]
    return names


def adamw(trainable: list, lr: float, projector_lr: float | None, weight_decay: float):
    """AdamW over (name, parameter) pairs: the projector's at projector_lr (None: lr), the others at lr; betas
    (0.9, 0.999); every state initialised now (init_optimizer_state)."""
    projector = [p for n, p in trainable if n.startswith("multi_modal_projector.")]
    groups = [{"params": [p for n, p in trainable if not n.startswith("multi_modal_projector.")], "lr": lr}]
    if projector:
        groups.append({"params": projector, "lr": projector_lr or lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay, betas=(0.9, 0.999))
    init_optimizer_state(optimizer)
    return optimizer


def init_optimizer_state(optimizer) -> None:
    """Give every parameter of an AdamW its (zero) state now, as AdamW would at its first gradient, so a parameter
    only sometimes used (no gradient before a save) is saved and loaded like the others: the sharded load refuses a
    checkpoint with a parameter's state missing. Bit-identical updates: AdamW skips parameters without a gradient and
    starts from exactly this state."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def nonfinite_parameters(model, prefix: str = "") -> list[str]:
    """(collective) `rank R: name` for every parameter (this rank's FSDP shard) holding a NaN or inf, every rank's."""
    mine = []
    for n, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            mine.append(f"rank {rank()}: {prefix}{n}")
    if not dist.is_initialized():
        return mine
    flag = torch.tensor([float(len(mine))])
    dist.all_reduce(flag)
    if float(flag) == 0:
        return []
    out = [None] * world_size()
    dist.all_gather_object(out, mine)
    return [x for part in out for x in part]


class Stop(SystemExit):
    """A run stopped on purpose, with one line (str(e)): a non-finite loss, gradient or parameter. A SystemExit, so
    it ends every rank's run; train.py's command line prints the line and exits with code 2, as for bad input."""


def check_loss(loss, where: str) -> None:
    """Stop (exit 2) naming `where` (step, rank, example ids, the last checkpoint) on a non-finite loss, before its
    backward and the optimizer step."""
    if not torch.isfinite(loss):
        raise Stop(f"error: non-finite loss {float(loss.detach())} at {where}; stopping before the optimizer step")


def allreduce_grads(module) -> None:
    """Mean of a plain (not FSDP-sharded) module's gradients over the ranks (the RM head, PPO's value head): FSDP
    reduces only its own units' gradients."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def optimizer_step(model, optimizer, head, head_optimizer, clip: float, where: str, skip_nonfinite: bool = False,
                   apply: bool = True, scaler=None) -> float | None:
    """(collective) One update after the backward passes, with the post-step check; every branch of train.py's loop
    (preference, reward model, RL: each PPO minibatch) steps through here.

    The head (a plain module beside the model: the reward model's or PPO's value head; None for the others) gets its
    gradients averaged over the ranks and clipped to `clip` on its own (0 = no clipping); the model's are clipped to
    `clip` (global norm, FSDP shards included). Then:
      a non-finite gradient norm (model or head): Stop (exit code 2) naming `where` (step, rank, example ids) before
        any parameter moves; with skip_nonfinite a warning, the gradients are dropped and None is returned (the
        caller skips the update);
      optimizer.step() and head_optimizer.step() (not when apply is False: a step with nothing to learn), grads zeroed;
      a non-finite parameter afterwards (model or head, any rank): Stop naming `where` and the parameters; nothing is
        saved (save_checkpoint also refuses such weights).
    scaler: a torch.amp.GradScaler (--dtype fp16: dynamic loss scaling; disabled otherwise, then a no-op). Enabled,
    the gradients are unscaled before the norms, and a non-finite norm while the scale is above 1 is an overflow,
    not a fault: the update is skipped with a line and the scale halved (decided on the global norm, so every rank
    agrees), returning None.
    Returns the model's gradient norm before clipping (float), or None for a skipped update. Scheduler steps are the
    caller's (one per training step, however many updates it makes)."""
    opts = [o for o in (optimizer, head_optimizer) if o is not None]
    scaling = scaler is not None and scaler.is_enabled()
    for o in opts if scaling else []:
        scaler.unscale_(o)  # the true gradients again, before the norms and clipping
    head_norm = 0.0
    if head is not None:
        allreduce_grads(head)
        head_norm = float(torch.nn.utils.clip_grad_norm_(head.parameters(), clip if clip > 0 else float("inf")))
    grad_norm = clip_grad_norm(model, clip)
    bad = [f"{name} {v}" for name, v in (("gradient norm", grad_norm), ("head gradient norm", head_norm))
           if not math.isfinite(v)]
    if bad and scaling and scaler.get_scale() > 1:  # fp16 overflow: skip, halve the scale, go on
        scaler.update(scaler.get_scale() / 2)
        print0(f"fp16 loss scale overflow at {where}: step skipped, scale now {scaler.get_scale():g}")
        for o in opts:
            o.zero_grad(set_to_none=True)
        return None
    if bad:
        if not skip_nonfinite:
            raise Stop(f"error: non-finite {', '.join(bad)} at {where}; stopping before the optimizer step "
                             "(--skip-nonfinite skips such steps)")
        print0(f"warning: non-finite {', '.join(bad)} at {where}: update skipped (--skip-nonfinite)")
        for o in opts:
            o.zero_grad(set_to_none=True)
        return None
    for o in opts:
        if apply:
            scaler.step(o) if scaling else o.step()  # the scaler steps only on finite, unscaled gradients
        o.zero_grad(set_to_none=True)
    if scaling:
        scaler.update()  # the scale doubles after 2000 steps without overflow
    bad = nonfinite_parameters(model) + (nonfinite_parameters(head, "head.") if head is not None else [])
    if bad:
        raise Stop(f"error: non-finite parameters after the optimizer step at {where}: {_short(bad)}; "
                         "nothing saved")
    return grad_norm


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


def load_optimizers(state: dict, model, optimizer, scheduler, head_optimizer=None, head_scheduler=None) -> None:
    """--resume: the optimizers and schedules of a training state (load_train_state). The schedules keep this run's
    rates (the optimizer's param groups' `initial_lr` of --lr / --projector-lr): with --allow-changed and another
    --lr the schedule continues at the new rate; unchanged, the numbers are the saved ones."""
    schedules = [s for s in (scheduler, head_scheduler) if s is not None]
    rates = [list(s.base_lrs) for s in schedules]
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if head_optimizer is not None:
        head_optimizer.load_state_dict(state["head_optimizer"])
        head_scheduler.load_state_dict(state["head_scheduler"])
    for s, base in zip(schedules, rates):  # the restored state carries the saved rates
        s.base_lrs = base
        for g, b, f in zip(s.optimizer.param_groups, base, s.lr_lambdas):
            g["initial_lr"], g["lr"] = b, b * f(s.last_epoch)


def fully_shard_llava(models, bf16_compute: bool) -> None:
    """(collective) FSDP2 over each LLaVA model (None skipped). Units: the vision tower, each decoder block, then the
    root (embeddings, projector, final norm, LM head). The final norm + LM head stay in the root unit, not a unit of
    their own: the fused loss reads the LM head weight directly (it never calls lm_head.forward), and the root's
    parameters stay unsharded between forward and backward, so that weight is the full tensor there and its gradient
    is reduce-scattered with the root's. bf16_compute: parameters cast to bf16 for compute, gradients reduced fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute else \
        MixedPrecisionPolicy()
    for m in models:
        if m is None:
            continue
        fully_shard(m.vision_tower, mp_policy=mp)
        for layer in m.language_model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(m, mp_policy=mp)


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

TRAIN_STATE = "train_state.json"  # + train_state.safetensors beside it


def save_checkpoint(out_dir: Path, name: str, model, model_config, processor, lora_layers: dict, optimizer=None,
                    scheduler=None, step: int = 0, args=None, keep: int | None = None, head=None, head_optimizer=None,
                    head_scheduler=None, values: dict | None = None) -> Path:
    """Write OUT/name atomically (collective: every rank must call it; rank 0 writes).

    With an optimizer the folder also holds the training state (train_state.json + .safetensors): the optimizer and
    scheduler, every rank's RNG state, and when given the head (a plain module beside the model: the reward model's
    or PPO's value head, the same on every rank), its optimizer and scheduler, and `values` (plain JSON numbers a
    later step depends on). Everything `--resume` needs to continue bit for bit.
    Refuses (Stop, every rank) to save non-finite weights (the head's included), and a full disk ends in one
    line naming the path and the space needed; the partial folder is removed and the previous checkpoint is left as
    it was."""
    sd = full_state_dict(model)
    head_sd = {k: v.detach().cpu() for k, v in head.state_dict().items()} if head is not None else {}
    bad = [k for k, v in [*sd.items(), *(("head." + k, v) for k, v in head_sd.items())]
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise Stop(f"error: not saving {out_dir / name}: non-finite weights in {_short(bad)}")
    state = None
    if optimizer is not None:
        state = {"step": step, "optimizer": optimizer_state(model, optimizer), "rng": rng_states(),
                 "scheduler": scheduler.state_dict() if scheduler else None,
                 "args": vars(args) if args is not None else None, "head": head_sd or None,
                 "head_optimizer": head_optimizer.state_dict() if head_optimizer is not None else None,
                 "head_scheduler": head_scheduler.state_dict() if head_scheduler is not None else None,
                 "values": values or {}}
    path = out_dir / name
    err = None
    if rank() == 0:
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        try:
            _write_checkpoint(tmp, path, sd, model, model_config, processor, lora_layers, state)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            need = sum(v.numel() * v.element_size() for v in sd.values())
            if state is not None:
                need += sum(t.numel() * t.element_size() for st in state["optimizer"]["state"].values()
                            for t in st.values() if torch.is_tensor(t))
            free = shutil.disk_usage(out_dir).free
            err = (f"error: no space left on the device of {out_dir} while saving {path}: the checkpoint needs about "
                   f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free (previous checkpoint: "
                   f"{latest_checkpoint(out_dir) or 'none'})")
        if err is None and keep is not None and name.startswith(STEP_PREFIX):
            steps = sorted(p for p in out_dir.glob(STEP_PREFIX + "*") if p.is_dir())
            for old in steps[:-keep] if keep > 0 else steps:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():  # every rank learns whether rank 0's save failed (not a barrier that hangs)
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise SystemExit(err)
    return path


def _short(names, n=3) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _write_checkpoint(tmp, path, sd, model, model_config, processor, lora_layers, state):
    out_dir = path.parent
    if tmp.exists():
        shutil.rmtree(tmp)
    scaling = next(iter(lora_layers.values())).scaling if lora_layers else 1.0
    # itself atomic; tmp becomes the checkpoint only at the rename below
    save_state_dict(model_config, merge_lora_state_dict(sd, scaling), processor, tmp)
    if lora_layers:
        save_lora_adapter(model, str(tmp / "adapter"), state_dict=sd)
    if state is not None:
        write_train_state(tmp, state)
    if path.exists():
        old = out_dir / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def _flatten_optimizer(prefix: str, opt: dict, tensors: dict) -> dict:
    """An optimizer state dict -> its JSON part; its tensors go into `tensors` as `prefix.<i>.<name>`."""
    entries = []
    for i, (key, st) in enumerate(opt["state"].items()):
        entry = {"key": key, "tensors": [], "values": {}}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{i}.{k}"] = v.detach().cpu().contiguous()
                entry["tensors"].append(k)
            else:
                entry["values"][k] = v
        entries.append(entry)
    return {"state": entries, "param_groups": opt["param_groups"]}


def _unflatten_optimizer(prefix: str, meta: dict, tensors: dict) -> dict:
    state = {}
    for i, e in enumerate(meta["state"]):
        st = dict(e["values"])
        st.update({k: tensors[f"{prefix}.{i}.{k}"] for k in e["tensors"]})
        state[e["key"]] = st
    return {"state": state, "param_groups": meta["param_groups"]}


def write_train_state(folder: Path, state: dict) -> None:
    """train_state.json (plain types) + train_state.safetensors (tensors) in `folder`; no pickle. state: the dict
    save_checkpoint builds (and load_train_state returns): step, optimizer, scheduler, rng, args, head,
    head_optimizer, head_scheduler, values."""
    tensors = {}
    for r, st in enumerate(state["rng"]):
        for k, v in st.items():
            tensors[f"rng.{r}.{k}"] = v.cpu().contiguous()
    for k, v in (state.get("head") or {}).items():
        tensors[f"head.{k}"] = v.detach().cpu().contiguous()
    head_opt = state.get("head_optimizer")
    meta = {"format": "nanoalign-train-state-1", "step": state["step"], "world": len(state["rng"]),
            "rng": [sorted(st) for st in state["rng"]], "scheduler": state.get("scheduler"),
            "optimizer": _flatten_optimizer("optimizer", state["optimizer"], tensors), "args": state.get("args"),
            "head": sorted(state["head"]) if state.get("head") else None,
            "head_optimizer": _flatten_optimizer("head_optimizer", head_opt, tensors) if head_opt else None,
            "head_scheduler": state.get("head_scheduler"), "values": state.get("values") or {}}
    save_file(tensors, str(folder / "train_state.safetensors"))
    (folder / TRAIN_STATE).write_text(json.dumps(meta, default=str))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest OUT/step-* folder holding a training state (or a train_state.pt, which load_train_state refuses)."""
    steps = sorted(p for p in Path(out_dir).glob(STEP_PREFIX + "*")
                   if (p / TRAIN_STATE).is_file() or (p / "train_state.pt").is_file())
    return steps[-1] if steps else None


def load_train_state(ckpt: Path) -> dict:
    """-> {"step", "optimizer" (a state dict for load_optimizer_state), "scheduler", "rng", "args", "world", "head"
    (the head's tensors by name, or None), "head_optimizer" (a torch state dict, or None), "head_scheduler",
    "values" (a dict)}. ValueError with one line for a pickle, a missing or damaged file."""
    f, tf = ckpt / TRAIN_STATE, ckpt / "train_state.safetensors"
    if not f.is_file():
        if (ckpt / "train_state.pt").is_file():
            raise ValueError(f"{ckpt / 'train_state.pt'}: a pickle, never read (it could run code); nanoalign's "
                             f"training state is {TRAIN_STATE} + train_state.safetensors")
        raise ValueError(f"{f}: not found")
    try:
        meta = json.loads(f.read_text())
        tensors = load_file(str(tf))
        rng = [{k: tensors[f"rng.{r}.{k}"] for k in keys} for r, keys in enumerate(meta["rng"])]
        head = {k: tensors[f"head.{k}"] for k in meta["head"]} if meta.get("head") else None
        head_opt = meta.get("head_optimizer")
        return {"step": int(meta["step"]), "optimizer": _unflatten_optimizer("optimizer", meta["optimizer"], tensors),
                "scheduler": meta["scheduler"], "rng": rng, "args": meta.get("args"), "world": meta.get("world"),
                "head": head, "head_optimizer": _unflatten_optimizer("head_optimizer", head_opt, tensors)
                if head_opt else None, "head_scheduler": meta.get("head_scheduler"),
                "values": meta.get("values") or {}}
    except Exception as e:  # JSON, safetensors or a missing key: the file is damaged
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{ckpt}: cannot read the training state ({type(e).__name__}: {msg})") from None


# ------------------------------------------------------------------------------------------------ logging

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
                            ("reward_mean", "reward", ".3f"), ("kl", "kl", ".4f")):
        if isinstance(rec.get(key), (int, float)):
            parts.append(f"{label} {rec[key]:{fmt}}")
    parts.append(f"{rec.get('tokens_per_s', rec.get('train_tokens_per_s', 0)):.0f} tok/s")
    parts += [f"{k} {v:.3f}" for k, v in rec.items() if k.startswith("eval/") and isinstance(v, (int, float))][:2]
    return " | ".join(parts)
