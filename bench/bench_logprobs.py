"""Benchmark: DPO loss forward+backward straight from hidden states, on CPU, fp32 (issue 3).

Providers (same loss everywhere: DPO sigmoid, beta 0.1, summed token log-probs, reference scores 0, mean over pairs):
  naive          full (2P, T, V) logits, log_softmax, gather, autograd
  liger          liger_kernel.chunked_loss.LigerFusedLinearDPOLoss (eager, use_ref_model=False: a peer, benchmark
                 only; skipped with a note when it does not import). Chunks by pair and projects every position.
  torch_chunked  nanoalign.ops.preference_loss with the pure-torch chunked row primitive
                 (NANOALIGN_LOGPROBS_BACKEND=torch)
  native         nanoalign.ops.preference_loss with the C++ row primitive (csrc/logprobs.cpp)
  torch_chunked_frozen / native_frozen   the same with the LM head frozen (weight.requires_grad_(False), LoRA):
                 torch chunked runs logprob_rows_fwd_dh_torch (full-V softmax per chunk of rows, 2 matmuls), native
                 the C++ logprob_rows_fwd_dh; grad_hidden = g * D, no backward primitive
and, on the N gathered scored rows of the same batch, the row primitives alone next to a plain matmul h @ w.T (the
FLOP count each row's GFLOP/s uses is in its `FLOP` column):
  op_matmul      (N, H) @ (H, V) into a preallocated, warm output: 2 N V H FLOP, the machine's GEMM speed here
  op_native / op_torch_chunked   logprob_rows_fwd + logprob_rows_bwd: 2 N V H (fwd) + 6 N V H (bwd: logits again,
                 grad_h, grad_w) = 8 N V H FLOP
  frozen head (need_grad_w=False):
  op_native_frozen / op_torch_chunked_frozen   logprob_rows_fwd + logprob_rows_bwd(need_grad_w=False): 2 N V H +
                 4 N V H (logits again, grad_h) = 6 N V H FLOP (the recomputing path)
  op_native_dh / op_torch_dh   logprob_rows_fwd_dh + grad_h = g * D (native op / its pure-torch twin): 2 N V H
                 (logits) + 2 N V H (E @ w) = 4 N V H FLOP

Method. Every sample is a fresh subprocess: it builds the inputs, runs one tiny warm-up of the same provider
(initialises MKL / OpenMP / imports), calls malloc_trim(0) so that freed heap pages cannot hide reuse, resets the
kernel's peak-RSS mark (/proc/self/clear_refs = 5), runs ONE forward+backward and reports its time and peak memory =
VmHWM - VmRSS before the call (resident memory the call added at its peak: activations, logits, gradients including
the (V, H) grad_w). Rounds are interleaved: round r runs every provider once, in an order rotated by r; times are
p20/p50/p80 over the rounds (>= 5), memory the median. The max relative gradient error max|g - g64| / max|g64| (the
worse of the hidden and weight grads) is measured in round 0 against a float64 reference computed once per shape
from the scored rows.

Usage: python bench/bench_logprobs.py            (H=1024, T=3000, pairs 1, 4 and 8; torch_chunked vs native)
       python bench/bench_logprobs.py --providers naive,liger,torch_chunked,native   (the peers too: slow)
       python bench/bench_logprobs.py --full     (H 1024/4096 x T 1024/3000 x pairs 1,2,4,8; hours)
       --ops-pairs 1   runs the op-level child (row primitives vs matmul) only at those pair counts
Writes bench/results/logprobs.csv, logprobs.md (the table with the CPU model and load beside every figure, the
native / torch chunked speedup at every size) and logprobs.png.
"""
import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# This checkout's nanoalign, not whichever one the environment installed (the venv's editable install points at
# another checkout: run from a worktree, the benchmark used to time that checkout's op).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

V = 32000
BETA = 0.1
SCORED_FRACTION = 0.05  # 95% of positions ignored (image + prompt tokens)
LOSS_PROVIDERS = ["naive", "liger", "torch_chunked", "native", "torch_chunked_frozen", "native_frozen"]
DEFAULT_PROVIDERS = ["torch_chunked", "native", "torch_chunked_frozen", "native_frozen"]
RESULTS = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------- inputs and providers


def make_inputs(H, T, P, seed=0):
    """hidden (2P, T, H), weight (V, H), labels (2P, T): the last 5% of each row are scored response tokens."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5 * 2.0  # logits with std ~2
    labels = torch.full((2 * P, T), -100, dtype=torch.long)
    n = max(1, round(SCORED_FRACTION * T))
    labels[:, T - n:] = torch.randint(0, V, (2 * P, n), generator=gen)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def dpo_from_scores(s, P):
    return -F.logsigmoid(BETA * (s[:P] - s[P:])).mean()


def loss_naive(hidden, weight, labels):
    P = hidden.shape[0] // 2
    logp = (hidden @ weight.T).log_softmax(-1)  # (2P, T, V)
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask  # (2P, T)
    return dpo_from_scores(tok.sum(-1), P)


def loss_liger(hidden, weight, labels):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    out = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=False)(weight, hidden, labels)
    return out[0] if isinstance(out, tuple) else out


def _ops_loss(backend):
    def run(hidden, weight, labels):
        os.environ["NANOALIGN_LOGPROBS_BACKEND"] = backend
        from nanoalign import ops

        if hasattr(ops, "preference_loss"):
            zeros = torch.zeros(labels.shape)
            return ops.preference_loss(hidden, weight, labels, None, zeros, loss_type="dpo", beta=BETA)[0]
        return _own_dpo(hidden, weight, labels, backend)  # nanoalign.ops without preference_loss
    return run


class _RowsDPO(torch.autograd.Function):
    """Fallback 'ours' when nanoalign.ops has no preference_loss: gathered rows + row primitives + DPO."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, fwd, bwd):
        B, T, H = hidden.shape
        flat = (labels.reshape(-1) != -100).nonzero()[:, 0]
        h, y = hidden.reshape(-1, H)[flat], labels.reshape(-1)[flat]
        logp, lse = fwd(h, weight, y)
        row = flat // T
        # fp64 scores: summed in fp32 they cost ~1e-5 relative in the gradients
        s = torch.zeros(B, dtype=torch.float64).index_add_(0, row, logp.double())
        P = B // 2
        margin = BETA * (s[:P] - s[P:])
        dm = -torch.sigmoid(-margin) * BETA / P
        g = torch.cat([dm, -dm])[row].float()
        gh, gw = bwd(h, weight, y, lse, g)
        grad_hidden = torch.zeros(B * T, H).index_copy_(0, flat, gh.float()).view(B, T, H)
        ctx.grads = (grad_hidden, gw)
        return -F.logsigmoid(margin).mean().float()

    @staticmethod
    def backward(ctx, go):
        gh, gw = ctx.grads
        return gh * go, gw * go, None, None, None


def _own_dpo(hidden, weight, labels, backend):
    if backend == "native":
        from nanoalign import native as m
        return _RowsDPO.apply(hidden, weight, labels, m.logprob_rows_fwd, m.logprob_rows_bwd)
    from nanoalign import ops
    return _RowsDPO.apply(hidden, weight, labels, ops.logprob_rows_fwd_torch, ops.logprob_rows_bwd_torch)


LOSS_FN = {"naive": loss_naive, "liger": loss_liger, "torch_chunked": _ops_loss("torch"), "native": _ops_loss("native"),
           "torch_chunked_frozen": _ops_loss("torch"), "native_frozen": _ops_loss("native")}

# ----------------------------------------------------------------------------- one sample (child process)


def _rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak():
    """Return freed heap pages to the OS (so reused memory is counted again), then reset the peak-RSS mark."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _grad_error(hidden, weight, labels, ref_path):
    """max relative error of the hidden and weight grads vs float64, and the largest grad on an ignored row."""
    ref = torch.load(ref_path)
    flat = (labels.reshape(-1) != -100).nonzero()[:, 0]
    gh = hidden.grad.reshape(-1, hidden.shape[-1])
    ignored = gh.index_fill(0, flat, 0.0).abs().max().item()  # must be 0
    err_h = ((gh[flat].double() - ref["grad_h"]).abs().max() / ref["grad_h"].abs().max()).item()
    if weight.grad is None:  # frozen head: hidden's grad only
        return err_h, ignored, ref["loss"]
    err_w = ((weight.grad.double() - ref["grad_w"]).abs().max() / ref["grad_w"].abs().max()).item()
    return max(err_h, err_w), ignored, ref["loss"]


def child_loss(provider, H, T, P, ref_path):
    fn = LOSS_FN[provider]
    frozen = provider.endswith("_frozen")  # LM head frozen (LoRA)
    tiny = make_inputs(H, 64, 1, seed=1)
    tiny[1].requires_grad_(not frozen)
    fn(*tiny).backward()  # warm-up: imports, thread pools, MKL, the cached native build
    del tiny
    hidden, weight, labels = make_inputs(H, T, P)
    weight.requires_grad_(not frozen)
    have_reset = _reset_peak()
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    loss = fn(hidden, weight, labels)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")  # without the reset this is the process's lifetime peak (an overestimate)
    out = {"time": dt, "peak_mb": (peak - base) / 1024, "peak_method": "VmHWM-reset" if have_reset else "VmHWM",
           "loss": loss.item()}
    if ref_path:
        out["grad_err"], out["ignored_grad"], ref_loss = _grad_error(hidden, weight, labels, ref_path)
        out["loss_err"] = abs(loss.item() - ref_loss)
    return out


def child_ops(H, T, P, first="native"):
    """Row primitives on the gathered scored rows, next to a plain matmul of the same rows; `first` runs first (the
    driver alternates it by round)."""
    from nanoalign import native, ops

    hidden, weight, labels = make_inputs(H, T, P)
    flat = (labels.reshape(-1) != -100).nonzero()[:, 0]
    h = hidden.detach().reshape(-1, H)[flat].contiguous()  # (N, H)
    w, y = weight.detach(), labels.reshape(-1)[flat]
    g = torch.randn(h.shape[0])
    torch_fwd = getattr(ops, "logprob_rows_fwd_torch")
    torch_bwd = getattr(ops, "logprob_rows_bwd_torch")
    mm_out = torch.empty(h.shape[0], V)  # (N, V) preallocated and touched: time the GEMM, not page faults
    torch.mm(h, w.T, out=mm_out)
    native.logprob_rows_bwd(h[:8], w, y[:8], native.logprob_rows_fwd(h[:8], w, y[:8])[1], g[:8])  # warm-up
    torch_bwd(h[:8], w, y[:8], torch_fwd(h[:8], w, y[:8])[1], g[:8])
    native.logprob_rows_fwd_dh(h[:8], w, y[:8])
    ops.logprob_rows_fwd_dh_torch(h[:8], w, y[:8])
    out = {"rows": h.shape[0]}

    def timed(f):
        t0 = time.perf_counter()
        r = f()
        return time.perf_counter() - t0, r

    out["matmul"], _ = timed(lambda: torch.mm(h, w.T, out=mm_out))
    del mm_out
    pair = [("native", native.logprob_rows_fwd, native.logprob_rows_bwd), ("torch_chunked", torch_fwd, torch_bwd)]
    for name, fwd, bwd in (pair if first == "native" else pair[::-1]):
        tf, (_, lse) = timed(lambda: fwd(h, w, y))
        tb, _ = timed(lambda: bwd(h, w, y, lse, g))
        out[name + "_fwd"], out[name + "_bwd"] = tf, tb
    # frozen head: forward + backward without grad_w (6 N V H) against the forward that returns D (4 N V H)
    frozen = [("native_frozen", native.logprob_rows_fwd, native.logprob_rows_bwd),
              ("torch_chunked_frozen", torch_fwd, torch_bwd)]
    for name, fwd, bwd in (frozen if first == "native" else frozen[::-1]):
        tf, (_, lse) = timed(lambda: fwd(h, w, y))
        tb, _ = timed(lambda: bwd(h, w, y, lse, g, need_grad_w=False))
        out[name + "_fwd"], out[name + "_bwd"] = tf, tb
    dh = [("native_dh", native.logprob_rows_fwd_dh), ("torch_dh", ops.logprob_rows_fwd_dh_torch)]
    for name, fwd_dh in (dh if first == "native" else dh[::-1]):
        def run():
            _, _, D = fwd_dh(h, w, y)
            return g[:, None] * D  # grad_h: the whole backward
        out[name], _ = timed(run)
    return out


# ----------------------------------------------------------------------------- driver


def reference(H, T, P, path):
    """float64 loss and gradients on the scored rows (ignored rows have zero gradient by construction)."""
    hidden, weight, labels = make_inputs(H, T, P)
    flat = (labels.reshape(-1) != -100).nonzero()[:, 0]
    h = hidden.detach().reshape(-1, H)[flat].double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    y = labels.reshape(-1)[flat]
    logits = h @ w.T  # (N, V) float64: only the scored rows
    logp = logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(logits, 1)
    s = torch.zeros(2 * P, dtype=torch.float64).index_add(0, flat // T, logp)
    loss = dpo_from_scores(s, P)
    loss.backward()
    torch.save({"grad_h": h.grad, "grad_w": w.grad, "loss": loss.item()}, path)


def run_child(args_dict, timeout=3600):
    cmd = [sys.executable, __file__, "--child", json.dumps(args_dict)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


def mem_available_mb():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def estimate_mb(provider, H, T, P):
    """Rough peak of the providers that hold logits, to skip shapes that cannot fit."""
    logits_mb = 2 * P * T * V * 4 / 2**20
    return {"naive": 4.2 * logits_mb, "liger": 4.2 * logits_mb / P}.get(provider, 0.0) + 3 * V * H * 4 / 2**20


def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="H 1024/4096, T 1024/3000, pairs 1,2,4,8")
    ap.add_argument("--quick", action="store_true", help="(default) H 1024, T 3000, pairs 1,4,8")
    ap.add_argument("--ops-pairs", help="pair counts at which to run the op-level child (default: every shape)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds per shape (>= 5)")
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS))
    ap.add_argument("--shapes", help="override the sweep: 'H,T,pairs;H,T,pairs'")
    ap.add_argument("--out", default=str(RESULTS), help="folder for logprobs.csv / logprobs.png")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        a = json.loads(args.child)
        torch.manual_seed(0)
        res = child_ops(a["H"], a["T"], a["P"], a.get("first", "native")) if a["provider"] == "ops" else \
            child_loss(a["provider"], a["H"], a["T"], a["P"], a.get("ref"))
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.reps < 1:
        sys.exit("error: --reps must be >= 1")
    shapes = [(H, T, P) for H in (1024, 4096) for T in (1024, 3000) for P in (1, 2, 4, 8)] if args.full else \
        [(1024, 3000, 1), (1024, 3000, 4), (1024, 3000, 8)]
    if args.shapes:
        try:
            shapes = [tuple(int(x) for x in item.split(",")) for item in args.shapes.split(";") if item.strip()]
            assert shapes and all(len(t) == 3 and min(t) > 0 for t in shapes)
        except (ValueError, AssertionError):
            sys.exit(f"error: --shapes: expected 'H,T,pairs;...' with positive integers, got {args.shapes!r}")
    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in LOSS_PROVIDERS]
    if bad:
        sys.exit(f"error: --providers: unknown {bad}, expected a subset of {LOSS_PROVIDERS}")
    notes = []
    if "liger" in providers:
        try:
            import liger_kernel  # noqa: F401
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
        except Exception as e:  # a peer: never required
            notes.append(f"liger skipped: {type(e).__name__}: {e}")
            providers.remove("liger")
    from nanoalign import native

    t_build = time.perf_counter()
    have_native = native.available()
    notes.append(f"native available: {have_native} (first use took {time.perf_counter() - t_build:.1f} s)")
    if not have_native and "native" in providers:
        providers.remove("native")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
            "git": _git_sha(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "native_tiles": list(native.tiles()) if have_native else None,
            "l2_per_cpu_bytes": native._l2_per_cpu()}
    try:
        import liger_kernel
        meta["liger"] = getattr(liger_kernel, "__version__", None) or _dist_version("liger-kernel")
    except Exception:
        pass
    print(f"# {meta}", flush=True)

    ops_pairs = None if not args.ops_pairs else {int(x) for x in args.ops_pairs.split(",") if x.strip()}
    load_start = _uptime()
    rows = []
    loads = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for H, T, P in shapes:
            ref_path = os.path.join(tmp, f"ref_{H}_{T}_{P}.pt")
            reference(H, T, P, ref_path)
            todo = list(providers) + (["ops"] if have_native and (ops_pairs is None or P in ops_pairs) else [])
            for p in list(todo):
                if estimate_mb(p, H, T, P) > 0.8 * mem_available_mb():
                    notes.append(f"{p} skipped at H={H} T={T} pairs={P}: needs ~{estimate_mb(p, H, T, P):.0f} MB")
                    todo.remove(p)
            samples = {p: [] for p in todo}
            for r in range(args.reps):
                order = todo[r % len(todo):] + todo[:r % len(todo)]
                for p in order:
                    res = run_child({"provider": p, "H": H, "T": T, "P": P, "ref": ref_path if r == 0 else None,
                                     "first": "native" if r % 2 == 0 else "torch_chunked"})
                    samples[p].append(res)
                    if "error" in res:
                        print(f"  {p} H={H} T={T} P={P} round {r}: {res['error']}", flush=True)
                loads.append(os.getloadavg()[0])
                print(f"  H={H} T={T} pairs={P} round {r + 1}/{args.reps} done "
                      f"({time.perf_counter() - t_all:.0f} s, load {loads[-1]:.1f})", flush=True)
            shape_rows = summarize(H, T, P, samples)
            for r in shape_rows:
                r["cpu"], r["load"] = meta["cpu"], statistics.median(loads[-args.reps:])
            rows += shape_rows
            rows += speedups(shape_rows)
            write_outputs(rows, meta, notes + [f"(partial: written after H={H} T={T} pairs={P})"], Path(args.out))
    notes.append(f"`uptime` before the rounds: {load_start}; after: {_uptime()}")
    notes.append(f"total wall time {time.perf_counter() - t_all:.0f} s; load average (1 min) during the rounds: "
                 f"median {statistics.median(loads):.1f}, max {max(loads):.1f} on {os.cpu_count()} CPUs "
                 "(other agents share the machine: prefer the ratios, measured side by side)")
    write_outputs(rows, meta, notes, Path(args.out))


def speedups(shape_rows):
    """native vs torch chunked at one shape: whole loss and op-level fwd+bwd (time ratio of the medians)."""
    get = {r["provider"]: r for r in shape_rows if r["status"] == "ok"}
    out = []
    for name, a, b in (("speedup_loss", "torch_chunked", "native"),
                       ("speedup_op", "op_torch_chunked_fwd+bwd", "op_native_fwd+bwd"),
                       ("speedup_loss_frozen", "torch_chunked_frozen", "native_frozen"),
                       ("speedup_op_frozen", "op_torch_chunked_frozen_fwd+bwd", "op_native_dh"),
                       ("speedup_op_dh", "op_native_frozen_fwd+bwd", "op_native_dh")):
        if a in get and b in get:
            r = {k: get[b][k] for k in ("H", "T", "pairs", "rows", "cpu", "load")}
            out.append(dict(r, provider=name, status="ok", n=get[b]["n"], speedup=get[a]["t_p50"] / get[b]["t_p50"]))
    return out


def summarize(H, T, P, samples):
    out = []
    n_rows = 2 * P * max(1, round(SCORED_FRACTION * T))
    for p, res in samples.items():
        ok = [r for r in res if "error" not in r]
        if not ok:
            out.append({"H": H, "T": T, "pairs": P, "rows": n_rows, "provider": p, "status": res[0]["error"]})
            continue
        if p != "ops":
            ts = [r["time"] for r in ok]
            first = next((r for r in ok if "grad_err" in r), {})
            out.append({"H": H, "T": T, "pairs": P, "rows": n_rows, "provider": p, "status": "ok", "n": len(ts),
                        "t_p20": pct(ts, .2), "t_p50": pct(ts, .5), "t_p80": pct(ts, .8),
                        "peak_mb": pct([r["peak_mb"] for r in ok], .5), "grad_rel_err": first.get("grad_err"),
                        "loss_abs_err": first.get("loss_err"), "ignored_grad": first.get("ignored_grad")})
            continue
        flop = 2.0 * ok[0]["rows"] * V * H  # one (N, H) @ (H, V)
        mm = [r["matmul"] for r in ok]
        mm_gflops = flop / pct(mm, .5) / 1e9
        out.append({"H": H, "T": T, "pairs": P, "rows": ok[0]["rows"], "provider": "op_matmul", "status": "ok",
                    "n": len(mm), "t_p20": pct(mm, .2), "t_p50": pct(mm, .5), "t_p80": pct(mm, .8),
                    "gflops": mm_gflops, "pct_of_matmul": 100.0, "flop": "2NVH"})
        cases = [(name, part, f) for name in ("native", "torch_chunked") for part, f in
                 (("fwd", 1), ("bwd", 3), ("fwd+bwd", 4))]  # f: FLOP in units of 2 N V H
        cases += [(name, "fwd+bwd", 3) for name in ("native_frozen", "torch_chunked_frozen")]
        cases += [(name, None, 2) for name in ("native_dh", "torch_dh")]
        for name, part, f in cases:
            if part is not None and name + "_fwd" not in ok[0] or part is None and name not in ok[0]:
                continue  # an older child without this case
            ts = [r[name] if part is None else r[name + "_fwd"] + r[name + "_bwd"] if part == "fwd+bwd"
                  else r[f"{name}_{part}"] for r in ok]
            gf = f * flop / pct(ts, .5) / 1e9
            out.append({"H": H, "T": T, "pairs": P, "rows": ok[0]["rows"], "status": "ok", "n": len(ts),
                        "provider": f"op_{name}" + (f"_{part}" if part else ""), "flop": f"{2 * f}NVH",
                        "t_p20": pct(ts, .2), "t_p50": pct(ts, .5), "t_p80": pct(ts, .8), "gflops": gf,
                        "pct_of_matmul": 100.0 * gf / mm_gflops})
    return out


FIELDS = ["H", "T", "pairs", "rows", "provider", "status", "n", "t_p20", "t_p50", "t_p80", "peak_mb",
          "grad_rel_err", "loss_abs_err", "ignored_grad", "flop", "gflops", "pct_of_matmul", "speedup", "cpu", "load"]
SPEEDUPS = {"speedup_loss": "native vs torch chunked, whole DPO loss",
            "speedup_op": "native vs torch chunked, row primitives fwd+bwd, op level",
            "speedup_loss_frozen": "frozen head: native vs torch chunked, whole DPO loss",
            "speedup_op_frozen": "frozen head: native fwd_dh + g*D vs torch chunked fwd + bwd, op level",
            "speedup_op_dh": "frozen head: native fwd_dh + g*D vs native fwd + bwd, op level"}


def _fmt(v, spec):
    return "" if v is None or v == "" else format(v, spec)


def write_outputs(rows, meta, notes, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "logprobs.csv", "w", newline="") as f:
        f.write(f"# bench/bench_logprobs.py {' '.join(sys.argv[1:])}; {json.dumps(meta)}\n")
        f.write("# peak_mb: VmHWM (reset before the call) minus VmRSS before the call, fresh process per sample\n")
        wr = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(r)
    lines = [f"# `python bench/bench_logprobs.py {' '.join(sys.argv[1:])}`", "", f"Run: {json.dumps(meta)}", "",
             "| CPU | load | H | T | pairs | rows | provider | p20 s | p50 s | p80 s | peak MB | grad rel err | FLOP "
             "| GFLOP/s | % matmul | native speedup |", "|---" * 16 + "|"]
    for r in rows:
        head = f"| {r.get('cpu', '')} | {_fmt(r.get('load'), '.1f')} | {r['H']} | {r['T']} | {r['pairs']} | {r['rows']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['provider']} | {r['status']} |||||||||")
        elif r["provider"].startswith("speedup"):
            lines.append(head + f"| {SPEEDUPS[r['provider']]} ||||||||| **{r['speedup']:.2f}x** |")
        else:
            lines.append(head + f"| {r['provider']} | {r['t_p20']:.3f} | {r['t_p50']:.3f} | {r['t_p80']:.3f} | "
                         f"{_fmt(r.get('peak_mb'), '.0f')} | {_fmt(r.get('grad_rel_err'), '.1e')} | "
                         f"{r.get('flop', '')} | {_fmt(r.get('gflops'), '.1f')} | "
                         f"{_fmt(r.get('pct_of_matmul'), '.0f')} | |")
    lines.append("")
    lines += ["- " + n for n in notes + targets(rows)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (out_dir / "logprobs.md").write_text(text)
    plot(rows, out_dir)


def targets(rows):
    """Issue 23's targets at every measured size: native >= 1.2x torch chunked (fwd+bwd) and the native op >= 85% of
    the machine's own matmul rate; issue 3's against the peers when they were measured (H=1024, T=3000, 4 pairs)."""
    get = {(r["H"], r["T"], r["pairs"], r["provider"]): r for r in rows if r["status"] == "ok"}
    out = []
    for (H, T, P, prov), r in sorted(get.items()):
        if prov == "speedup_loss":
            out.append(f"target native >= 1.2x torch chunked, whole loss, H={H} T={T} pairs={P}: {r['speedup']:.2f}x "
                       f"-> {'MET' if r['speedup'] >= 1.2 else 'NOT met'}")
        if prov == "speedup_op":
            out.append(f"target native >= 1.2x torch chunked, row primitives fwd+bwd, H={H} T={T} pairs={P}: "
                       f"{r['speedup']:.2f}x -> {'MET' if r['speedup'] >= 1.2 else 'NOT met'}")
        if prov in ("speedup_loss_frozen", "speedup_op_frozen", "speedup_op_dh"):
            out.append(f"{SPEEDUPS[prov]}, H={H} T={T} pairs={P}: {r['speedup']:.2f}x")
        if prov == "op_native_fwd+bwd":
            out.append(f"target native >= 85% of matmul, H={H} T={T} pairs={P}: {r['gflops']:.1f} GFLOP/s = "
                       f"{r['pct_of_matmul']:.0f}% -> {'MET' if r['pct_of_matmul'] >= 85 else 'NOT met'}")
    key = (1024, 3000, 4)
    ours = get.get(key + ("native",))
    for peer_name, mem_lim in (("naive", 10), ("liger", 2)):
        peer = get.get(key + (peer_name,))
        if ours is None or peer is None:
            continue
        m, t = peer["peak_mb"] / max(ours["peak_mb"], 1e-9), peer["t_p50"] / ours["t_p50"]
        out.append(f"target memory <= 1/{mem_lim} of {peer_name}: {ours['peak_mb']:.0f} vs {peer['peak_mb']:.0f} MB "
                   f"({m:.1f}x less) -> {'MET' if m >= mem_lim else 'NOT met'}")
        out.append(f"target time <= 1/5 of {peer_name}: {ours['t_p50']:.2f} vs {peer['t_p50']:.2f} s ({t:.1f}x faster)"
                   f" -> {'MET' if t >= 5 else 'NOT met'}")
    for (H, T, P, prov), r in sorted(get.items()):
        if prov == "native" and r.get("grad_rel_err") is not None:
            out.append(f"target fp32 grad rel err <= 1e-5, pairs={P}: {r['grad_rel_err']:.1e} -> "
                       f"{'MET' if r['grad_rel_err'] <= 1e-5 else 'NOT met'}")
    return out


def plot(rows, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("- plot skipped: matplotlib not installed")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ok = [r for r in rows if r["status"] == "ok"]
    for ax, col, label in ((axes[0], "t_p50", "forward+backward time, p50 (s)"),
                           (axes[1], "peak_mb", "peak memory (MB)")):
        for key in sorted({(r["H"], r["T"]) for r in ok}):
            for p in LOSS_PROVIDERS:
                pts = sorted((r["pairs"], r[col]) for r in ok if r["provider"] == p and (r["H"], r["T"]) == key)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{p} H={key[0]} T={key[1]}")
        ax.set_xlabel("pairs")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=.3)
    axes[0].legend(fontsize=7)
    ops_rows = [r for r in ok if r["provider"].startswith("op_") and not r["provider"].endswith(("_fwd", "_bwd"))]
    ok = [r for r in ok if not r["provider"].startswith("speedup")]
    labels = [f"{r['provider'][3:]}\nH={r['H']} T={r['T']} P={r['pairs']}" for r in ops_rows]
    axes[2].bar(range(len(ops_rows)), [r["gflops"] for r in ops_rows], color="tab:blue")
    axes[2].set_xticks(range(len(ops_rows)), labels, fontsize=6, rotation=60)
    axes[2].set_ylabel("GFLOP/s (scored rows)")
    axes[2].set_title("row primitive vs plain matmul", fontsize=9)
    cpu = next((r["cpu"] for r in rows if r.get("cpu")), _cpu_name())
    fig.suptitle(f"DPO loss fwd+bwd on CPU ({cpu}), V={V}, fp32, 95% of positions ignored", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "logprobs.png", dpi=120)
    plt.close(fig)


def _cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()


def _git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "none"
    except OSError:
        return "none"


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
