"""Seam: --resume of every algorithm of train.py's table (1 process, CPU): the train state holds what a step needs."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from common import main, steps

import train

REWARD_MOD = "def length(images, prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
RL = ["--k", 2, "--max-new-tokens", 4, "--reward", "{rewards}:length"]
LORA = ["--lora-rank", 4, "--lora-dropout", 0.2]  # dropout draws from the global RNG: it must be restored
# each algorithm's extra arguments: LoRA with dropout on some rows, full fine-tuning on the others
EXTRA = {
    "sft": ["--data", "{world}/llava.json", "--data-format", "llava"],
    "dpo": [],
    "ipo": LORA,
    "slic": [],
    "ddpo": LORA,
    "povid": [],  # its noise is drawn from the global RNG
    "online-dpo": ["--annotator", "len", "--max-new-tokens", 4, *LORA],
    "mixed-dpo": ["--annotator", "len", "--max-new-tokens", 4, "--alpha", 0.5],
    "online-bdhs": LORA,  # BDHS samples with its own settings (--max-new-tokens: online-dpo, mixed-dpo, RL)
    "rm": [],  # the reward head and its own AdamW
    "rloo": [*RL, "--reward-norm", 2, *LORA],  # the reward mean/std measured before step 1
    "ppo": [*RL, "--ppo-epochs", 2, "--ppo-minibatches", 2],  # the value head and its own AdamW
    "grpo": [*RL, *LORA],
}
FAST = ["povid", "online-dpo", "rm", "ppo", "grpo"]  # the default run (dpo: tests/test_train.py, test_kill_resume.py)
TIMING = ("time_s", "tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s", "peak_mem_mb", "rollout_s",
          "train_s")


def _numbers(recs):
    """The records without wall-clock and memory keys, as JSON text (NaN == NaN, floats compared bit for bit)."""
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True) for r in recs]


def _tensors(folder):
    out = dict(load_file(str(folder / "model.safetensors")))
    for name in ("reward_head.safetensors", "train_state.safetensors"):
        if (folder / name).is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(str(folder / name)).items() if not k.startswith("rng.")})
    return out


def _resume_matches(world, tmp_path, monkeypatch, algo):
    from test_online import length_annotator
    monkeypatch.setattr(train, "load_annotator", length_annotator)
    (tmp_path / "rewards_mod.py").write_text(REWARD_MOD)
    extra = [str(a).format(world=world, rewards=tmp_path / "rewards_mod.py") for a in EXTRA[algo]]
    args = ["--algo", algo, "--max-steps", 3, "--save-every", 1, "--lr", 1e-3, *extra]
    out = tmp_path / "run"
    main(world, out, *args)
    full, final = _numbers(steps(out)), _tensors(out / "final")
    shutil.rmtree(out / "final")  # a kill right after the step-1 checkpoint: the later state is gone
    shutil.rmtree(out / "step-000002")
    if algo == "rloo":  # measured with the initial policy before step 1: read from the checkpoint, not re-measured
        monkeypatch.setattr(train.rlstep, "reward_stats_before_training", lambda *a, **kw: (0.5, 3.0))
    main(world, out, *args, "--resume")
    assert [r["step"] for r in steps(out)] == [1, 2, 3]
    assert _numbers(steps(out)) == full  # steps 2 and 3 recomputed from the step-1 state: bit for bit
    resumed = _tensors(out / "final")
    assert sorted(resumed) == sorted(final)
    for k, v in final.items():
        assert torch.equal(resumed[k], v), k
    if algo in ("rm", "ppo"):
        assert any(k.startswith(("reward_head", "train_state.safetensors:head.")) for k in final)
    assert all(math.isfinite(r["loss"]) for r in steps(out))


@pytest.mark.parametrize("algo", FAST)
def test_resume_every_algorithm(world, tmp_path, monkeypatch, algo):
    """A run of each algorithm (here povid, online-dpo, rm, ppo with 2 minibatches, grpo) stopped after the
    step-1 checkpoint and resumed -> every step's metrics (loss, rewards, KL, ...) and final/'s weights, reward head
    and value head equal the uninterrupted run's bit for bit (CPU, 1 process)."""
    _resume_matches(world, tmp_path, monkeypatch, algo)


@pytest.mark.slow
@pytest.mark.parametrize("algo", [a for a in train.ALGOS if a not in FAST])
def test_resume_every_algorithm_rest(world, tmp_path, monkeypatch, algo):
    """The same for the other rows of the table (sft, dpo, ipo, slic, ddpo, mixed-dpo, online-bdhs, rloo with its
    reward normalization, which is read from the checkpoint, never re-measured) -> bit-identical metrics and final/
    tensors."""
    _resume_matches(world, tmp_path, monkeypatch, algo)
