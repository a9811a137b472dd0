"""BDHS masked-image sampling: our compacted path vs our dense-mask path vs transformers, side by side on CPU.

    python bench/bench_bdhs.py [--reps 5] [--new-tokens 32] [--batches 1,16] [--quick]

Model: a random tiny LLaVA-1.6 (llava_next) checkpoint made with transformers' save_pretrained: CLIP 64px / patch 4
(256 tokens a tile), 2x2 AnyRes grid + base = 1312 image tokens per sample, LLaMA text 4 layers, hidden 256, 8 heads /
4 kv heads, vocab 32064 (LLaVA-1.6's). Prompt = 24 text tokens + the image. rho_th = 0.99 (~13 image tokens survive).
Providers (same weights, same mask, greedy, fp32, no EOS so every row makes exactly --new-tokens tokens):
  compact   nanoalign.engine.generate(compact=True): masked image tokens dropped, survivors keep their RoPE positions
  dense     nanoalign.engine.generate (dense layout): full sequence, masked image keys written but not attendable
  hf        transformers LlavaNextForConditionalGeneration.generate with a 2D attention_mask that is 0 at the masked
            image tokens (generate refuses 4D masks: "attention_mask passed to generate must be 2D"). A 2D key mask
            removes those keys for every query, i.e. the same masking; the tokens are compared with ours below.
Measured: end-to-end generated tokens/s (vision tower + prefill + decode), and one decode step (B rows, one token
each, after the prefill) for batch 1 and 16. Interleaved repetitions, median (p20/p80 in the CSV).
Writes bench/results/bench_bdhs.csv and bench_bdhs.png, prints a markdown table.
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

from nanoalign.checkpoint import load_pretrained  # noqa: E402
from nanoalign.engine import decode, decode_step, extend, generate, prefill, sample_image_mask  # noqa: E402

IMG = 32000
PIN = [[64, 128], [128, 64], [128, 128]]


def make_checkpoint(d):
    import transformers as T
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=64, patch_size=4)
    text = dict(model_type="llama", vocab_size=32064, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    hf = T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=IMG, image_grid_pinpoints=PIN, image_seq_length=256))
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(2.0) if p.dim() > 1 else None
    hf.eval().save_pretrained(d)
    return hf


def make_inputs(model, B, rho, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img = model.num_image_features((128, 128))
    rows = [[1] + torch.randint(3, 31000, (8,), generator=g).tolist() + [IMG] * n_img
            + torch.randint(3, 31000, (15,), generator=g).tolist() for _ in range(B)]
    ids = torch.tensor(rows)
    am = torch.ones_like(ids)
    pv = torch.randn(B, 5, 3, 64, 64, generator=g)
    sizes = torch.tensor([[128, 128]] * B)
    keeps = [sample_image_mask(n_img, rho, g) for _ in range(B)]
    return ids, am, pv, sizes, keeps, n_img


def hf_mask(ids, am, keeps):
    m = am.clone()
    for b, k in enumerate(keeps):
        m[b, ids[b] == IMG] = k.long()
    return m


@torch.no_grad()
def run_provider(name, model, hf, inp, n_new):
    ids, am, pv, sizes, keeps, _ = inp
    if name in ("compact", "dense"):
        batch = {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_sizes": sizes}
        return generate(model, batch, n_new, image_keep=keeps, compact=name == "compact").ids
    out = hf.generate(input_ids=ids, attention_mask=hf_mask(ids, am, keeps), pixel_values=pv, image_sizes=sizes,
                      position_ids=(am.cumsum(1) - 1).clamp(min=0), max_new_tokens=n_new, min_new_tokens=n_new,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


CTX = [0, 8, 16, 24]  # reference-context tokens of the 4 sentence branches of an example


@torch.no_grad()
def run_branches(name, model, hf, inp, n_new):
    """The BDHS workload: every example has len(CTX) sentence branches (prompt + image + reference context),
    n_new tokens each. compact: one prefill per example, fork, ragged extend, decode. dense / hf: every branch is
    its own full-length row (left padded)."""
    ids, am, pv, sizes, keeps, _ = inp
    B = ids.shape[0]
    g = torch.Generator().manual_seed(1)
    ctx = [torch.randint(3, 31000, (n,), generator=g).tolist() for n in CTX]
    rows = [b for b in range(B) for _ in CTX]
    if name == "compact":
        cache, _, last, _ = prefill(model, ids, am, pv, sizes, image_keep=keeps, compact=True)
        bc = cache.fork(torch.tensor(rows), capacity=int(cache.lens.max()) + max(CTX) + n_new)
        hb = extend(model, bc, [ctx[i % len(CTX)] for i in range(len(rows))], last[rows])
        return decode(model, bc, hb, n_new, drop_finished=True)[0]
    full = [ids[b].tolist() + ctx[i % len(CTX)] for i, b in enumerate(rows)]
    T = max(map(len, full))
    ids2 = torch.tensor([[0] * (T - len(f)) + f for f in full])
    am2 = torch.tensor([[0] * (T - len(f)) + [1] * len(f) for f in full])
    pv2, sizes2, keeps2 = pv[rows], sizes[rows], [keeps[b] for b in rows]
    return run_provider(name, model, hf, (ids2, am2, pv2, sizes2, keeps2, None), n_new)


@torch.no_grad()
def decode_step_fns(model, hf, inp):
    """One-token decode step per provider, after a prefill done here (not timed). Each call appends one token."""
    ids, am, pv, sizes, keeps, _ = inp
    B = ids.shape[0]
    tok = torch.full((B,), 7)
    fns = {}
    # one decode step each: the compacted (ragged) cache and the dense one (masked image keys kept, not attendable)
    for name, compact in (("compact", True), ("dense", False)):
        cache = prefill(model, ids, am, pv, sizes, extra=4096, image_keep=keeps, compact=compact).cache

        def step(cache=cache):
            model.logits(decode_step(model, cache, tok))
        fns[name] = step

    m2 = hf_mask(ids, am, keeps)
    out = hf(input_ids=ids, attention_mask=m2, pixel_values=pv, image_sizes=sizes, use_cache=True, logits_to_keep=1)
    hs = {"pkv": out.past_key_values, "mask": m2, "pos": ids.shape[1]}

    def hf_step():
        hs["mask"] = torch.cat([hs["mask"], hs["mask"].new_ones(B, 1)], 1)
        o = hf(input_ids=tok[:, None], attention_mask=hs["mask"], past_key_values=hs["pkv"], use_cache=True,
               cache_position=torch.tensor([hs["pos"]]), logits_to_keep=1)
        hs["pkv"], hs["pos"] = o.past_key_values, hs["pos"] + 1
    fns["hf"] = hf_step
    return fns


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens of the prompt workload")
    ap.add_argument("--branch-tokens", type=int, default=16, help="new tokens per sentence branch")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rho", type=float, default=0.99)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per repetition")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as d:
        hf = make_checkpoint(d)
        model, _ = load_pretrained(d)
    providers = ["compact", "dense", "hf"]
    workloads = {"prompt": (run_provider, args.new_tokens, 1), "branches": (run_branches, args.branch_tokens, len(CTX))}
    rows = []
    for B in batches:
        inp = make_inputs(model, B, args.rho)
        n_img, kept = inp[5], [int(k.sum()) for k in inp[4]]
        same, gen = {}, {}
        for w, (fn, n_new, mult) in workloads.items():  # warm-up + correctness (greedy tokens vs dense)
            outs = {p: fn(p, model, hf, inp, n_new) for p in providers}
            for p in providers:
                same[w, p], gen[w, p] = outs[p] == outs["dense"], []
        step = {p: [] for p in providers}
        for _ in range(args.reps):  # interleaved
            for w, (fn, n_new, mult) in workloads.items():
                for p in providers:
                    t = time.perf_counter()
                    fn(p, model, hf, inp, n_new)
                    gen[w, p].append(time.perf_counter() - t)
            fns = decode_step_fns(model, hf, inp)
            for p in providers:
                with torch.no_grad():
                    fns[p]()  # warm
                t = time.perf_counter()
                with torch.no_grad():  # the closures run here, outside decode_step_fns' no_grad
                    for _ in range(args.steps):
                        fns[p]()
                step[p].append((time.perf_counter() - t) / args.steps)
        for w, (fn, n_new, mult) in workloads.items():
            for p in providers:
                tok_s = [B * mult * n_new / t for t in gen[w, p]]
                rows.append(dict(workload=w, provider=p, batch=B, sequences=B * mult, image_tokens=n_img,
                                 kept_mean=sum(kept) / B, new_tokens=n_new, tok_s_p50=statistics.median(tok_s),
                                 tok_s_p20=pct(tok_s, 0.2), tok_s_p80=pct(tok_s, 0.8),
                                 gen_s_p50=statistics.median(gen[w, p]), step_ms_p50=1e3 * statistics.median(step[p]),
                                 step_ms_p20=1e3 * pct(step[p], 0.2), step_ms_p80=1e3 * pct(step[p], 0.8),
                                 same_tokens_as_dense=same[w, p], torch=torch.__version__, threads=args.threads,
                                 machine=platform.machine()))
        print(f"B={B}: done", file=sys.stderr)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    csv_path = os.path.join(HERE, "results", "bench_bdhs.csv")
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"\nBDHS masked sampling, LLaVA-1.6 layout, {rows[0]['image_tokens']} image tokens/sample (mean kept "
          f"{rows[0]['kept_mean']:.1f}), rho_th {args.rho}, median of {args.reps} interleaved reps, {args.threads} "
          f"thread(s). prompt: {args.new_tokens} new tokens per prompt; branches: {len(CTX)} sentence branches per "
          f"example, {args.branch_tokens} new tokens each. tok/s = generated tokens / wall time (vision + prefill + "
          f"decode). Decode step = one token for every row of the batch after the prompt prefill.\n")
    print("| batch | workload | provider | gen tok/s | vs hf | vs dense | same tokens as dense |")
    print("|---|---|---|---|---|---|---|")
    for B in batches:
        for w in workloads:
            r = {x["provider"]: x for x in rows if x["batch"] == B and x["workload"] == w}
            for p in providers:
                x = r[p]
                print(f"| {B} | {w} | {p} | {x['tok_s_p50']:.1f} | {x['tok_s_p50'] / r['hf']['tok_s_p50']:.2f}x | "
                      f"{x['tok_s_p50'] / r['dense']['tok_s_p50']:.2f}x | {x['same_tokens_as_dense']} |")
    print("\n| batch | provider | decode step ms (p50) | p20-p80 | vs hf |")
    print("|---|---|---|---|---|")
    for B in batches:
        r = {x["provider"]: x for x in rows if x["batch"] == B and x["workload"] == "prompt"}
        for p in providers:
            x = r[p]
            print(f"| {B} | {p} | {x['step_ms_p50']:.2f} | {x['step_ms_p20']:.2f}-{x['step_ms_p80']:.2f} | "
                  f"{r['hf']['step_ms_p50'] / x['step_ms_p50']:.2f}x |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        width = 0.25

        def get(B, p, w, key):
            return next(x[key] for x in rows if x["batch"] == B and x["provider"] == p and x["workload"] == w)
        for i, p in enumerate(providers):
            xs = [j + i * width for j in range(len(batches))]
            axes[0].bar(xs, [get(B, p, "prompt", "tok_s_p50") for B in batches], width, label=p)
            axes[1].bar(xs, [get(B, p, "branches", "tok_s_p50") for B in batches], width, label=p)
            axes[2].bar(xs, [get(B, p, "prompt", "step_ms_p50") for B in batches], width, label=p)
        for ax, t in zip(axes, ["prompt workload: tokens/s", "sentence branches: tokens/s", "decode step (ms)"]):
            ax.set_xticks([j + width for j in range(len(batches))], [f"batch {B}" for B in batches])
            ax.set_title(t)
            ax.legend()
        fig.suptitle(f"BDHS masked sampling, rho_th {args.rho}, {rows[0]['image_tokens']} image tokens, "
                     f"{args.threads} thread(s)")
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "results", "bench_bdhs.png"), dpi=100)
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
    print(f"\nwrote {csv_path}")


if __name__ == "__main__":
    main()
