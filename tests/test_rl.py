"""nanoalign.rl: every estimator against numbers worked out by hand (written out below), and the gradients of the
clipped objectives with clipping active and inactive."""
import math

import pytest
import torch

from nanoalign import rl


def test_rloo_advantages_k4_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, -4.0]], dtype=torch.float64)
    # prompt 0: A_0 = 1 - (2+3+6)/3 = 1 - 11/3 = -8/3; A_1 = 2 - (1+3+6)/3 = 2 - 10/3 = -4/3;
    #           A_2 = 3 - (1+2+6)/3 = 0;               A_3 = 6 - (1+2+3)/3 = 4
    # prompt 1: A_0 = 0 - (0+4-4)/3 = 0; A_1 = 0; A_2 = 4 - (0+0-4)/3 = 16/3; A_3 = -4 - 4/3 = -16/3
    expected = torch.tensor([[-8 / 3, -4 / 3, 0.0, 4.0], [0.0, 0.0, 16 / 3, -16 / 3]], dtype=torch.float64)
    assert torch.allclose(rl.rloo_advantages(r), expected, atol=1e-12)
    with pytest.raises(ValueError, match="k >= 2"):
        rl.rloo_advantages(torch.ones(3, 1))


def test_reward_normalization_and_sequence_kl_by_hand():
    data = torch.tensor([1.0, 3.0, 5.0, 7.0])  # mean 4, population var (9+1+1+9)/4 = 5
    mean, std = rl.reward_stats(data)
    assert mean == 4.0 and std == pytest.approx(math.sqrt(5.0))
    r = rl.normalize_rewards(torch.tensor([4.0, 4.0 + math.sqrt(5.0)]), mean, std)
    assert torch.allclose(r, torch.tensor([0.0, 1.0]))
    logps = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.5, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # k1 per token = logp - ref: row 0: 0.5, -1.0 (third off the mask) -> -0.5; row 1: 0, 1.0, -0.5 -> 0.5
    out = rl.kl_penalized_rewards(torch.tensor([1.0, 1.0]), logps, ref, mask, beta=0.1)
    assert torch.allclose(out, torch.tensor([1.0 + 0.05, 1.0 - 0.05]))
    with pytest.raises(ValueError, match="non-finite"):
        rl.reward_stats(torch.tensor([1.0, float("nan")]))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # r = ref/pi = 0.5, log r = -log 2
    assert rl.kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert rl.kl_per_token(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert rl.kl_per_token(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    # exact KL of two distributions = the expectation of k1 and of k3 under pi
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    kl = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        assert float((p * rl.kl_per_token(p.log(), q.log(), est)).sum()) == pytest.approx(kl, rel=1e-6)


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 1: mean 0.75, deviations -0.75 x3, 2.25:
    #          sample var (3 * 0.5625 + 5.0625) / 3 = 2.25, std 1.5
    s0 = math.sqrt(1 / 3)
    expected = torch.tensor([[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [-0.5, -0.5, -0.5, 1.5]], dtype=torch.float64)
    assert torch.allclose(rl.grpo_advantages(r, eps=0.0), expected, atol=1e-12)
    # Dr. GRPO: no std division
    assert torch.allclose(rl.grpo_advantages(r, scale=False),
                          torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]], dtype=torch.float64))
    assert torch.equal(rl.grpo_advantages(torch.ones(1, 4)), torch.zeros(1, 4))  # constant group: eps keeps 0


def test_aggregations_by_hand():
    l = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert rl.aggregate(l, mask, "grpo").item() == pytest.approx((6 / 3 + 4 / 1) / 2)  # 3.0
    assert rl.aggregate(l, mask, "dapo").item() == pytest.approx((1 + 2 + 3 + 4) / 4)  # 2.5
    assert rl.aggregate(l, mask, "dr_grpo", max_len=5).item() == pytest.approx(10 / (2 * 5))  # 1.0
    with pytest.raises(ValueError, match="max_len"):
        rl.aggregate(l, mask, "dr_grpo")
    with pytest.raises(ValueError, match="unknown"):
        rl.aggregate(l, mask, "mean")


def test_grpo_loss_by_hand():
    """At the first update (old = current) the ratio is 1; the loss is -A per token plus beta * k3."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    A = torch.tensor([2.0, -1.0])
    # k3 tokens: row 0: (0, e^{1} - 1 - 1 = e - 2); row 1: 0.  per-token loss: row 0: -2, -2 + 0.1 (e - 2); row 1: 1
    loss, m = rl.grpo_loss(logps, logps.detach(), ref, mask, A, beta=0.1, aggregation="grpo")
    row0 = (-2 + -2 + 0.1 * (math.e - 2)) / 2
    assert loss.item() == pytest.approx((row0 + 1.0) / 2, rel=1e-6)
    assert m["kl"].item() == pytest.approx((math.e - 2) / 3, rel=1e-6) and m["clip_frac"].item() == 0.0
    loss, _ = rl.grpo_loss(logps, logps.detach(), ref, mask, A, beta=0.1, aggregation="dapo")
    assert loss.item() == pytest.approx((-4 + 0.1 * (math.e - 2) + 1.0) / 3, rel=1e-6)
    loss, _ = rl.grpo_loss(logps, logps.detach(), None, mask, A, beta=0.0, aggregation="dr_grpo", max_len=4)
    assert loss.item() == pytest.approx((-4 + 1.0) / (2 * 4), rel=1e-6)


def test_clipped_objective_gradients():
    """d/dlogp of -min(ratio A, clip(ratio) A): -ratio * A where the unclipped term is taken, 0 where clipped."""
    old = torch.zeros(1, 4)
    # ratios e^{0.1}=1.105 (inside), e^{0.5}=1.65 (above 1.2), e^{-0.5}=0.61 (below 0.8), e^{0.5} with A < 0
    logps = torch.tensor([[0.1, 0.5, -0.5, 0.5]], requires_grad=True)
    A = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    l, clipped = rl.clipped_ratio_terms(logps, old, A, eps_low=0.2)
    l.sum().backward()
    # token 1: A > 0, ratio > 1.2 -> min picks the clipped 1.2 (no grad). token 2: A < 0, ratio < 0.8: -ratio*A =
    # 0.61 vs clipped 0.8 -> max loss is the clipped 0.8 (no grad). token 3: A < 0, ratio 1.65 > 1.2: loss max(1.65,
    # 1.2) = unclipped, gradient -ratio * A = 1.65 (PPO never clips a step that makes a bad action more likely).
    e = math.exp
    assert clipped.tolist() == [[False, True, True, False]]
    assert torch.allclose(logps.grad, torch.tensor([[-e(0.1), 0.0, 0.0, e(0.5)]]), atol=1e-6)
    assert torch.allclose(l, torch.tensor([[-e(0.1), -1.2, 0.8, e(0.5)]]), atol=1e-6)
    # DAPO clip-higher: eps_high 0.28 leaves a ratio of 1.25 unclipped
    lp = torch.tensor([[math.log(1.25)]], requires_grad=True)
    l, clipped = rl.clipped_ratio_terms(lp, torch.zeros(1, 1), torch.ones(1, 1), eps_low=0.2, eps_high=0.28)
    l.sum().backward()
    assert not clipped.item() and lp.grad.item() == pytest.approx(-1.25)


def test_ppo_losses_gradients_and_clip_fraction():
    logps = torch.tensor([[0.0, 0.1, 0.5]], requires_grad=True)
    mask = torch.tensor([[False, True, True]])
    adv = torch.tensor([[9.0, 1.0, 1.0]])
    loss, m = rl.ppo_policy_loss(logps, torch.zeros(1, 3), adv, mask, clip=0.2)
    loss.backward()
    # token 1 unclipped: -e^{0.1}; token 2 clipped: -1.2 (no grad); mean over 2 tokens
    assert loss.item() == pytest.approx((-math.exp(0.1) - 1.2) / 2, rel=1e-6)
    assert torch.allclose(logps.grad, torch.tensor([[0.0, -math.exp(0.1) / 2, 0.0]]), atol=1e-6)
    assert m["clip_frac"].item() == 0.5
    values = torch.tensor([[0.0, 1.0, 0.5]], requires_grad=True)
    old_v, returns = torch.tensor([[0.0, 0.5, 0.4]]), torch.tensor([[0.0, 2.0, 0.45]])
    loss, m = rl.ppo_value_loss(values, old_v, returns, mask, clip=0.2)
    loss.backward()
    # token 1: V 1.0 -> V_clip 0.7: (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> clipped term, no grad
    # token 2: V 0.5 -> V_clip 0.5 (inside): (0.05)^2 both -> unclipped, grad 0.5 * 2 * (0.5 - 0.45) / 2 = 0.025
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0025) / 2, rel=1e-5)
    assert torch.allclose(values.grad, torch.tensor([[0.0, 0.0, 0.025]]), atol=1e-6)
    assert m["value_clip_frac"].item() == 0.5


def test_gae_by_hand():
    """4 positions, the response on positions 1..3 (position 0 a prompt token), gamma 0.9, lambda 0.8."""
    scores = torch.tensor([1.0])
    logps = torch.tensor([[0.0, -1.0, -2.0, -1.0]])
    ref = torch.tensor([[5.0, -1.5, -2.0, -0.5]])
    mask = torch.tensor([[False, True, True, True]])
    r = rl.token_rewards(scores, logps, ref, mask, beta=0.1)  # k1 = logp - ref: 0.5, 0, -0.5
    assert torch.allclose(r, torch.tensor([[0.0, -0.05, 0.0, 0.05 + 1.0]]))
    values = torch.tensor([[7.0, 0.5, 0.4, 0.3]])
    adv, ret = rl.gae(r, values, mask, gamma=0.9, lam=0.8)
    # delta_3 = 1.05 - 0.3 = 0.75               (V after the last token is 0)
    # delta_2 = 0 + 0.9 * 0.3 - 0.4 = -0.13
    # delta_1 = -0.05 + 0.9 * 0.4 - 0.5 = -0.19
    # A_3 = 0.75; A_2 = -0.13 + 0.72 * 0.75 = 0.41; A_1 = -0.19 + 0.72 * 0.41 = 0.1052
    assert torch.allclose(adv, torch.tensor([[0.0, 0.1052, 0.41, 0.75]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, 0.6052, 0.81, 1.05]]), atol=1e-6)
    # gamma = lambda = 1: A_t = sum of future rewards - V_t (Monte-Carlo return minus the baseline)
    adv1, _ = rl.gae(r, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, torch.tensor([[0.0, 1.0 - 0.5, 1.05 - 0.4, 1.05 - 0.3]]), atol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        rl.gae(r, values, torch.tensor([[True, False, True, True]]))


def test_gae_two_rows_with_padding_match_one_row_each():
    torch.manual_seed(0)
    r, v = torch.randn(2, 6), torch.randn(2, 6)
    mask = torch.tensor([[False, True, True, True, False, False], [False, False, True, True, True, True]])
    adv, _ = rl.gae(r, v, mask, 0.95, 0.9)
    for i in range(2):
        pos = mask[i].nonzero().flatten()
        a, _ = rl.gae(r[i:i + 1, pos], v[i:i + 1, pos], torch.ones(1, len(pos), dtype=torch.bool), 0.95, 0.9)
        assert torch.allclose(adv[i, pos], a[0])


def test_whiten_explained_variance_entropy():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = rl.whiten(x, mask, eps=0.0)  # mean 2, unbiased var 1
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    assert torch.allclose(rl.whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    # PPO's token rewards: zero but for the score on the last token. Mean 4/3, unbiased var 16/3, std 4/sqrt(3):
    # rescaling keeps the zeros (TRL's (x - mean) / std + mean would give them 4/3 - 1/sqrt(3) = 0.756 each)
    sparse = rl.whiten(torch.tensor([[0.0, 0.0, 4.0]]), torch.ones(1, 3, dtype=torch.bool), shift_mean=False, eps=0.0)
    assert torch.allclose(sparse, torch.tensor([[0.0, 0.0, 3 ** 0.5]]))
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    # residuals R - V = 0, 1, 0 -> var 2/9; var R = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    assert rl.explained_variance(torch.tensor([[1.0, 1.0, 3.0, 9.0]]), returns, mask) == pytest.approx(2 / 3)
    assert rl.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert rl.entropy_estimate(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[True, True, False]])).item() == 1.5


def test_reinforce_loss_gradient():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = rl.reinforce_loss(logps, mask, torch.tensor([2.0, -1.0]))
    assert loss.item() == pytest.approx(-(2.0 * -3.0 + -1.0 * -1.0) / 2)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]))
