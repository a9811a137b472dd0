"""One DPO optimizer step, nanoalign (train.py's step) vs TRL's DPOTrainer, side by side on the same tiny LLaVA.

    python bench/bench_step.py                 # 5 interleaved repetitions, ~4 min on a loaded 2-core machine
    python bench/bench_step.py --reps 7 --steps 3 --threads 2 --out bench/results

Setup (shared, untimed): a random LLaVA-1.5-style checkpoint made and saved by transformers (CLIP 3 layers, hidden
128, 64 px images, patch 8 -> 64 image tokens; LLaMA 4 layers, hidden 256, vocab 4096 from a WordLevel tokenizer
built here) and 8 preference pairs with images (prefs JSONL). Both providers read that same folder.

Providers, each repetition in a fresh subprocess, interleaved (nanoalign, nanoalign+ref, trl, nanoalign, ...):
  nanoalign      train.py's step with its design: reference log-probs from the RefLogpCache (filled before training,
                 as train.py does), so the step is policy forward + fused preference_loss + backward + grad clip +
                 AdamW step + scheduler step + zero_grad. No reference model in memory.
  nanoalign+ref  the same step plus a reference-model forward (no grad) inside the timed region -- what the step
                 costs without the cache, i.e. the same work TRL does (precompute_ref_log_probs is refused by TRL
                 for vision data), with a second model in memory.
  trl            DPOTrainer(model=<folder path>), sigmoid loss, beta 0.1, AdamW (optim="adamw_torch", the same
                 torch.optim.AdamW as train.py), lr 1e-5, weight decay 0, max_grad_norm 1, batch = all 8 pairs,
                 no accumulation, sequential sampler (the same row order as train.py's step 1), reference model =
                 TRL's own frozen copy. Timed from the `on_step_begin` to the `on_step_end` callback: that covers
                 input transfer + policy forward + reference forward + loss + metrics + backward + clip + AdamW
                 step + scheduler step + zero_grad; batch collation (image processing, tokenization) happens before
                 on_step_begin in transformers' loop and is excluded -- as it is for nanoalign (collate is untimed).
                 gradient_checkpointing=False, like train.py's default: the like-for-like comparison.
  trl-gc         the same with TRL's own default gradient_checkpointing=True (fewer repetitions, --gc-reps).
Before its first step, each process runs one untimed no-grad forward on the batch (nanoalign: the reference-cache
pass train.py does anyway; TRL: an explicit warm-up forward), so one-time runtime allocations are not in the step.
Each subprocess runs --steps optimizer steps over the same 8 pairs; step 1 is "cold" (first calls, AdamW state
allocation), later steps are "warm". The time ratio uses the warm step (median over repetitions of each process's
median warm step); the cold step is reported too.
Threads: --threads 1 by default. On the shared 2-core machine (other benchmarks running, load average 4-5), two
OpenMP threads per process spend most of a step waiting at barriers for a descheduled sibling: a 2-thread nanoalign
step measured 0.33 s to 6.7 s from run to run, a 1-thread step 0.76 s to 1.2 s. Use --threads 2 on an idle machine.
Memory: Linux VmHWM is reset (/proc/self/clear_refs = 5) right before each step and read right after it:
  step_mb  = peak RSS during step 1 - RSS at its start (activations, gradients, AdamW state, temporaries; later
             steps reuse what the allocator kept, so step 1 is the one that shows the step's footprint),
  peak_mb  = the process's peak RSS over its whole life (imports, models -- TRL holds a reference copy --, step).
Parity (step 1, same weights, same 8 pairs, same token ids -- checked in the parent before timing): loss to 1e-5,
mean summed chosen / rejected policy log-probs to 1e-4, gradient norm (before clipping) to 1e-4 relative.
Prompts use nanoalign's `raw` template; TRL gets the same text with "<s>" in front and " </s>" after each response
(its vision collator adds neither BOS nor EOS), so both see identical input_ids / scored positions / pixel values.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPT = "<image>\ndescribe the image in detail ."
WORDS = ["describe", "the", "image", "in", "detail", ".", "a", "cat", "dog", "red", "blue", "on", "is", "and"]
VOCAB, IMAGE_PX, PATCH = 4096, 64, 8
# --config: "tiny" is the original setting (vocabulary 4,096, 64 image tokens, ~100-token sequences, where the fused
# loss and the reference cache hardly matter); "llava" keeps LLaVA-1.6's proportions scaled to a CPU: vocabulary
# 32,064, 576 image tokens per sequence (192 px, patch 8), 40-80 response tokens, LLaMA hidden 512, 4 layers.
CONFIGS = {
    "tiny": dict(vocab=4096, image_px=64, pairs=8, resp=(24, 40), vision_hidden=128, vision_layers=3, hidden=256,
                 intermediate=688, layers=4, heads=4, max_pos=1024),
    "llava": dict(vocab=32064, image_px=192, pairs=4, resp=(40, 80), vision_hidden=128, vision_layers=2, hidden=512,
                  intermediate=1376, layers=4, heads=8, max_pos=2048),
}
CFG = dict(CONFIGS["tiny"], name="tiny")


def use_config(name: str) -> None:
    global VOCAB, IMAGE_PX
    CFG.clear()
    CFG.update(CONFIGS[name], name=name)
    VOCAB, IMAGE_PX = CFG["vocab"], CFG["image_px"]
BETA, LR, SEED = 0.1, 1e-5, 0
PROVIDERS = ["nanoalign", "nanoalign+ref", "trl", "trl-gc"]
COLORS = ["tab:blue", "tab:cyan", "tab:orange", "tab:red"]


# ------------------------------------------------------------------------------------------------ memory, timing
def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


class StepMeter:
    """Wall time and RSS growth of one step: start() resets the peak-RSS mark, stop() reads it."""

    def __init__(self):
        self.life_peak_kb, self.records = 0, []

    def start(self):
        s = _status()
        self.life_peak_kb = max(self.life_peak_kb, s["VmHWM"])
        self.rss0 = s["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        self.t0 = time.perf_counter()

    def stop(self):
        t = time.perf_counter() - self.t0
        s = _status()
        self.life_peak_kb = max(self.life_peak_kb, s["VmHWM"])
        self.records.append({"time_s": t, "step_mb": (s["VmHWM"] - self.rss0) / 1024})


# ------------------------------------------------------------------------------------------------ shared setup
def build_world(d: Path) -> None:
    """Tiny random LLaVA checkpoint (saved by transformers) + WordLevel tokenizer + 8 pairs with images."""
    import torch
    import transformers
    from PIL import Image
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ckpt = d / "ckpt"
    ckpt.mkdir(parents=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3: pad id 3 is truthy (TRL does `pad_token_id or eos`)
    words = specials + WORDS + [f"w{i}" for i in range(VOCAB - 1 - len(specials) - len(WORDS))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + ["<image>"]])
    tk.save(str(ckpt / "tokenizer.json"))
    image_id = tk.token_to_id("<image>")
    assert image_id == VOCAB - 1 and tk.get_vocab_size() == VOCAB

    vision = dict(model_type="clip_vision_model", hidden_size=CFG["vision_hidden"], intermediate_size=512,
                  num_hidden_layers=CFG["vision_layers"], num_attention_heads=4, image_size=IMAGE_PX, patch_size=PATCH)
    text = dict(model_type="llama", hidden_size=CFG["hidden"], intermediate_size=CFG["intermediate"],
                num_hidden_layers=CFG["layers"], num_attention_heads=CFG["heads"], num_key_value_heads=CFG["heads"],
                vocab_size=VOCAB, max_position_embeddings=CFG["max_pos"],
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(SEED)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, pad_token_id=3)
    model = transformers.LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # larger than the 0.02-std init, so the next-token distributions are not near uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    model.eval().save_pretrained(str(ckpt))
    ip = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
                                do_pad=True)
    hft = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), bos_token="<s>",
                                               eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    proc = transformers.LlavaProcessor(image_processor=ip, tokenizer=hft, patch_size=PATCH,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)
    proc.save_pretrained(str(ckpt))

    (d / "img").mkdir()
    rng = random.Random(SEED)
    vocab_words = [f"w{i}" for i in range(2000)] + WORDS[6:]
    with open(d / "prefs.jsonl", "w") as f:
        for i in range(CFG["pairs"]):
            h, w = 48 + 8 * i, 96 - 4 * i
            arr = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / "img" / f"{i}.png")
            chosen = [rng.choice(vocab_words) for _ in range(rng.randint(*CFG["resp"]))]
            rejected = list(chosen)
            a = rng.randint(2, len(chosen) - 8)
            rejected[a:a + rng.randint(2, 5)] = [rng.choice(vocab_words) for _ in range(rng.randint(2, 6))]
            f.write(json.dumps({"id": str(i), "image": f"{i}.png", "prompt": PROMPT, "chosen": " ".join(chosen),
                                "rejected": " ".join(rejected)}) + "\n")


def step1_order(n: int) -> list[int]:
    """train.py's batch_indices(step=0, micro=0) with batch_size = n, one rank: the seeded epoch-0 permutation."""
    import torch
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).tolist()


def trl_rows(d: Path, order: list[int]) -> list[dict]:
    """The same pairs as TRL input: BOS spelled out in the prompt, EOS after each response (TRL's vision collator
    tokenizes with add_special_tokens=False and adds no EOS), in train.py's step-1 order."""
    from PIL import Image
    rows = [json.loads(line) for line in open(d / "prefs.jsonl")]
    out = []
    for i in order:
        r = rows[i]
        with Image.open(d / "img" / r["image"]) as im:
            img = im.convert("RGB")
        out.append({"image": img, "prompt": "<s>" + r["prompt"], "chosen": r["chosen"] + " </s>",
                    "rejected": r["rejected"] + " </s>"})
    return out


def nanoalign_batch(d: Path, order: list[int]):
    from nanoalign.batch import collate, encode_all, open_image
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.data import load_examples
    _, processor = load_pretrained(d / "ckpt")
    exs, _ = load_examples(str(d / "prefs.jsonl"), "prefs", str(d / "img"))
    enc, _ = encode_all(exs, processor, str(d / "img"), "raw", 4096)
    items = [enc[i] for i in order]
    return collate(items, ["chosen", "rejected"], processor, [open_image(exs[it.index], str(d / "img")) for it in items])


def check_inputs(d: Path) -> dict:
    """Our collated step-1 batch vs TRL's DataCollatorForVisionPreference on the same rows: identical token ids,
    identical scored positions, pixel values. Prints both token sequences of the first differing row."""
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    order = step1_order(CFG["pairs"])
    ours = nanoalign_batch(d, order)
    theirs = DataCollatorForVisionPreference(AutoProcessor.from_pretrained(str(d / "ckpt")))(trl_rows(d, order))
    same_ids = same_scored = True
    for r in range(ours["input_ids"].shape[0]):
        a = ours["input_ids"][r][ours["attention_mask"][r].bool()].tolist()
        b = theirs["input_ids"][r][theirs["attention_mask"][r].bool()].tolist()
        sa = (ours["labels"][r] != -100).nonzero().flatten().add(1).tolist()  # position t scores token t+1
        sb = theirs["completion_mask"][r].nonzero().flatten().tolist()
        if a != b and same_ids:
            print(f"row {r}: token ids differ\n  nanoalign {a}\n  trl       {b}")
        same_ids &= a == b
        same_scored &= sa == sb
    # TRL repeats the images for the rejected rows; ours holds each image once plus a row -> image index
    pix = float((ours["pixel_values"][ours["image_index"]] - theirs["pixel_values"]).abs().max())
    return {"same_input_ids": same_ids, "same_scored_positions": same_scored, "pixel_max_abs_diff": pix,
            "seq_len": int(ours["attention_mask"].sum(1).max()), "scored_tokens": int((ours["labels"] != -100).sum())}


# ------------------------------------------------------------------------------------------------ providers
def run_nanoalign(d: Path, steps: int, with_ref: bool) -> dict:
    """train.py's DPO step (one rank, batch = 8 pairs, grad_accum 1), built from train.py's own pieces."""
    import torch
    sys.path.insert(0, str(REPO))
    from nanoalign import ops
    from nanoalign import trainutil as tu
    from nanoalign.batch import collate, encode_all, image_bytes, open_image, scatter_response_values
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.data import load_examples
    from nanoalign.forward import forward, response_logps
    from nanoalign.ops import preference_loss
    from nanoalign.refcache import RefLogpCache, checkpoint_fingerprint, example_key
    torch.manual_seed(SEED)
    device, template, root = torch.device("cpu"), "raw", str(d / "img")
    model, processor = load_pretrained(d / "ckpt", dtype=torch.float32)
    examples, _ = load_examples(str(d / "prefs.jsonl"), "prefs", root)
    encoded, _ = encode_all(examples, processor, root, template, 4096, None, log=lambda *a: None)
    P = len(encoded)

    def make_batch(idx):
        items = [encoded[i] for i in idx]
        return items, collate(items, ["chosen", "rejected"], processor, [open_image(examples[it.index], root)
                                                                         for it in items])

    # reference log-probs: scored once before training into the cache, as train.py does
    cache = RefLogpCache(Path(tempfile.mkdtemp()) / "refcache", checkpoint_fingerprint(d / "ckpt"))
    settings = {"image_processor": processor.image_processor.to_dict(), "template": template}
    keys = {it.index: example_key(it.prompt_ids + it.chosen_ids, it.prompt_ids + it.rejected_ids,
                                  image_bytes(examples[it.index], root), settings) for it in encoded}
    model.eval()
    items, b = make_batch(list(range(P)))
    logp = response_logps(model, b, device)
    for k, it in enumerate(items):
        cache.put(keys[it.index], logp[k], logp[P + k])
    ref_model = None
    if with_ref:
        ref_model, _ = load_pretrained(d / "ckpt", dtype=torch.float32)
        ref_model.requires_grad_(False).eval()

    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.startswith("multi_modal_projector.")], "lr": LR},
              {"params": [p for n, p in trainable if n.startswith("multi_modal_projector.")], "lr": LR}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: tu.cosine_with_warmup(s, steps, 0, 0.0))
    meter, first = StepMeter(), {}
    for step in range(steps):
        idx = torch.randperm(P, generator=torch.Generator().manual_seed(SEED + step)).tolist()  # batch_indices
        items, b = make_batch(idx)  # untimed: collation / image processing (as TRL's, before on_step_begin)
        meter.start()
        if ref_model is not None:  # no cache: score the batch with the frozen reference model
            lp = response_logps(ref_model, b, device)
            ref = scatter_response_values(b["labels"], lp)
        else:
            ref = scatter_response_values(b["labels"], [cache.get(keys[it.index])[0] for it in items] +
                                          [cache.get(keys[it.index])[1] for it in items])
        h = forward(model, b, device)  # (2P,T,H); each image through the vision tower once
        labels, w = b["labels"], b["token_weights"]
        loss, m = preference_loss(h, model.lm_head_weight, labels, w, ref, loss_type="dpo",
                                  beta=BETA, sft_weight=0.0, average=False)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: non-finite loss at step {step + 1}")
        loss.backward()
        rec = {"loss": float(loss.detach()), **{k: float(v.float().mean()) for k, v in m.items()}}
        grad_norm = tu.clip_grad_norm(model, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        meter.stop()
        if step == 0:
            first = {"loss": rec["loss"], "logps_chosen": rec["logp_chosen"], "logps_rejected": rec["logp_rejected"],
                     "grad_norm": grad_norm}
    be = ops._backend(device)
    backend = "torch chunked" if be is ops._TORCH else getattr(be, "__name__", str(be))
    return {"records": meter.records, "life_peak_mb": meter.life_peak_kb / 1024, "first": first,
            "backend": backend}


def run_trl(d: Path, steps: int, grad_checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset, Features, Image, Value
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    meter = StepMeter()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            meter.start()

        def on_step_end(self, args, state, control, **kw):
            meter.stop()

    feats = Features({"image": Image(), "prompt": Value("string"), "chosen": Value("string"),
                      "rejected": Value("string")})
    ds = Dataset.from_list(trl_rows(d, step1_order(CFG["pairs"])), features=feats)
    out = tempfile.mkdtemp()
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=CFG["pairs"], gradient_accumulation_steps=1, max_steps=steps,
                    learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
                    lr_scheduler_type="cosine", warmup_steps=0, beta=BETA, loss_type=["sigmoid"],
                    precompute_ref_log_probs=False, max_length=None, train_sampling_strategy="sequential",
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
                    dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
                    gradient_checkpointing=grad_checkpointing)
    trainer = DPOTrainer(model=str(d / "ckpt"), args=cfg, train_dataset=ds, callbacks=[Timer()])
    # untimed warm-up forward (no grad) on the batch, the counterpart of nanoalign's reference-cache pass, so that
    # one-time runtime allocations (thread pools, kernels) are not charged to either provider's step
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        trainer.model(**{k: v for k, v in batch.items() if k != "completion_mask"}, use_cache=False)
    del batch
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    first = {"loss": logs[0]["loss"], "logps_chosen": logs[0]["logps/chosen"],
             "logps_rejected": logs[0]["logps/rejected"], "grad_norm": float(logs[0]["grad_norm"])}
    return {"records": meter.records, "life_peak_mb": meter.life_peak_kb / 1024, "first": first,
            "backend": "trl " + __import__("trl").__version__, "torch_threads": torch.get_num_threads()}


def worker(args) -> None:
    import torch
    use_config(args.config)
    torch.set_num_threads(args.threads)
    d = Path(args.world)
    if args.worker.startswith("trl"):
        res = run_trl(d, args.steps, grad_checkpointing=args.worker == "trl-gc")
    else:
        res = run_nanoalign(d, args.steps, with_ref=args.worker == "nanoalign+ref")
    print("RESULT " + json.dumps(res))


# ------------------------------------------------------------------------------------------------ driver
def pct(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=float), q))


def spawn(provider: str, world: Path, steps: int, threads: int) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, __file__, "--worker", provider, "--world", str(world), "--steps", str(steps),
                        "--config", CFG["name"]],
                       capture_output=True, text=True, cwd=str(REPO), env=env, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        raise SystemExit(f"error: provider {provider} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="fresh-process repetitions per provider (>= 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / OpenMP threads per provider process (default 1: see 'Threads' above)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per process (step 1 cold, rest warm)")
    p.add_argument("--gc-reps", type=int, default=2,
                   help="repetitions of TRL with its default gradient checkpointing (trl-gc; slow, so fewer)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for step.csv and step.png")
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny",
                   help="tiny (vocabulary 4,096, ~100 tokens) or llava (LLaVA-1.6 proportions scaled to CPU: vocabulary "
                        "32,064, 576 image tokens, 40-80 response tokens, hidden 512, 4 layers, 4 pairs); "
                        "llava writes step_llava.{csv,md,png}")
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--world", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    use_config(args.config)
    if args.worker:
        worker(args)
        return 0
    if args.reps < 1 or args.steps < 2:
        p.error("--reps must be >= 1 and --steps >= 2 (step 1 is cold, the rest are timed warm)")
    t_start = time.time()
    import torch
    import transformers
    try:
        import trl
    except ImportError:
        print("error: bench/bench_step.py needs TRL as the peer: pip install 'trl>=1.16' (see its docstring)",
              file=sys.stderr)
        return 2
    world = Path(tempfile.mkdtemp(prefix="bench_step_"))
    build_world(world)
    inputs = check_inputs(world)
    print(f"inputs: {inputs}", flush=True)
    spawn("nanoalign", world, 2, args.threads)  # untimed warm-up: builds / loads the cached native log-prob op, disk caches

    runs = {k: [] for k in PROVIDERS}
    for rep in range(args.reps):
        for prov in PROVIDERS:  # interleaved
            if prov != "trl-gc" or rep < args.gc_reps:
                runs[prov].append(spawn(prov, world, args.steps, args.threads))
        print(f"rep {rep + 1}/{args.reps} ({time.time() - t_start:.0f} s): " + ", ".join(
            f"{k} {statistics.median(r['time_s'] for r in runs[k][-1]['records'][1:]) * 1e3:.0f} ms"
            for k in PROVIDERS if len(runs[k]) == rep + 1), flush=True)
    runs = {k: v for k, v in runs.items() if v}

    rows = []
    for prov in runs:
        warm = [statistics.median(r["time_s"] for r in run["records"][1:]) * 1e3 for run in runs[prov]]
        cold = [run["records"][0]["time_s"] * 1e3 for run in runs[prov]]
        step_mb = [run["records"][0]["step_mb"] for run in runs[prov]]  # step 1
        peak = [run["life_peak_mb"] for run in runs[prov]]
        f = runs[prov][0]["first"]
        rows.append({"provider": prov, "reps": len(runs[prov]), "warm_ms_p20": pct(warm, 20), "warm_ms_p50": pct(warm, 50),
                     "warm_ms_p80": pct(warm, 80), "cold_ms_p50": pct(cold, 50), "step_mb_p50": pct(step_mb, 50),
                     "peak_rss_mb_p50": pct(peak, 50), "loss": f["loss"], "logps_chosen": f["logps_chosen"],
                     "logps_rejected": f["logps_rejected"], "grad_norm": f["grad_norm"],
                     "backend": runs[prov][0]["backend"]})
    by = {r["provider"]: r for r in rows}
    ours, ref_in, theirs = by["nanoalign"], by["nanoalign+ref"], by["trl"]
    parity = {
        "loss_abs_diff": abs(ours["loss"] - theirs["loss"]),
        "logps_chosen_abs_diff": abs(ours["logps_chosen"] - theirs["logps_chosen"]),
        "logps_rejected_abs_diff": abs(ours["logps_rejected"] - theirs["logps_rejected"]),
        "grad_norm_rel_diff": abs(ours["grad_norm"] - theirs["grad_norm"]) / max(theirs["grad_norm"], 1e-12),
    }
    ok = {"loss": parity["loss_abs_diff"] <= 1e-5,
          "logps": max(parity["logps_chosen_abs_diff"], parity["logps_rejected_abs_diff"]) <= 1e-4,
          "grad_norm": parity["grad_norm_rel_diff"] <= 1e-4, "inputs": inputs["same_input_ids"] and
          inputs["same_scored_positions"]}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": CFG["name"], "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "threads": args.threads, "cpu": _cpu_name(),
            "git_sha": _git_sha(), "loadavg_1min_end": round(os.getloadavg()[0], 2), "reps_requested": args.reps, "steps_per_process": args.steps, **inputs}
    stem = "step" if CFG["name"] == "tiny" else f"step_{CFG['name']}"
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) + list(meta))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: round(v, 3) if isinstance(v, float) and ("_ms_" in k or "_mb" in k) else v
                           for k, v in r.items()}, **meta})
    _plot(rows, out / f"{stem}.png")
    with contextlib.redirect_stdout(io.StringIO()) as buf:  # the table goes to the terminal and to .md

        def ratio(a, b):
            return a / b if b else float("nan")
        print(f"\nDPO step, config {CFG['name']}, {CFG['pairs']} pairs, vocabulary {VOCAB}, CPU {meta['cpu']}, load "
              f"{meta['loadavg_1min_end']} at the end ({inputs['scored_tokens']} scored tokens, sequences up to {inputs['seq_len']}), "
              f"{meta['threads']} threads, torch {meta['torch']}, transformers {meta['transformers']}, trl {meta['trl']}, "
              f"{args.reps} fresh processes per provider, interleaved\n")
        print("| provider | warm step ms p20 / p50 / p80 | cold step ms p50 | step RSS growth MB | process peak RSS MB "
              "| time vs TRL | step mem vs TRL | peak vs TRL |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['provider']} (n={r['reps']}) | {r['warm_ms_p20']:.0f} / {r['warm_ms_p50']:.0f} / {r['warm_ms_p80']:.0f} | "
                  f"{r['cold_ms_p50']:.0f} | {r['step_mb_p50']:.1f} | {r['peak_rss_mb_p50']:.0f} | "
                  f"{ratio(r['warm_ms_p50'], theirs['warm_ms_p50']):.2f} | "
                  f"{ratio(r['step_mb_p50'], theirs['step_mb_p50']):.2f} | "
                  f"{ratio(r['peak_rss_mb_p50'], theirs['peak_rss_mb_p50']):.2f} |")
        print(f"\nparity (step 1): nanoalign loss {ours['loss']:.8f} vs TRL {theirs['loss']:.8f}; "
              f"logps chosen {ours['logps_chosen']:.6f} vs {theirs['logps_chosen']:.6f}, rejected "
              f"{ours['logps_rejected']:.6f} vs {theirs['logps_rejected']:.6f}; grad norm {ours['grad_norm']:.6f} vs "
              f"{theirs['grad_norm']:.6f}; nanoalign+ref loss {ref_in['loss']:.8f}")
        print(f"parity checks: {ok}  ({parity})")
        t_ratio, m_ratio = ratio(ours["warm_ms_p50"], theirs["warm_ms_p50"]), ratio(ours["step_mb_p50"],
                                                                                      theirs["step_mb_p50"])
        p_ratio = ratio(ours["peak_rss_mb_p50"], theirs["peak_rss_mb_p50"])
        print(f"targets: step time <= 1/2 of TRL: {'MET' if t_ratio <= 0.5 else 'MISSED'} ({t_ratio:.2f}); "
              f"step memory <= 1/2: {'MET' if m_ratio <= 0.5 else 'MISSED'} ({m_ratio:.2f}); "
              f"process peak <= 1/2: {'MET' if p_ratio <= 0.5 else 'MISSED'} ({p_ratio:.2f}); "
              f"with the reference forward in the step: time {ratio(ref_in['warm_ms_p50'], theirs['warm_ms_p50']):.2f}, "
              f"step memory {ratio(ref_in['step_mb_p50'], theirs['step_mb_p50']):.2f}")
        if "trl-gc" in by:
            gc = by["trl-gc"]
            print(f"vs TRL defaults (gradient checkpointing on): time {ratio(ours['warm_ms_p50'], gc['warm_ms_p50']):.2f}, "
                  f"step memory {ratio(ours['step_mb_p50'], gc['step_mb_p50']):.2f}, "
                  f"process peak {ratio(ours['peak_rss_mb_p50'], gc['peak_rss_mb_p50']):.2f}")
    print(f"wrote {out / stem}.csv / .md / .png in {time.time() - t_start:.0f} s")
    text = f"# `python bench/bench_step.py {' '.join(sys.argv[1:])}`\n" + buf.getvalue()
    (out / f"{stem}.md").write_text(text)
    sys.stdout.write(text)
    return 0 if all(ok.values()) else 1


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(REPO), capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["provider"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    p50 = [r["warm_ms_p50"] for r in rows]
    err = [[r["warm_ms_p50"] - r["warm_ms_p20"] for r in rows], [r["warm_ms_p80"] - r["warm_ms_p50"] for r in rows]]
    ax[0].bar(names, p50, yerr=err, capsize=4, color=COLORS[:len(rows)])
    ax[0].set_ylabel("warm step time, ms (p50, p20-p80)")
    ax[1].bar(names, [r["step_mb_p50"] for r in rows], color=COLORS[:len(rows)])
    ax[1].set_ylabel("RSS growth during step 1, MB")
    for a in ax:
        a.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"one DPO step, {CFG['pairs']} pairs, config {CFG['name']} (vocabulary {VOCAB}), {_cpu_name()}: "
                 "nanoalign vs TRL DPOTrainer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
