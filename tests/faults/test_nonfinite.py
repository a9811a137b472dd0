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


# ------------------------------------------------------------------------------ RL and the reward model (heads)
REWARD_MOD = "def length(images, prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
RL = ["--k", 2, "--max-new-tokens", 4, "--lr", 1e-3]
POISON = '''
import runpy, sys
sys.path.insert(0, {repo!r})
from nanoalign import trainutil
real, calls = trainutil.{fn}, {{"n": 0}}
def poisoned(module, *a):
    calls["n"] += 1
    if calls["n"] == {at}:  # a NaN in the first gradient found
        next(p for p in module.parameters() if p.grad is not None).grad.fill_(float("nan"))
    return real(module, *a)
trainutil.{fn} = poisoned
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
'''


def _poisoned_cli(world, out, fn, at, *extra):
    """train.py's command line with trainutil.fn (clip_grad_norm: the model's gradients; allreduce_grads: the
    head's) putting a NaN into a gradient at its `at`-th call."""
    import os
    import subprocess
    import sys
    from common import REPO, TRAIN, argv
    code = POISON.format(repo=REPO, fn=fn, at=at, train=TRAIN)
    return subprocess.run([sys.executable, "-c", code, *argv(world, out, *map(str, extra))], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300, cwd=REPO)


@pytest.mark.parametrize("algo,fn,at,extra,where", [
    ("grpo", "clip_grad_norm", 2, [], r"gradient norm nan at step 2, rank 0"),
    ("ppo", "clip_grad_norm", 3, ["--ppo-epochs", 2], r"gradient norm nan at step 2 \(update 1 of 2\), rank 0"),
    ("rm", "allreduce_grads", 2, [], r"head gradient norm nan at step 2, rank 0"),
])
def test_nonfinite_gradients_stop_rl_and_rm(world, tmp_path, algo, fn, at, extra, where):
    """Non-finite gradients in grpo, ppo (each PPO update checked) or the reward model's head -> one line naming
    step (and update), rank and example ids, exit 2, before the optimizer step; final/ is never written and the
    step-1 checkpoint (head included) is finite."""
    import re
    from common import error_lines
    from safetensors.torch import load_file
    (tmp_path / "rewards_mod.py").write_text(REWARD_MOD)
    rl = [*RL, "--reward", f"{tmp_path / 'rewards_mod.py'}:length"] if algo != "rm" else ["--lr", 1e-3]
    r = _poisoned_cli(world, tmp_path / "o", fn, at, "--algo", algo, "--max-steps", 3, "--save-every", 1, *rl, *extra)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1, lines
    assert re.search(rf"^error: non-finite {where}, examples \['\d+', '\d+'\] \(last checkpoint: .*step-000001\); "
                     r"stopping before the optimizer step", lines[0]), lines[0]
    assert not (tmp_path / "o" / "final").exists()
    for f in ("model.safetensors", "train_state.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "o" / "step-000001" / f)).values()
                   if v.is_floating_point())


def test_nonfinite_head_parameters_after_the_step(world, tmp_path, monkeypatch):
    """PPO's value head becoming non-finite in its optimizer step -> the run stops naming step, rank and the head's
    parameter; nothing is saved."""
    (tmp_path / "rewards_mod.py").write_text(REWARD_MOD)
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        if len(self.param_groups[0]["params"]) == 2:  # the head's AdamW: weight (1, H) and bias (1,)
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(SystemExit, match=r"non-finite parameters after the optimizer step at step 1 \(update 1 of "
                                         r"2\), rank 0.*rank 0: head\.weight; nothing saved"):
        main(world, tmp_path / "o", "--algo", "ppo", "--max-steps", 2, "--ppo-epochs", 2, *RL,
             "--reward", f"{tmp_path / 'rewards_mod.py'}:length")
    assert not (tmp_path / "o" / "final").exists()


def test_skip_nonfinite_rl(world, tmp_path, monkeypatch):
    """Non-finite gradients in an RL update with --skip-nonfinite -> that update is skipped (logged in the step's
    record), the run goes on and the saved weights are finite."""
    (tmp_path / "rewards_mod.py").write_text(REWARD_MOD)
    _poison_grads(monkeypatch, 2)
    main(world, tmp_path, "--algo", "grpo", "--max-steps", 3, "--skip-nonfinite", *RL,
         "--reward", f"{tmp_path / 'rewards_mod.py'}:length")
    recs = steps(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert "skipped" not in recs[0] and recs[1]["skipped"].startswith("1 of 1 updates") and "skipped" not in recs[2]
    assert math.isnan(recs[1]["grad_norm"]) and math.isfinite(recs[2]["grad_norm"])
    from nanoalign.checkpoint import load_state_dict
    assert all(torch.isfinite(v).all() for v in load_state_dict(tmp_path / "final").values())


def test_nonfinite_rl_loss_stops(world, tmp_path, monkeypatch):
    """A non-finite RL loss (here ppo's second update) -> the run stops before its optimizer step naming step,
    update, rank and example ids; nothing is saved."""
    from nanoalign import rlstep
    (tmp_path / "rewards_mod.py").write_text(REWARD_MOD)
    real, calls = rlstep.rl_objective, {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss, m = real(*a, **kw)
        return (loss * float("nan") if calls["n"] == 2 else loss), m
    monkeypatch.setattr(rlstep, "rl_objective", poisoned)
    with pytest.raises(SystemExit, match=r"^error: non-finite loss nan at step 1 \(update 2 of 2\), rank 0, examples "
                                         r"\['\d+', '\d+'\] \(last checkpoint: none\); stopping before the optimizer"):
        main(world, tmp_path / "o", "--algo", "ppo", "--max-steps", 2, "--ppo-epochs", 2, *RL,
             "--reward", f"{tmp_path / 'rewards_mod.py'}:length")
    assert not (tmp_path / "o" / "final").exists()
