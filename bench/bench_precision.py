"""Memory per precision setting of train.py's DPO step: weights, gradients, AdamW state and the step's peak, computed
from the parameter counts and measured on bench_step.py's LLaVA-proportioned CPU model (vocabulary 32,064, 576 image
tokens, LLaMA hidden 512 x 4 layers, CLIP 128 x 2; ~46 M parameters).

    python bench/bench_precision.py                      # ~3 min on a loaded 2-core machine; table on stdout
    python bench/bench_precision.py --out bench/results  # also writes precision.md / precision.json there

Each setting runs train.py's real main (`--algo dpo --max-steps 1 --batch-size 2`, reference log-probs from the
cache as train.py does) in a fresh process, instrumented from outside:
  weights   computed: parameters at load x bytes of the setting's weight dtype;
  grads     computed: trainable parameters x bytes of their dtype; measured: the bytes of the .grad tensors when
            AdamW's first step starts;
  AdamW     computed: 2 x trainable x bytes (m and v in the parameter's dtype); measured: the bytes of the optimizer
            state's tensors after its first step (train.py allocates them before step 1: init_optimizer_state);
  RSS at step 1's start: at the objective's first call (after the model, the reference cache and AdamW's state);
  step 1's peak over its start: VmHWM during step 1 (reset at its start through /proc/self/clear_refs) minus that
            RSS: activations, gradients, temporaries, and fp32 weight pages read for the first time (an fp32
            checkpoint is mapped from its safetensors file, not copied: RSS grows by ~17 MB at load and by the rest
            on first use; bf16/fp16 are converted, so copied, at load);
  process peak RSS: VmHWM at the end (imports, data, model, cache, the step: the figure to compare settings by).
Linux only (reads /proc/self/status). CPU figures; on a GPU the same tensors take the same bytes, plus the CUDA
context and allocator slack, and --amp keeps autocast's bf16 copy of each weight for the step (as here).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> train.py flags
    "fp32": [],
    "bf16": ["--dtype", "bf16"],
    "amp": ["--amp"],
    "fp32 LoRA r16": ["--lora-rank", "16"],
    "bf16 LoRA r16": ["--dtype", "bf16", "--lora-rank", "16"],
    "fp16 LoRA r16": ["--dtype", "fp16", "--lora-rank", "16"],
}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def worker(world: Path, name: str) -> dict:
    """train.main on `world` with SETTINGS[name], instrumented; -> the figures above in bytes."""
    import torch
    sys.path.insert(0, str(REPO))
    import train
    rec = {}
    load = train.load_pretrained

    def load_pretrained(*a, **k):
        first = "weights_rss" not in rec
        r0 = _status()["VmRSS"]
        out = load(*a, **k)
        if first:
            rec["weights_rss"] = _status()["VmRSS"] - r0
            model = out[0]
            rec["params"] = sum(p.numel() for p in model.parameters())
            rec["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
        return out
    train.load_pretrained = load_pretrained
    objective = train.objective

    def first_objective(loss, model, *a, **k):
        if "step_rss0" not in rec:
            rec["step_rss0"] = _status()["VmRSS"]
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            trainable = [p for p in model.parameters() if p.requires_grad]
            rec["trainable"] = sum(p.numel() for p in trainable)
            rec["trainable_bytes"] = sum(p.numel() * p.element_size() for p in trainable)
            rec["weights_after_setup"] = sum(p.numel() * p.element_size() for p in model.parameters())
        return objective(loss, model, *a, **k)
    train.objective = first_objective
    step = torch.optim.AdamW.step

    def adamw_step(self, *a, **k):
        first = "grads" not in rec
        if first:
            rec["grads"] = sum(p.grad.numel() * p.grad.element_size() for g in self.param_groups for p in g["params"]
                               if p.grad is not None)
        out = step(self, *a, **k)
        if first:
            rec["step_peak"] = _status()["VmHWM"] - rec["step_rss0"]
            rec["adamw"] = sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                               if torch.is_tensor(t) and t.dim() > 0)
        return out
    torch.optim.AdamW.step = adamw_step
    with tempfile.TemporaryDirectory() as out:
        train.main(train.parse_args(["--model", str(world / "ckpt"), "--data", str(world / "prefs.jsonl"),
                                     "--image-root", str(world / "img"), "--template", "raw", "--out", out,
                                     "--algo", "dpo", "--max-steps", "1", "--batch-size", "2", *SETTINGS[name]]))
    rec["process_peak"] = _status()["VmHWM"]
    return rec


def computed(r: dict, name: str) -> dict:
    """The napkin figures from the parameter counts: bytes per weight of the setting's dtype."""
    w = {"bf16": 2, "fp16": 2}.get(name.split()[0], 4)  # amp: fp32 weights
    t = 4 if name.startswith(("fp32", "amp", "fp16")) else 2  # trainable dtype: fp16 trains fp32 adapters
    return {"weights": r["params"] * w, "grads": r["trainable"] * t, "adamw": 2 * r["trainable"] * t}


def render(rows: dict) -> str:
    """The markdown table of the workers' figures (MB = 2^20 bytes)."""
    mb = lambda x: f"{x / 2**20:.0f}"
    lines = ["| setting | parameters (trainable) | weights MB | grads MB computed / measured | AdamW MB computed / "
             "measured | weights + grads + AdamW MB | RSS at step 1's start MB | step 1's peak over its start MB | "
             "process peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        c = computed(r, name)
        lines.append(f"| {name} | {r['params'] / 1e6:.1f} M ({r['trainable'] / 1e6:.2f} M) | {mb(c['weights'])} | "
                     f"{mb(c['grads'])} / {mb(r['grads'])} | {mb(c['adamw'])} / {mb(r['adamw'])} | "
                     f"{mb(c['weights'] + c['grads'] + c['adamw'])} | {mb(r['step_rss0'])} | {mb(r['step_peak'])} | "
                     f"{mb(r['process_peak'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for precision.md and precision.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", help="print the table of an earlier run's precision.json (no runs)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--world", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(Path(args.world), args.worker)))
        return 0
    if args.table:
        print(render(json.loads(Path(args.table).read_text())))
        return 0
    sys.path.insert(0, str(REPO / "bench"))
    import bench_step
    bench_step.use_config("llava")
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        bench_step.build_world(Path(d))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        for name in SETTINGS:
            r = subprocess.run([sys.executable, __file__, "--worker", name, "--world", d], capture_output=True,
                               text=True, env=env)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                raise SystemExit(f"{name}: {r.stderr[-2000:]}")
            rows[name] = json.loads(line[0][7:])
    table = render(rows)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "precision.md").write_text(table + "\n")
        (Path(args.out) / "precision.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
