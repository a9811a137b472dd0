#!/usr/bin/env python
"""GPU proof in one command (issue 21): the machine's ceilings, kernel correctness, kernel speed, a 7B-shaped
training step and BDHS generation, each measured against the limit and the peers.

    python bench/gpu_check.py --quick            # the first thing to run on any CUDA machine (< 3 min)
    python bench/gpu_check.py [--out DIR]        # the full check (< 8 min)
    python bench/gpu_check.py --dry-run          # the same code at tiny shapes on the CPU (< 1 min; in the tests)

Runs from a plain checkout with no network and nothing installed: the repository root is put on sys.path and
`nanoalign.kernels` maps to kernels/ (nanoalign/__init__.py). Optional peers (Liger, Cut Cross-Entropy, TRL) are
skipped with a line when absent. Writes DIR/gpu_check.json and DIR/gpu_check.md and prints the table last.
Exit code 0 when every correctness check (section 2) passed, 1 otherwise (2 for bad arguments / no CUDA).

Sections (each guarded: a failure is recorded with its error and the script goes on):
  1 ceilings     device-to-device copy (GB/s, bytes read + written) and a large bf16 matmul (TFLOP/s)
  2 correctness  every Triton kernel against its pure-torch reference in float64 (fresh random inputs, odd shapes,
                 fp32 / bf16 / fp16, outputs poisoned first). Tolerance (flash-attention's rule, as in the tests):
                 ||out - ref|| / ||ref|| <= 2 x that of plain torch run in the input precision + FLOOR
  3 fused loss   ops.preference_loss (fwd + bwd) at LLaVA-1.6-7B's LM head (H 4096, V 32064, T 3000, ~5% of the
                 positions scored) against naive torch (full logits), Liger's fused DPO loss and CCE where importable
  4 decode attn  kernels.decode_attention on BDHS's compacted cache (2,928 image tokens, rho 0.99) against SDPA on
                 the same cache and dense masked SDPA over the full sequence, batch 1 / 16 / 64
  5 train step   a LLaVA-1.6-7B-shaped model with random weights (config written out below), bf16, FSDP2 on one
                 GPU, DDPO on 8 pairs of ~3,000 tokens with cached reference log-probs, full and LoRA rank 128
  6 bdhs gen     the compacted BDHS sampler against transformers' generate with the equivalent attention mask

Timing: CUDA-synchronized wall clock, median of the repeats that fit the section's budget after one warm-up.
Every FLOP / byte count is written out next to the code that uses it.
"""
import argparse
import json
import math
import os
import socket
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# seconds per section (full run, --quick); the total is printed at the start so a reader knows it fits a loan
BUDGET = {"ceilings": (20, 10), "correctness": (60, 35), "fused_loss": (90, 30), "decode_attention": (45, 15),
          "train_step": (180, 60), "bdhs_generation": (60, 25)}
DRY_BUDGET = 10  # each section under --dry-run (the whole dry run must stay under a minute)
FLOOR = 1e-5  # absolute floor of the relative-error rule (fp32 accumulation of exact inputs)

# The 7B-shaped model: llava-hf/llava-v1.6-vicuna-7b-hf's shapes, written out (no hub). An image of 672 x 672 takes the
# 2 x 2 AnyRes grid: 576 base tokens + 48 rows x (48 + 1 newline) = 2,928 image tokens.
CONFIG_7B = {
    "model_type": "llava_next", "image_token_index": 32000, "pad_token_id": 0,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu"},
    "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 0},
}
IMAGE_SIZE_7B = (672, 672)
# The dry run's model: the same structure, tiny (image 64 x 64 on 32-pixel tiles of 8-pixel patches: 16 + 8 x 9 = 88
# image tokens).
CONFIG_TINY = {
    "model_type": "llava_next", "image_token_index": 250, "pad_token_id": 0,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
    "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]],
    "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"},
    "text_config": {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "max_position_embeddings": 512, "pad_token_id": 0},
}
IMAGE_SIZE_TINY = (64, 64)


# ---------------------------------------------------------------------------------------------------------- plumbing
class Ctx:
    """Run settings shared by the sections: device, mode, the current section's deadline."""

    def __init__(self, args):
        import torch
        self.torch = torch
        self.dry = args.dry_run
        self.quick = args.quick
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.cuda = self.device.type == "cuda"
        self.deadline = math.inf
        self.ceil_gbs = None  # measured in section 1
        self.ceil_tflops = None

    def pick(self, full, quick, dry):
        return dry if self.dry else quick if self.quick else full

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def left(self):
        return self.deadline - time.perf_counter()

    def time_fn(self, fn, reps=5, min_reps=1):
        """Median seconds of fn() over up to `reps` repeats after one warm-up; stops early when the section's budget
        is spent (at least min_reps)."""
        if self.dry:  # the dry run proves the code path, not the speed: one call, no warm-up
            reps = min_reps = 1
        else:
            fn()
            self.sync()
        times = []
        while len(times) < reps and (len(times) < min_reps or self.left() > 0):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated()
        return 0

    def peak_mib(self, base=0):
        """Peak allocated memory since reset_peak, above `base` bytes, in MiB (None on the CPU)."""
        if not self.cuda:
            return None
        return round((self.torch.cuda.max_memory_allocated() - base) / 2**20, 1)

    def poison(self):
        """Fill the CUDA caching allocator's free memory with NaN (best effort: the blocks it holds free, at least
        4 MiB), so an output a kernel forgets to write reads as NaN, not as a stale correct value. On the CPU there is
        no allocator cache to poison (no-op)."""
        if not self.cuda:
            return
        torch = self.torch
        free = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        n = max(free // 4 - 2**20, 2**20)
        try:
            x = torch.full((int(n),), float("nan"), device=self.device)
            del x
        except torch.OutOfMemoryError:
            pass


def sig(x, digits=4):
    """x to `digits` significant figures (a float; the table prints floats with 3)."""
    return float(f"{float(x):.{digits}g}")


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (0 when both are empty; ||ref|| floored at 1e-30)."""
    if out.numel() == 0:
        return 0.0
    d = (out.double() - ref.double()).norm().item()
    return d / max(ref.double().norm().item(), 1e-30)


def check_row(name, dtype, err, base_err, out_dtype, finite=True):
    """One correctness row: passes when finite and err <= 2 x base_err + floor, floor = FLOOR, or the unit roundoff
    of the output's dtype when the output is stored in 16 bits (its own rounding, which plain torch's output has
    too, but which the interpreter's bf16 store (truncation) doubles in the dry run)."""
    import torch
    floor = FLOOR if out_dtype in (torch.float32, torch.float64) else torch.finfo(out_dtype).eps / 2
    bound = 2 * base_err + floor
    return {"check": name, "dtype": str(dtype).replace("torch.", ""), "err": err, "torch_err": base_err,
            "bound": bound, "pass": bool(finite and err <= bound)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- 1 ceilings
def sec_ceilings(ctx):
    """Device-to-device copy of a large buffer (bytes read + written / s) and a square bf16 matmul (2 n^3 / s)."""
    torch = ctx.torch
    nbytes = ctx.pick(2 << 30, 1 << 30, 8 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=ctx.device).normal_()
    dst = torch.empty_like(src)
    t = ctx.time_fn(lambda: dst.copy_(src), reps=20)
    ctx.ceil_gbs = 2 * nbytes / t / 1e9  # read + write
    del src, dst
    n = ctx.pick(8192, 8192, 256)
    dt = torch.float32 if ctx.dry else torch.bfloat16  # the CPU's bf16 matmul is not its ceiling
    a = torch.randn(n, n, device=ctx.device, dtype=dt)
    b = torch.randn(n, n, device=ctx.device, dtype=dt)
    t2 = ctx.time_fn(lambda: a @ b, reps=20)
    ctx.ceil_tflops = 2 * n**3 / t2 / 1e12
    rows = [{"what": f"copy {nbytes / 2**30:.2f} GiB fp32", "GB/s": sig(ctx.ceil_gbs), "ms": sig(t * 1e3)},
            {"what": f"matmul {n}^3 {str(dt).replace('torch.', '')}", "TFLOP/s": sig(ctx.ceil_tflops),
             "ms": sig(t2 * 1e3)}]
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        rows.append({"what": f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                             f"torch {torch.__version__}, cuda {torch.version.cuda}"})
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------ 2 correctness
def _lp_inputs(torch, N, H, V, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2).to(dtype).to(device)  # (N, H): logits of a few tens
    w = (torch.randn(V, H, generator=g) / math.sqrt(H) * 4).to(dtype).to(device)  # (V, H)
    y = torch.randint(0, V, (N,), generator=g).to(device)  # (N,)
    y[0], y[-1] = 0, V - 1  # labels at both ends of the vocabulary
    gr = torch.randn(N, generator=g).to(device)  # dL/dlogp
    return h, w, y, gr


def check_logprobs(ctx, dtype, N, H, V, seed=0):
    """kernels.logprobs forward and backward vs logprob_rows_*_ref in float64 (truth) and in the input dtype (the
    plain-torch error the rule doubles)."""
    from nanoalign.kernels import logprobs as K
    torch = ctx.torch
    h, w, y, g = _lp_inputs(torch, N, H, V, dtype, ctx.device, seed)
    blocks = dict(block_n=16, block_v=32, block_h=16) if ctx.dry else {}  # dry: partial blocks at tiny shapes
    ctx.poison()
    logp, lse = K.logprob_rows_fwd(h, w, y, **blocks)
    ctx.poison()
    gh, gw = K.logprob_rows_bwd(h, w, y, lse, g, **blocks)
    ctx.sync()
    r_logp, r_lse = K.logprob_rows_fwd_ref(h.double(), w.double(), y)
    r_gh, r_gw = K.logprob_rows_bwd_ref(h.double(), w.double(), y, r_lse, g.double())
    b_logp, b_lse = K.logprob_rows_fwd_ref(h, w, y)
    b_gh, b_gw = K.logprob_rows_bwd_ref(h, w, y, b_lse, g)
    shape = f"N{N} H{H} V{V}"
    rows = []
    for name, out, base, ref in (("logprobs fwd logp", logp, b_logp, r_logp), ("logprobs fwd lse", lse, b_lse, r_lse),
                                 ("logprobs bwd grad_h", gh, b_gh, r_gh), ("logprobs bwd grad_w", gw, b_gw, r_gw)):
        rows.append(check_row(f"{name} {shape}", dtype, rel_err(out, ref), rel_err(base, ref), out.dtype,
                              finite=bool(torch.isfinite(out).all())))
    return rows


def _pref_batch(torch, P, T, H, V, dtype, device, seed, frac=0.3):
    """A DDPO-like batch: 2P rows (chosen, rejected), the last ~frac of each row scored, some rows shorter, gamma 5
    on a fifth of the scored tokens, cached reference log-probs."""
    g = torch.Generator(device=device).manual_seed(seed)  # made on the device: the 7B batch is 0.8-3 GB
    kw = dict(generator=g, device=device)
    hidden = (torch.randn(2 * P, T, H, **kw) * 2).to(dtype)
    weight = (torch.randn(V, H, **kw) / math.sqrt(H) * 4).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), **kw)
    start = T - torch.randint(max(1, int(frac * T) // 2), max(2, int(frac * T)) + 1, (2 * P,), **kw)
    labels[torch.arange(T, device=device)[None, :] < start[:, None]] = -100
    tw = torch.where(torch.rand(2 * P, T, **kw) < 0.2, 5.0, 1.0)
    ref = -torch.rand(2 * P, T, **kw) * 8
    return hidden, weight, labels, tw, ref


def pref_loss_plain(hidden, weight, labels, token_weights, ref_logps, beta, acc_dtype):
    """Plain-torch DDPO/DPO loss from full logits (hidden @ weight.T in the inputs' dtype, log-softmax in acc_dtype),
    differentiable by autograd: the reference (acc float64 on float64 inputs) and the naive baseline."""
    from nanoalign import losses as L
    P = hidden.shape[0] // 2
    mask = labels != -100
    logits = (hidden @ weight.T).to(acc_dtype)  # (2P, T, V): what the fused op never builds
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask  # (2P, T)
    pol = L.sequence_scores(logp, mask, token_weights.to(acc_dtype), False)
    ref = L.sequence_scores(ref_logps.to(acc_dtype), mask, token_weights.to(acc_dtype), False)
    rho = (pol[:P] - ref[:P]) - (pol[P:] - ref[P:])
    return L.pair_losses("dpo", rho, beta).mean()


def check_pref_loss(ctx, dtype, P, T, H, V, seed=0):
    """ops.preference_loss (fused; Triton on CUDA, the interpreter in the dry run) vs pref_loss_plain in float64:
    the loss and both gradients."""
    from nanoalign import ops
    torch = ctx.torch
    hidden, weight, labels, tw, ref = _pref_batch(torch, P, T, H, V, dtype, ctx.device, seed)

    def grads(fn, hd, wt):
        hd, wt = hd.detach().clone().requires_grad_(True), wt.detach().clone().requires_grad_(True)
        loss = fn(hd, wt)
        loss.backward()
        return loss.detach(), hd.grad, wt.grad
    ctx.poison()
    out = grads(lambda hd, wt: ops.preference_loss(hd, wt, labels, tw, ref, "dpo", 0.5)[0], hidden, weight)
    ctx.sync()
    truth = grads(lambda hd, wt: pref_loss_plain(hd, wt, labels, tw, ref, 0.5, torch.float64),
                  hidden.double(), weight.double())
    base = grads(lambda hd, wt: pref_loss_plain(hd, wt, labels, tw, ref, 0.5, torch.float32), hidden, weight)
    shape = f"P{P} T{T} H{H} V{V}"
    return [check_row(f"preference_loss {name} {shape}", dtype, rel_err(o, r), rel_err(b, r), o.dtype,
                      finite=bool(torch.isfinite(o).all()))
            for name, o, b, r in zip(("loss", "grad_hidden", "grad_weight"), out, base, truth)]


def attn64(q, k, v, lens):
    """float64 truth of decode attention: q (B,Hq,D), k/v (B,Hkv,T,D), lens (B,) -> (B,Hq,D) float64."""
    import torch
    G = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)  # (B,Hq,T,D)
    s = torch.einsum("bhd,bhtd->bht", q.double(), kk) / math.sqrt(q.shape[-1])
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]  # (B,T)
    p = s.masked_fill(~valid[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bht,bhtd->bhd", p, vv)


def sdpa_padded(q, k, v, lens):
    """Plain torch decode attention in the input dtype: SDPA over the padded cache with a key-padding mask
    (rows must have lens >= 1)."""
    import torch
    import torch.nn.functional as F
    G = q.shape[1] // k.shape[1]
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]  # (B,T)
    return F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                          attn_mask=valid[:, None, None, :])[:, :, 0]


def check_decode_attention(ctx, dtype, B, Hq, Hkv, T, D, seed=0):
    """kernels.decode_attention on ragged lengths (one empty row) vs float64 truth; the empty row must be zeros."""
    from nanoalign.kernels.decode_attention import decode_attention
    torch = ctx.torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype).to(ctx.device)
    k = (torch.randn(B, Hkv, T, D, generator=g) * 2).to(dtype).to(ctx.device)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype).to(ctx.device)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0], lens[-1] = 0, T
    lens = lens.to(ctx.device)
    ctx.poison()
    out = decode_attention(q, k, v, lens, **({"block_n": 16} if ctx.dry else {}))
    ctx.sync()
    nz = lens > 0
    truth = attn64(q, k, v, lens)
    base = sdpa_padded(q[nz], k[nz], v[nz], lens[nz])
    row = check_row(f"decode_attention B{B} Hq{Hq} Hkv{Hkv} T{T} D{D}", dtype, rel_err(out[nz], truth[nz]),
                    rel_err(base, truth[nz]), out.dtype, finite=bool(torch.isfinite(out).all()))
    row["pass"] = row["pass"] and bool((out[~nz] == 0).all())  # an empty row gives zeros, never NaN
    return [row]


def correctness_cases(dry):
    """(name, function, kwargs) of every correctness check; shared with tests/test_cuda.py (pytest -m cuda)."""
    import torch
    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        n = str(dt).replace("torch.", "")
        if dry:
            cases += [(f"logprobs-{n}", check_logprobs, dict(dtype=dt, N=37, H=40, V=75)),
                      (f"pref-{n}", check_pref_loss, dict(dtype=dt, P=2, T=9, H=24, V=67)),
                      (f"decode-{n}", check_decode_attention, dict(dtype=dt, B=3, Hq=4, Hkv=2, T=37, D=24))]
        else:  # odd sizes everywhere: partial blocks in every dimension
            cases += [(f"logprobs-{n}", check_logprobs, dict(dtype=dt, N=333, H=1000, V=32064)),
                      (f"pref-{n}", check_pref_loss, dict(dtype=dt, P=3, T=301, H=520, V=5003)),
                      (f"decode-{n}", check_decode_attention, dict(dtype=dt, B=5, Hq=32, Hkv=8, T=1001, D=128))]
    return cases


def sec_correctness(ctx):
    rows = []
    # ops.preference_loss dispatches by device (Triton on CUDA); on the CPU the dry run forces the Triton kernels
    # (interpreted) so that it checks the same kernels, not the C++ path. Restored after: later sections use the
    # default dispatch.
    saved = os.environ.get("NANOALIGN_LOGPROBS_BACKEND")
    os.environ["NANOALIGN_LOGPROBS_BACKEND"] = "triton"
    try:
        for name, fn, kw in correctness_cases(ctx.dry):
            try:
                rows += fn(ctx, **kw)
            except Exception as e:  # a crashing check is a failed check, and the others still run
                rows.append({"check": name, "dtype": str(kw["dtype"]).replace("torch.", ""), "pass": False,
                             "error": f"{type(e).__name__}: {e}"})
    finally:
        if saved is None:
            os.environ.pop("NANOALIGN_LOGPROBS_BACKEND", None)
        else:
            os.environ["NANOALIGN_LOGPROBS_BACKEND"] = saved
    return {"rows": rows, "pass": bool(rows) and all(r["pass"] for r in rows)}


# ----------------------------------------------------------------------------------------------- 3 fused loss speed
def sec_fused_loss(ctx):
    """Fused preference loss fwd + bwd at the 7B LM head vs naive full logits and the peers.
    FLOPs: the fused op projects only the N scored rows: forward 2 N V H, backward 6 N V H (the Triton backward
    recomputes the logit tile: 2 N V H, then grad_h and grad_w 2 N V H each) = 8 N V H. Naive torch projects every
    position: forward 2 B T V H, backward 4 B T V H."""
    from nanoalign import ops
    torch = ctx.torch
    H, V, T = ctx.pick((4096, 32064, 3000), (4096, 32064, 3000), (64, 512, 300))
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    rows = []
    for P in ctx.pick((8, 32), (8,), (2,)):
        hidden, weight, labels, tw, ref = _pref_batch(torch, P, T, H, V, dtype, ctx.device, 1, frac=0.067)
        N = int((labels != -100).sum())  # 3.3-6.7% of the 2P x T positions (a response after 2,928 image tokens)
        hd, wt = hidden.requires_grad_(True), weight.requires_grad_(True)

        def fused():
            hd.grad = wt.grad = None
            ops.preference_loss(hd, wt, labels, tw, ref, "dpo", 0.5)[0].backward()

        def naive():
            hd.grad = wt.grad = None
            pref_loss_plain(hd, wt, labels, tw, ref, 0.5, torch.float32).backward()
        providers = [("nanoalign fused", fused, 8 * N * V * H), ("naive torch", naive, 6 * 2 * P * T * V * H)]
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
            liger = LigerFusedLinearDPOLoss(beta=0.5)
            tgt = labels.clone()

            def liger_fn():  # DPO (no DDPO weights) over the same rows; Liger projects every position in chunks
                hd.grad = wt.grad = None
                seq_ref = (ref * (labels != -100)).sum(1)
                out = liger(wt, hd, tgt, None, ref_chosen_logps=seq_ref[:P], ref_rejected_logps=seq_ref[P:])
                (out[0] if isinstance(out, tuple) else out).backward()
            providers.append(("liger fused dpo", liger_fn, 6 * 2 * P * T * V * H))
        except ImportError:
            rows.append({"provider": "liger fused dpo", "pairs": P, "note": "skipped: liger_kernel not importable"})
        try:
            from cut_cross_entropy import linear_cross_entropy

            def cce():  # token cross-entropy of the scored rows only (no preference margin)
                hd.grad = wt.grad = None
                linear_cross_entropy(hd, wt, labels, ignore_index=-100, reduction="sum").backward()
            providers.append(("cut cross-entropy", cce, 6 * N * V * H))
        except ImportError:
            rows.append({"provider": "cut cross-entropy", "pairs": P, "note": "skipped: cut_cross_entropy not "
                                                                              "importable"})
        for name, fn, flops in providers:
            row = {"provider": name, "pairs": P, "scored rows": N, "shape": f"2P{2 * P} T{T} H{H} V{V}"}
            try:
                base = ctx.reset_peak()
                t = ctx.time_fn(fn, reps=5)
                row.update({"ms": sig(t * 1e3), "peak MiB": ctx.peak_mib(base),
                            "TFLOP/s": sig(flops / t / 1e12),
                            "% of matmul ceiling": sig(100 * flops / t / 1e12 / ctx.ceil_tflops)
                            if ctx.ceil_tflops else None})
            except Exception as e:  # e.g. the naive path's (2P, T, V) logits do not fit
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            hd.grad = wt.grad = None
        del hidden, weight, hd, wt
    return {"rows": rows}


# --------------------------------------------------------------------------------------------- 4 decode attention
def sec_decode_attention(ctx):
    """One decode step's attention of one LLaMA-7B layer (Hq = Hkv = 32, D = 128) after a prompt of 2,928 image
    tokens + 72 text tokens and 100 generated ones. BDHS at rho 0.99 keeps ~1% of the image tokens: the compacted
    cache holds ~29 + 172 keys per row (ragged), the dense one all 3,100 with a mask.
    Bytes: K and V of the valid keys read once: 2 x sum(lens) x Hkv x D x 2 bytes (bf16)."""
    from nanoalign.kernels.decode_attention import decode_attention
    torch = ctx.torch
    import torch.nn.functional as F
    n_img, n_text = ctx.pick((2928, 172), (2928, 172), (88, 20))
    Hq, Hkv, D = ctx.pick((32, 32, 128), (32, 32, 128), (4, 4, 16))
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    rows = []
    for B in ctx.pick((1, 16, 64), (1, 16, 64), (1, 4)):
        g = torch.Generator(device="cpu").manual_seed(B)
        kept = (torch.rand(B, n_img, generator=g) >= 0.99)  # Eq. 6 of paper 000: masked where u < rho_th
        lens = (kept.sum(1) + n_text).to(ctx.device)  # (B,) compacted lengths
        L, T = int(lens.max()), n_img + n_text
        q = torch.randn(B, Hq, D, generator=g).to(dtype).to(ctx.device)
        kc = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(ctx.device)
        vc = torch.randn_like(kc)
        kd = torch.randn(B, Hkv, T, D, device=ctx.device, dtype=dtype)
        vd = torch.randn_like(kd)
        dense_mask = torch.cat([kept, torch.ones(B, n_text, dtype=torch.bool)], 1).to(ctx.device)  # (B, T)
        G = Hq // Hkv

        def dense():
            return F.scaled_dot_product_attention(q[:, :, None], kd.repeat_interleave(G, 1) if G > 1 else kd,
                                                  vd.repeat_interleave(G, 1) if G > 1 else vd,
                                                  attn_mask=dense_mask[:, None, None, :])
        bytes_c = 2 * int(lens.sum()) * Hkv * D * kc.element_size()
        bytes_d = 2 * B * T * Hkv * D * kd.element_size()
        for name, fn, nbytes in (("triton decode (compacted)", lambda: decode_attention(q, kc, vc, lens), bytes_c),
                                 ("SDPA (compacted, padded)", lambda: sdpa_padded(q, kc, vc, lens), bytes_c),
                                 ("SDPA dense masked", dense, bytes_d)):
            row = {"provider": name, "batch": B, "keys/row": sig(float(lens.float().mean()) if "compact" in name
                                                                   else T, 1)}
            try:
                t = ctx.time_fn(fn, reps=50)
                row.update({"us": sig(t * 1e6), "tokens/s (1 layer)": sig(B / t),
                            "GB/s": sig(nbytes / t / 1e9),
                            "% of copy ceiling": sig(100 * nbytes / t / 1e9 / ctx.ceil_gbs)
                            if ctx.ceil_gbs else None})
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------- model helpers
def model_config(ctx, n_layers=None):
    from nanoalign.model import LlavaConfig
    d = json.loads(json.dumps(CONFIG_TINY if ctx.dry else CONFIG_7B))
    if n_layers:
        d["text_config"]["num_hidden_layers"] = n_layers
    return LlavaConfig.from_dict(d), (IMAGE_SIZE_TINY if ctx.dry else IMAGE_SIZE_7B)


def random_model(ctx, cfg, dtype):
    """LlavaModel with random weights made on the device (meta first: no CPU copy of 7B parameters). Linear and
    embedding weights N(0, 0.02) as LLaMA's init, norms 1, biases 0."""
    from nanoalign.model import LlavaModel
    torch = ctx.torch
    with torch.device("meta"):
        model = LlavaModel(cfg)
    model = model.to_empty(device=ctx.device).to(dtype)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model


def llava_inputs(ctx, cfg, image_size, B, n_text, seed=0):
    """B rows: <s> + image + n_text random text tokens; pixel values for one image per row (AnyRes patches)."""
    torch = ctx.torch
    from nanoalign.model import LlavaModel
    with torch.device("meta"):
        n_img = LlavaModel(cfg).num_image_features(image_size)
    g = torch.Generator(device="cpu").manual_seed(seed)
    V, idx = cfg.text_config.vocab_size, cfg.image_token_index
    text = torch.randint(3, min(V, idx), (B, n_text), generator=g)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, n_img), idx), text], 1)
    S = cfg.vision_config.image_size
    n_patch = (image_size[0] // S) * (image_size[1] // S) + 1
    pv = torch.randn(B, n_patch, 3, S, S, generator=g)
    sizes = torch.tensor([list(image_size)] * B)
    return ids, pv, sizes, n_img


# ------------------------------------------------------------------------------------------------- 5 training step
def sec_train_step(ctx):
    """One optimizer step of DDPO on P pairs of ~3,000 tokens (2,928 image tokens + text, 64 scored response tokens),
    micro-batches of one pair (2 rows, one shared image), reference log-probs from a cache (random here: data, not
    computed), FSDP2 at world size 1 (bf16 params, fp32 reduce), gradient checkpointing, AdamW; full fine-tuning and
    LoRA rank 128 on the language model.
    MFU = model FLOPs / (step time x measured matmul ceiling), model FLOPs counted as (6 x parameters x tokens +
    attention) with the convention's 6 = forward 2 + backward 4, even where LoRA skips the frozen weights' grads and
    gradient checkpointing recomputes the forward (so MFU understates the work the GPU did):
      text:      6 x P_text x (2P x T)                + attention 6 x L x H x T^2 per row (causal: half of 12 L H T^2)
      vision:    6 x P_vision x (P x patches x 577)   (one image per pair, through the tower once)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from nanoalign import ops
    from nanoalign.lora import apply_lora
    torch = ctx.torch
    pairs = ctx.pick(8, 2, 2)
    n_layers = ctx.pick(None, 8, None)  # --quick: the 7B shapes with 8 of the 32 decoder layers
    cfg, image_size = model_config(ctx, n_layers)
    n_text, n_resp = ctx.pick(71, 71, 12), ctx.pick(64, 64, 8)
    started = not dist.is_initialized()
    if started:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if ctx.cuda else "gloo", rank=0, world_size=1)
    rows = []
    try:
        for lora in (False, True):
            row = {"run": "LoRA r128" if lora else "full", "pairs": pairs,
                   "layers": cfg.text_config.num_hidden_layers}
            model = opt = None
            try:
                base = ctx.reset_peak()
                model = random_model(ctx, cfg, ctx.torch.float32)  # fp32 master weights, bf16 compute
                if lora:
                    apply_lora(model, rank=ctx.pick(128, 128, 4), alpha=ctx.pick(256.0, 256.0, 8.0),
                               prefix="language_model")
                model.gradient_checkpointing = True
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if ctx.cuda \
                    else MixedPrecisionPolicy()
                fully_shard(model.vision_tower, mp_policy=mp)  # train.py's units
                for layer in model.language_model.model.layers:
                    fully_shard(layer, mp_policy=mp)
                fully_shard(model, mp_policy=mp)
                params = [p for p in model.parameters() if p.requires_grad]
                # foreach=False: the multi-tensor path holds param-sized temporaries, which a 7B full fine-tune on
                # one GPU (16 bytes/param = 113 GB before activations) cannot spare
                opt = torch.optim.AdamW(params, lr=1e-6, foreach=False)
                ids, pv, sizes, n_img = llava_inputs(ctx, cfg, image_size, 2 * pairs, n_text)
                T = ids.shape[1]
                labels = torch.full_like(ids, -100)
                labels[:, -n_resp:] = ids[:, -n_resp:]  # already shifted: any tokens do for timing
                g = torch.Generator(device="cpu").manual_seed(1)
                tw = torch.where(torch.rand(ids.shape, generator=g) < 0.2, 5.0, 1.0)  # DDPO gamma on 20%
                ref = -torch.rand(ids.shape, generator=g) * 8  # the cached reference log-probs
                dev = lambda x: x.to(ctx.device)

                last = {}

                def step():
                    opt.zero_grad(set_to_none=True)
                    for p in range(pairs):  # one pair per micro-batch: chosen and rejected share the image
                        r = torch.tensor([p, pairs + p])
                        h = model(dev(ids[r]), dev(pv[p:p + 1]), dev(sizes[p:p + 1]),
                                  image_index=dev(torch.tensor([0, 0])))
                        loss, _ = ops.preference_loss(h, model.lm_head_weight, dev(labels[r]), dev(tw[r]),
                                                      dev(ref[r]), "dpo", 0.5)
                        (loss / pairs).backward()
                        last["loss"] = loss.detach()
                    opt.step()
                t = ctx.time_fn(step, reps=3)
                tc, vc = cfg.text_config, cfg.vision_config
                with torch.device("meta"):
                    from nanoalign.model import LlavaModel
                    mm = LlavaModel(cfg)
                p_vis = sum(p.numel() for p in mm.vision_tower.parameters())
                p_all = sum(p.numel() for p in mm.parameters())
                p_text = p_all - p_vis
                n_patch = pv.shape[1]
                tokens = 2 * pairs * T
                flops = (6 * p_text * tokens + 2 * pairs * 6 * tc.num_hidden_layers * tc.hidden_size * T * T
                         + 6 * p_vis * pairs * n_patch * ((vc.image_size // vc.patch_size) ** 2 + 1))
                row.update({"loss": sig(last["loss"]), "params B": sig(p_all / 1e9),
                            "trainable M": sig(sum(p.numel() for p in params) / 1e6),
                            "tokens/step": tokens, "image tokens/row": n_img, "step s": sig(t),
                            "tokens/s": sig(tokens / t), "peak MiB": ctx.peak_mib(base),
                            "model TFLOP/step": sig(flops / 1e12),
                            "MFU % of measured ceiling": sig(100 * flops / t / 1e12 / ctx.ceil_tflops)
                            if ctx.ceil_tflops else None})
                if not math.isfinite(row["loss"]):
                    row["error"] = f"non-finite loss {row['loss']}"
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            del model, opt
            if ctx.cuda:
                torch.cuda.empty_cache()
    finally:
        if started:
            dist.destroy_process_group()
    try:
        import trl
        rows.append({"run": "TRL DPOTrainer", "note": f"trl {trl.__version__} imports, but the same-step comparison "
                                                      "is not built yet (issue 21 follow-up)"})
    except ImportError:
        rows.append({"run": "TRL DPOTrainer", "note": "skipped: trl not importable on this machine"})
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------ 6 BDHS generation
def bdhs_sampler():
    """The compacted BDHS sampler of nanoalign/engine.py as (generate_compact(model, input_ids, attention_mask,
    pixel_values, image_sizes, image_keep, max_new_tokens) -> Rollout, sample_image_mask)."""
    from nanoalign.engine import generate, sample_image_mask

    def generate_compact(model, input_ids, attention_mask, pixel_values, image_sizes, image_keep, max_new_tokens=32):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                 "image_sizes": image_sizes}
        return generate(model, batch, max_new_tokens, image_keep=image_keep, compact=True)
    return generate_compact, sample_image_mask


def sec_bdhs_generation(ctx):
    """Batch 16 of (image + 40 text tokens) prompts, rho 0.99 image masks, greedy, max_new_tokens new tokens with no
    EOS (every row runs to the end): our compacted sampler vs transformers' LlavaNext generate with the attention mask
    zero at the masked image tokens (the equivalent mask; transformers computes the full sequence). Same config and
    dtype; the two models have separate random weights (the timing does not depend on the values; the token-level
    equality of the two paths on shared weights is tests/test_sample.py's job)."""
    import transformers
    torch = ctx.torch
    generate_compact, sample_image_mask = bdhs_sampler()
    cfg, image_size = model_config(ctx, ctx.pick(None, 8, None))
    B, n_new = ctx.pick(16, 16, 4), ctx.pick(64, 32, 8)
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    ids, pv, sizes, n_img = llava_inputs(ctx, cfg, image_size, B, 40, seed=2)
    g = torch.Generator().manual_seed(3)
    keeps = [sample_image_mask(n_img, 0.99, g) for _ in range(B)]
    am = torch.ones_like(ids)
    hf_am = am.clone()
    for b, k in enumerate(keeps):
        hf_am[b, ids[b] == cfg.image_token_index] = k.long()
    dev = lambda x: x.to(ctx.device)
    ids, pv, sizes, am, hf_am = map(dev, (ids, pv.to(dtype), sizes, am, hf_am))
    rows = []
    model = random_model(ctx, cfg, dtype).eval()
    try:
        t = ctx.time_fn(lambda: generate_compact(model, ids, am, pv, sizes, keeps, max_new_tokens=n_new), reps=3)
        rows.append({"provider": "nanoalign compacted", "batch": B, "new tokens": n_new, "prompt": ids.shape[1],
                     "s": sig(t), "tokens/s": sig(B * n_new / t)})
    except Exception as e:
        rows.append({"provider": "nanoalign compacted", "error": f"{type(e).__name__}: {str(e)[:200]}"})
    del model
    try:
        hcfg = transformers.LlavaNextConfig.from_dict(cfg.to_dict())
        with torch.device(ctx.device):
            hf = transformers.LlavaNextForConditionalGeneration(hcfg).to(dtype).eval()
        pos = (hf_am.cumsum(1) - 1).clamp(min=0)

        def hf_gen():
            with torch.no_grad():
                return hf.generate(input_ids=ids, attention_mask=hf_am, pixel_values=pv, image_sizes=sizes,
                                   position_ids=pos, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        t = ctx.time_fn(hf_gen, reps=3)
        rows.append({"provider": f"transformers {transformers.__version__} generate (mask)", "batch": B,
                     "new tokens": n_new, "prompt": ids.shape[1], "s": sig(t),
                     "tokens/s": sig(B * n_new / t)})
        del hf
    except Exception as e:
        rows.append({"provider": "transformers generate", "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return {"rows": rows}


SECTIONS = [("ceilings", sec_ceilings), ("correctness", sec_correctness), ("fused_loss", sec_fused_loss),
            ("decode_attention", sec_decode_attention), ("train_step", sec_train_step),
            ("bdhs_generation", sec_bdhs_generation)]


# ---------------------------------------------------------------------------------------------------------- report
def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown(report):
    """The report as markdown: one table per section, its status and time against its budget."""
    out = [f"# gpu_check ({report['mode']}) on {report['device']}", "",
           f"torch {report['torch']}, triton {report['triton']}, git {report['git']}, {report['date']}", ""]
    for name, sec in report["sections"].items():
        out.append(f"## {name}: {sec['status']} ({sec['seconds']:.1f} s of {sec['budget_s']} s)")
        if sec.get("error"):
            out.append(f"error: {sec['error']}")
        rows = sec.get("rows") or []
        if rows:
            cols = []
            for r in rows:
                cols += [k for k in r if k not in cols]
            out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
        out.append("")
    out.append(f"correctness: {'ALL PASSED' if report['correct'] else 'FAILED'}; total {report['seconds']:.1f} s "
               f"of {report['budget_s']} s")
    return "\n".join(out)


def _git():
    try:
        import subprocess
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except Exception:
        return "?"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for gpu_check.json / .md (default bench/results; --dry-run: "
                   "a folder in the system temp dir, so a dry run never overwrites a GPU table)")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (< 3 min)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton interpreter (< 1 min)")
    p.add_argument("--only", default=None, help="comma-separated sections to run (default all)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.out is None:
        import tempfile
        args.out = os.path.join(tempfile.gettempdir(), "gpu_check_dry") if args.dry_run else \
            os.path.join(REPO, "bench", "results")
    if args.dry_run:  # before anything imports triton: the kernels are defined interpreted
        os.environ["TRITON_INTERPRET"] = "1"
        # the CPU log-prob path outside the correctness section: pure torch, not the C++ op (whose first use is a
        # JIT build that can wait minutes on a shared machine); the correctness section forces the Triton kernels
        os.environ["NANOALIGN_LOGPROBS_BACKEND"] = "torch"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # the GPU check times the compiled kernels
        print("note: TRITON_INTERPRET was set; unset for this GPU run", flush=True)
        os.environ.pop("TRITON_INTERPRET")
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible; run with --dry-run to check the script on the CPU")
    only = set(args.only.split(",")) if args.only else None
    if only and only - {n for n, _ in SECTIONS}:
        raise SystemExit(f"error: --only: unknown section(s) {sorted(only - {n for n, _ in SECTIONS})}")
    ctx = Ctx(args)
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    budgets = {n: (DRY_BUDGET if args.dry_run else BUDGET[n][1 if args.quick else 0]) for n, _ in SECTIONS}
    total_budget = sum(budgets[n] for n, _ in SECTIONS if not only or n in only)
    print(f"gpu_check {mode}: budget " + ", ".join(f"{n} {budgets[n]} s" for n, _ in SECTIONS
                                                    if not only or n in only) + f"; total {total_budget} s", flush=True)
    import triton
    report = {"mode": mode, "device": torch.cuda.get_device_name() if ctx.cuda else "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "git": _git(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "budget_s": total_budget, "sections": {}}
    t_all = time.perf_counter()
    for name, fn in SECTIONS:
        if only and name not in only:
            continue
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        ctx.deadline = t0 + budgets[name]
        sec = {"budget_s": budgets[name]}
        try:
            torch.manual_seed(0)
            res = fn(ctx)
            sec.update(res)
            errors = [r for r in res.get("rows", []) if r.get("error")]
            sec["status"] = ("FAIL" if res.get("pass") is False else
                             "ok, with errors" if errors else "ok")
        except Exception as e:
            sec.update(status="ERROR", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            if name == "correctness":
                sec["pass"] = False
        sec["seconds"] = round(time.perf_counter() - t0, 2)
        if sec["seconds"] > budgets[name]:
            sec["status"] += f" (over budget: {sec['seconds']:.0f} s > {budgets[name]} s)"
        print(f"[{name}] {sec['status']} in {sec['seconds']:.1f} s", flush=True)
        report["sections"][name] = sec
        if ctx.cuda:
            torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - t_all, 2)
    corr = report["sections"].get("correctness")
    report["correct"] = bool(corr is None or corr.get("pass"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0 if report["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
