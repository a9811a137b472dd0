"""nanoalign.ops: the row primitive (torch chunked and native backends), token_logprobs and preference_loss against
float64 references written out here, fused == unfused, and the bad-input errors. The Triton backend is tested in
tests/test_kernels*.py."""
import functools
import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from nanoalign import ops

# relative tolerance (max abs error / max abs reference) of values and gradients vs float64, per input dtype:
# fp32 is the target (1e-5); fp16/bf16 grads are rounded to the input dtype (2^-11 / 2^-8 relative).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@functools.lru_cache(maxsize=None)
def _native_status():
    if importlib.util.find_spec("nanoalign.native") is None:  # only while NATIVE is writing it
        return False, "nanoalign/native.py does not exist yet"
    from nanoalign import native  # any import error fails the test run
    if native.available():
        return True, ""
    info = native.build_info() if hasattr(native, "build_info") else {}
    return False, f"nanoalign.native.available() is False ({info.get('error')})"


@pytest.fixture(params=["torch", "native"])
def backend(request, monkeypatch):
    if request.param == "native":
        ok, why = _native_status()
        if not ok:
            if os.environ.get("NANOALIGN_REQUIRE_NATIVE") == "1":  # set by .ci/run: CI must test the native path
                pytest.fail(f"NANOALIGN_REQUIRE_NATIVE=1 but {why}")
            pytest.skip(f"native backend skipped: {why}")
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", request.param)
    return request.param


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_rows(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    gout = torch.randn(N, generator=g)
    return h, w, y, gout


def ref_rows(h, w, y, gout):
    """float64 logp and the gradients of sum(gout * logp) through full logits (autograd)."""
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    logits = h64 @ w64.T  # (N, V)
    logp = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    (logp * gout.double()).sum().backward()
    return logp.detach(), h64.grad, w64.grad


def check_rows(logp, gh, gw, h, w, y, gout, dtype):
    logp64, gh64, gw64 = ref_rows(h, w, y, gout)
    assert logp.dtype == torch.float32 and gh.dtype == h.dtype and gw.dtype == w.dtype
    assert rel_err(logp, logp64) < 1e-5  # fp32 accumulation on the (rounded) inputs, whatever their dtype
    assert rel_err(gh, gh64) < TOL[dtype], ("grad_h", rel_err(gh, gh64))
    assert rel_err(gw, gw64) < TOL[dtype], ("grad_w", rel_err(gw, gw64))


# ----------------------------------------------------------------------------- row primitive


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_rows_odd_blocks(dtype):
    # 50 rows in blocks of 7, V=203 in blocks of 64: neither is a multiple of its block
    h, w, y, gout = make_rows(50, 24, 203, dtype)
    y[0], y[1] = 0, 202  # first and last vocabulary entries
    logp, lse = ops.logprob_rows_fwd_torch(h, w, y, block_rows=7, block_v=64)
    gh, gw = ops.logprob_rows_bwd_torch(h, w, y, lse, gout, block_rows=7, block_v=64)
    check_rows(logp, gh, gw, h, w, y, gout, dtype)
    lse64 = torch.logsumexp(h.double() @ w.double().T, dim=1)
    assert rel_err(lse, lse64) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_dispatch(backend, dtype):
    h, w, y, gout = make_rows(300, 64, 3001, dtype, seed=1)
    logp, lse = ops.logprob_rows_fwd(h, w, y)
    gh, gw = ops.logprob_rows_bwd(h, w, y, lse, gout)
    check_rows(logp, gh, gw, h, w, y, gout, dtype)


def test_rows_empty(backend):
    h, w, y, gout = make_rows(0, 8, 11, torch.float32)
    logp, lse = ops.logprob_rows_fwd(h, w, y)
    gh, gw = ops.logprob_rows_bwd(h, w, y, lse, gout)
    assert logp.shape == (0,) and gh.shape == (0, 8) and gw.shape == (11, 8) and not gw.any()
    logp, lse = ops.logprob_rows_fwd_torch(h, w, y)
    assert ops.logprob_rows_bwd_torch(h, w, y, lse, gout)[1].abs().sum() == 0


def test_ref_is_float64_capable():
    h, w, y, gout = make_rows(5, 4, 9, torch.float64)
    assert ops.logprob_rows_ref(h, w, y).dtype == torch.float64
    expect = torch.log_softmax(h @ w.T, 1)[torch.arange(5), y]
    assert torch.allclose(ops.logprob_rows_ref(h, w, y), expect, rtol=1e-12)


# ----------------------------------------------------------------------------- token_logprobs


def make_batch(B, T, H, V, dtype, seed=0, frac_scored=0.4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) > frac_scored] = -100
    return hidden, weight, labels


def ref_token_logprobs(hidden, weight, labels):
    """float64 (B, T) log-probs from full (B, T, V) logits; differentiable."""
    logits = hidden @ weight.T  # (B, T, V)
    logp = F.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return torch.where(labels != -100, logp, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs(backend, dtype):
    hidden, weight, labels = make_batch(3, 37, 48, 1001, dtype)
    labels[1] = -100  # a row with no scored token
    gout = torch.randn(3, 37, generator=torch.Generator().manual_seed(5))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = ops.token_logprobs(h, w, labels)
    (out * gout).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = ref_token_logprobs(h64, w64, labels)
    (ref * gout.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (3, 37)
    assert (out[labels == -100] == 0).all()
    assert rel_err(out, ref.detach()) < 1e-5
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(h.grad, h64.grad) < TOL[dtype] and rel_err(w.grad, w64.grad) < TOL[dtype]
    assert (h.grad[1] == 0).all()


def test_token_logprobs_all_ignored(backend):
    hidden, weight, labels = make_batch(2, 5, 8, 13, torch.float32)
    labels.fill_(-100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = ops.token_logprobs(h, w, labels)
    out.sum().backward()
    assert (out == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


# ----------------------------------------------------------------------------- preference_loss


def make_pairs(P, T, H, V, dtype, seed=0):
    hidden, weight, labels = make_batch(2 * P, T, H, V, dtype, seed=seed, frac_scored=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    token_weights = torch.where(torch.rand(2 * P, T, generator=g) < 0.3, 5.0, 1.0)  # DDPO: gamma on "corrected"
    ref_logps = -3 * torch.rand(2 * P, T, generator=g)
    return hidden, weight, labels, token_weights, ref_logps


def ref_preference_loss(hidden, weight, labels, token_weights, ref_logps, loss_type, beta, average, sft_weight):
    """float64 reference written from the formulas (see nanoalign/losses.py docstrings for the papers)."""
    P = hidden.shape[0] // 2
    mask = (labels != -100).double()
    logp = ref_token_logprobs(hidden, weight, labels)  # (2P, T)
    wm = token_weights.double() * mask

    def score(lp):
        num = (wm * lp).sum(1)
        return torch.where(wm.sum(1) > 0, num / wm.sum(1).clamp_min(1e-300), 0.0) if average else num

    pol, ref = score(logp), score(ref_logps.double())
    rho = (pol[:P] - ref[:P]) - (pol[P:] - ref[P:])
    if loss_type == "dpo":
        loss = torch.log1p(torch.exp(-beta * rho))
    elif loss_type == "ipo":
        loss = (rho - 1 / (2 * beta)) ** 2
    else:
        loss = torch.clamp(1 - beta * rho, min=0)
    nll = -(logp[:P] * mask[:P]).sum(1) / mask[:P].sum(1).clamp_min(1)
    return loss.mean() + sft_weight * nll.mean(), beta * rho


@pytest.mark.parametrize("loss_type,average,sft_weight,dtype", [
    ("dpo", False, 0.0, torch.float32), ("ipo", True, 0.0, torch.float32), ("slic", False, 0.3, torch.float32),
    ("dpo", True, 0.5, torch.float32), ("dpo", True, 0.1, torch.bfloat16), ("dpo", False, 0.0, torch.float16)])
def test_preference_loss_vs_float64(backend, loss_type, average, sft_weight, dtype):
    hidden, weight, labels, tw, ref = make_pairs(3, 29, 40, 517, dtype)
    labels[1] = -100  # a chosen response with no scored token
    beta = 0.5
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = ops.preference_loss(h, w, labels, tw, ref, loss_type, beta, average=average,
                                        sft_weight=sft_weight)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss64, margin64 = ref_preference_loss(h64, w64, labels, tw, ref, loss_type, beta, average, sft_weight)
    loss64.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(h.grad, h64.grad) < TOL[dtype] and rel_err(w.grad, w64.grad) < TOL[dtype]
    assert rel_err(metrics["margin"], margin64.detach()) < 1e-5
    assert torch.equal(metrics["accuracy"], (margin64 > 0).float())
    for k in ("reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"):
        assert metrics[k].shape == (3,)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "slic"])
@pytest.mark.parametrize("dtype,average,sft_weight,chunk_pairs", [(torch.float32, False, 0.0, None),
                                                                  (torch.float32, True, 0.2, 1),
                                                                  (torch.bfloat16, False, 0.1, 2)])
def test_fused_equals_unfused(loss_type, dtype, average, sft_weight, chunk_pairs, monkeypatch):
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", "torch")
    hidden, weight, labels, tw, ref = make_pairs(5, 17, 32, 301, dtype, seed=3)
    labels[7] = -100  # a rejected response with no scored token
    out = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = ops.preference_loss(h, w, labels, tw, ref, loss_type, 0.3, average=average,
                                            sft_weight=sft_weight, fused=fused, chunk_pairs=chunk_pairs)
        (2.5 * loss).backward()  # grad_output != 1 exercises the fused backward's scaling
        out.append((loss.detach(), h.grad, w.grad, metrics))
    (lf, hf, wf, mf), (lu, hu, wu, mu) = out
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(lf, lu, rtol=1e-5)
    assert hf.dtype == dtype and wf.dtype == dtype
    assert rel_err(hf, hu.double()) < tol and rel_err(wf, wu.double()) < tol
    for k in mu:
        assert torch.allclose(mf[k], mu[k].float(), rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("fused", [True, False])
def test_no_grad_and_frozen_weight(backend, fused):
    # a frozen LM head (LoRA) gets no grad; hidden's grad is the trainable head's within fp32 rounding (the frozen
    # path takes dlogp/dh from logprob_rows_fwd_dh instead of the backward: same math, other summation order)
    hidden, weight, labels, tw, ref = make_pairs(2, 11, 16, 97, torch.float32)
    with torch.no_grad():
        l0, _ = ops.preference_loss(hidden, weight, labels, tw, ref, "ipo", 0.1, fused=fused)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ops.preference_loss(h, w, labels, tw, ref, "ipo", 0.1, fused=fused)[0].backward()
    h2 = hidden.clone().requires_grad_()
    l2, _ = ops.preference_loss(h2, weight, labels, tw, ref, "ipo", 0.1, fused=fused)
    l2.backward()
    assert torch.allclose(l0, l2) and weight.grad is None
    assert rel_err(h2.grad, h.grad.double()) < 1e-6


# ----------------------------------------------------------------------------- frozen LM head (LoRA)


def ref_dh(h, w, y):
    """float64 D = dlogp/dh per row, by autograd through full logits, log_softmax and gather."""
    h64 = h.double().requires_grad_()
    logp = F.log_softmax(h64 @ w.double().T, dim=1).gather(1, y[:, None]).squeeze(1)
    return torch.autograd.grad(logp.sum(), h64)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,V,block_rows,block_v", [(300, 33, 1000, None, 4096), (7, 17, 203, 3, 64),
                                                     (1, 9, 255, None, 100)])
def test_fwd_dh_torch_twin(dtype, N, H, V, block_rows, block_v):
    # the pure-torch reference of the native op: D and grad_h = g * D against float64 autograd; logp / lse too
    h, w, y, gout = make_rows(N, H, V, dtype, seed=2)
    logp, lse, D = ops.logprob_rows_fwd_dh_torch(h, w, y, block_rows=block_rows, block_v=block_v)
    logp64, gh64, _ = ref_rows(h, w, y, gout)
    assert D.dtype == dtype and D.shape == h.shape and logp.dtype == lse.dtype == torch.float32
    assert rel_err(logp, logp64) < 1e-5
    assert rel_err(lse, torch.logsumexp(h.double() @ w.double().T, 1)) < 1e-5
    assert rel_err(D, ref_dh(h, w, y)) < TOL[dtype]
    assert rel_err(gout[:, None] * D.float(), gh64) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fwd_dh_dispatch(backend, dtype):
    h, w, y, _ = make_rows(300, 64, 3001, dtype, seed=3)
    logp, lse, D = ops.logprob_rows_fwd_dh(h, w, y)
    assert rel_err(logp, ref_rows(h, w, y, torch.ones(300))[0]) < 1e-5
    assert rel_err(D, ref_dh(h, w, y)) < TOL[dtype]
    z = ops.logprob_rows_fwd_dh(h[:0], w, y[:0])
    assert z[0].shape == (0,) and z[2].shape == (0, 64) and z[2].dtype == dtype


def _no_backward(*a, **k):
    raise AssertionError("logprob_rows_bwd called: the frozen-head path must take D from logprob_rows_fwd_dh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_frozen_head(backend, dtype, monkeypatch):
    # weight frozen (LoRA): the same values and grad_hidden as the trainable-head path within rounding, without
    # ever calling the backward primitive; against float64 too
    hidden, weight, labels = make_batch(3, 37, 48, 1001, dtype)
    labels[1] = -100
    gout = torch.randn(3, 37, generator=torch.Generator().manual_seed(5))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = ops.token_logprobs(h, w, labels)
    (out * gout).sum().backward()
    monkeypatch.setattr(ops, "logprob_rows_bwd", _no_backward)
    h2 = hidden.clone().requires_grad_()
    out2 = ops.token_logprobs(h2, weight, labels)
    (out2 * gout).sum().backward()
    h64 = hidden.double().requires_grad_()
    (ref_token_logprobs(h64, weight.double(), labels) * gout.double()).sum().backward()
    assert torch.equal(out, out2.detach()) or rel_err(out2, out.double()) < 1e-6
    assert h2.grad.dtype == dtype and (h2.grad[1] == 0).all()
    assert rel_err(h2.grad, h.grad.double()) < TOL[dtype] and rel_err(h2.grad, h64.grad) < TOL[dtype]


def test_no_grad_takes_the_plain_forward(monkeypatch):
    # under torch.no_grad() (reference log-probs, evaluation) nothing needs D, even when hidden requires grad
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", "torch")
    monkeypatch.setattr(ops._TORCH, "logprob_rows_fwd_dh", lambda *a: pytest.fail("D computed under no_grad"))
    monkeypatch.setattr(ops, "logprob_rows_bwd", _no_backward)
    hidden, weight, labels, tw, ref = make_pairs(2, 11, 16, 97, torch.float32)
    h = hidden.clone().requires_grad_()
    with torch.no_grad():
        ops.token_logprobs(h, weight, labels)
        ops.preference_loss(h, weight, labels, tw, ref, "dpo", 0.1)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "slic"])
@pytest.mark.parametrize("dtype,average,sft_weight,chunk_pairs", [(torch.float32, False, 0.0, None),
                                                                  (torch.float32, True, 0.3, 1),
                                                                  (torch.bfloat16, False, 0.1, 2)])
def test_preference_loss_frozen_head(backend, loss_type, dtype, average, sft_weight, chunk_pairs, monkeypatch):
    # every loss type of the fused loss with the weight frozen: the same loss, metrics and grad_hidden as the
    # trainable head within fp32 rounding, without the backward primitive
    hidden, weight, labels, tw, ref = make_pairs(3, 23, 40, 517, dtype, seed=4)
    labels[4] = -100  # a rejected response with no scored token
    kw = dict(average=average, sft_weight=sft_weight, chunk_pairs=chunk_pairs)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, m = ops.preference_loss(h, w, labels, tw, ref, loss_type, 0.5, **kw)
    (2.5 * loss).backward()
    monkeypatch.setattr(ops, "logprob_rows_bwd", _no_backward)
    h2 = hidden.clone().requires_grad_()
    loss2, m2 = ops.preference_loss(h2, weight, labels, tw, ref, loss_type, 0.5, **kw)
    (2.5 * loss2).backward()
    assert weight.grad is None and h2.grad.dtype == dtype
    assert torch.allclose(loss, loss2, rtol=1e-6)
    for k in m:
        assert torch.allclose(m[k], m2[k], rtol=1e-5, atol=1e-6), k
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    assert rel_err(h2.grad, h.grad.double()) < tol
    h64 = hidden.double().requires_grad_()
    loss64, _ = ref_preference_loss(h64, weight.double(), labels, tw, ref, loss_type, 0.5, average, sft_weight)
    (2.5 * loss64).backward()
    assert rel_err(h2.grad, h64.grad) < TOL[dtype]


def test_frozen_head_without_the_op_keeps_forward_and_backward(monkeypatch):
    # a backend without logprob_rows_fwd_dh (the Triton kernels) keeps today's forward + backward
    import types
    plain = types.SimpleNamespace(logprob_rows_fwd=ops.logprob_rows_fwd_torch,
                                  logprob_rows_bwd=ops.logprob_rows_bwd_torch)
    monkeypatch.setattr(ops, "_backend", lambda device: plain)
    calls = []
    bwd = ops.logprob_rows_bwd
    monkeypatch.setattr(ops, "logprob_rows_bwd", lambda *a, **k: calls.append(k) or bwd(*a, **k))
    hidden, weight, labels, tw, ref = make_pairs(2, 11, 16, 97, torch.float32)
    h = hidden.clone().requires_grad_()
    ops.preference_loss(h, weight, labels, tw, ref, "dpo", 0.1)[0].backward()
    assert calls and all(k == {"need_grad_w": False} for k in calls)
    h64 = hidden.double().requires_grad_()
    ref_preference_loss(h64, weight.double(), labels, tw, ref, "dpo", 0.1, False, 0.0)[0].backward()
    assert rel_err(h.grad, h64.grad) < 1e-5
    _, _, D = ops.logprob_rows_fwd_dh(*make_rows(5, 8, 13, torch.float32)[:3])  # fwd + backward with g = 1
    h5, w5, y5, _ = make_rows(5, 8, 13, torch.float32)
    assert rel_err(D, ref_dh(h5, w5, y5)) < 1e-5


def test_preference_loss_all_ignored(backend):
    hidden, weight, labels, tw, ref = make_pairs(2, 6, 8, 19, torch.float32)
    labels.fill_(-100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = ops.preference_loss(h, w, labels, None, ref, "dpo", 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.6931471805599453)  # log 2 at zero margin
    assert (h.grad == 0).all() and (w.grad == 0).all()


# ----------------------------------------------------------------------------- bad input and dispatch


def test_bad_inputs():
    hidden, weight, labels, tw, ref = make_pairs(2, 6, 8, 19, torch.float32)
    with pytest.raises(ValueError, match="labels: shape"):
        ops.token_logprobs(hidden, weight, labels[:, :5])
    with pytest.raises(ValueError, match="weight: hidden size 7"):
        ops.token_logprobs(hidden, weight[:, :7], labels)
    bad = labels.clone()
    bad[0, 0] = 19
    with pytest.raises(ValueError, match=r"labels: value 19 outside \[0, 19\)"):
        ops.token_logprobs(hidden, weight, bad)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="labels: value -1"):
        ops.preference_loss(hidden, weight, bad, tw, ref, "dpo", 0.1)
    with pytest.raises(ValueError, match="labels: expected an integer"):
        ops.token_logprobs(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="hidden: expected"):
        ops.token_logprobs(hidden[0], weight, labels)
    nan_w = tw.clone()
    nan_w[labels != -100] = float("nan")
    with pytest.raises(ValueError, match="token_weights: contains NaN"):
        ops.preference_loss(hidden, weight, labels, nan_w, ref, "dpo", 0.1)
    with pytest.raises(ValueError, match="ref_logps: expected shape"):
        ops.preference_loss(hidden, weight, labels, tw, ref[:, :3], "dpo", 0.1)
    with pytest.raises(ValueError, match="hidden: batch 3"):
        ops.preference_loss(hidden[:3], weight, labels[:3], tw[:3], ref[:3], "dpo", 0.1)
    with pytest.raises(ValueError, match="loss_type"):
        ops.preference_loss(hidden, weight, labels, tw, ref, "ddpo", 0.1)  # a token weighting, not a loss
    with pytest.raises(ValueError, match="beta"):
        ops.preference_loss(hidden, weight, labels, tw, ref, "dpo", 0.0)


def test_backend_env_and_fallback_warning(monkeypatch):
    hidden, weight, labels = make_batch(2, 4, 8, 11, torch.float32)
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="NANOALIGN_LOGPROBS_BACKEND"):
        ops.token_logprobs(hidden, weight, labels)
    monkeypatch.delenv("NANOALIGN_LOGPROBS_BACKEND")
    monkeypatch.setattr(ops, "_native_module", lambda: (None, "no compiler (test)"))
    monkeypatch.setattr(ops, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ops.token_logprobs(hidden, weight, labels)
        b = ops.token_logprobs(hidden, weight, labels)
    msgs = [str(c.message) for c in caught if "pure-torch" in str(c.message)]
    assert len(msgs) == 1 and "no compiler (test)" in msgs[0] and "\n" not in msgs[0]
    assert torch.equal(a, b)
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", "native")
    with pytest.raises(RuntimeError, match="no compiler"):
        ops.token_logprobs(hidden, weight, labels)


def test_no_reference_is_zero_reference(monkeypatch):
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", "torch")
    hidden, weight, labels, tw, _ = make_pairs(2, 9, 16, 41, torch.float32)
    a, ma = ops.preference_loss(hidden, weight, labels, tw, None, "slic", 0.2)
    b, mb = ops.preference_loss(hidden, weight, labels, tw, torch.zeros(4, 9), "slic", 0.2)
    assert torch.equal(a, b) and torch.equal(ma["margin"], mb["margin"]) and (ma["ref_chosen"] == 0).all()
