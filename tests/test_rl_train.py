"""train.py's rm, rloo, ppo and grpo end to end on a tiny llava checkpoint made by transformers: 3 steps each, the
first-step loss against the formulas, 1 rank vs 2 ranks (torchrun, FSDP2 on gloo), RLOO and GRPO raising a reward
that is a known function of the response, the reward model's head file and its one-line failures, the collapse
guard."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
from test_train import world  # noqa: E402,F401  (the fixture: tiny checkpoint, 8 images, 8 pairs)

transformers = pytest.importorskip("transformers")
REWARD_MOD = '''
def length(images, prompts, responses):
    return [float(len(r.split())) for r in responses]

def short(images, prompts, responses):
    return [-float(len(r.split())) for r in responses]

def bad(images, prompts, responses):
    return [float("nan") if i == 1 else 0.0 for i in range(len(responses))]
'''


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("rw") / "rewards_mod.py"
    p.write_text(REWARD_MOD)
    return p


def run(world, tmp, *extra):
    argv = ["--model", str(world / "ckpt"), "--data", str(world / "prefs.jsonl"), "--image-root",
            str(world / "img"), "--out", str(tmp), "--batch-size", "2", *map(str, extra)]
    train.main(train.parse_args(argv))
    return [r for r in map(json.loads, open(tmp / "metrics.jsonl")) if "step" in r]


RL_ARGS = ["--k", 2, "--max-new-tokens", 6, "--lr", 1e-3, "--reward-norm", 0]


@pytest.mark.parametrize("algo", ["rloo", "ppo", "grpo"])
def test_three_steps(world, tmp_path, rewards_file, algo):
    recs = run(world, tmp_path, "--algo", algo, "--max-steps", 3, "--reward", f"{rewards_file}:length", *RL_ARGS,
               *(["--ppo-epochs", 2] if algo == "ppo" else []))
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "kl", "entropy", "resp_len", "rollout_tokens_per_s",
                "train_tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 1
    assert all(r["grad_norm"] > 0 for r in recs)
    if algo == "grpo":  # ratio 1 and KL 0 at step 1: loss = -mean A = 0 (group-centred advantages)
        assert recs[0]["loss"] == pytest.approx(0.0, abs=1e-4)
        assert recs[0]["clip_frac"] == 0.0
    if algo == "ppo":
        assert all(math.isfinite(r["value_loss"]) and "explained_var" in r for r in recs)


@pytest.mark.parametrize("algo", ["rloo", "grpo", "ppo"])
def test_two_ranks_match_one_rank(world, tmp_path, rewards_file, algo):
    """2 gloo ranks, 1 prompt each == 1 rank, 2 micro-steps of 1 prompt: same samples, losses, rewards."""
    common = ["--model", str(world / "ckpt"), "--data", str(world / "prefs.jsonl"), "--image-root",
              str(world / "img"), "--algo", algo, "--max-steps", "2", "--reward", f"{rewards_file}:length",
              *map(str, RL_ARGS), "--batch-size", "1", "--ppo-epochs", "2"]
    train.main(train.parse_args(common + ["--grad-accum", "2", "--out", str(tmp_path / "one")]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "train.py"), *common, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    load = lambda d: [x for x in map(json.loads, open(d / "metrics.jsonl")) if "step" in x]  # noqa: E731
    one, two = load(tmp_path / "one"), load(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["reward_mean"] == b["reward_mean"] and a["resp_len"] == b["resp_len"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_reward_of_the_response_rises(world, tmp_path, rewards_file, algo):
    """Reward = minus the number of words: 50 steps make responses shorter (mean reward of the last 10 steps above
    the first 10's)."""
    recs = run(world, tmp_path, "--algo", algo, "--max-steps", 50, "--reward", f"{rewards_file}:short", "--k", 4,
               "--max-new-tokens", 8, "--lr", 3e-3, "--reward-norm", 4 if algo == "rloo" else 0, "--beta", 0.01)
    first = sum(r["reward_mean"] for r in recs[:10]) / 10
    last = sum(r["reward_mean"] for r in recs[-10:]) / 10
    assert last > first + 1.0, (first, last)


def test_nonfinite_reward_names_the_example(world, tmp_path, rewards_file):
    with pytest.raises(ValueError, match=r"example \S+: non-finite reward nan"):
        run(world, tmp_path, "--algo", "grpo", "--max-steps", 1, "--reward", f"{rewards_file}:bad", *RL_ARGS)


def test_collapse_guard_stops(world, tmp_path, rewards_file, capsys):
    with pytest.raises(SystemExit, match="collapse guard at step 1.*response length"):
        run(world, tmp_path, "--algo", "rloo", "--max-steps", 2, "--reward", f"{rewards_file}:length", *RL_ARGS,
            "--guard-len-min", 100, "--stop-on-collapse")


def test_rm_trains_saves_head_and_loads_as_llava(world, tmp_path):
    recs = run(world, tmp_path / "rm", "--algo", "rm", "--max-steps", 3, "--lr", 1e-3)
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=0.2) and "accuracy" in recs[0]
    final = tmp_path / "rm" / "final"
    assert (final / "reward_head.safetensors").is_file()
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(final))
    assert hf is not None
    # as an RL reward
    recs = run(world, tmp_path / "rl", "--algo", "grpo", "--max-steps", 1, "--reward", f"rm:{final}", *RL_ARGS)
    assert math.isfinite(recs[0]["reward_mean"])
    # head missing: one line at start
    (final / "reward_head.safetensors").unlink()
    with pytest.raises(ValueError, match="no reward_head.safetensors"):
        run(world, tmp_path / "rl2", "--algo", "grpo", "--max-steps", 1, "--reward", f"rm:{final}", *RL_ARGS)
