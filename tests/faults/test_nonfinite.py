"""Seam: the optimizer step (non-finite gradients and parameters)."""
import json
import math

import pytest
import torch

from common import main, steps


def _poison_grads(monkeypatch, at_call):
    """Make clip_grad_norm see NaN gradients at its `at_call`-th call."""
    from nanoalign import trainutil
    real, calls = trainutil.clip_grad_norm, {"n": 0}

    def poisoned(model, max_norm):
        calls["n"] += 1
        if calls["n"] == at_call:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return real(model, max_norm)
    monkeypatch.setattr(trainutil, "clip_grad_norm", poisoned)


def test_nonfinite_gradients_stop(world, tmp_path, monkeypatch):
    """Non-finite gradients -> the run stops before the optimizer step naming step, rank and example ids; the
    previous checkpoint stays, nothing non-finite is saved."""
    _poison_grads(monkeypatch, 3)
    with pytest.raises(SystemExit, match=r"non-finite gradient norm nan at step 3, rank 0, examples \['\d+', '\d+'\].*"
                                         r"step-000002"):
        main(world, tmp_path, "--algo", "dpo", "--max-steps", 4, "--save-every", 2)
    assert not (tmp_path / "final").exists()


def test_skip_nonfinite(world, tmp_path, monkeypatch):
    """Non-finite gradients with --skip-nonfinite -> that step is skipped with a warning, the run goes on and the
    saved weights are finite."""
    _poison_grads(monkeypatch, 2)
    main(world, tmp_path, "--algo", "dpo", "--max-steps", 3, "--skip-nonfinite", "--lr", 1e-3)
    assert [r["step"] for r in steps(tmp_path)] == [1, 3]
    from nanoalign.checkpoint import load_state_dict
    assert all(torch.isfinite(v).all() for v in load_state_dict(tmp_path / "final").values())


def test_nonfinite_parameters_after_the_step(world, tmp_path, monkeypatch):
    """Parameters that become non-finite in the optimizer step -> the run stops naming step, rank and parameter;
    nothing is saved."""
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(SystemExit, match=r"non-finite parameters after the optimizer step at step 1, rank 0.*"
                                         r"rank 0: .*nothing saved"):
        main(world, tmp_path, "--algo", "dpo", "--max-steps", 2)
    assert not (tmp_path / "final").exists()


def test_nonfinite_weights_never_saved(world, tmp_path):
    """A save of weights holding NaN (whatever put it there) -> refused with the checkpoint and the tensor named."""
    from nanoalign import trainutil as tu
    from nanoalign.checkpoint import load_pretrained
    model, proc = load_pretrained(world / "ckpt")
    next(model.parameters()).data[0] = float("nan")
    with pytest.raises(SystemExit, match=r"not saving .*final: non-finite weights in"):
        tu.save_checkpoint(tmp_path, "final", model, model.config, proc, {})
    assert not (tmp_path / "final").exists()
