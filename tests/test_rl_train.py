"""train.py's rm, rloo, ppo and grpo end to end on a tiny llava checkpoint made by transformers: 3 steps each, the
first-step loss against the formulas, 1 rank vs 2 ranks (torchrun, FSDP2 on gloo), RLOO and GRPO raising a reward
that is a known function of the response, the reward model's head file and its one-line failures, the collapse
guard, PPO's minibatches (which rollouts go into which, how many optimizer steps, the argument's rules)."""
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


def rl_args(algo):  # --reward-norm: rloo only (0: no sampling before training)
    return ["--k", 2, "--max-new-tokens", 6, "--lr", 1e-3, *(["--reward-norm", 0] if algo == "rloo" else [])]


@pytest.mark.parametrize("algo", ["rloo", "ppo", "grpo"])
def test_three_steps(world, tmp_path, rewards_file, algo):
    recs = run(world, tmp_path, "--algo", algo, "--max-steps", 3, "--reward", f"{rewards_file}:length", *rl_args(algo),
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
              *map(str, rl_args(algo)), "--batch-size", "1",
              *(["--ppo-epochs", "2"] if algo == "ppo" else [])]
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
               "--max-new-tokens", 8, "--lr", 3e-3, *(["--reward-norm", 4] if algo == "rloo" else []), "--beta", 0.01)
    first = sum(r["reward_mean"] for r in recs[:10]) / 10
    last = sum(r["reward_mean"] for r in recs[-10:]) / 10
    assert last > first + 1.0, (first, last)


def test_nonfinite_reward_names_the_example(world, tmp_path, rewards_file):
    with pytest.raises(ValueError, match=r"example \S+: non-finite reward nan"):
        run(world, tmp_path, "--algo", "grpo", "--max-steps", 1, "--reward", f"{rewards_file}:bad", *rl_args("grpo"))


def test_collapse_guard_stops(world, tmp_path, rewards_file, capsys):
    with pytest.raises(SystemExit, match="collapse guard at step 1.*response length"):
        run(world, tmp_path, "--algo", "rloo", "--max-steps", 2, "--reward", f"{rewards_file}:length", *rl_args("rloo"),
            "--guard-len-min", 100, "--stop-on-collapse")


def test_rm_trains_saves_head_and_loads_as_llava(world, tmp_path):
    recs = run(world, tmp_path / "rm", "--algo", "rm", "--max-steps", 3, "--lr", 1e-3)
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=0.2) and "accuracy" in recs[0]
    final = tmp_path / "rm" / "final"
    assert (final / "reward_head.safetensors").is_file()
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(final))
    assert hf is not None
    # as an RL reward
    recs = run(world, tmp_path / "rl", "--algo", "grpo", "--max-steps", 1, "--reward", f"rm:{final}", *rl_args("grpo"))
    assert math.isfinite(recs[0]["reward_mean"])
    # head missing: one line at start
    (final / "reward_head.safetensors").unlink()
    with pytest.raises(ValueError, match="no reward_head.safetensors"):
        run(world, tmp_path / "rl2", "--algo", "grpo", "--max-steps", 1, "--reward", f"rm:{final}", *rl_args("grpo"))


# ----------------------------------------------------------------------------------------------- PPO minibatches
def _fake_roll(first: int, n: int) -> dict:
    """A rollout of n rows whose rewards are first .. first+n-1 (each row's identity) and a batch of n rows, the
    even rows showing image 0 or 1 (row_image), the odd rows text-only."""
    T = 3
    row_image = torch.tensor([(r // 2) % 2 if r % 2 == 0 else -1 for r in range(n)])
    b = {"input_ids": torch.arange(n * T).reshape(n, T), "attention_mask": torch.ones(n, T, dtype=torch.long),
         "labels": torch.arange(n * T).reshape(n, T), "token_weights": torch.ones(n, T), "row_image": row_image,
         "pixel_values": torch.randn(2, 3, 4, 4), "image_sizes": torch.tensor([[4, 4], [4, 4]]),
         "image_index": row_image[row_image >= 0]}
    ids = torch.arange(first, first + n, dtype=torch.float32)
    return {"b": b, "rewards": ids, "advantages": ids[:, None].repeat(1, T), "old_logps": ids[:, None].repeat(1, T),
            "ref_logps": None, "mask": torch.ones(n, T, dtype=torch.bool), "metrics": {"reward_mean": 0.0}}


def test_minibatches_hand_computed():
    """Two rolls (grad-accum micro-batches) of 6 rows, rows 0..11 in order. M = 1: both rolls whole, share 2 (=
    --grad-accum: today's one update). M = 2: one roll per minibatch, share 1. M = 3: blocks of 4 rows = rows 0-3 |
    4-7 | 8-11, the middle one made of roll 0's last 2 and roll 1's first 2 rows, each share 4 / 2 = 2. M = 12: one
    row each. M = 5 or 0: refused."""
    from nanoalign import rlstep
    rolls = [_fake_roll(0, 6), _fake_roll(6, 6)]
    rows = lambda blocks: [[p["rewards"].tolist() for p, _ in blk] for blk in blocks]  # noqa: E731
    shares = lambda blocks: [[s for _, s in blk] for blk in blocks]  # noqa: E731
    one = rlstep.minibatches(rolls, 1)
    assert [[p is r for (p, _), r in zip(one[0], rolls)]] == [[True, True]] and shares(one) == [[2.0, 2.0]]
    two = rlstep.minibatches(rolls, 2)
    assert rows(two) == [[[0, 1, 2, 3, 4, 5]], [[6, 7, 8, 9, 10, 11]]] and shares(two) == [[1.0], [1.0]]
    three = rlstep.minibatches(rolls, 3)
    assert rows(three) == [[[0, 1, 2, 3]], [[4, 5], [6, 7]], [[8, 9, 10, 11]]]
    assert shares(three) == [[1.0], [2.0, 2.0], [1.0]]
    assert rows(rlstep.minibatches(rolls, 12)) == [[[float(i)]] for i in range(12)]
    for m in (5, 0):
        with pytest.raises(ValueError, match=f"--ppo-minibatches {m}: must be >= 1 and divide the rank's 12"):
            rlstep.minibatches(rolls, m)
    # a piece is the roll's rows in every per-row tensor; the images stay whole, image_index follows the rows
    mid = three[1][0][0]  # roll 0, rows 4-5: row 4 shows image (4 // 2) % 2 = 0, row 5 none
    assert mid["advantages"][:, 0].tolist() == [4, 5] and mid["old_logps"].shape == (2, 3)
    assert torch.equal(mid["b"]["input_ids"], rolls[0]["b"]["input_ids"][4:6])
    assert mid["b"]["image_index"].tolist() == [0] and mid["b"]["pixel_values"].shape[0] == 2


def test_minibatches_reshuffled_hand_computed():
    """With an epoch's order (a permutation of the 12 global rows), block j = rows order[4j : 4j + 4], cut per roll
    in row order: order [11 0 5 6 | 1 2 3 4 | 7 8 9 10] -> block 0 = roll 0 rows {0, 5} + roll 1 rows {0, 5}
    (global 6, 11), share 4 / 2 = 2 each; block 1 = roll 0 rows 1-4 (share 1); block 2 = roll 1 rows 1-4. M = 1
    ignores the order (both rolls whole). A non-permutation is refused."""
    from nanoalign import rlstep
    rolls = [_fake_roll(0, 6), _fake_roll(6, 6)]
    order = torch.tensor([11, 0, 5, 6, 1, 2, 3, 4, 7, 8, 9, 10])
    blocks = rlstep.minibatches(rolls, 3, order)
    assert [[p["rewards"].tolist() for p, _ in blk] for blk in blocks] == [
        [[0, 5], [6, 11]], [[1, 2, 3, 4]], [[7, 8, 9, 10]]]
    assert [[s for _, s in blk] for blk in blocks] == [[2.0, 2.0], [1.0], [1.0]]
    first = blocks[0][0][0]  # roll 0 rows 0 and 5: per-row tensors and the batch cut alike
    assert first["advantages"][:, 0].tolist() == [0, 5]
    assert torch.equal(first["b"]["input_ids"], rolls[0]["b"]["input_ids"][[0, 5]])
    assert first["b"]["image_index"].tolist() == [0]  # row 0 shows image 0, row 5 is text-only
    one = rlstep.minibatches(rolls, 1, order)
    assert [p is r for (p, _), r in zip(one[0], rolls)] == [True, True]
    with pytest.raises(ValueError, match="permutation"):
        rlstep.minibatches(rolls, 3, torch.tensor([0] * 12))


def test_minibatch_order_per_epoch():
    """Each PPO epoch draws its own order from (seed, step, epoch) alone: the epochs of a step differ, the same
    (seed, step, epoch) gives the same order (what --resume needs), the global RNG is untouched, and each order is
    a permutation whose blocks still cover every row once."""
    from nanoalign import rlstep
    torch.manual_seed(123)
    before = torch.get_rng_state()
    orders = [rlstep.minibatch_order(12, 0, 5, e) for e in range(4)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(torch.sort(o).values, torch.arange(12)) for o in orders)
    assert len({tuple(o.tolist()) for o in orders}) == 4  # every epoch its own order
    assert torch.equal(orders[1], rlstep.minibatch_order(12, 0, 5, 1))
    assert not torch.equal(orders[1], rlstep.minibatch_order(12, 0, 6, 1))  # another step
    assert not torch.equal(orders[1], rlstep.minibatch_order(12, 1, 5, 1))  # another seed
    rolls = [_fake_roll(0, 6), _fake_roll(6, 6)]
    blocks = [rlstep.minibatches(rolls, 3, o) for o in orders]
    rows_of = lambda bl: [sorted(x for p, _ in blk for x in p["rewards"].tolist()) for blk in bl]  # noqa: E731
    for bl, o in zip(blocks, orders):
        assert rows_of(bl) == [sorted(o[4 * j:4 * j + 4].tolist()) for j in range(3)]
    assert rows_of(blocks[0]) != rows_of(blocks[1])


def test_ppo_minibatches_optimizer_steps(world, tmp_path, rewards_file, monkeypatch):
    """--ppo-epochs 2 --ppo-minibatches 2 on a step of 2 prompts x k 2 = 4 rollouts: 4 optimizer steps of the
    policy and 4 of the value head per training step, each on 2 rollouts (M = 1: 2 steps of 4)."""
    from nanoalign import rlstep
    real_step, real_obj = torch.optim.AdamW.step, rlstep.rl_objective
    counts, rows = {}, []

    def step(self, *a, **kw):
        key = "head" if len(self.param_groups[0]["params"]) == 2 else "policy"
        counts[key] = counts.get(key, 0) + 1
        return real_step(self, *a, **kw)

    def objective(algo_loss, policy, roll, *a, **kw):
        rows.append(roll["rewards"].shape[0])
        return real_obj(algo_loss, policy, roll, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(rlstep, "rl_objective", objective)
    for m, want in ((2, 4), (1, 2)):
        counts.clear(), rows.clear()
        run(world, tmp_path / f"m{m}", "--algo", "ppo", "--max-steps", 1, "--reward", f"{rewards_file}:length",
            *rl_args("ppo"), "--ppo-epochs", 2, "--ppo-minibatches", m)
        assert counts == {"policy": want, "head": want}
        assert rows == [4 // m] * want


@pytest.mark.parametrize("value,reason", [
    ("0", "must be >= 1"),
    ("3", "must divide a rank's rollouts per step, --batch-size x --k x --grad-accum = 2 x 2 x 1 = 4")])
def test_ppo_minibatches_refused(world, tmp_path, capsys, value, reason):
    """--ppo-minibatches 0, or one that does not divide a rank's rollouts of a step: the parser's one line, exit 2."""
    argv = ["--model", str(world / "ckpt"), "--data", str(world / "prefs.jsonl"), "--out", str(tmp_path), "--algo",
            "ppo", "--reward", "oracle", "--batch-size", "2", "--k", "2", "--ppo-minibatches", value]
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: --ppo-minibatches {value}: " in last and reason in last, last


# ------------------------------------------------------------------------------- one forward less per rloo/grpo step
@pytest.mark.parametrize("algo,extra,per_step", [
    ("grpo", [], {"reference": 1, "policy": 1}),  # the rollout's policy forward is the update's (live_logps)
    ("rloo", [], {"reference": 1, "policy": 1}),
    ("grpo", ["--grad-accum", 2], {"reference": 2, "policy": 4}),  # per micro-batch: the old pass + the update's
    ("ppo", ["--ppo-epochs", 2], {"reference": 1, "policy": 3})])  # old pass + one per epoch
def test_rl_forward_passes(world, tmp_path, rewards_file, monkeypatch, algo, extra, per_step):
    """Forward passes of the models per training step (the rollout's sampling aside): rloo and grpo with one update
    per rollout reuse the rollout's policy forward for the loss (TRL's GRPOTrainer also makes 2, not 3); with
    --grad-accum 2 or PPO's epochs the old-policy pass stays."""
    from nanoalign import rlstep
    real, calls = rlstep.forward, []

    def counted(model, b, device):
        calls.append("reference" if not any(p.requires_grad for p in model.parameters()) else "policy")
        return real(model, b, device)
    monkeypatch.setattr(rlstep, "forward", counted)
    run(world, tmp_path, "--algo", algo, "--max-steps", 2, "--reward", f"{rewards_file}:length", *rl_args(algo), *extra)
    assert {k: calls.count(k) for k in per_step} == {k: 2 * v for k, v in per_step.items()}


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_live_logps_equal_a_fresh_forward(world, tmp_path, rewards_file, monkeypatch, algo):
    """Reusing the rollout's forward changes no number: 3 steps with live_logps and 3 steps where every update makes
    its own forward (the entry dropped before rl_objective, the previous implementation) give bit-identical metrics
    (loss, KL, rewards, grad norm) and final weights."""
    from safetensors.torch import load_file
    from nanoalign import rlstep
    args = ["--algo", algo, "--max-steps", 3, "--reward", f"{rewards_file}:length", *rl_args(algo)]
    live = run(world, tmp_path / "live", *args)
    real = rlstep.rl_objective

    def fresh(algo_loss, policy, roll, *a, **kw):
        assert roll["live_logps"] is not None
        return real(algo_loss, policy, {**roll, "live_logps": None}, *a, **kw)
    monkeypatch.setattr(rlstep, "rl_objective", fresh)
    again = run(world, tmp_path / "fresh", *args)
    skip = ("time_s", "rollout_tokens_per_s", "train_tokens_per_s", "peak_mem_mb", "rollout_s")
    assert [{k: v for k, v in r.items() if k not in skip} for r in live] == \
        [{k: v for k, v in r.items() if k not in skip} for r in again]
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("live", "fresh"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_rollouts_sample_with_the_given_top_p(world, tmp_path, rewards_file, monkeypatch, algo):
    """--top-p reaches the RL rollouts (they sampled at top-p 1 whatever was given) and RLOO's reward statistics."""
    from nanoalign import engine
    seen, real = [], engine.sample
    monkeypatch.setattr(engine, "sample", lambda *a, **kw: (seen.append(kw.get("top_p")), real(*a, **kw))[1])
    run(world, tmp_path, "--algo", algo, "--max-steps", 1, "--reward", f"{rewards_file}:length", "--top-p", 0.7,
        "--k", 2, "--max-new-tokens", 4, *(["--reward-norm", 2] if algo == "rloo" else []))
    assert seen and all(p == 0.7 for p in seen), seen
