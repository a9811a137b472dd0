"""Training-time rollouts: nanoalign.engine.sample (what online-dpo calls each step) vs transformers' generate.

    python bench/bench_rollout.py [--reps 5] [--new-tokens 32] [--batches 1,16,16p] [--stages]

Model: bench_bdhs.py's random tiny LLaVA-1.6 (llava_next) checkpoint saved by transformers (CLIP 64px / patch 4, 2x2
AnyRes grid + base = 1312 image tokens per sample, LLaMA 4 layers, hidden 256, vocab 32064), fp32 on CPU, loaded by
nanoalign (load_pretrained) and by transformers from the same folder. Prompt = 24 text tokens + the image, B rows;
a batch written "16p" is left padded: row b has b % 8 of its trailing text tokens removed and as many pad tokens
(attention_mask 0) in front, as a batch of prompts of different lengths has.
Providers, each making exactly --new-tokens tokens per row (no EOS), greedy so the tokens can be compared:
  ours      nanoalign.engine.sample(policy, batch, temperature=0): eval mode, no grad, one KV cache, batched
  hf        LlavaNextForConditionalGeneration.generate(do_sample=False, min_new_tokens = max_new_tokens)
  ours_t1   nanoalign.engine.sample at temperature 1, top-p 0.9 (the sampling path of online-dpo; same token count)
Measured: generated tokens/s end to end (vision tower + prefill + decode), interleaved repetitions, median (p20 / p80
in the CSV). The greedy tokens of ours and hf are compared (the line says how many rows match exactly).
Writes bench/results/rollout.csv and rollout.md.
--stages: instead, per-stage wall seconds of one rollout (median of --reps interleaved runs) for ours and hf: vision
tower, projector, AnyRes packing, prefill (the decoder over the prompt), decode steps, LM head, sampling; measured by
wrapping those functions (the times nest: a prefill's layers include its attention). Prints a markdown table.
Not measured here: a whole online-dpo step against TRL's OnlineDPOTrainer (TRL is not installed in this project's
environment; see the README text of the online algorithms).
"""
import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_bdhs import make_checkpoint, make_inputs  # noqa: E402
from nanoalign.checkpoint import load_pretrained  # noqa: E402
from nanoalign.engine import sample  # noqa: E402


@torch.no_grad()
def run(name, model, hf, inp, n_new):
    ids, am, pv, sizes = inp
    if name in ("ours", "ours_t1"):
        batch = {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_sizes": sizes}
        t1 = name == "ours_t1"
        return sample(model, batch, 1, temperature=1.0 if t1 else 0.0, top_p=0.9 if t1 else 1.0,
                      max_new_tokens=n_new, generator=torch.Generator().manual_seed(0)).ids
    out = hf.generate(input_ids=ids, attention_mask=am, pixel_values=pv, image_sizes=sizes, max_new_tokens=n_new,
                      min_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def left_pad(ids, am):
    """Row b loses b % 8 of its trailing text tokens and gets as many pad tokens (0, mask 0) in front."""
    ids, am = ids.clone(), am.clone()
    for b in range(ids.shape[0]):
        p = b % 8
        if p:
            ids[b] = torch.cat([ids.new_zeros(p), ids[b, :-p]])
            am[b, :p] = 0
    return ids, am


def stages(model, hf, inp, n_new, reps):
    """Per-stage seconds of ours and hf (see the module docstring), medians over interleaved repetitions."""
    import collections
    import nanoalign.engine as E
    acc = collections.defaultdict(float)

    def wrap(obj, name, key):
        f = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            acc[key(*a, **k) if callable(key) else key] += time.perf_counter() - t
            return r
        setattr(obj, name, timed)
    wrap(model.vision_tower, "forward", "vision tower")
    wrap(model.multi_modal_projector, "forward", "projector")
    wrap(E, "forward_cached", lambda m, c, x, *a, **k: "prefill" if x.shape[1] > 1 else "decode steps")
    wrap(model, "logits", "LM head")
    wrap(E, "sample_next", "sampling")
    wrap(hf.model.vision_tower, "forward", "vision tower")
    wrap(hf.model.multi_modal_projector, "forward", "projector")
    wrap(hf.model, "pack_image_features", "AnyRes packing")
    wrap(hf.model.language_model, "forward",
         lambda *a, **k: "prefill" if k["inputs_embeds"].shape[1] > 1 else "decode steps")
    wrap(hf.lm_head, "forward", "LM head")
    res = {"ours": [], "hf": []}
    for rep in range(reps + 1):  # the first is a warm-up
        for n in res:
            acc.clear()
            t = time.perf_counter()
            run(n, model, hf, inp, n_new)
            acc["total"] = time.perf_counter() - t
            if rep:
                res[n].append(dict(acc))
    keys = ["total", "vision tower", "projector", "AnyRes packing", "prefill", "decode steps", "LM head", "sampling"]
    out = {n: {k: statistics.median(d.get(k, 0.0) for d in res[n]) for k in keys} for n in res}
    return keys, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,16,16p")
    p.add_argument("--stages", action="store_true", help="per-stage seconds instead of the tokens/s table")
    a = p.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as d:
        hf = make_checkpoint(d)
        model, _ = load_pretrained(d)
    rows = []
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for spec in a.batches.split(","):
        B, padded = int(spec.rstrip("p")), spec.endswith("p")
        ids, am, pv, sizes, _, _ = make_inputs(model, B, 0.0)
        if padded:
            ids, am = left_pad(ids, am)
        inp = (ids, am, pv, sizes)
        if a.stages:
            keys, out = stages(model, hf, inp, a.new_tokens, a.reps)
            print(f"\nbatch {spec}, {a.new_tokens} new tokens, median of {a.reps}, load average "
                  f"{os.getloadavg()[0]:.1f}\n\n| stage | ours s | hf s |\n|---|---|---|")
            for k in keys:
                print(f"| {k} | {out['ours'][k]:.3f} | {out['hf'][k]:.3f} |")
            continue
        toks = {n: run(n, model, hf, inp, a.new_tokens) for n in ("ours", "hf")}  # warm-up + parity
        same = sum(x == y for x, y in zip(toks["ours"], toks["hf"]))
        times = {n: [] for n in ("ours", "hf", "ours_t1")}
        for _ in range(a.reps):
            for n in times:
                t = time.perf_counter()
                out = run(n, model, hf, inp, a.new_tokens)
                times[n].append(time.perf_counter() - t)
                assert all(len(r) == a.new_tokens for r in out)
        for n, ts in times.items():
            q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
            med = statistics.median(ts)
            rows.append({"batch": spec, "provider": n, "new_tokens": a.new_tokens, "tokens_per_s": B * a.new_tokens / med, "median_s": med,
                         "p20_s": q[0], "p80_s": q[3], "greedy_rows_equal_hf": f"{same}/{B}"})
            rows[-1]["hf_over_x_per_rep_median"] = statistics.median(h / x for h, x in zip(times["hf"], ts))
            print(f"B={spec:>4s} {n:8s} {B * a.new_tokens / med:9.1f} tok/s  median {med:.3f}s  "
                  f"(greedy rows equal to transformers: {same}/{B})", flush=True)
    if a.stages:
        return
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "rollout.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    md = [f"Rollout tokens/s, {a.new_tokens} new tokens per row, median of {a.reps} interleaved repetitions; CPU "
          f"{cpu}, {torch.get_num_threads()} threads, load average {load0:.1f} at the start, {load:.1f} at the end "
          "(2 cores shared with other agents). Command: "
          f"`python bench/bench_rollout.py --reps {a.reps} --new-tokens {a.new_tokens} --batches {a.batches}`. "
          "vs hf = median over repetitions of (hf's seconds / this provider's seconds) in the same repetition; "
          "16p = 16 rows left padded (0-7 pad tokens).", "",
          "| batch | provider | tokens/s | median s | vs hf |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['batch']} | {r['provider']} | {r['tokens_per_s']:.1f} | {r['median_s']:.3f} | "
                  f"{r['hf_over_x_per_rep_median']:.2f}x |")
    md.append("")
    md.append("Greedy tokens equal to transformers': " + ", ".join(
        f"batch {r['batch']}: {r['greedy_rows_equal_hf']} rows" for r in rows if r["provider"] == "ours"))
    with open(os.path.join(HERE, "results", "rollout.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
