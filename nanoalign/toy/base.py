"""The toy's SFT base model, made the way LLaVA is: a vision tower that already sees, then supervised fine-tuning.

`prepare_base(train_main, parse_args, cache, settings, toy_seed)` (collective) builds or reuses, under the cache
folder: the world (nanoalign.toy.files.build_world), a freshly initialised tiny LLaVA (`init_checkpoint`) whose vision
tower is pretrained to name what lies in each grid cell (`pretrain_vision`, the stand-in for a pretrained CLIP), and
the SFT base in two `train.py --algo sft` stages: the world's captions and short QA (sft.json) from the initial
weights, then a grounding stage (sft_ground.json: the same mix plus more existence questions) from there, each
trained by one process (`_train_alone`). The settings are SETTINGS (the cache key); why each value: docs/toy_world.md.
Also here: the rank helpers of the toy pipeline (run on one rank, broadcast the result) and `fingerprint`.
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanoalign import trainutil as tu
from nanoalign.toy import files
from nanoalign.toy.world import CELL, COLORS, GRID, KINDS, SIZES

TOY_VERSION = 3
SETTINGS = {  # everything the cached world and base depend on (why these values: docs/toy_world.md)
    "n_train": 10000, "n_eval": 300, "qa_per_image": 7, "exist_per_image": 5, "vocab_size": 512, "kind": "llava",
    "init_std": 0.02, "patch_size": 16, "vision_hidden": 128, "vision_steps": 800, "freeze_vision": True,
    "template": "vicuna_nosys", "sft_steps": 5000, "ground_steps": 4000, "sft_batch": 16, "sft_lr": 1e-3,
    "sft_warmup": 30, "eval_max_new_tokens": 96,
}


# ------------------------------------------------------------------------------------------------- ranks
def on_rank(fn, src=0):
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


def in_parallel(fns):
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


def cores() -> int:
    """Threads a rank working alone uses: OMP_NUM_THREADS when the user set it, else every core. Under torchrun a
    value of 1 is torchrun's own default (it sets 1 unless the user set something), so there it means every core."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0 and not ("WORLD_SIZE" in os.environ and env == "1"):
        return int(env)
    return os.cpu_count() or 1


class Threads:
    """`with Threads(n):` torch uses n threads inside, then its old count again (every core on a rank that works
    alone while the others wait)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *a):
        torch.set_num_threads(self.old)


def load_model(path):
    """A checkpoint folder -> (model in eval mode, processor)."""
    from nanoalign.checkpoint import load_pretrained
    model, processor = load_pretrained(path)
    model.eval()
    return model, processor


def to_argv(options):
    """train.py options {name: value} -> its command line: `--name value`, True a bare flag, False and None left out
    (an option at None or False is at train.py's default); non_default (parse_args's record of the options away
    from their defaults) is not an option and is left out."""
    out = []
    for k, v in options.items():
        if v is None or v is False or k == "non_default":
            continue
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


# -------------------------------------------------------------------------------- the cache and the recipe's pieces
def cache_key(settings):
    blob = json.dumps({**settings, "toy_version": TOY_VERSION, "world_version": files.VERSION}, sort_keys=True)
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
        cfg_dict = files.toy_config(settings["kind"], cfg_dict["text_config"]["vocab_size"])
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
    thrown away. Real LLaVA starts from a pretrained CLIP tower; a from-scratch one collapses under the language
    loss and the decoder never learns to look (docs/toy_world.md). Returns the probe accuracy on the last batch."""
    from nanoalign.image import open_image
    from nanoalign.checkpoint import save_pretrained
    model, processor = load_model(path)
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    if side != GRID:
        raise ValueError(f"pretrain_vision: needs one patch per grid cell (patch {CELL}), got patch {vc.patch_size}")
    kinds, colors, sizes = ["none", *KINDS], ["none", *COLORS], ["none", *SIZES]
    scenes = list(files.load_scenes(world["scenes_train"]).items())
    pix = processor.image_processor.process([open_image(os.path.join(world["images"], n))
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
    bar = tu.Progress(steps, 0, "vision pretraining", "ex")
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
    SIMD level and the versions that do the arithmetic (one machine reproduces its base bit for bit; another CPU may
    train another base: docs/toy_world.md)."""
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


# ------------------------------------------------------------------------------------------------- the base
def prepare_base(train_main, parse_args, cache, settings, toy_seed):
    """World, tokenizer, initial checkpoint and SFT base, each cached under `cache` (collective: every rank calls it)
    -> (world paths dict, base checkpoint folder). train_main / parse_args: train.py's main and parse_args."""
    cache = Path(cache)
    t0 = time.time()

    def world_step():
        with Threads(cores()):
            world = files.build_world(str(cache / "world"), settings["n_train"], settings["n_eval"], toy_seed,
                                      settings["qa_per_image"], settings["vocab_size"], settings["exist_per_image"])
            if not _done(cache / "init"):
                init_checkpoint(world, cache / "init", settings, toy_seed)
                acc = pretrain_vision(cache / "init", world, settings["vision_steps"], seed=toy_seed) \
                    if settings["vision_steps"] else None
                _mark(cache / "init", {"vision_kind_acc": acc})
        return world

    world = on_rank(world_step)
    base = cache / "base"
    if _done(base):
        tu.print0(f"toy: reusing the SFT base model {base / 'final'} (world and base cached in {cache})")
        return world, base / "final"
    tu.print0(f"toy: world ready in {time.time() - t0:.0f}s ({cache / 'world'}); training the SFT base model")
    # two SFT stages, each cached: the full mix from init, then grounding (the mix plus more existence questions,
    # from a fresh warm-up) from there; with ground_steps 0 the first stage is the base
    stages = ([("sft_mix", world["sft"], settings["sft_steps"]), ("base", world["sft_ground"], settings["ground_steps"])]
              if settings["ground_steps"] else [("base", world["sft"], settings["sft_steps"])])
    # --resume: a stage killed earlier continues (or starts over when it saved nothing) instead of being refused
    flags = ["--resume"] + (["--freeze-vision"] if settings["freeze_vision"] else [])
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
                train_main(parse_args(to_argv(sargs) + flags))
            else:  # rank 0 alone (see _train_alone); the others wait
                on_rank(lambda: _train_alone(train_main, to_argv(sargs) + flags))
            if tu.rank() == 0:
                _mark(out, {"seconds": time.time() - t1, "settings": settings})
            on_rank(lambda: None)
        start = out / "final"
    return world, base / "final"


_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _train_alone(train_main, argv):
    """Run train.py (the script that defines train_main) with argv as one plain process using every core: at the
    tiny base's size each step's collectives cost more than its compute, so FSDP over CPU ranks is several times
    slower (docs/toy_world.md). Raises RuntimeError when it fails."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV and not k.startswith("TORCHELASTIC")}
    env["OMP_NUM_THREADS"] = str(cores())
    script = Path(sys.modules[train_main.__module__].__file__).resolve()
    r = subprocess.run([sys.executable, str(script), *argv], env=env)
    if r.returncode != 0:
        raise RuntimeError(f"the SFT base run ({script.name} {' '.join(argv[:2])} ...) exited with {r.returncode}")

