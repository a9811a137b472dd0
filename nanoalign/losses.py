"""Preference-loss formulas on sequence-level scores (plain torch, differentiable by autograd); formulas only.

Notation used by every function here, for a pair (chosen y_w, rejected y_l) of the same prompt x:
    s_pi(y)  = sequence score of y under the policy    (see `sequence_scores`)
    s_ref(y) = sequence score of y under the reference
    rho      = [s_pi(y_w) - s_ref(y_w)] - [s_pi(y_l) - s_ref(y_l)]      (the log-ratio margin, NOT scaled by beta)
With plain sums of token log-probs s(y) = log pi(y|x) and rho is the quantity in DPO / IPO / SLiC.

The losses are per pair (shape (P,)); the caller averages them. `loss_grad` gives dL/drho in closed form for the
fused one-pass path in nanoalign/ops.py (tests check it against autograd through these formulas). DDPO is not a loss
here: it is DPO on DDPO-weighted scores (`ddpo_sequence_score`; train.py's table gives it token weights).
"""
import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "ipo", "slic")


def sequence_scores(logps, mask, token_weights=None, average=False):
    """Weighted sequence scores from per-token log-probs.

    logps (R, T) float, mask (R, T) bool (scored tokens), token_weights (R, T) float or None (= 1).
        s = sum_t m_t w_t logp_t                       (average=False)
        s = sum_t m_t w_t logp_t / sum_t m_t w_t       (average=True; 0 for a row with no scored token)
    Returns (R,) float32 (float64 if logps is float64).
    """
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    w = mask.to(dtype) if token_weights is None else torch.where(mask, token_weights.to(dtype), 0.0)
    num = (w * torch.where(mask, logps.to(dtype), 0.0)).sum(-1)  # (R,)
    if not average:
        return num
    den = w.sum(-1)  # (R,)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(num))


def ddpo_sequence_score(logps, mask, corrected, gamma, average=True):
    """DDPO sequence score, RLHF-V (Yu et al. 2023, arXiv:2312.00849), Sec. 3.2:

        log pi(y|x) = (1/N) [ sum_{y_i in y_u} log p(y_i|x, y_<i) + gamma * sum_{y_i in y_c} log p(y_i|x, y_<i) ],
        N = |y_u| + gamma |y_c|

    y_c are the corrected (hallucination-fixed) tokens, y_u the unchanged ones. logps, mask, corrected: (R, T);
    corrected is a bool (or 0/1) tensor, counted only where mask is True.
    Departure: `average` is a flag (default True = the paper). RLHF-V's published training run does not average
    (their code's `dpo_use_average` off), i.e. it scores sum_u logp + gamma sum_c logp.
    """
    w = torch.where(corrected.bool(), float(gamma), 1.0)
    return sequence_scores(logps, mask, w, average=average)


def dpo_loss(rho, beta):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7; Amirloo et al. 2024, arXiv:2407.02477, Eq. 3):
        L = -log sigmoid(beta * rho)
    rho (P,). RLHF-V's DDPO is this loss on DDPO-weighted scores (`ddpo_sequence_score`).
    """
    return -F.logsigmoid(beta * rho)


def ipo_loss(rho, beta):
    """IPO (Azar et al. 2024, arXiv:2310.12036, Eq. 17 with tau = beta):
        L = (rho - 1/(2 beta))^2
    Amirloo et al. 2024 (arXiv:2407.02477) cite Azar et al. and Tang et al. 2024 (GPO, arXiv:2402.05749) for it.
    Scores are what the caller passes: with `average=False` (our default) rho uses summed log-probs as in the
    paper; TRL's `ipo` averages log-probs by length, which is `average=True` here.
    """
    return (rho - 1.0 / (2.0 * beta)) ** 2


def slic_loss(rho, beta):
    """SLiC as a hinge on the reference-adjusted rho (the form Amirloo et al. 2024, arXiv:2407.02477, use via Tang
    et al. 2024, GPO, arXiv:2402.05749, Table 1; = TRL's `hinge`):
        L = max(0, 1 - beta * rho)
    Departure from SLiC-HF (Zhao et al. 2023, arXiv:2305.10425, Eq. 2): SLiC-HF's calibration loss is
    max(0, delta - log pi(y_w) + log pi(y_l)) without a reference model plus a separate regularizer. Ours =
    beta * max(0, 1/beta - rho): the margin delta is 1/beta, the scores are relative to the reference, and the
    regularizer is the optional SFT term (`sft_weight` in ops.preference_loss).
    """
    return torch.relu(1.0 - beta * rho)


def pair_losses(loss_type, rho, beta):
    """Per-pair loss (P,) of rho (P,) for loss_type in LOSS_TYPES."""
    if loss_type == "dpo":
        return dpo_loss(rho, beta)
    if loss_type == "ipo":
        return ipo_loss(rho, beta)
    if loss_type == "slic":
        return slic_loss(rho, beta)
    raise ValueError(f"loss_type: unknown {loss_type!r}, expected one of {LOSS_TYPES}")


def loss_grad(loss_type, rho, beta):
    """Closed-form dL/drho (P,) of `pair_losses` (used by the fused path, which never runs autograd):
        dpo: -beta * sigmoid(-beta rho);  ipo: 2 (rho - 1/(2 beta));  slic: -beta * 1[1 - beta rho > 0].
    """
    if loss_type == "dpo":
        return -beta * torch.sigmoid(-beta * rho)
    if loss_type == "ipo":
        return 2.0 * (rho - 1.0 / (2.0 * beta))
    if loss_type == "slic":
        return -beta * (1.0 - beta * rho > 0).to(rho.dtype)
    raise ValueError(f"loss_type: unknown {loss_type!r}, expected one of {LOSS_TYPES}")


def preference_metrics(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair metrics (all (P,), detached), TRL-style implicit rewards:
        reward_chosen = beta (s_pi(y_w) - s_ref(y_w)),  reward_rejected = beta (s_pi(y_l) - s_ref(y_l)),
        margin = reward_chosen - reward_rejected (= beta * rho; "margin" is the logged name, TRL's rewards/margins),
        accuracy = 1[reward_chosen > reward_rejected],
        logp_chosen / logp_rejected = the policy scores s_pi.
    """
    rc = (beta * (pol_chosen - ref_chosen)).detach()
    rr = (beta * (pol_rejected - ref_rejected)).detach()
    return {"reward_chosen": rc, "reward_rejected": rr, "margin": rc - rr, "accuracy": (rc > rr).float(),
            "logp_chosen": pol_chosen.detach(), "logp_rejected": pol_rejected.detach()}
