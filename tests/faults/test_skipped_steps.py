"""Seam: skipped optimizer steps (fp16 loss-scale overflow, --skip-nonfinite): schedule, loss scale, --resume."""
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from common import main, steps

FP16 = ["--algo", "dpo", "--lr", 1e-3, "--lora-rank", 4, "--dtype", "fp16"]
TIMING = ("time_s", "tokens_per_s", "peak_mem_mb")


def _poison_first_grads(monkeypatch):
    """clip_grad_norm sees inf gradients at its first call (step 1): an fp16 overflow, or a non-finite step."""
    from nanoalign import trainutil
    real, calls = trainutil.clip_grad_norm, {"n": 0}

    def poisoned(model, max_norm):
        calls["n"] += 1
        if calls["n"] == 1:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        return real(model, max_norm)
    monkeypatch.setattr(trainutil, "clip_grad_norm", poisoned)


def _numbers(out):
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True) for r in steps(out)]


def _weights(folder):
    return dict(load_file(str(folder / "adapter" / "adapter_model.safetensors")))


def test_fp16_resume_after_an_overflow_keeps_the_scale(world, tmp_path, monkeypatch):
    """--dtype fp16 --resume from a checkpoint saved after a loss-scale overflow (the scale halved to 2^15) -> the
    resumed run continues at the saved scale, not at 2^16 again: every later step's metrics (loss_scale included)
    and the final adapters equal the uninterrupted run's bit for bit."""
    out = tmp_path / "run"
    args = [*FP16, "--max-steps", 4, "--save-every", 1]
    with monkeypatch.context() as m:
        _poison_first_grads(m)
        main(world, out, *args)
    assert [json.loads(r)["step"] for r in _numbers(out)] == [2, 3, 4]  # step 1 overflowed: skipped
    assert [r["loss_scale"] for r in steps(out)] == [2.0 ** 15] * 3
    full, final = _numbers(out), _weights(out / "final")
    shutil.rmtree(out / "final")  # killed after the step-2 checkpoint
    shutil.rmtree(out / "step-000003")
    main(world, out, *args, "--resume")
    assert _numbers(out) == full
    resumed = _weights(out / "final")
    assert sorted(resumed) == sorted(final) and all(torch.equal(resumed[k], v) for k, v in final.items())


@pytest.mark.parametrize("extra", [FP16, ["--algo", "dpo", "--skip-nonfinite"]],
                         ids=["fp16-overflow", "skip-nonfinite"])
def test_skipped_first_step_leaves_the_schedule(world, tmp_path, monkeypatch, extra):
    """The first step skipped (an fp16 overflow; non-finite gradients with --skip-nonfinite) -> no PyTorch warning
    "lr_scheduler.step() before optimizer.step()": the schedule advances only with the optimizer, so the next step
    runs at the first step's rate."""
    _poison_first_grads(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(world, tmp_path, *extra, "--max-steps", 3, "--warmup-steps", 2)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    recs = steps(tmp_path)
    lr = 1e-3 if "--lr" in extra else 1e-5
    assert [r["step"] for r in recs] == [2, 3]
    assert [r["lr"] for r in recs] == pytest.approx([lr / 2, lr])  # warm-up 1/2, 2/2: step 1 took no slot
