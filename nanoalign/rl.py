"""RL formulas for RLOO, GRPO and PPO on plain tensors (no model, no batch layout, differentiable by autograd).

Notation shared by every function here, for N prompts with k sampled responses each (B = N * k rollouts):
    logps     (B, T) float  log pi_theta(y_t | x, y_<t) of the sampled tokens (the fused op, never (B, T, V) logits)
    old_logps (B, T) float  the same under the policy that sampled the rollout (detached; = logps at PPO epoch 0)
    ref_logps (B, T) float  the same under the frozen reference pi_ref
    mask      (B, T) bool   True on response tokens (one contiguous run per row; any offset, right padding)
    rewards   (N, k) float  one scalar per rollout, rows grouped by prompt: rollout j of prompt i is row i * k + j
                            of the (B, T) tensors (`group` / `ungroup` reshape between the two)
Every tensor position where mask is False is ignored (it may hold anything finite or not).

Objective being optimized (the Apple study, Amirloo et al. 2024, arXiv:2407.02477, Eq. 2):
    max_pi  E_{x ~ D, y ~ pi(.|x)} [ r(x, y) ] - beta * KL( pi(.|x) || pi_ref(.|x) )
RLOO and PPO put the KL into the reward (sequence-level or per token); GRPO adds it as a separate loss term.
"""
from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


# --------------------------------------------------------------------------------------------------------- helpers
def group(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) -> (N, k), rollout j of prompt i at [i, j] (B must be a multiple of k)."""
    if x.dim() != 1 or x.shape[0] % k:
        raise ValueError(f"group: expected a 1-D tensor whose length is a multiple of k={k}, got {tuple(x.shape)}")
    return x.reshape(-1, k)


def ungroup(x: torch.Tensor) -> torch.Tensor:
    """(N, k) -> (B,) in the row order of `group`."""
    return x.reshape(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum of x where mask (positions off the mask never enter, even if non-finite)."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """mean of x over the masked positions (0 where there is none)."""
    n = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / n.clamp_min(1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all masked positions of the batch; unbiased = Bessel's n / (n - 1) (as TRL's masked_var)."""
    n = mask.sum().to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        if n < 2:
            raise ValueError(f"masked_var: unbiased variance needs at least 2 masked values, got {int(n)}")
        var = var * n / (n - 1)
    return var


# ------------------------------------------------------------------------------------------------ KL estimators
def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html; no arXiv id). With log r = ref_logp - logp:
        k1 = -log r                  unbiased, high variance, can be negative per token
        k2 = (log r)^2 / 2           biased (low for small KL), always >= 0
        k3 = (r - 1) - log r         unbiased, always >= 0 (GRPO's KL term, Shao et al. 2024 Eq. 4)
    logps, ref_logps (B, T) -> (B, T), the same dtype. Departure: none; the estimators are exact formulas, the
    caller masks and sums (sequence KL) or averages them. Values off the response mask are meaningless.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator: unknown {estimator!r}, expected one of {KL_ESTIMATORS}")
    log_r = ref_logps - logps  # (B, T)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    return torch.expm1(log_r) - log_r  # k3; expm1 keeps it >= 0 and exact near r = 1


# ------------------------------------------------------------------------------------------------------- rewards
def reward_stats(rewards: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of rewards (any shape, float) computed over the alignment data before training (the Apple study,
    arXiv:2407.02477, Appendix A: "we calculated the mean and standard deviation of rewards using the alignment
    dataset and normalized the rewards during training to achieve zero mean and unit variance").
    std is the population std (ddof 0). Departure: the paper does not say which responses it scored; the caller
    chooses (train.py: the policy's samples on the training prompts before step 1). Raises ValueError on a
    non-finite reward or fewer than 2 values."""
    r = rewards.detach().double().reshape(-1)
    if r.numel() < 2:
        raise ValueError(f"reward_stats: need at least 2 rewards, got {r.numel()}")
    if not torch.isfinite(r).all():
        raise ValueError("reward_stats: non-finite reward among the values")
    return float(r.mean()), float(r.std(unbiased=False))


def normalize_rewards(rewards: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """(r - mean) / max(std, eps), any shape (Appendix A of arXiv:2407.02477; mean / std from `reward_stats`).
    Departure: eps guards a constant reward (std 0) -- the paper gives no rule for it."""
    return (rewards - mean) / max(std, eps)


def kl_penalized_rewards(rewards: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         beta: float, estimator: str = "k1") -> torch.Tensor:
    """Sequence-level KL penalty folded into the reward (RLOO in the Apple study, Eq. 2 + Appendix A; Ahmadian et
    al. 2024, arXiv:2402.14740; Stiennon et al. 2020, arXiv:2009.01325):
        r'_i = r_i - beta * sum_t kl_t(y_i)         kl_t = the `estimator` (k1: log pi - log pi_ref) per token
    rewards (B,) (already normalized when normalization is on), logps / ref_logps / mask (B, T) -> (B,).
    The penalty is detached: it changes the reward, the gradient flows through the policy-gradient term only (as in
    REINFORCE on r'). Departure: none beyond the estimator being selectable (the papers use k1).
    """
    kl = masked_sum(kl_per_token(logps.detach(), ref_logps.detach(), estimator), mask, dim=1)  # (B,)
    return rewards - beta * kl.to(rewards.dtype)


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                  beta: float, estimator: str = "k1") -> torch.Tensor:
    """PPO's per-token rewards (Ziegler et al. 2019, arXiv:1909.08593; Stiennon et al. 2020, arXiv:2009.01325; the
    Apple study's Eq. 2): the KL penalty on every response token, the sequence reward added on the last one:
        r_t = -beta * kl_t  +  1[t = last response token] * score
    scores (B,), logps / ref_logps / mask (B, T) -> (B, T), 0 off the mask, detached. Raises ValueError for a row
    with no response token. Departure: the KL estimator is selectable (k1 as in the papers, or k3)."""
    kl = kl_per_token(logps.detach(), ref_logps.detach(), estimator)  # (B, T)
    r = torch.where(mask, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = _last_index(mask)  # (B,)
    r[torch.arange(r.shape[0], device=r.device), last] += scores.detach().to(r.dtype)
    return r


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's last True; ValueError when a row has none."""
    empty = ~mask.any(1)
    if empty.any():
        raise ValueError(f"rows {empty.nonzero().flatten().tolist()} have no response token")
    T = mask.shape[1]
    return T - 1 - mask.flip(1).int().argmax(1)


# ---------------------------------------------------------------------------------------------------- advantages
def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!", ICLR
    DeepRLStructPred workshop; Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740):
        A_i = r_i - 1/(k-1) * sum_{j != i} r_j   =  k/(k-1) * (r_i - mean_j r_j)
    rewards (N, k) with k >= 2 -> (N, k). The whole response is one action (no per-token credit).
    Departure: none (the KL penalty, if any, is already in r: `kl_penalized_rewards`)."""
    N, k = rewards.shape
    if k < 2:
        raise ValueError(f"rloo: needs k >= 2 samples per prompt, got {k}")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def grpo_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2, outcome
    supervision):
        A_i = (r_i - mean(r)) / (std(r) + eps)       scale=True   (GRPO)
        A_i =  r_i - mean(r)                         scale=False
    (scale=False is Dr. GRPO, Liu et al. 2025, arXiv:2503.20783, Sec. 3.1: the std division up-weights groups that are
    almost all right or all wrong.)
    rewards (N, k), k >= 2 -> (N, k); every token of response i gets A_i. std is the sample std (Bessel, ddof 1),
    as in the DeepSeekMath/TRL implementations. Departure: eps (1e-4, TRL's) keeps a constant group finite (A = 0)."""
    N, k = rewards.shape
    if k < 2:
        raise ValueError(f"grpo: needs k >= 2 samples per prompt, got {k}")
    centered = rewards - rewards.mean(1, keepdim=True)
    return centered / (rewards.std(1, keepdim=True) + eps) if scale else centered


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438, Eq. 16) over the response tokens:
        delta_t = r_t + gamma * V_{t+1} - V_t          V after the last response token = 0 (the episode ends)
        A_t     = sum_{l >= 0} (gamma lam)^l delta_{t+l}   (computed backwards: A_t = delta_t + gamma lam A_{t+1})
        R_t     = A_t + V_t                            (the value target, "returns")
    rewards (B, T) (token_rewards), values (B, T) (the critic's V of the state before token t), mask (B, T) one
    contiguous run per row -> (advantages (B, T), returns (B, T)), 0 off the mask, detached.
    Departure: none; defaults gamma 1, lambda 0.95 are TRL's / the InstructGPT-style setting (the Apple study does not
    give them). Raises ValueError when a row's mask is not one contiguous run."""
    _check_contiguous(mask)
    r = torch.where(mask, rewards.detach(), 0.0)
    v = torch.where(mask, values.detach(), 0.0)
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_adv = torch.zeros(B, dtype=r.dtype, device=r.device)
    next_v = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in range(T - 1, -1, -1):  # off-mask positions reset the recursion: V and A after the run are 0
        m = mask[:, t]
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a, 0.0)
        next_adv, next_v = adv[:, t], v[:, t]
    return adv, torch.where(mask, adv + v, 0.0)


def _check_contiguous(mask: torch.Tensor) -> None:
    starts = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0].long()  # (B,) number of runs
    bad = (starts > 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"response mask of rows {bad} is not one contiguous run of tokens")


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whitening over all masked positions of the batch (PPO's advantage / reward whitening; Ziegler et al. 2019,
    arXiv:1909.08593):
        shift_mean=True  (advantages): y = (x - mean) / sqrt(var + eps)
        shift_mean=False (rewards):    y = x / sqrt(var + eps)        rescale only: a zero stays zero
    x, mask (B, T) -> (B, T), 0 off the mask. var is unbiased (n / (n - 1)); needs >= 2 masked values.
    Departure from TRL's `masked_whiten`, whose shift_mean=False form is (x - mean) / std + mean: applied to PPO's
    token rewards (zero but for the KL penalty, the score on the last token) it adds mean * (1 - 1 / std) to every
    token: a per-token length penalty whenever the scores are positive and std < 1 (the toy world's judge: scores
    ~0.8); scaling alone keeps the rewards' shape."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    y = (x - mean if shift_mean else x) * torch.rsqrt(var + eps)
    return torch.where(mask, y, 0.0)


# ---------------------------------------------------------------------------------------------------- objectives
def reinforce_loss(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """RLOO's policy-gradient loss, the response as one action (Williams 1992; Ahmadian et al. 2024,
    arXiv:2402.14740, with the leave-one-out baseline):
        L = -(1/B) sum_i A_i * sum_t log pi(y_{i,t})
    logps (B, T) (with grad), mask (B, T), advantages (B,) (detached here) -> scalar.
    Departure: none (one gradient step per batch of rollouts, so no importance ratio is needed)."""
    seq = masked_sum(logps, mask, dim=1)  # (B,)
    return -(advantages.detach().to(seq.dtype) * seq).mean()


def clipped_ratio_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        eps_low: float = 0.2, eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, arXiv:1707.06347, Eq. 7), as a loss:
        ratio_t = exp(logp_t - old_logp_t)
        l_t     = -min(ratio_t A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_t)
    logps (B, T) with grad, old_logps (B, T), advantages (B, T) or (B, 1) (broadcast; detached) -> (l (B, T),
    clipped (B, T) bool: the clipped term was the one taken, so the token has no gradient).
    Departure: eps_high defaults to eps_low (PPO); DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476, Sec. 3.1)
    sets it apart (0.28)."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logps - old_logps.detach())
    A = advantages.detach().to(ratio.dtype)
    unclipped = -ratio * A
    clipped = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * A
    return torch.maximum(unclipped, clipped), clipped > unclipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "grpo", max_len: int | None = None):
    """Reduce a per-token loss (B, T) to a scalar; B = G rollouts of the batch, |o_i| = mask[i].sum():
        grpo     (1/B) sum_i (1/|o_i|) sum_t l_{i,t}      per-sequence mean, then mean over sequences
                 (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Eq. 3)
        dapo     sum_{i,t} l_{i,t} / sum_i |o_i|          token mean over the batch (Yu et al. 2025, DAPO,
                 arXiv:2503.14476, Sec. 3.3: long responses are not down-weighted)
        dr_grpo  sum_{i,t} l_{i,t} / (B * max_len)        a constant normalizer (Liu et al. 2025, Dr. GRPO,
                 arXiv:2503.20783, Sec. 3.1: no length bias); max_len = the generation budget
    Departure: over a batch split in micro-batches or ranks, dapo's denominator is the micro-batch's own token
    count (the papers: the whole batch); grpo's and dr_grpo's are exact per micro-batch."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation: unknown {mode!r}, expected one of {AGGREGATIONS}")
    if mode == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    if mode == "dapo":
        return masked_sum(per_token, mask) / mask.sum().clamp_min(1).to(per_token.dtype)
    if not max_len or max_len < 1:
        raise ValueError(f"dr_grpo aggregation needs max_len >= 1 (the generation budget), got {max_len!r}")
    return masked_sum(per_token, mask) / (per_token.shape[0] * max_len)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor,
              advantages: torch.Tensor, beta: float = 0.04, eps_low: float = 0.2, eps_high: float | None = None,
              aggregation: str = "grpo", max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO objective (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Eq. 3), as a loss to minimize:
        l_{i,t} = -min(ratio A_i, clip(ratio, 1-eps_low, 1+eps_high) A_i) + beta * k3_{i,t}
        k3_{i,t} = pi_ref/pi - log(pi_ref/pi) - 1      (Eq. 4, `kl_per_token(..., "k3")`, gradient through pi)
        L = aggregate(l, mask, aggregation, max_len)     (grpo | dapo | dr_grpo, see `aggregate`)
    logps (B, T) with grad; old_logps (B, T) (= logps.detach() for one update per rollout); ref_logps (B, T) or None
    (beta = 0: no reference needed); mask (B, T); advantages (B,) from `grpo_advantages` -> (loss, metrics) with
    metrics {"kl": mean k3 per token, "clip_frac": fraction of tokens clipped} as detached scalars.
    Departures: the KL term is dropped when beta == 0 (DAPO / Dr. GRPO); eps_high (DAPO's clip-higher) optional."""
    per_token, clipped = clipped_ratio_terms(logps, old_logps, advantages[:, None], eps_low, eps_high)
    metrics = {"clip_frac": masked_mean(clipped.to(logps.dtype), mask).detach()}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logps")
        kl = kl_per_token(logps, ref_logps.detach(), "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    return aggregate(per_token, mask, aggregation, max_len), metrics


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO clipped policy objective (Schulman et al. 2017, arXiv:1707.06347, Eq. 7) as a token-mean loss:
        L = mean_{masked t} max(-ratio_t A_t, -clip(ratio_t, 1-clip, 1+clip) A_t)
    logps (B, T) with grad, old_logps / advantages (per token, from `gae` then `whiten`) / mask (B, T) ->
    (loss, {"clip_frac", "approx_kl": mean of k3 between old and new policy}). Departure: token mean over the batch
    (TRL's / OpenAI lm-human-preferences' choice; the paper averages over timesteps of fixed-length episodes).
    Epochs and minibatches (the paper's K epochs of minibatch SGD, Sec. 5 / Algorithm 1): train.py makes --ppo-epochs
    passes over a rank's rollouts of a step, each split into --ppo-minibatches blocks of rows with one
    optimizer step each (nanoalign.rlstep.minibatches; TRL's PPOTrainer num_mini_batches), the rows reshuffled into
    new blocks every epoch (rlstep.minibatch_order, seeded by (seed, step, epoch)); B is then the block's rows, and
    old_logps / advantages stay those computed at the rollout (advantages whitened over one micro-batch's rollouts,
    before the split)."""
    per_token, clipped = clipped_ratio_terms(logps, old_logps, advantages, clip)
    approx_kl = masked_mean(kl_per_token(old_logps.detach(), logps.detach(), "k3"), mask)
    return masked_mean(per_token, mask), {"clip_frac": masked_mean(clipped.to(logps.dtype), mask).detach(),
                                          "approx_kl": approx_kl}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO clipped value objective (the OpenAI baselines / Ziegler et al. 2019 form; not in the PPO paper's Eq. 9,
    which uses an unclipped squared error):
        V_clip = V_old + clip(V - V_old, -clip, clip)
        L = 0.5 * mean_{masked t} max((V - R)^2, (V_clip - R)^2)
    values (B, T) with grad, old_values / returns (from `gae`) / mask (B, T) -> (loss, {"value_clip_frac"}).
    Departure: clip is in the reward's units (TRL's cliprange_value 0.2)."""
    old = old_values.detach()
    R = returns.detach()
    v_clip = old + torch.clamp(values - old, -clip, clip)
    a, b = (values - R) ** 2, (v_clip - R) ** 2
    return 0.5 * masked_mean(torch.maximum(a, b), mask), {"value_clip_frac": masked_mean((b > a).to(a.dtype), mask)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens (1 = perfect critic, 0 = no better than a constant, < 0 worse).
    values, returns, mask (B, T) -> float (nan when Var[R] = 0)."""
    var_r = masked_var(returns.detach().double(), mask, unbiased=False)
    var_d = masked_var((returns - values).detach().double(), mask, unbiased=False)
    return float("nan") if var_r == 0 else float(1.0 - var_d / var_r)


def entropy_estimate(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo token entropy from the log-probs of the sampled tokens:  H ~ -mean_{masked t} log pi(y_t).
    Unbiased for H(pi(.|context)) averaged over visited contexts when y_t ~ pi at temperature 1 (E_y[-log pi(y)] =
    H); with another temperature or top-p it estimates the cross-entropy instead. We never form (B, T, V) logits,
    so this is the entropy we have. logps, mask (B, T) -> scalar (detached)."""
    return -masked_mean(logps.detach(), mask)
