"""Seam: runs with nothing to learn from (online pairs all dropped, RL rewards without a signal): --no-signal-limit."""
import json

import pytest
import torch

import train
from common import cli, error_lines, main, steps

from nanoalign import annotate
from nanoalign.rollout import DROP_REASONS

ONLINE = ["--max-new-tokens", 4, "--batch-size", 4, "--lr", 1e-3, "--data", "{w}/llava.json", "--data-format",
          "llava"]
RL = ["--k", 2, "--max-new-tokens", 4, "--batch-size", 2, "--lr", 1e-3]
REWARDS = '''
def constant(images, prompts, responses):
    return [0.0] * len(responses)

def prompt_only(images, prompts, responses):  # ignores the response: equal within each prompt's samples
    return [float(im.size[0]) for im in images]

def length(images, prompts, responses):
    return [float(len(r)) for r in responses]
'''


def _args(world, extra):
    return [str(a).replace("{w}", str(world)) for a in extra]


def _annotator(verdicts):
    """A test double of load_annotator: calls[i] (a callable on the response texts, or a constant) gives the
    scores of the i-th annotation call (equal scores: a tie, dropped); the last one repeats."""
    calls = {"n": 0}

    def load(spec, *a, **kw):
        def score(ex, im, resp):
            fn = verdicts[min(calls["n"], len(verdicts) - 1)]
            calls["n"] += 1
            return torch.tensor([float(fn(r)) for r in resp])
        return annotate.Annotator(spec, score=score)
    return load


def _dropped(recs):
    """'reason n, ...' over the steps' dropped_<reason> counters (DROP_REASONS order, non-zero ones)."""
    return ", ".join(f"{r} {n}" for r in DROP_REASONS if (n := int(sum(x.get("dropped_" + r, 0) for x in recs))))


def test_unparseable_judge_stops_after_the_limit(world, tmp_path):
    """online-dpo whose judge (the tiny random VLM) parses no verdict -> after the step at which --no-signal-limit
    pairs (8: 2 steps of 4) have been sampled and all dropped, one line naming the step, the count, the reasons
    with their counts and the judge, exit 2; no further step, no final/ (it ran every step and exited 0)."""
    r = cli(world, tmp_path, "--algo", "online-dpo", "--annotator", f"vlm:{world / 'ckpt'}", "--max-steps", 10,
            "--no-signal-limit", 8, *_args(world, ONLINE), timeout=600)
    recs = steps(tmp_path)
    assert r.returncode == 2 and [x["step"] for x in recs] == [1, 2], r.stderr[-2000:]
    assert all(x["pairs"] == 0 for x in recs) and not (tmp_path / "final").exists()
    assert error_lines(r.stderr) == [
        f"error: step 2: online-dpo kept none of the first 8 pairs sampled (steps 1-2 of this run, all ranks; "
        f"dropped: {_dropped(recs)}); the annotator (--annotator vlm:{world / 'ckpt'}) leaves no sampled pair to "
        f"train on: stopping (--no-signal-limit 8; 0 = no check)"]


@pytest.mark.parametrize("algo,temperature,reason", [("online-dpo", 1.0, "tie"), ("online-dpo", 0.0, "identical"),
                                                     ("mixed-dpo", 1.0, "tie")])
def test_every_pair_dropped_stops(world, tmp_path, monkeypatch, algo, temperature, reason):
    """Every online pair dropped for another reason: an annotator that ties every pair, or --temperature 0 (both
    samples identical); mixed-dpo too, whose offline pairs still train -> stopped once --no-signal-limit online pairs
    were sampled, the line naming that reason and its count, exit 2 (Stop)."""
    monkeypatch.setattr(train, "load_annotator", _annotator([lambda r: 1.0]))
    extra = _args(world, ONLINE) if algo == "online-dpo" else _args(world, ONLINE)[:-4]  # mixed: pairs
    with pytest.raises(SystemExit) as e:
        main(world, tmp_path, "--algo", algo, "--annotator", "tie", "--temperature", temperature, "--max-steps", 20,
             "--no-signal-limit", 6, *extra)
    recs = steps(tmp_path)
    sampled = [int(sum(x.get("dropped_" + r, 0) for r in DROP_REASONS)) for x in recs]
    n = len(recs)
    assert sum(sampled[:-1]) < 6 <= sum(sampled) and n < 20 and all(x["online_share"] == 0 for x in recs)
    assert sum(x["dropped_" + reason] for x in recs) > 0  # (a sampled <image> token is dropped before annotation)
    assert all(x["dropped_" + r] == 0 for x in recs for r in DROP_REASONS if r not in (reason, "image_token"))
    assert e.value.code == (f"error: step {n}: {algo} kept none of the first {sum(sampled)} pairs sampled (steps "
                            f"1-{n} of this run, all ranks; dropped: {_dropped(recs)}); the annotator "
                            f"(--annotator tie) leaves no sampled pair to train on: stopping (--no-signal-limit 6; 0 "
                            "= no check)")
    assert not (tmp_path / "final").exists()


def test_run_with_nothing_kept_fails_at_its_end(world, tmp_path, monkeypatch):
    """A run shorter than --no-signal-limit (2 steps, 8 pairs < 64) in which no pair was kept -> one line at the
    end (every step without a pair, the reasons), exit 2, no final/: it used to save the initial weights as final/
    and exit 0."""
    monkeypatch.setattr(train, "load_annotator", _annotator([lambda r: 1.0]))
    with pytest.raises(SystemExit) as e:
        main(world, tmp_path, "--algo", "online-dpo", "--annotator", "tie", "--max-steps", 2, *_args(world, ONLINE))
    recs = steps(tmp_path)
    assert [x["step"] for x in recs] == [1, 2] and not (tmp_path / "final").exists()
    assert e.value.code == (f"error: online-dpo: no pair kept in any of the run's 2 steps (8 sampled, all dropped: "
                            f"{_dropped(recs)}); the annotator (--annotator tie) left nothing to train on, so no step was taken "
                            "and final/ is not saved")


def test_pairs_kept_after_a_bad_start_run_on(world, tmp_path, monkeypatch):
    """The first step's pairs all dropped (ties), the later ones kept (the longer response wins), --no-signal-limit
    8 (two steps' pairs) -> the run goes on to its last step and saves final/; with every pair dropped and
    --no-signal-limit 0 (no check) the run is not stopped either, and ends with final/ as before."""
    monkeypatch.setattr(train, "load_annotator", _annotator([lambda r: 1.0, len]))
    main(world, tmp_path / "a", "--algo", "online-dpo", "--annotator", "x", "--max-steps", 3, "--no-signal-limit", 8,
         *_args(world, ONLINE))
    recs = steps(tmp_path / "a")
    assert [x["pairs"] > 0 for x in recs] == [False, True, True] and (tmp_path / "a" / "final").is_dir()
    monkeypatch.setattr(train, "load_annotator", _annotator([lambda r: 1.0]))
    main(world, tmp_path / "b", "--algo", "online-dpo", "--annotator", "x", "--max-steps", 3, "--no-signal-limit", 0,
         *_args(world, ONLINE))
    assert [x["pairs"] for x in steps(tmp_path / "b")] == [0, 0, 0] and (tmp_path / "b" / "final").is_dir()


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    p = tmp_path_factory.mktemp("rw") / "rewards_flat.py"
    p.write_text(REWARDS)
    return p


@pytest.mark.parametrize("algo,fn", [("grpo", "constant"), ("rloo", "prompt_only"), ("grpo", "prompt_only"),
                                     ("ppo", "constant")])
def test_reward_without_signal_stops(world, tmp_path, rewards, algo, fn):
    """An RL reward that gives each prompt's samples one value (a constant; a rule that reads only the image): the
    group advantages (rloo, grpo) or, for ppo, the whole micro-batch's rewards hold no signal -> stopped after the
    step at which --no-signal-limit prompts (4: 2 steps of 2) were all without one, one line naming the step, the
    count, the mean reward and the --reward spec, exit 2; flat_share 1.0 in every step's metrics."""
    spec = f"{rewards}:{fn}"
    extra = ["--reward-norm", 0] if algo == "rloo" else []
    with pytest.raises(SystemExit) as e:
        main(world, tmp_path, "--algo", algo, "--reward", spec, "--max-steps", 10, "--no-signal-limit", 4, *RL, *extra)
    recs = steps(tmp_path)
    assert [x["step"] for x in recs] == [1, 2] and all(x["flat_share"] == 1.0 for x in recs)
    mean = sum(x["reward_mean"] for x in recs) / 2
    what = "each prompt's samples got one reward" if algo != "ppo" else "every sample of each micro-batch got one " \
        "reward"
    assert e.value.code == (f"error: step 2: {algo}: for the first 4 prompts (steps 1-2 of this run, all ranks) "
                            f"{what} (mean reward {mean:.4g}): the advantages hold no reward signal (only KL to the "
                            f"reference), --reward {spec} gives nothing to learn from: stopping (--no-signal-limit 4; "
                            "0 = no check)")
    assert not (tmp_path / "final").exists()


def test_reward_with_a_signal_runs_on(world, tmp_path, rewards):
    """ppo with k 1 (no group to compare within) and a reward of the response's length, and grpo with the same
    reward -> no stop: each runs every step (flat_share below 1 on some) and saves final/."""
    for algo, k in (("ppo", 1), ("grpo", 2)):
        main(world, tmp_path / algo, "--algo", algo, "--reward", f"{rewards}:length", "--max-steps", 3,
             "--no-signal-limit", 2, *RL[2:], "--k", k)
        recs = steps(tmp_path / algo)
        assert [x["step"] for x in recs] == [1, 2, 3] and (tmp_path / algo / "final").is_dir()
        assert min(x["flat_share"] for x in recs) < 1.0


def test_rl_run_without_signal_fails_at_its_end(world, tmp_path, rewards):
    """A grpo run shorter than --no-signal-limit (2 steps, 4 prompts < 64) with a constant reward -> one line at the
    end (every prompt without a signal, the mean reward), exit 2, no final/."""
    with pytest.raises(SystemExit) as e:
        main(world, tmp_path, "--algo", "grpo", "--reward", f"{rewards}:constant", "--max-steps", 2, *RL)
    assert e.value.code == (f"error: grpo: in all 2 steps of the run each prompt's samples got one reward (mean "
                            f"reward 0; 4 prompts): the advantages held no reward signal (only KL to the reference), "
                            f"nothing was learned from --reward {rewards}:constant; final/ is not saved")
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("algo,extra", [("dpo", []), ("grpo", ["--reward", "{rw}:length", *RL])])
def test_every_step_skipped_fails_at_the_end(world, tmp_path, monkeypatch, rewards, algo, extra):
    """--skip-nonfinite with non-finite gradients at every update (dpo; grpo) -> every step skipped with its
    warning, then one line at the end (no step updated the model), exit 2, no final/: it saved the initial weights
    as final/ and exited 0."""
    from nanoalign import trainutil
    real = trainutil.clip_grad_norm

    def poisoned(model, max_norm):
        next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        return real(model, max_norm)
    monkeypatch.setattr(trainutil, "clip_grad_norm", poisoned)
    with pytest.raises(SystemExit) as e:
        main(world, tmp_path, "--algo", algo, "--max-steps", 2, "--skip-nonfinite",
             *[str(a).replace("{rw}", str(rewards)) for a in extra])
    assert e.value.code == (f"error: {algo}: none of the run's 2 steps updated the model (each was skipped, see the "
                            "lines above): nothing was learned, final/ is not saved")
    assert not (tmp_path / "final").exists()
