"""Triton log-prob kernels (kernels/logprobs.py) under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py).

Truth is the float64 torch reference run on the same (already rounded) inputs. Tolerances:
- forward (logp, lse): the kernel accumulates in fp32 from exact inputs, so every dtype must be within 1e-5 relative;
- gradients: flash-attention's rule, error at most 2x the error of plain torch run in the input precision, plus
  1e-5 relative (issue 3's fp32 target; at logits in the hundreds fp32 itself is only good to ~1e-5: exp(logit - lse)).
The interpreter takes ~0.3 s a launch: shapes are tiny, blocks small (16/32/16) so partial blocks occur in N, V and H.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nanoalign.kernels.logprobs import (logprob_rows_bwd, logprob_rows_bwd_ref, logprob_rows_fwd,
                                        logprob_rows_fwd_ref)

BLOCKS = dict(block_n=16, block_v=32, block_h=16)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(N, H, V, dtype, scale=1.0, seed=0, w_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=gen) * scale).to(dtype)  # (N, H)
    w = (torch.randn(V, H, generator=gen) * 0.5).to(w_dtype or dtype)  # (V, H)
    y = torch.randint(0, V, (N,), generator=gen)  # (N,)
    if N >= 2:
        y[0], y[-1] = 0, V - 1  # labels at both ends of the vocabulary
    g = torch.randn(N, generator=gen)  # dL/dlogp
    return h, w, y, g


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check_against_float64(h, w, y, g, **kw):
    logp, lse = logprob_rows_fwd(h, w, y, **kw)
    gh, gw = logprob_rows_bwd(h, w, y, lse, g, **kw)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == y.shape
    assert gh.dtype == h.dtype and gh.shape == h.shape and gw.dtype == w.dtype and gw.shape == w.shape
    for t in (logp, lse, gh, gw):
        assert torch.isfinite(t).all()

    r_logp, r_lse = logprob_rows_fwd_ref(h.double(), w.double(), y)  # truth
    r_gh, r_gw = logprob_rows_bwd_ref(h.double(), w.double(), y, r_lse, g.double())
    for name, out, ref in (("logp", logp, r_logp), ("lse", lse, r_lse)):
        scale = max(ref.abs().max().item(), 1.0)
        assert _max_err(out, ref) <= 1e-5 * scale, f"{name}: err {_max_err(out, ref):.3g} (scale {scale:.3g})"

    b_logp, b_lse = logprob_rows_fwd_ref(h, w, y)  # plain torch in the input precision
    b_gh, b_gw = logprob_rows_bwd_ref(h, w, y, b_lse, g)
    for name, out, base, ref in (("grad_h", gh, b_gh, r_gh), ("grad_w", gw, b_gw, r_gw)):
        scale = max(ref.abs().max().item(), 1.0)
        err, base_err = _max_err(out, ref), _max_err(base, ref)
        bound = 2 * base_err + 1e-5 * scale
        assert err <= bound, f"{name} {h.dtype}: err {err:.3g} > {bound:.3g} (plain torch err {base_err:.3g})"


# ----------------------------------------------------------------------------------------------------------------------
# the references themselves, against independent torch code (cheap, no kernel launch)

def test_reference_matches_cross_entropy_and_autograd():
    h, w, y, g = _inputs(9, 12, 31, torch.float64)
    h.requires_grad_(True)
    w.requires_grad_(True)
    logp, lse = logprob_rows_fwd_ref(h, w, y)
    torch.testing.assert_close(logp, -F.cross_entropy(h @ w.T, y, reduction="none"))
    torch.testing.assert_close(lse, torch.logsumexp(h @ w.T, dim=-1))
    (logp * g).sum().backward()
    gh, gw = logprob_rows_bwd_ref(h.detach(), w.detach(), y, lse.detach(), g)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


# ----------------------------------------------------------------------------------------------------------------------
# kernels vs float64

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,V", [(1, 16, 50), (7, 40, 97), (33, 40, 128)])
def test_matches_float64(N, H, V, dtype):
    # N=33 / 7 / 1: partial row blocks of 16; V=50, 97: partial V block of 32; H=40: partial H chunk of 16.
    _check_against_float64(*_inputs(N, H, V, dtype), **BLOCKS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_v(dtype):
    # 97 / 16 -> 7 V blocks, 3 splits of (3, 3, 1) blocks: partial log-sum-exps combined, atomics from 3 programs.
    _check_against_float64(*_inputs(33, 40, 97, dtype, seed=1), block_n=16, block_v=16, block_h=16, split_v=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_stable(dtype):
    # h * 50: logits in the hundreds; a naive sum of exp overflows, the online max must keep the LSE finite.
    h, w, y, g = _inputs(33, 16, 97, dtype, scale=50.0, seed=2)
    assert (h.double() @ w.double().T).abs().max() > 100
    _check_against_float64(h, w, y, g, **BLOCKS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_labels_at_vocab_edges(dtype):
    # every label is 0 or V-1; V-1 = 96 sits alone in the last, mostly padded, V block (96..127).
    h, w, _, g = _inputs(7, 16, 97, dtype, seed=3)
    y = torch.tensor([0, 96, 96, 0, 96, 0, 96])
    _check_against_float64(h, w, y, g, **BLOCKS)


def test_mixed_dtypes_and_default_blocks():
    # h bf16 with w fp32 (the fp32 dot path), and the GPU default block sizes (one tile covers the whole problem).
    h, w, y, g = _inputs(7, 40, 97, torch.bfloat16, seed=4, w_dtype=torch.float32)
    _check_against_float64(h, w, y, g)


def test_non_contiguous_inputs():
    h, w, y, g = _inputs(7, 80, 97, torch.float32, seed=5)
    h = h[:, ::2]  # (7, 40) with stride (80, 2)
    w = w.T.contiguous().T[:, 40:]  # (97, 40) column-major view
    assert not h.is_contiguous() and not w.is_contiguous()
    _check_against_float64(h, w, y, g, **BLOCKS)


def test_zero_rows():
    h, w, y, g = _inputs(0, 16, 50, torch.bfloat16)
    logp, lse = logprob_rows_fwd(h, w, y, **BLOCKS)
    assert logp.shape == lse.shape == (0,) and logp.dtype == torch.float32
    gh, gw = logprob_rows_bwd(h, w, y, lse, g, **BLOCKS)
    assert gh.shape == (0, 16) and gw.shape == (50, 16) and gw.dtype == torch.bfloat16
    assert not gw.any()


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one-line ValueErrors naming the argument (no kernel launch)

def test_bad_input():
    h, w, y, g = _inputs(5, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="hidden sizes differ"):
        logprob_rows_fwd(h, w[:, :8], y)
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 50\)"):
        logprob_rows_fwd(h, w, torch.tensor([0, 1, 2, 50, 3]))
    with pytest.raises(ValueError, match=r"labels y must lie"):
        logprob_rows_fwd(h, w, torch.tensor([0, -100, 2, 3, 4]))
    with pytest.raises(ValueError, match="y must be"):
        logprob_rows_fwd(h, w, y[:3])
    with pytest.raises(ValueError, match="h dtype torch.float64 unsupported"):
        logprob_rows_fwd(h.double(), w, y)
    with pytest.raises(ValueError, match="g must have shape"):
        logprob_rows_bwd(h, w, y, torch.zeros(5), g[:4])
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        logprob_rows_fwd(h, w, y, block_v=24)


def test_cpu_tensors_without_interpreter_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, y, _ = _inputs(5, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="need CUDA"):
        logprob_rows_fwd(h, w, y)
    assert os.environ["TRITON_INTERPRET"] == "0"


def test_skip_below_filters_small_gradients():
    # skip_below above every |dlogits| (<= |g|) skips all tiles; a tiny threshold changes little at large logits.
    h, w, y, g = _inputs(33, 16, 97, torch.float32, scale=50.0, seed=6)
    _, lse = logprob_rows_fwd(h, w, y, **BLOCKS)
    gh, gw = logprob_rows_bwd(h, w, y, lse, g, skip_below=1e9, **BLOCKS)
    assert not gh.any() and not gw.any()
    gh, gw = logprob_rows_bwd(h, w, y, lse, g, skip_below=1e-7, **BLOCKS)
    r_gh, r_gw = logprob_rows_bwd_ref(h.double(), w.double(), y, lse.double(), g.double())
    assert _max_err(gh, r_gh) <= 1e-4 * r_gh.abs().max().item()
    assert _max_err(gw, r_gw) <= 1e-4 * r_gw.abs().max().item()


# ----------------------------------------------------------------------------------------------------------------------
# the GPU-only branch (fp16/bf16 tiles fed to tl.dot in their own dtype) compiles for an A100 without a GPU

_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from nanoalign.kernels import logprobs as L
    ints = dict.fromkeys(["N", "V", "H", "stride_hn", "stride_hh", "stride_wv", "stride_wh", "VBLOCKS_PER_SPLIT"],
                         "i32")
    cx = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, DOT_FP32=False)  # the bf16 GPU defaults
    ptrs = dict(h_ptr="*bf16", w_ptr="*bf16", y_ptr="*i64")
    sigs = [(L._fwd_kernel, dict(**ptrs, part_lse_ptr="*fp32", part_tgt_ptr="*fp32", **ints)),
            (L._bwd_kernel, dict(**ptrs, lse_ptr="*fp32", g_ptr="*fp32", gh_ptr="*fp32", gw_ptr="*fp32", **ints,
                                 skip_below="fp32"))]
    for fn, sig in sigs:
        src = triton.compiler.ASTSource(fn=fn, signature={**sig, **dict.fromkeys(cx, "constexpr")}, constexprs=cx)
        k = triton.compile(src, target=GPUTarget("cuda", 80, 32))
        print(fn.__name__, "mma" in k.asm["ptx"], k.metadata.shared)
""")


def test_bf16_kernels_compile_for_sm80():
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no nvidia backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in out.stdout.split("\n")[:2]:  # "<kernel> <uses tensor cores> <shared bytes>"
        name, mma, shared = line.split()
        assert mma == "True" and int(shared) <= 100 * 1024, line
