"""The native CPU log-prob primitive (csrc/logprobs.cpp via nanoalign.native) against a float64 torch reference.

The reference is computed from the same (possibly bf16/fp16-rounded) inputs in float64 with full logits, so the only
expected error is fp32 arithmetic plus the rounding of the returned gradients to the input dtype.
"""
import os
import shutil
from pathlib import Path

import pytest
import torch

from nanoalign import native


def _require_native():
    if native.available():
        return
    if shutil.which(os.environ.get("CXX", "c++")) is None and os.environ.get("NANOALIGN_REQUIRE_NATIVE") != "1":
        pytest.skip("no C++ compiler: the native op cannot be built here")
    pytest.fail(f"a compiler exists but the native op did not build: {native.build_info()}")


@pytest.fixture(scope="module", autouse=True)
def built():
    _require_native()


def _ref(h, w, y, g):
    """float64 logp, lse, grad_h, grad_w of sum(g * logp) with full (N, V) logits."""
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    logits = h64 @ w64.T  # (N, V)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, y[:, None])[:, 0] - lse
    (logp * g.double()).sum().backward()
    return logp.detach(), lse.detach(), h64.grad, w64.grad


def _rel(a, b):
    """Normwise relative error max|a - b| / max|b| (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# tolerance on (logp, lse) and on the gradients, which are rounded to the input dtype
TOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (2e-6, 1e-2), torch.float16: (2e-6, 2e-3)}


def _inputs(n, hdim, v, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hdim, generator=gen) * scale).to(dtype)
    w = (torch.randn(v, hdim, generator=gen) / hdim**0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    if n > 2:
        g[1] = 0.0  # a row that does not contribute to the loss
    return h, w, y, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,hdim,v", [(300, 64, 1000), (257, 40, 513), (7, 16, 255), (1, 8, 1), (600, 24, 300)])
def test_values_and_gradients_match_float64(dtype, n, hdim, v):
    # N and V deliberately not multiples of the 256 x 256 tiles; (1, 8, 1) is a one-word vocabulary.
    h, w, y, g = _inputs(n, hdim, v, dtype, scale=2.0)
    logp, lse = native.logprob_rows_fwd(h, w, y)
    grad_h, grad_w = native.logprob_rows_bwd(h, w, y, lse, g)
    r_logp, r_lse, r_gh, r_gw = _ref(h, w, y, g)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == (n,)
    assert grad_h.dtype == h.dtype and grad_h.shape == h.shape
    assert grad_w.dtype == w.dtype and grad_w.shape == w.shape
    tol_val, tol_grad = TOL[dtype]
    assert _rel(logp, r_logp) < tol_val + 1e-7 * r_lse.abs().max().item()
    assert _rel(lse, r_lse) < tol_val
    assert _rel(grad_h, r_gh) < tol_grad
    assert _rel(grad_w, r_gw) < tol_grad


def test_empty_rows():
    h, w, y, g = _inputs(0, 16, 300, torch.float32)
    logp, lse = native.logprob_rows_fwd(h, w, y)
    assert logp.shape == lse.shape == (0,)
    grad_h, grad_w = native.logprob_rows_bwd(h, w, y, lse, g)
    assert grad_h.shape == (0, 16) and grad_w.shape == (300, 16)
    assert torch.count_nonzero(grad_w) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits(dtype):
    # logits of order 1e3-1e4: a naive exp overflows; the online log-sum-exp must not.
    h, w, y, g = _inputs(70, 32, 600, dtype, scale=300.0, seed=1)
    logp, lse = native.logprob_rows_fwd(h, w, y)
    grad_h, grad_w = native.logprob_rows_bwd(h, w, y, lse, g)
    r_logp, r_lse, r_gh, r_gw = _ref(h, w, y, g)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    assert r_lse.abs().max() > 500  # the test really has large logits
    # absolute error of a difference of numbers ~1e3 in fp32 is ~1e-4; compare against the scale of the logits
    assert (logp.double() - r_logp).abs().max() < 1e-5 * r_lse.abs().max()
    assert _rel(grad_h, r_gh) < TOL[dtype][1]
    assert _rel(grad_w, r_gw) < TOL[dtype][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunked_backward(dtype, monkeypatch):
    # A tiny partial-buffer budget forces the backward to walk the rows in 256-row chunks (the path large N takes),
    # including the full fp32 grad_w accumulator used for low-precision weights.
    monkeypatch.setenv("NANOALIGN_NATIVE_PARTIAL_BYTES", "1")
    h, w, y, g = _inputs(700, 24, 520, dtype, seed=2)  # 3 chunks of 256 rows
    logp, lse = native.logprob_rows_fwd(h, w, y)
    grad_h, grad_w = native.logprob_rows_bwd(h, w, y, lse, g)
    _, _, r_gh, r_gw = _ref(h, w, y, g)
    assert _rel(grad_h, r_gh) < TOL[dtype][1]
    assert _rel(grad_w, r_gw) < TOL[dtype][1]


def test_mixed_dtypes_and_single_thread():
    # bf16 rows with an fp32 head, computed with one thread, must match the default (multi-thread) result closely.
    h, w, y, g = _inputs(300, 32, 700, torch.float32, seed=3)
    h = h.to(torch.bfloat16)
    logp, lse = native.logprob_rows_fwd(h, w, y)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        logp1, lse1 = native.logprob_rows_fwd(h, w, y)
    finally:
        torch.set_num_threads(old)
    r_logp, r_lse, _, _ = _ref(h, w, y, g)
    assert _rel(logp, r_logp) < 1e-5 and _rel(logp1, r_logp) < 1e-5 and _rel(lse1, lse) < 1e-6


def test_bad_input_raises_clear_errors():
    h, w, y, g = _inputs(10, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="y must be in"):
        native.logprob_rows_fwd(h, w, torch.full((10,), 50))
    with pytest.raises(ValueError, match="y must be in"):
        native.logprob_rows_fwd(h, w, torch.full((10,), -100))
    with pytest.raises(ValueError, match="hidden sizes differ"):
        native.logprob_rows_fwd(h, w[:, :8], y)
    with pytest.raises(ValueError, match="y must be"):
        native.logprob_rows_fwd(h, w, y[:5])
    with pytest.raises(ValueError, match="int64"):
        native.logprob_rows_fwd(h, w, y.int())
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        native.logprob_rows_fwd(h.double(), w, y)
    logp, lse = native.logprob_rows_fwd(h, w, y)
    with pytest.raises(ValueError, match="g must be"):
        native.logprob_rows_bwd(h, w, y, lse, g[:3])


def test_frozen_head_skips_grad_w():
    # need_grad_w=False (LoRA with a frozen LM head) must give the same grad_h and no grad_w.
    h, w, y, g = _inputs(300, 32, 700, torch.float32, seed=4)
    logp, lse = native.logprob_rows_fwd(h, w, y)
    grad_h, grad_w = native.logprob_rows_bwd(h, w, y, lse, g, need_grad_w=False)
    assert grad_w is None
    _, _, r_gh, _ = _ref(h, w, y, g)
    assert _rel(grad_h, r_gh) < TOL[torch.float32][1]


def test_bitwise_reproducible_under_cpu_contention():
    # Training must give the same numbers when the machine is busy (the toy world's "same seed, same numbers"). Under
    # `schedule(dynamic)` the vocabulary blocks went to whichever thread was free, so the per-thread partial sums --
    # and the last bits of lse and grad_h -- followed the OS scheduler: two toy SFT runs side by side diverged. Here
    # two busy-looping processes compete for the cores while the op runs 25 times with 2 threads; every run must be
    # bit-identical to the first. (With schedule(dynamic, 1) it failed 3 of 3 tries; with static it passed 3 of 3.)
    # The frozen-head forward (logprob_rows_fwd_dh: per-group D partials merged in group order) is held to the same.
    import subprocess
    import sys
    h, w, y, g = _inputs(96, 64, 8192, torch.float32, seed=5)
    burn = "import time\nt = time.time()\nwhile time.time() - t < 20: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = None
        for _ in range(25):
            logp, lse = native.logprob_rows_fwd(h, w, y)
            gh, gw = native.logprob_rows_bwd(h, w, y, lse, g)
            out = [t.clone() for t in (logp, lse, gh, gw) + native.logprob_rows_fwd_dh(h, w, y)]
            if first is None:
                first = out
            for a, b in zip(out, first):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)
        for p in hogs:
            p.kill()
            p.wait()


def test_build_folder_is_shared_by_checkouts_and_compiling_is_announced(tmp_path, monkeypatch, capsys):
    # Two checkouts with the same source must share one build folder (they used to rewrite each other's build.ninja
    # and rebuild on every first use); a build says once that it compiles and where; a finished build is loaded
    # straight from its folder without the compiler.
    import importlib.util
    import torch.utils.cpp_extension as cpp

    other = tmp_path / "other_checkout"
    (other / "nanoalign").mkdir(parents=True)
    (other / "csrc").mkdir()
    (other / "csrc" / "logprobs.cpp").write_bytes(native._SOURCE.read_bytes())
    (other / "nanoalign" / "native.py").write_bytes(open(native.__file__, "rb").read())
    spec = importlib.util.spec_from_file_location("other_native", other / "nanoalign" / "native.py")
    other_native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other_native)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert other_native._SOURCE != native._SOURCE and other_native.build_dir() == native.build_dir()
    assert str(native.build_dir()).startswith(str(tmp_path / "ext"))

    calls = []

    def fake_load(name, sources, build_directory, **kw):
        calls.append(("compile", sources))
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: calls.append(("load", path)))
    monkeypatch.setattr(other_native, "_STATE", {})
    other_native._build()
    folder = native.build_dir()
    assert calls == [("compile", [str(folder / "logprobs.cpp")])]  # compiled from the copy, not the checkout
    assert (folder / "logprobs.cpp").read_bytes() == native._SOURCE.read_bytes() and (folder / "built").is_file()
    err = capsys.readouterr().err
    assert err.count("compiling") == 1 and str(folder) in err
    monkeypatch.setattr(native, "_STATE", {})
    native._build()  # the other checkout: already built
    assert calls[1:] == [("load", str(folder / f"nanoalign_native_{folder.name}.so"))]
    assert "compiling" not in capsys.readouterr().err


def test_tiles_follow_the_l2_cache(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {})
    # a square of fp32 filling half the L2 a thread has, side a multiple of 16 (hand-computed: sqrt(bytes / 2 / 4))
    for l2, side in ((512 * 1024, 256), (1024 * 1024, 352), (2 * 1024 * 1024, 512), (256 * 1024, 176),
                     (32 * 1024 * 1024, 512), (8 * 1024, 32)):
        monkeypatch.setattr(native, "_STATE", {})
        monkeypatch.setattr(native, "_l2_per_cpu", lambda l2=l2: l2)
        assert native.tiles() == (side, side), l2
        assert side * side * 4 <= max(l2 // 2, 32 * 32 * 4)
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "_l2_per_cpu", lambda: None)  # unknown: as 512 KB
    assert native.tiles() == (256, 256)
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("NANOALIGN_NATIVE_TILES", "64,128")
    assert native.tiles() == (64, 128)
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("NANOALIGN_NATIVE_TILES", "64")
    with pytest.raises(ValueError, match="NANOALIGN_NATIVE_TILES"):
        native.tiles()


@pytest.mark.parametrize("tiles", [(16, 32), (512, 256), (100, 7), (176, 176), (352, 352), (32, 9), (48, 17)])
@pytest.mark.parametrize("n,v", [(300, 700), (1, 700), (177, 353), (353, 15)])
def test_any_tile_shape_gives_the_same_numbers(tiles, n, v):
    # Rows and vocabulary not multiples of the tile (177 rows in 176-row tiles, 353 words in 352-word blocks), a
    # single row, vocabulary blocks whose width is not a multiple of the 8-float vectors of the exp (7, 9, 15, 17:
    # the masked tail alone, one vector plus a tail, ...), tiles larger than the problem.
    h, w, y, g = _inputs(n, 40, v, torch.float32, seed=6)
    r_logp, r_lse, r_gh, r_gw = _ref(h, w, y, g)
    logp, lse = torch.ops.nanoalign.logprob_rows_fwd(h, w, y, *tiles)
    gh, gw = torch.ops.nanoalign.logprob_rows_bwd(h, w, y, lse, g, True, *tiles)
    assert _rel(logp, r_logp) < 2e-6 and _rel(lse, r_lse) < 2e-6
    assert _rel(gh, r_gh) < 1e-5 and _rel(gw, r_gw) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_of_the_l2_rule_on_odd_shapes(dtype, monkeypatch):
    # The tile native.tiles() derives for a 1 MB L2 (352 x 352) through the public functions, on rows and vocabulary
    # just past a multiple of it, and on one row.
    monkeypatch.setattr(native, "_STATE", dict(native._STATE, tiles=None))
    monkeypatch.setattr(native, "_l2_per_cpu", lambda: 1024 * 1024)
    del native._STATE["tiles"]
    assert native.tiles() == (352, 352)
    for n, v in ((353, 705), (1, 353), (705, 351)):
        h, w, y, g = _inputs(n, 24, v, dtype, seed=7)
        logp, lse = native.logprob_rows_fwd(h, w, y)
        grad_h, grad_w = native.logprob_rows_bwd(h, w, y, lse, g)
        r_logp, r_lse, r_gh, r_gw = _ref(h, w, y, g)
        assert _rel(logp, r_logp) < 2e-6 + 1e-7 * r_lse.abs().max().item() and _rel(lse, r_lse) < 2e-6
        assert _rel(grad_h, r_gh) < TOL[dtype][1] and _rel(grad_w, r_gw) < TOL[dtype][1]


def test_exp_edge_values():
    # The vectorised exp: a NaN logit gives NaN (not a silent finite number), -inf logits (a row of h of -inf times
    # a positive w) contribute nothing, and logits near the fp32 exp range (|x| ~ 80-90 after the max shift) stay
    # finite with a log-sum-exp equal to the reference.
    w = torch.tensor([[1.0], [2.0], [-1.0], [0.5], [3.0], [1.5], [-2.0], [0.25], [1.0]])  # (9, 1): a tail of 1
    y = torch.tensor([0, 1, 4])
    h = torch.tensor([[float("nan")], [45.0], [-30.0]])  # logits up to 135 and down to -90 in one row
    logp, lse = native.logprob_rows_fwd(h, w, y)
    assert torch.isnan(logp[0]) and torch.isnan(lse[0])
    grad_h, grad_w = native.logprob_rows_bwd(h, w, y, lse, torch.ones(3))
    assert torch.isnan(grad_h[0]).all() and torch.isnan(grad_w).all()  # every word saw the NaN row
    r = torch.logsumexp(h[1:].double() @ w.double().T, dim=1)
    assert torch.allclose(lse[1:].double(), r, rtol=1e-6, atol=0)
    assert torch.allclose(logp[1:].double(), (h[1:].double() @ w.double().T).gather(1, y[1:, None])[:, 0] - r,
                          rtol=0, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_partials_pool_reused_across_groups_and_chunks(threads, dtype, monkeypatch):
    # grad_h is summed from per-group partials held in a pool of 2 buffers per thread and added in group order: with
    # 16 x 32 tiles a 700-word vocabulary is 22 blocks in 4 * threads groups, so buffers are reused, and with a
    # 1-byte budget the 150 rows are walked in 16-row chunks (the pool restarts per chunk). Against float64.
    h, w, y, g = _inputs(150, 24, 700, dtype, seed=8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        logp, lse = torch.ops.nanoalign.logprob_rows_fwd(h, w, y, 16, 32)
        gh, gw = torch.ops.nanoalign.logprob_rows_bwd(h, w, y, lse, g, True, 16, 32)
        monkeypatch.setenv("NANOALIGN_NATIVE_PARTIAL_BYTES", "1")
        gh_c, gw_c = torch.ops.nanoalign.logprob_rows_bwd(h, w, y, lse, g, True, 16, 32)
        gh_frozen, _ = torch.ops.nanoalign.logprob_rows_bwd(h, w, y, lse, g, False, 16, 32)
    finally:
        torch.set_num_threads(old)
    _, _, r_gh, r_gw = _ref(h, w, y, g)
    for a, b in ((gh, r_gh), (gw, r_gw), (gh_c, r_gh), (gw_c, r_gw), (gh_frozen, r_gh)):
        assert _rel(a, b) < TOL[dtype][1]


# ----------------------------------------------------------------------------- frozen LM head: logprob_rows_fwd_dh


def _ref_dh(h, w, y):
    """float64 D = dlogp/dh per row (rows are independent, so the gradient of sum(logp) is every row's D)."""
    h64 = h.double().requires_grad_()
    logits = h64 @ w.double().T  # (N, V)
    logp = torch.log_softmax(logits, 1).gather(1, y[:, None])[:, 0]
    (D,) = torch.autograd.grad(logp.sum(), h64)
    return D


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [(0, 0), (16, 32), (8, 7)])
@pytest.mark.parametrize("n,hdim,v", [(300, 33, 1000), (7, 17, 513), (1, 9, 255)])
def test_fwd_dh_matches_float64(dtype, tiles, n, hdim, v):
    # D and grad_h = g * D against float64 autograd through full logits; odd N, H and V, tiles from the default to
    # 8 x 7 (143 vocabulary blocks in 4 groups per thread: the online rescale and the group merge both run). logp and
    # lse must be logprob_rows_fwd's bits (same tiles, same groups, same summation order).
    h, w, y, g = _inputs(n, hdim, v, dtype, scale=2.0, seed=9)
    logp, lse, D = torch.ops.nanoalign.logprob_rows_fwd_dh(h, w, y, *tiles)
    logp_f, lse_f = torch.ops.nanoalign.logprob_rows_fwd(h, w, y, *tiles)
    assert torch.equal(logp, logp_f) and torch.equal(lse, lse_f)
    assert D.dtype == h.dtype and D.shape == h.shape
    _, _, r_gh, _ = _ref(h, w, y, g)
    r_D = _ref_dh(h, w, y)
    tol = TOL[dtype][1]
    assert _rel(D, r_D) < tol
    assert _rel(g[:, None] * D.float(), r_gh) < tol
    # the same gradient as the frozen backward, which recomputes the logits
    gh_bwd, _ = torch.ops.nanoalign.logprob_rows_bwd(h, w, y, lse, g, False, *tiles)
    assert _rel(g[:, None] * D.float(), gh_bwd.double()) < tol


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fwd_dh_row_chunks_and_pool(threads, dtype, monkeypatch):
    # With a 1-byte partial budget the 150 rows are done in 16-row chunks and the 4 * threads groups' partials are
    # taken from (and returned to) the pool: D must not change by a bit (chunks are whole row tiles, and each row's
    # groups are merged in the same order), and must match float64.
    h, w, y, _ = _inputs(150, 24, 700, dtype, scale=2.0, seed=10)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        whole = torch.ops.nanoalign.logprob_rows_fwd_dh(h, w, y, 16, 32)
        monkeypatch.setenv("NANOALIGN_NATIVE_PARTIAL_BYTES", "1")
        chunked = torch.ops.nanoalign.logprob_rows_fwd_dh(h, w, y, 16, 32)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    assert _rel(chunked[2], _ref_dh(h, w, y)) < TOL[dtype][1]


def test_fwd_dh_large_logits_and_edge_rows():
    # Logits of order 1e3 (the max rises block after block: every rescale runs) stay finite and right; a NaN row and
    # a row whose logits are all -inf give NaN in D, as the backward gives NaN there; the other rows are unaffected.
    h, w, y, g = _inputs(40, 16, 300, torch.float32, scale=300.0, seed=11)
    w = w.abs()  # all positive: a row of h of -inf gives logits of -inf only
    h[3] = float("nan")
    h[5] = float("-inf")
    _, lse, D = torch.ops.nanoalign.logprob_rows_fwd_dh(h, w, y, 16, 32)
    gh_bwd, _ = torch.ops.nanoalign.logprob_rows_bwd(h, w, y, lse, torch.ones(40), False, 16, 32)
    for r in (3, 5):
        assert torch.isnan(D[r]).all() and torch.isnan(gh_bwd[r]).all()
    ok = [r for r in range(40) if r not in (3, 5)]
    assert torch.isfinite(D[ok]).all()
    r_D = _ref_dh(h[ok], w, y[ok])
    # fp32 logits of ~1e3 carry absolute errors of ~1e-4, which the peaked softmax passes on: the tolerance scales
    # with the largest logit (the backward, which recomputes the logits, has the same error: 2e-5 here)
    zmax = (h[ok].double() @ w.double().T).abs().max().item()
    assert zmax > 500 and _rel(D[ok], r_D) < 1e-7 * zmax
    assert _rel(D[ok], gh_bwd[ok].double()) < 1e-5


def test_fwd_dh_public_wrapper_and_bad_input():
    h, w, y, _ = _inputs(10, 16, 50, torch.float32)
    logp, lse, D = native.logprob_rows_fwd_dh(h, w, y)
    assert _rel(D, _ref_dh(h, w, y)) < 1e-5
    empty = native.logprob_rows_fwd_dh(h[:0], w, y[:0])
    assert [tuple(t.shape) for t in empty] == [(0,), (0,), (0, 16)]
    with pytest.raises(ValueError, match="logprob_rows_fwd_dh: y must be in"):
        native.logprob_rows_fwd_dh(h, w, torch.full((10,), 50))
    with pytest.raises(ValueError, match="logprob_rows_fwd_dh: hidden sizes differ"):
        native.logprob_rows_fwd_dh(h, w[:, :8], y)
