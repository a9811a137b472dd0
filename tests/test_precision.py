"""--dtype bf16 (bf16 weights) and --amp (fp32 weights, bf16 autocast) on one process: the steps run and their losses
are within bf16 tolerance of fp32's on the same tiny checkpoint and data (bf16 keeps 8 mantissa bits: relative
rounding 2^-8 = 0.4% per value; the tolerance below allows a few of those through a 2-layer model)."""
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from test_train import run, world  # noqa: E402,F401

pytest.importorskip("transformers")
TOL = 3e-2  # relative


@pytest.fixture(scope="module")
def fp32(world, tmp_path_factory):  # noqa: F811
    t = tmp_path_factory.mktemp("fp32")
    return {"sft": run(world, t / "sft", "--algo", "sft", "--max-steps", 2, "--lr", 1e-3, data="llava.json",
                       fmt="llava"),
            "dpo": run(world, t / "dpo", "--algo", "dpo", "--max-steps", 3, "--lr", 1e-3)}


@pytest.mark.parametrize("flags,backend", [(["--dtype", "bf16"], None), (["--amp"], None), (["--amp"], "torch")])
def test_bf16_steps_within_tolerance_of_fp32(world, fp32, tmp_path, flags, backend, monkeypatch):  # noqa: F811
    """backend torch: the pure-torch row kernels (the CPU default outside tests), which must not run under autocast"""
    if backend:
        monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", backend)
    sft = run(world, tmp_path / "sft", "--algo", "sft", "--max-steps", 2, "--lr", 1e-3, *flags, data="llava.json",
              fmt="llava")
    assert sft[0]["loss"] == pytest.approx(fp32["sft"][0]["loss"], rel=TOL)
    assert sft[0]["loss"] != fp32["sft"][0]["loss"]  # it did compute in bf16
    dpo = run(world, tmp_path / "dpo", "--algo", "dpo", "--max-steps", 3, "--lr", 1e-3, *flags)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in dpo)
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    for a, b in zip(dpo, fp32["dpo"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=TOL)

