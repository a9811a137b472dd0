"""Token log-probs and preference losses without materializing [B, T, V] logits.

Public entry points (the caller never chooses a backend):
    token_logprobs(hidden (B,T,H), weight (V,H), labels (B,T)) -> (B,T) fp32 log p(label), 0 where label == -100
    preference_loss(hidden, weight, labels, token_weights, ref_logps, loss_type, beta, ...) -> (loss, metrics)

Both gather the scored rows (labels != -100) first and hand them to the row primitive of CONTRACT.md:
    logprob_rows_fwd(h (N,H), w (V,H), y (N,)) -> (logp (N,) fp32, lse (N,) fp32)
    logprob_rows_bwd(h, w, y, lse, g (N,) = dL/dlogp) -> (grad_h (N,H) h.dtype, grad_w (V,H) w.dtype)
and, for a frozen LM head (LoRA: weight needs no grad while hidden does), the forward that also returns dlogp/dh:
    logprob_rows_fwd_dh(h, w, y) -> (logp, lse, D (N,H) h.dtype), grad_h = g[:, None] * D (2 GEMMs, not 3)
dispatched by device: CUDA -> Triton (nanoalign.kernels.logprobs); CPU -> the faster of native C++ (nanoalign.native)
and the pure-torch chunked path below, measured once per machine, build and thread count and cached beside the
native build (see _cpu_choice; the torch path with a one-line warning when the native op does not build).
NANOALIGN_LOGPROBS_BACKEND=torch|native|triton forces a backend; NANOALIGN_LOGPROBS_AUTOTUNE=0 skips the measurement.
"""
import json
import os
import statistics
import sys
import time
import types
import warnings

import torch

from nanoalign import losses as L

IGNORE_INDEX = -100
BLOCK_ROWS = 256  # rows of the torch chunked path's (rows, V-block) tile
BLOCK_V = 4096  # vocabulary block: a tile is 256 x 4096 fp32 = 4 MiB

# ----------------------------------------------------------------------------- reference (full logits)


def logprob_rows_ref(h, w, y):
    """Plain full-logits reference: (N,H), (V,H), (N,) -> logp (N,). Computes in float64 if h or w is float64, else
    float32. Differentiable by autograd (the tests use it as the float64 ground truth)."""
    dt = torch.float64 if torch.float64 in (h.dtype, w.dtype) else torch.float32
    logits = h.to(dt) @ w.to(dt).T  # (N, V)
    return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


# ----------------------------------------------------------------------------- pure-torch chunked path


@torch.autocast("cpu", enabled=False)  # fp32 accumulation even inside --amp's autocast region
@torch.autocast("cuda", enabled=False)
def logprob_rows_fwd_torch(h, w, y, block_rows=BLOCK_ROWS, block_v=BLOCK_V):
    """Chunked forward: online log-sum-exp over V blocks in fp32; holds one (block_rows, block_v) tile at a time."""
    N, V = h.shape[0], w.shape[0]
    hf = h.float()  # (N, H)
    m = torch.full((N,), float("-inf"), device=h.device)  # running max
    s = torch.zeros(N, device=h.device)  # running sum of exp(logit - m)
    for v0 in range(0, V, block_v):
        wb = w[v0:v0 + block_v].float()  # (bv, H)
        for r0 in range(0, N, block_rows):
            logits = hf[r0:r0 + block_rows] @ wb.T  # (br, bv)
            mb, sb = m[r0:r0 + block_rows], s[r0:r0 + block_rows]
            m_new = torch.maximum(mb, logits.amax(1))
            # m is finite after the first block for finite inputs; the where() guards -inf - -inf anyway
            scale = torch.where(torch.isinf(mb), 0.0, torch.exp(mb - m_new))
            s[r0:r0 + block_rows] = sb * scale + logits.sub_(m_new[:, None]).exp_().sum(1)
            m[r0:r0 + block_rows] = m_new
    lse = m + torch.log(s)  # (N,)
    target = (hf * w.index_select(0, y).float()).sum(1)  # (N,) logit of the label
    return target - lse, lse


@torch.autocast("cpu", enabled=False)  # fp32 accumulation even inside --amp's autocast region
@torch.autocast("cuda", enabled=False)
def logprob_rows_bwd_torch(h, w, y, lse, g, block_rows=BLOCK_ROWS, block_v=BLOCK_V, need_grad_w=True):
    """Chunked backward, recomputing the logit tiles:
        grad_logits = g[n] (1[v == y_n] - exp(logit - lse_n));  grad_h = grad_logits @ w;  grad_w = grad_logits.T @ h
    fp32 accumulation; returns grads in h.dtype / w.dtype. need_grad_w=False (frozen LM head, e.g. LoRA) skips the
    grad_w matmul (a third of the FLOPs) and returns None for it."""
    N, V = h.shape[0], w.shape[0]
    hf, g = h.float(), g.float()
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)  # (N, H)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad_w else None  # (V, H)
    if N == 0:
        return grad_h.to(h.dtype), (grad_w.to(w.dtype) if need_grad_w else None)
    for v0 in range(0, V, block_v):
        wb = w[v0:v0 + block_v].float()  # (bv, H)
        for r0 in range(0, N, block_rows):
            hb = hf[r0:r0 + block_rows]  # (br, H)
            # softmax part of grad_logits: -g p  (br, bv)
            gl = (hb @ wb.T).sub_(lse[r0:r0 + block_rows, None]).exp_().mul_(-g[r0:r0 + block_rows, None])
            grad_h[r0:r0 + block_rows].addmm_(gl, wb)
            if need_grad_w:
                grad_w[v0:v0 + block_v].addmm_(gl.T, hb)
    # one-hot part: + g_n at (n, y_n)
    grad_h += g[:, None] * w.index_select(0, y).float()
    if not need_grad_w:
        return grad_h.to(h.dtype), None
    grad_w.index_add_(0, y, g[:, None] * hf)
    return grad_h.to(h.dtype), grad_w.to(w.dtype)


@torch.autocast("cpu", enabled=False)  # fp32 accumulation even inside --amp's autocast region
@torch.autocast("cuda", enabled=False)
def logprob_rows_fwd_dh_torch(h, w, y, block_rows=None, block_v=BLOCK_V):
    """Frozen-LM-head forward, the pure-torch reference of csrc's logprob_rows_fwd_dh: (logp (N,) fp32, lse (N,)
    fp32, D (N,H) h.dtype) with D[n] = dlogp[n]/dh[n] = w[y[n]] - softmax(h[n] w^T) @ w, so that grad_h of
    sum(g * logp) is g[:, None] * D. Chunks of block_rows rows with a full-V softmax each (default: as many rows as
    keep the (rows, V) fp32 probabilities at 16 MiB, 8 to 256); a non-fp32 w is converted block_v rows at a time."""
    N, V = h.shape[0], w.shape[0]
    if block_rows is None:
        block_rows = max(8, min(BLOCK_ROWS, BLOCK_ROWS * BLOCK_V * 4 // V))
    hf = h.float()  # (N, H)
    blocks = [(0, w)] if w.dtype == torch.float32 else [(v0, w[v0:v0 + block_v]) for v0 in range(0, V, block_v)]
    logp, lse = torch.empty(N, device=h.device), torch.empty(N, device=h.device)
    D = w.index_select(0, y).float()  # (N, H) w[y], minus E_p[w] below
    for r0 in range(0, N, block_rows):
        r1 = min(N, r0 + block_rows)
        logits = torch.cat([hf[r0:r1] @ wb.float().T for _, wb in blocks], 1)  # (br, V)
        lse[r0:r1] = torch.logsumexp(logits, 1)
        logp[r0:r1] = logits.gather(1, y[r0:r1, None])[:, 0] - lse[r0:r1]
        p = logits.sub_(lse[r0:r1, None]).exp_()  # (br, V) softmax
        for v0, wb in blocks:
            D[r0:r1].addmm_(p[:, v0:v0 + wb.shape[0]], wb.float(), alpha=-1)
    return logp, lse, D.to(h.dtype)


# ----------------------------------------------------------------------------- dispatch

_BACKENDS = ("torch", "native", "triton")
_warned_fallback = False


def _native_module():
    """nanoalign.native if it imports and its op builds, else (None, reason)."""
    try:
        from nanoalign import native
    except Exception as e:  # the module may not exist yet, or fail to import
        return None, f"nanoalign.native not importable ({type(e).__name__}: {e})"
    try:
        if native.available():
            return native, ""
        info = native.build_info() if hasattr(native, "build_info") else {}
        return None, f"the native op did not build ({info.get('error') or 'no reason given'})"
    except Exception as e:
        return None, f"nanoalign.native.available() failed ({type(e).__name__}: {e})"


def _backend(device):
    """Module exposing logprob_rows_fwd / logprob_rows_bwd for this device (see the module docstring)."""
    global _warned_fallback
    forced = os.environ.get("NANOALIGN_LOGPROBS_BACKEND", "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(f"NANOALIGN_LOGPROBS_BACKEND: unknown {forced!r}, expected one of {_BACKENDS}")
    if forced == "triton" or (not forced and device.type == "cuda"):
        from nanoalign.kernels import logprobs as triton_logprobs
        return triton_logprobs
    if forced == "torch":
        return _TORCH
    native, reason = _native_module()
    if native is not None:
        return native if forced == "native" or _cpu_choice(native) == "native" else _TORCH
    if forced == "native":
        raise RuntimeError(f"NANOALIGN_LOGPROBS_BACKEND=native but {reason}")
    if not _warned_fallback:
        warnings.warn(f"nanoalign.ops: {reason}; using the slower pure-torch chunked log-prob path", stacklevel=3)
        _warned_fallback = True
    return _TORCH


# The CPU default is whichever row primitive is faster on this machine: the native op won 1.6-2.4x on one 2-core
# machine and lost 10-20% on another. Measured once per (build, thread count) -- native vs torch chunked,
# forward + backward, interleaved rounds, median -- and cached as JSON beside the native build (its folder is keyed
# by source, torch, flags and CPU, so a new CPU or source measures again). NANOALIGN_LOGPROBS_AUTOTUNE=0 skips
# the measurement (native); NANOALIGN_LOGPROBS_BACKEND still forces a backend.
_CHOICE_SHAPE = (256, 1024, 8192)  # rows, hidden, vocabulary: 2 vocabulary blocks of the torch path, 17 GFLOP a round
_CHOICE_ROUNDS = 5
_CHOICE_BUDGET_S = 8.0  # stop early (after >= 3 rounds) on a loaded machine
_cpu_choices: dict = {}  # thread count -> "native" | "torch", for this process


def _choice_path(native):
    return native.build_dir() / f"backend-{torch.get_num_threads()}threads.json"


def _cpu_choice(native):
    """'native' or 'torch': the faster CPU row primitive here, from the cache beside the build or measured once."""
    threads = torch.get_num_threads()
    if threads in _cpu_choices:
        return _cpu_choices[threads]
    if os.environ.get("NANOALIGN_LOGPROBS_AUTOTUNE", "1").strip() == "0":
        _cpu_choices[threads] = "native"
        return "native"
    path = _choice_path(native)
    try:
        saved = json.loads(path.read_text())
        if saved.get("backend") in ("native", "torch"):
            _cpu_choices[threads] = saved["backend"]
            return saved["backend"]
    except (OSError, ValueError, AttributeError):
        pass  # not measured yet here (or an unreadable file): measure
    try:
        times = _measure_cpu_backends(_choice_fns(native))
    except Exception as e:  # noqa: BLE001 - a failed measurement must not stop training: keep the native default
        warnings.warn(f"nanoalign.ops: could not compare the log-prob backends ({type(e).__name__}: {e}); "
                      "using native", stacklevel=4)
        _cpu_choices[threads] = "native"
        return "native"
    choice = "native" if times["native"] <= times["torch"] else "torch"
    fast, slow = sorted((times["native"], times["torch"]))
    ratio = slow / max(fast, 1e-12)
    record = {"backend": choice, "native_s": times["native"], "torch_s": times["torch"], "threads": threads,
              "rounds": times["rounds"], "shape_rows_hidden_vocab": list(_CHOICE_SHAPE),
              "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
        where = f"cached at {path}"
    except OSError as e:
        where = f"not cached: {e}"
    other = "torch chunked" if choice == "native" else "native"
    print(f"logprobs backend: {choice if choice == 'native' else 'torch chunked'} ({ratio:.2f}x faster than {other} "
          f"here, {threads} threads, measured once, {where}; NANOALIGN_LOGPROBS_BACKEND=torch|native forces one)",
          file=sys.stderr, flush=True)
    _cpu_choices[threads] = choice
    return choice


def _choice_fns(native):
    """forward + backward of each CPU row primitive at _CHOICE_SHAPE on fixed random rows."""
    n, hdim, v = _CHOICE_SHAPE
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hdim, generator=gen)
    w = torch.randn(v, hdim, generator=gen) / hdim**0.5
    y = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)

    def run(mod):
        def fwd_bwd():
            _, lse = mod.logprob_rows_fwd(h, w, y)
            mod.logprob_rows_bwd(h, w, y, lse, g)
        return fwd_bwd
    return {"native": run(native), "torch": run(_TORCH)}


def _measure_cpu_backends(fns, rounds=None, budget_s=None, clock=time.perf_counter):
    """Median seconds of each callable over interleaved rounds (order alternating), after one untimed warm-up each.
    Stops after `budget_s` once 3 rounds are done. Returns {name: median_s, ..., "rounds": k}."""
    rounds = _CHOICE_ROUNDS if rounds is None else rounds
    budget_s = _CHOICE_BUDGET_S if budget_s is None else budget_s
    names = list(fns)
    for name in names:
        fns[name]()
    times = {name: [] for name in names}
    start = clock()
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
        if r >= 2 and clock() - start > budget_s:
            break
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["rounds"] = len(times[names[0]])
    return out


_TORCH = types.SimpleNamespace(logprob_rows_fwd=logprob_rows_fwd_torch, logprob_rows_bwd=logprob_rows_bwd_torch,
                               logprob_rows_fwd_dh=logprob_rows_fwd_dh_torch)


def logprob_rows_fwd(h, w, y):
    """Dispatched row primitive (forward); N == 0 handled here."""
    if h.shape[0] == 0:
        z = torch.zeros(0, dtype=torch.float32, device=h.device)
        return z, z.clone()
    return _backend(h.device).logprob_rows_fwd(h.contiguous(), w.contiguous(), y.contiguous())


def logprob_rows_bwd(h, w, y, lse, g, need_grad_w=True):
    """Dispatched row primitive (backward); N == 0 -> zero grads. need_grad_w=False returns None for grad_w (the
    torch and native paths then skip its matmul; the Triton kernel always computes it)."""
    if h.shape[0] == 0:
        return torch.zeros_like(h), (torch.zeros_like(w) if need_grad_w else None)
    args = (h.contiguous(), w.contiguous(), y.contiguous(), lse.contiguous(), g.float().contiguous())
    backend = _backend(h.device)
    if backend is _TORCH:
        return logprob_rows_bwd_torch(*args, need_grad_w=need_grad_w)
    if backend is not _TORCH and getattr(backend, "__name__", "") == "nanoalign.native":
        return backend.logprob_rows_bwd(*args, need_grad_w=need_grad_w)  # skips the grad_w GEMM when frozen
    gh, gw = backend.logprob_rows_bwd(*args)
    return gh, (gw if need_grad_w else None)


def _fwd_dh_fn(device):
    """The chosen backend's frozen-head forward (native op or torch twin), None where it has none (Triton: the
    callers keep today's forward + backward there)."""
    return getattr(_backend(device), "logprob_rows_fwd_dh", None)


def logprob_rows_fwd_dh(h, w, y):
    """Dispatched frozen-LM-head forward: (logp (N,) fp32, lse (N,) fp32, D (N,H) h.dtype = dlogp/dh); the
    gradient of sum(g * logp) w.r.t. h is g[:, None] * D. A backend without the op (Triton) runs its forward and
    a backward with g = 1 (need_grad_w=False) instead. N == 0 handled here."""
    if h.shape[0] == 0:
        z = torch.zeros(0, dtype=torch.float32, device=h.device)
        return z, z.clone(), torch.zeros_like(h)
    args = (h.contiguous(), w.contiguous(), y.contiguous())
    fn = _fwd_dh_fn(h.device)
    if fn is not None:
        return fn(*args)
    logp, lse = logprob_rows_fwd(*args)
    return logp, lse, logprob_rows_bwd(*args, lse, torch.ones_like(lse), need_grad_w=False)[0]


def _frozen_head(ctx, grad_enabled, device):
    """True when hidden needs a gradient and the LM head does not (LoRA), and the backend has a frozen-head
    forward: the caller then takes D = dlogp/dh from logprob_rows_fwd_dh instead of running logprob_rows_bwd.
    grad_enabled is torch.is_grad_enabled() outside the Function (inside forward grad mode is always off, and
    ctx.needs_input_grad ignores it)."""
    return bool(grad_enabled and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
                and _fwd_dh_fn(device) is not None)


# ----------------------------------------------------------------------------- validation


def _check_inputs(hidden, weight, labels):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden: expected a float tensor (B, T, H), got {_describe(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight: expected a float tensor (V, H), got {_describe(weight)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor (B, T), got {_describe(labels)}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} != hidden's (B, T) {tuple(hidden.shape[:2])}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight: hidden size {weight.shape[1]} does not match hidden's H = {hidden.shape[2]}")
    if weight.device != hidden.device or labels.device != hidden.device:
        raise ValueError(f"weight/labels: devices {weight.device}/{labels.device} differ from hidden's {hidden.device}")
    V = weight.shape[0]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels: value {int(labels[bad][0])} outside [0, {V}) and not {IGNORE_INDEX}")


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# ----------------------------------------------------------------------------- token_logprobs


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, grad_enabled):
        B, T, H = hidden.shape
        flat = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) scored positions in B*T
        h = hidden.reshape(-1, H).index_select(0, flat)  # (N, H)
        y = labels.reshape(-1).index_select(0, flat).long()  # (N,)
        ctx.frozen_head = _frozen_head(ctx, grad_enabled, hidden.device)
        if ctx.frozen_head:  # frozen LM head: D = dlogp/dh now, the backward is g * D (no logits recomputed)
            logp, _, D = logprob_rows_fwd_dh(h, weight, y)
            ctx.save_for_backward(D, flat)
        else:
            logp, lse = logprob_rows_fwd(h, weight, y)
            ctx.save_for_backward(h, weight, y, lse, flat)
        out = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
        out[flat] = logp
        ctx.hidden_shape = hidden.shape
        return out.view(B, T)

    @staticmethod
    def backward(ctx, grad_out):
        B, T, H = ctx.hidden_shape
        if ctx.frozen_head:
            D, flat = ctx.saved_tensors
            g = grad_out.reshape(-1).index_select(0, flat).float()  # (N,) dL/dlogp
            gh, gw = (g[:, None] * D.float()).to(D.dtype), None
        else:
            h, weight, y, lse, flat = ctx.saved_tensors
            g = grad_out.reshape(-1).index_select(0, flat).float()  # (N,) dL/dlogp
            gh, gw = logprob_rows_bwd(h, weight, y, lse, g, need_grad_w=ctx.needs_input_grad[1])
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.zeros(B * T, H, dtype=gh.dtype, device=gh.device)
            grad_hidden[flat] = gh
            grad_hidden = grad_hidden.view(B, T, H)
        return grad_hidden, (gw if ctx.needs_input_grad[1] else None), None, None


def token_logprobs(hidden, weight, labels):
    """log p(labels) from final hidden states and the LM head, never materializing (B, T, V).

    hidden (B, T, H) any float dtype; weight (V, H) the LM head; labels (B, T) int64, -100 = not scored (already
    shifted: labels[b, t] is the token predicted from hidden[b, t]). Returns (B, T) float32, 0 at unscored positions.
    Differentiable w.r.t. hidden and weight (grads in their dtypes). Only rows with a label are projected. With
    the weight frozen (LoRA: hidden requires grad, weight does not) the forward also returns dlogp/dh from
    logprob_rows_fwd_dh and the backward only scales it: 2 matmuls over the logits instead of 3.
    """
    _check_inputs(hidden, weight, labels)
    return _TokenLogprobs.apply(hidden, weight, labels, torch.is_grad_enabled())


# ----------------------------------------------------------------------------- preference_loss


def _check_pref_inputs(hidden, weight, labels, token_weights, ref_logps, loss_type, beta, sft_weight):
    _check_inputs(hidden, weight, labels)
    if hidden.shape[0] == 0 or hidden.shape[0] % 2:
        raise ValueError(f"hidden: batch {hidden.shape[0]} is not a positive even number; expected 2P rows "
                         "(chosen [0:P], rejected [P:2P])")
    if loss_type not in L.LOSS_TYPES:
        raise ValueError(f"loss_type: unknown {loss_type!r}, expected one of {L.LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    if not sft_weight >= 0:
        raise ValueError(f"sft_weight: must be >= 0, got {sft_weight}")
    for name, x in (("token_weights", token_weights), ("ref_logps", ref_logps)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(labels.shape):
            raise ValueError(f"{name}: expected shape {tuple(labels.shape)} like labels, got {_describe(x)}")
        if x.device != labels.device:
            raise ValueError(f"{name}: on {x.device}, expected {labels.device} like labels")
        scored = x[labels != IGNORE_INDEX]
        if bool(torch.isnan(scored).any()):
            raise ValueError(f"{name}: contains NaN at a scored position")
        if name == "token_weights" and bool((scored < 0).any() or torch.isinf(scored).any()):
            raise ValueError("token_weights: must be finite and >= 0 at scored positions")
        if name == "ref_logps" and bool(torch.isinf(scored).any()):
            raise ValueError("ref_logps: contains inf at a scored position")


class _FusedPreferenceLoss(torch.autograd.Function):
    """Forward computes the loss AND both gradients in one pass over the scored rows, per chunk of pairs (a pair's
    loss depends only on that pair); backward only scales the stored gradients by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, ref_logps, loss_type, beta, average, sft_weight,
                chunk_pairs, grad_enabled):
        B, T, H = hidden.shape
        P = B // 2
        dev = hidden.device
        flat = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) scored positions
        row = torch.div(flat, T, rounding_mode="floor")  # (N,) row in [0, 2P)
        pair = row % P
        y = labels.reshape(-1).index_select(0, flat).long()  # (N,)
        # Sequence scores, rho and their gradients are (2P,)-sized: kept in float64, so summing thousands of
        # fp32 token log-probs does not cost the 1e-5 relative gradient accuracy the rows themselves reach.
        f64 = torch.float64
        w_tok = token_weights.reshape(-1).index_select(0, flat).to(f64)  # (N,)
        ref_tok = ref_logps.reshape(-1).index_select(0, flat).to(f64)  # (N,)
        den = torch.zeros(B, device=dev, dtype=f64).index_add_(0, row, w_tok)  # (2P,) sum of weights
        n_tok = torch.bincount(row, minlength=B).to(f64)  # (2P,)
        ref = torch.zeros(B, device=dev, dtype=f64).index_add_(0, row, w_tok * ref_tok)  # (2P,)
        if average:
            ref = torch.where(den > 0, ref / den.clamp_min(1e-30), torch.zeros_like(ref))
        hidden_rows = hidden.reshape(-1, H)
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        frozen = need_grad and _frozen_head(ctx, grad_enabled, dev)  # LoRA: grad_hidden = g * D from the forward
        grad_hidden = torch.zeros_like(hidden_rows) if need_grad else None  # (2P*T, H)
        grad_weight = None  # (V, H) fp32 accumulator over chunks
        pol = torch.zeros(B, device=dev, dtype=f64)  # (2P,) policy scores
        loss_pairs, sft_nll = torch.zeros(P, device=dev, dtype=f64), torch.zeros(P, device=dev, dtype=f64)
        step = P if chunk_pairs is None else max(1, int(chunk_pairs))
        for p0 in range(0, P, step):
            p1 = min(P, p0 + step)
            c, rej = slice(p0, p1), slice(P + p0, P + p1)
            tok = ((pair >= p0) & (pair < p1)).nonzero().squeeze(1)  # (n,) this chunk's tokens
            r = row[tok]  # (n,)
            h = hidden_rows.index_select(0, flat[tok])  # (n, H)
            if frozen:
                logp, lse, D = logprob_rows_fwd_dh(h, weight, y[tok])  # (n,), (n,), (n, H) dlogp/dh
            else:
                logp, lse = logprob_rows_fwd(h, weight, y[tok])  # (n,), (n,)
            pol.index_add_(0, r, w_tok[tok] * logp.to(f64))
            if average:
                for s in (c, rej):
                    pol[s] = torch.where(den[s] > 0, pol[s] / den[s].clamp_min(1e-30), 0.0)
            logp_sum = torch.zeros(B, device=dev, dtype=f64).index_add_(0, r, logp.to(f64))  # (2P,)
            sft_nll[c] = -logp_sum[c] / n_tok[c].clamp_min(1)
            rho = (pol[c] - ref[c]) - (pol[rej] - ref[rej])  # (c,)
            loss_pairs[c] = L.pair_losses(loss_type, rho, beta)
            if not need_grad or tok.numel() == 0:
                continue
            dm = L.loss_grad(loss_type, rho, beta) / P  # (c,) dL/drho, L = mean over pairs
            dscore = torch.zeros(B, device=dev, dtype=f64)  # (2P,) dL/ds
            dscore[c], dscore[rej] = dm, -dm
            if average:  # s = num / den: ds/dnum = 1/den (0 for an empty row)
                dscore = torch.where(den > 0, dscore / den.clamp_min(1e-30), 0.0)
            g = dscore[r] * w_tok[tok]  # (n,) dL/dlogp (float64; the row primitive takes it as fp32)
            if sft_weight:
                g = g + torch.where(r < P, -sft_weight / (P * n_tok[r].clamp_min(1)), 0.0)
            if frozen:
                grad_hidden[flat[tok]] = (g.float()[:, None] * D.float()).to(grad_hidden.dtype)
                continue
            gh, gw = logprob_rows_bwd(h, weight, y[tok], lse, g, need_grad_w=ctx.needs_input_grad[1])
            grad_hidden[flat[tok]] = gh
            if gw is not None:
                grad_weight = gw.float() if grad_weight is None else grad_weight.add_(gw)
        # stored as plain attributes, not save_for_backward: backward drops its reference before returning them,
        # so autograd can move them into .grad instead of copying (V, H) and (2P, T, H) once more
        ctx.grads = None
        if need_grad:
            if grad_weight is None and ctx.needs_input_grad[1]:
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
            ctx.grads = [grad_hidden.view(B, T, H), None if grad_weight is None else grad_weight.to(weight.dtype)]
        loss = (loss_pairs.mean() + sft_weight * sft_nll.mean()).float()
        stats = torch.stack([pol[:P], pol[P:], ref[:P], ref[P:], sft_nll, loss_pairs], dim=1).float()  # (P, 6)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.grads is None:
            raise RuntimeError("preference_loss: backward called twice (retain_graph is not supported by the fused "
                               "path; use fused=False)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if not bool(grad_loss == 1):  # in place: these buffers are ours
            grad_hidden.mul_(grad_loss)
            if grad_weight is not None:
                grad_weight.mul_(grad_loss)
        grad_hidden = grad_hidden if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def preference_loss(hidden, weight, labels, token_weights, ref_logps, loss_type="dpo", beta=0.1, average=False,
                    sft_weight=0.0, fused=True, chunk_pairs=None):
    """Preference loss of a batch of pairs straight from hidden states, never materializing (B, T, V) logits.

    Batch layout: P pairs stacked as chosen rows [0:P] and rejected rows [P:2P] of a (2P, T, H) batch; row i and
    row P+i are the same prompt.
      hidden (2P, T, H) policy final hidden states (any float dtype); weight (V, H) LM head;
      labels (2P, T) int64 with -100 where not scored (prompt, image, padding), already shifted;
      token_weights (2P, T) float or None (= 1): DDPO puts gamma on corrected tokens and 1 elsewhere;
      ref_logps (2P, T) per-token reference log-probs (from a cache or a reference forward; not differentiated),
        or None = no reference (s_ref = 0: SLiC-HF's original reference-free calibration);
      loss_type "dpo" | "ipo" | "slic" (formulas and papers in nanoalign/losses.py; DDPO is "dpo" with
        token_weights carrying gamma, RLHF-V's weighted scores);
      beta > 0; average: s = sum(w logp) / sum(w) (RLHF-V's 1/N, TRL's IPO) instead of sum(w logp);
      sft_weight >= 0: adds sft_weight * mean over pairs of the chosen response's token-mean NLL (unweighted);
      fused: True = loss and gradients in one pass (see _FusedPreferenceLoss), False = token_logprobs + autograd
        (the reference path); chunk_pairs: pairs per fused chunk (None = all; the row primitive already bounds
        memory to one tile, so chunking only bounds the gathered rows). With the weight frozen (LoRA) the fused
        forward takes grad_hidden = g * dlogp/dh from logprob_rows_fwd_dh: no backward primitive runs.
    Scores: s = sum_t w_t logp_t over scored tokens for policy and reference alike; rho = (s_pi(c) - s_ref(c)) -
    (s_pi(r) - s_ref(r)); loss = mean over pairs of L(rho) (+ SFT term).
    Returns (loss: fp32 scalar, metrics: dict of detached (P,) tensors reward_chosen, reward_rejected, margin
    (= beta rho, under its logged name), accuracy, logp_chosen, logp_rejected (policy scores), ref_chosen,
    ref_rejected, pair_loss, sft_nll).
    """
    if token_weights is None:
        token_weights = torch.ones(labels.shape, device=labels.device)
    if ref_logps is None:
        ref_logps = torch.zeros(labels.shape, device=labels.device)
    _check_pref_inputs(hidden, weight, labels, token_weights, ref_logps, loss_type, beta, sft_weight)
    if fused:
        loss, stats = _FusedPreferenceLoss.apply(hidden, weight, labels, token_weights, ref_logps, loss_type,
                                                 float(beta), bool(average), float(sft_weight), chunk_pairs,
                                                 torch.is_grad_enabled())
        pc, pr, rc, rr, nll, pair_loss = stats.unbind(1)
    else:
        loss, (pc, pr, rc, rr, nll, pair_loss) = _unfused(hidden, weight, labels, token_weights, ref_logps,
                                                           loss_type, beta, average, sft_weight)
    metrics = L.preference_metrics(pc, pr, rc, rr, beta)
    metrics.update(ref_chosen=rc.detach(), ref_rejected=rr.detach(), pair_loss=pair_loss.detach(),
                   sft_nll=nll.detach())
    return loss, metrics


def _unfused(hidden, weight, labels, token_weights, ref_logps, loss_type, beta, average, sft_weight):
    """Reference path: per-token log-probs through autograd, then the formulas of losses.py."""
    P = hidden.shape[0] // 2
    mask = labels != IGNORE_INDEX  # (2P, T)
    logp = token_logprobs(hidden, weight, labels)  # (2P, T)
    pol = L.sequence_scores(logp, mask, token_weights, average)  # (2P,)
    ref = L.sequence_scores(ref_logps.detach(), mask, token_weights, average)
    rho = (pol[:P] - ref[:P]) - (pol[P:] - ref[P:])  # (P,)
    pair_loss = L.pair_losses(loss_type, rho, beta)
    n_c = mask[:P].sum(1).clamp_min(1)
    nll = -(logp[:P] * mask[:P]).sum(1) / n_c  # (P,)
    loss = pair_loss.mean() + sft_weight * nll.mean()
    return loss, (pol[:P], pol[P:], ref[:P], ref[P:], nll, pair_loss)
