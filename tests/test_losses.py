"""The loss formulas of nanoalign/losses.py against numbers computed by hand from the papers' formulas."""
import math

import pytest
import torch

from nanoalign import losses as L


def _t(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_dpo_by_hand():
    # pol_c=-10, ref_c=-12, pol_r=-15, ref_r=-14: rho = (2) - (-1) = 3; beta = 0.5 -> beta*rho = 1.5
    # -log sigmoid(1.5) = log(1 + e^-1.5) = log(1.22313016014843) = 0.201413277982752
    rho = (_t(-10.0) - _t(-12.0)) - (_t(-15.0) - _t(-14.0))
    assert L.dpo_loss(rho, 0.5).item() == pytest.approx(0.201413277982752, rel=1e-12)
    # rho = 0: log 2 for any beta
    assert L.dpo_loss(_t(0.0), 0.1).item() == pytest.approx(0.693147180559945, rel=1e-12)
    # rho = -4, beta = 0.25: log(1 + e^1) = 1.31326168751822
    assert L.dpo_loss(_t(-4.0), 0.25).item() == pytest.approx(1.31326168751822, rel=1e-12)


def test_ipo_by_hand():
    # (rho - 1/(2 beta))^2: rho=0.5, beta=0.5 -> (0.5 - 1)^2 = 0.25 ; rho=3, beta=0.1 -> (3 - 5)^2 = 4 ;
    # rho=-1, beta=0.25 -> (-1 - 2)^2 = 9
    out = L.ipo_loss(_t(0.5, 3.0, -1.0), _t(0.5, 0.1, 0.25))
    assert out.tolist() == pytest.approx([0.25, 4.0, 9.0], rel=1e-12)


def test_slic_hinge_by_hand():
    # max(0, 1 - beta*rho), beta = 0.5: rho=3 -> 0 ; rho=0.5 -> 0.75 ; rho=-2 -> 2 ; rho=2 -> 0 (kink)
    out = L.slic_loss(_t(3.0, 0.5, -2.0, 2.0), 0.5)
    assert out.tolist() == pytest.approx([0.0, 0.75, 2.0, 0.0], abs=1e-12)


def test_ddpo_score_by_hand():
    # RLHF-V: (1/N)[sum_u logp + gamma sum_c logp], N = |y_u| + gamma |y_c|, gamma = 5
    # tokens logp = [-1, -2, -0.5, -3, (masked) -7], corrected = [0, 1, 1, 0, 1]
    # sum_u = -1 - 3 = -4 ; sum_c = -2.5 ; weighted sum = -4 + 5 * -2.5 = -16.5 ; N = 2 + 5*2 = 12 -> -1.375
    logps = _t(-1.0, -2.0, -0.5, -3.0, -7.0)[None]
    corrected = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    assert L.ddpo_sequence_score(logps, mask, corrected, 5.0).item() == pytest.approx(-1.375, rel=1e-12)
    assert L.ddpo_sequence_score(logps, mask, corrected, 5.0, average=False).item() == pytest.approx(-16.5, rel=1e-12)
    # gamma = 1 and averaging: the mean token log-prob (-6.5 / 4)
    assert L.ddpo_sequence_score(logps, mask, corrected, 1.0).item() == pytest.approx(-1.625, rel=1e-12)


def test_sequence_scores_empty_row_and_weights():
    logps = _t(-1.0, -2.0, -4.0, -8.0).view(2, 2)
    mask = torch.tensor([[True, True], [False, False]])
    w = _t(2.0, 0.5, 9.0, 9.0).view(2, 2)
    # row 0: 2*-1 + 0.5*-2 = -3 ; averaged -3 / 2.5 = -1.2 ; row 1 has no scored token -> 0 either way
    assert L.sequence_scores(logps, mask, w).tolist() == pytest.approx([-3.0, 0.0])
    assert L.sequence_scores(logps, mask, w, average=True).tolist() == pytest.approx([-1.2, 0.0])
    assert L.sequence_scores(logps, mask).tolist() == pytest.approx([-3.0, 0.0])


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_grad_matches_autograd(loss_type, beta):
    rho = _t(-3.0, -0.7, 0.3, 1.1, 4.0, 12.0).requires_grad_()  # no point on the hinge kink 1/beta
    L.pair_losses(loss_type, rho, beta).sum().backward()
    closed = L.loss_grad(loss_type, rho.detach(), beta)
    assert torch.allclose(closed, rho.grad, rtol=1e-12, atol=1e-14)


def test_metrics_by_hand():
    # beta 0.5: reward_c = 0.5 * (-10 + 12) = 1 ; reward_r = 0.5 * (-15 + 14) = -0.5 ; margin 1.5 ; accuracy 1
    m = L.preference_metrics(_t(-10.0, -3.0), _t(-15.0, -1.0), _t(-12.0, -3.0), _t(-14.0, -2.0), 0.5)
    assert m["reward_chosen"].tolist() == pytest.approx([1.0, 0.0])
    assert m["reward_rejected"].tolist() == pytest.approx([-0.5, 0.5])
    assert m["margin"].tolist() == pytest.approx([1.5, -0.5])
    assert m["accuracy"].tolist() == [1.0, 0.0]
    assert m["logp_chosen"].tolist() == [-10.0, -3.0]


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        L.pair_losses("kto", _t(0.0), 0.1)
    with pytest.raises(ValueError, match="loss_type"):
        L.loss_grad("kto", _t(0.0), 0.1)


def test_ddpo_is_a_weighting_of_dpo_not_a_loss():
    # RLHF-V's DDPO = DPO on the gamma-weighted scores: by hand, tokens logp chosen [-1, -2] (2nd corrected),
    # rejected [-3, -1] (1st corrected), reference all -1.5, gamma 5, summed scores:
    # s_pi(c) = -1 + 5 * -2 = -11, s_ref(c) = -1.5 - 7.5 = -9 ; s_pi(r) = 5 * -3 - 1 = -16, s_ref(r) = -9
    # rho = (-11 + 9) - (-16 + 9) = 5 ; beta 0.5: -log sigmoid(2.5) = log(1 + e^-2.5) = 0.0789293301...
    assert "ddpo" not in L.LOSS_TYPES
    logps = _t(-1.0, -2.0, -3.0, -1.0).view(2, 2)
    corrected = torch.tensor([[False, True], [True, False]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    pol = L.ddpo_sequence_score(logps, mask, corrected, 5.0, average=False)
    ref = L.ddpo_sequence_score(torch.full((2, 2), -1.5, dtype=torch.float64), mask, corrected, 5.0, average=False)
    rho = (pol[:1] - ref[:1]) - (pol[1:] - ref[1:])
    assert rho.item() == pytest.approx(5.0, rel=1e-12)
    assert L.pair_losses("dpo", rho, 0.5).item() == pytest.approx(math.log1p(math.exp(-2.5)), rel=1e-12)
    with pytest.raises(ValueError, match="loss_type"):
        L.pair_losses("ddpo", rho, 0.5)
