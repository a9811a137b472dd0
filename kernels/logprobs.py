"""Triton kernels for per-row log-probs under a big LM head, never materializing the (N, V) logits.

The primitive of CONTRACT.md ("Low-level log-prob primitive"). Rows are the already-gathered scored positions.

    logits = h @ w.T                                  # (N, V), only ever a (BLOCK_N, BLOCK_V) tile of it
    lse[n]  = logsumexp_v logits[n, v]                 # online over vocabulary blocks, fp32
    logp[n] = logits[n, y[n]] - lse[n]
    backward, with g = dL/dlogp (N,):
    dlogits[n, v] = g[n] * (1[v == y[n]] - exp(logits[n, v] - lse[n]))
    grad_h = dlogits @ w                               # (N, H)
    grad_w = dlogits.T @ h                             # (V, H)

FLOP count per call: forward 2*N*V*H (one pass over the logit tiles); backward 6*N*V*H (recompute the logit tiles
2*N*V*H, then grad_h and grad_w 2*N*V*H each). Memory: the inputs, (N,) lse and, in backward, fp32 gradient buffers.

Design (everything, launchers included, runs under TRITON_INTERPRET=1 on CPU tensors; the only GPU-only line is the
split_v heuristic in _launch_params, and tests compile the bf16 GPU branch for sm_80 without a GPU):
- Grid (row blocks, V splits). Each program owns BLOCK_N rows and a contiguous range of V blocks; a logit tile is
  accumulated over H in BLOCK_H chunks with tl.dot in fp32. With several V splits the forward writes one partial
  log-sum-exp and target logit per split, and torch combines them ((SPLIT, N) floats: negligible). Splitting V keeps
  the GPU busy when N is small (a few hundred scored rows).
- Backward recomputes each logit tile and adds its grad_h / grad_w contributions with fp32 tl.atomic_add (bf16
  atomics are unsupported, and splitting both N and V needs atomics for both outputs). So the sum order is not
  deterministic on GPU, and fp16/bf16 inputs use fp32 buffers ((N,H) and (V,H) fp32) cast at the end. The rejected
  alternative, a second kernel per V block looping over row blocks, is deterministic but recomputes the logits once
  more (8*N*V*H instead of 6) and has little parallelism at small N. Tiles whose dlogits are all exactly zero
  (padding rows, g == 0, exp underflow) skip their H loop; `skip_below > 0` also skips tiles with
  max|dlogits| <= skip_below (Cut Cross-Entropy's gradient filtering) and is off by default.
- Dot precision: fp32 inputs use input_precision="ieee" (no TF32) so fp32 results stay within ~1e-6 of float64.
  fp16/bf16 inputs on GPU feed the tensor cores in their own dtype (dlogits cast to that dtype, as flash-attention
  does with P) with fp32 accumulation. The interpreter computes bf16 arithmetic wrongly (shared/notes/environment.md),
  so under TRITON_INTERPRET=1 bf16 tiles are cast to fp32 right after the load; fp16 keeps the GPU path there.
- No @triton.autotune: the backward accumulates with atomics, so autotuning would need reset_to_zero and we cannot
  tune without a GPU here. Block sizes are constexpr keyword arguments with defaults meant for an A100-class GPU
  (untested on GPU: this project is developed on CPU machines).
"""
import os

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# GPU defaults (tests pass small ones). Compiled for sm_80 (no GPU needed to compile), the backward needs 64 KiB of
# shared memory in fp16/bf16 at these sizes and 56 KiB in fp32 (ieee dot, no tensor cores) at the smaller fp32 tile.
_DEFAULT_BLOCKS = dict(block_n=64, block_v=128, block_h=64)
_DEFAULT_BLOCKS_FP32 = dict(block_n=64, block_v=64, block_h=32)


# ----------------------------------------------------------------------------------------------------------------------
# torch references (full logits; any float dtype; used by tests and bench)

def logprob_rows_fwd_ref(h, w, y):
    """Plain torch: logits = h @ w.T in the input dtype (like a model's LM head; mixed dtypes promote), log-softmax in
    fp32 (fp64 for fp64 inputs). Returns (logp (N,), lse (N,)) in that accumulation dtype. Materializes (N, V)."""
    mm = torch.promote_types(h.dtype, w.dtype)
    acc = torch.promote_types(mm, torch.float32)
    logits = (h.to(mm) @ w.to(mm).T).to(acc)  # (N, V)
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    logp = logits.gather(1, y.long()[:, None]).squeeze(1) - lse
    return logp, lse


def logprob_rows_bwd_ref(h, w, y, lse, g):
    """Plain torch backward of logprob_rows_fwd_ref: dlogits in fp32 (fp64 for fp64 inputs), then the two matmuls in
    the input dtypes. Returns (grad_h (N,H) in h.dtype, grad_w (V,H) in w.dtype)."""
    mm = torch.promote_types(h.dtype, w.dtype)
    acc = torch.promote_types(mm, torch.float32)
    logits = (h.to(mm) @ w.to(mm).T).to(acc)  # (N, V)
    g = g.to(acc)
    dlogits = -g[:, None] * torch.exp(logits - lse.to(acc)[:, None])  # (N, V)
    dlogits[torch.arange(len(y), device=y.device), y.long()] += g
    grad_h = (dlogits.to(mm) @ w.to(mm)).to(h.dtype)  # (N, H)
    grad_w = (dlogits.T.to(mm) @ h.to(mm)).to(w.dtype)  # (V, H)
    return grad_h, grad_w


# ----------------------------------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_hh, stride_wv, stride_wh,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of h @ w.T; rows >= N and columns >= V come out as 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_H)
    rows = offs_n.to(tl.int64)
    cols = offs_v.to(tl.int64)
    for k0 in range(0, H, BLOCK_H):
        kk = k0 + offs_k
        a = tl.load(h_ptr + rows[:, None] * stride_hn + kk[None, :] * stride_hh,
                    mask=(offs_n[:, None] < N) & (kk[None, :] < H), other=0.0)  # (BLOCK_N, BLOCK_H)
        b = tl.load(w_ptr + cols[None, :] * stride_wv + kk[:, None] * stride_wh,
                    mask=(offs_v[None, :] < V) & (kk[:, None] < H), other=0.0)  # (BLOCK_H, BLOCK_V)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, y_ptr, part_lse_ptr, part_tgt_ptr, N, V, H,
                stride_hn, stride_hh, stride_wv, stride_wh, VBLOCKS_PER_SPLIT,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of exp(logit - m)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)  # logit of the label, if it falls in this split
    v_start = pid_s * VBLOCKS_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(V, v_start + VBLOCKS_PER_SPLIT * BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        logits = _logit_tile(h_ptr, w_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_hh, stride_wv, stride_wh,
                             BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32)
        logits = tl.where(offs_v[None, :] < V, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # guards -inf - -inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m = m_new
        tgt += tl.sum(tl.where(offs_v[None, :] == y[:, None], logits, 0.0), axis=1)
    out = pid_s * N + offs_n
    tl.store(part_lse_ptr + out, m + tl.log(s), mask=row_ok)
    tl.store(part_tgt_ptr + out, tgt, mask=row_ok)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, gh_ptr, gw_ptr, N, V, H,
                stride_hn, stride_hh, stride_wv, stride_wh, VBLOCKS_PER_SPLIT, skip_below,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr):
    # gh_ptr: (N, H) fp32 contiguous, gw_ptr: (V, H) fp32 contiguous, both zeroed; filled with atomic adds.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=row_ok, other=0.0)  # padding rows get g = 0: no contribution
    offs_k = tl.arange(0, BLOCK_H)
    v_start = pid_s * VBLOCKS_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(V, v_start + VBLOCKS_PER_SPLIT * BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        cols = offs_v.to(tl.int64)
        logits = _logit_tile(h_ptr, w_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_hh, stride_wv, stride_wh,
                             BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32)
        p = tl.where(v_ok[None, :], tl.exp(logits - lse[:, None]), 0.0)  # softmax tile (BLOCK_N, BLOCK_V)
        onehot = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0)
        dl = g[:, None] * (onehot - p)  # dlogits tile, fp32
        if tl.max(tl.abs(dl)) > skip_below:
            for k0 in range(0, H, BLOCK_H):
                kk = k0 + offs_k
                k_ok = kk < H
                wt = tl.load(w_ptr + cols[:, None] * stride_wv + kk[None, :] * stride_wh,
                             mask=v_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_V, BLOCK_H)
                ht = tl.load(h_ptr + rows[:, None] * stride_hn + kk[None, :] * stride_hh,
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_H)
                if DOT_FP32:
                    dh = tl.dot(dl, wt.to(tl.float32), input_precision="ieee")  # (BLOCK_N, BLOCK_H)
                    dw = tl.dot(tl.trans(dl), ht.to(tl.float32), input_precision="ieee")  # (BLOCK_V, BLOCK_H)
                else:
                    dh = tl.dot(dl.to(wt.dtype), wt)
                    dw = tl.dot(tl.trans(dl).to(ht.dtype), ht)
                tl.atomic_add(gh_ptr + rows[:, None] * H + kk[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
                tl.atomic_add(gw_ptr + cols[:, None] * H + kk[None, :], dw, mask=v_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# launchers

def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(fn, h, w, y, extra=()):
    """Validate shapes, dtypes and devices; return (N, V, H). One-line ValueErrors naming the argument."""
    if h.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{fn}: h must be (N, H) and w (V, H), got h {tuple(h.shape)} and w {tuple(w.shape)}")
    N, H = h.shape
    V = w.shape[0]
    if w.shape[1] != H:
        raise ValueError(f"{fn}: hidden sizes differ: h {tuple(h.shape)} vs w {tuple(w.shape)}")
    if V == 0 or H == 0:
        raise ValueError(f"{fn}: w must have V > 0 and H > 0, got {tuple(w.shape)}")
    for name, t in (("h", h), ("w", w)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{fn}: {name} dtype {t.dtype} unsupported (float32, float16 or bfloat16)")
    if y.shape != (N,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: y must be ({N},) int64 or int32, got {tuple(y.shape)} {y.dtype}")
    for name, t in extra:
        if t.shape != (N,):
            raise ValueError(f"{fn}: {name} must have shape ({N},), got {tuple(t.shape)}")
    devices = {t.device for t in (h, w, y, *(t for _, t in extra))}
    if len(devices) != 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if h.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{fn}: tensors are on {h.device}; the Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    if N > 0 and bool(((y < 0) | (y >= V)).any()):
        raise ValueError(f"{fn}: labels y must lie in [0, {V}), got min {int(y.min())} max {int(y.max())}")
    return N, V, H


def _launch_params(h, w, N, V, block_n, block_v, block_h, split_v):
    lowp_dot = h.dtype == w.dtype and h.dtype in (torch.float16, torch.bfloat16)
    defaults = _DEFAULT_BLOCKS if lowp_dot else _DEFAULT_BLOCKS_FP32
    bn, bv, bh = block_n or defaults["block_n"], block_v or defaults["block_v"], block_h or defaults["block_h"]
    for name, b in (("block_n", bn), ("block_v", bv), ("block_h", bh)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {b}")
    n_rowblocks, n_vblocks = triton.cdiv(N, bn), triton.cdiv(V, bv)
    if split_v is None:  # GPU: aim at ~4 programs per SM; interpreter: 1 split
        split_v = 1
        if h.device.type == "cuda":
            sms = torch.cuda.get_device_properties(h.device).multi_processor_count
            split_v = max(1, min(n_vblocks, triton.cdiv(4 * sms, n_rowblocks)))
    per_split = triton.cdiv(n_vblocks, max(1, split_v))
    n_splits = triton.cdiv(n_vblocks, per_split)  # every split gets at least one V block
    if lowp_dot and h.dtype == torch.bfloat16 and _interpreting():
        lowp_dot = False  # interpreter bf16 arithmetic is broken: cast to fp32 right after loads
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, DOT_FP32=not lowp_dot), (n_rowblocks, n_splits), per_split


def logprob_rows_fwd(h, w, y, *, block_n=None, block_v=None, block_h=None, split_v=None):
    """h (N,H), w (V,H) float32/float16/bfloat16, y (N,) int64 in [0,V) -> (logp (N,) fp32, lse (N,) fp32).

    block_* override the constexpr tile sizes (powers of two >= 16); split_v the number of V splits per row block
    (default: enough programs to fill the GPU; 1 when interpreting)."""
    N, V, H = _check("logprob_rows_fwd", h, w, y)
    if N == 0:
        empty = torch.empty(0, dtype=torch.float32, device=h.device)
        return empty, empty.clone()
    meta, grid, per_split = _launch_params(h, w, N, V, block_n, block_v, block_h, split_v)
    part_lse = torch.empty(grid[1], N, dtype=torch.float32, device=h.device)  # (SPLIT, N)
    part_tgt = torch.empty(grid[1], N, dtype=torch.float32, device=h.device)  # (SPLIT, N)
    _fwd_kernel[grid](h, w, y.contiguous(), part_lse, part_tgt, N, V, H,
                      h.stride(0), h.stride(1), w.stride(0), w.stride(1), per_split, **meta)
    if grid[1] == 1:
        lse, tgt = part_lse[0], part_tgt[0]
    else:
        lse, tgt = torch.logsumexp(part_lse, dim=0), part_tgt.sum(0)
    return tgt - lse, lse


def logprob_rows_bwd(h, w, y, lse, g, *, block_n=None, block_v=None, block_h=None, split_v=None, skip_below=0.0):
    """Backward of logprob_rows_fwd: lse (N,) from the forward, g (N,) = dL/dlogp.
    -> (grad_h (N,H) in h.dtype, grad_w (V,H) in w.dtype), accumulated in fp32. See the module docstring for
    skip_below (default 0: only tiles whose gradient is exactly zero are skipped)."""
    N, V, H = _check("logprob_rows_bwd", h, w, y, extra=(("lse", lse), ("g", g)))
    if N == 0:
        return torch.zeros_like(h), torch.zeros_like(w)
    meta, grid, per_split = _launch_params(h, w, N, V, block_n, block_v, block_h, split_v)
    gh = torch.zeros(N, H, dtype=torch.float32, device=h.device)  # fp32 atomics target
    gw = torch.zeros(V, H, dtype=torch.float32, device=h.device)
    _bwd_kernel[grid](h, w, y.contiguous(), lse.float().contiguous(), g.float().contiguous(), gh, gw, N, V, H,
                      h.stride(0), h.stride(1), w.stride(0), w.stride(1), per_split, float(skip_below), **meta)
    return gh.to(h.dtype), gw.to(w.dtype)
