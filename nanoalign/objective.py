"""The step's last stage: the policy's loss on a batch, given the reference log-probs (formulas: nanoalign/losses.py,
fused kernels: nanoalign/ops.py). Plain functions; train.py's algorithm table says which one and with what.
"""
import torch
import torch.distributed as dist

from nanoalign.forward import forward
from nanoalign.ops import preference_loss, token_logprobs


def objective(loss_type: str, policy, b: dict, ref, P: int, device, beta: float = 0.1, sft_weight: float = 0.0,
              average: bool = False) -> tuple[torch.Tensor, dict]:
    """(loss: scalar, metrics: dict of 0-d tensors, means over pairs) of the batch b of P examples.
    loss_type "nll": b holds the P responses; the token-mean NLL. Otherwise a loss of losses.LOSS_TYPES on the
    pairs of `preference`. ref: `nanoalign.refcache.reference_logps` of b (None for "nll")."""
    if loss_type == "nll":
        return nll(policy, b, device), {}
    return preference(loss_type, policy, b, ref, P, device, beta, sft_weight, average)


def nll(policy, b: dict, device) -> torch.Tensor:
    """Next-token NLL of the responses, averaged over all scored tokens of the batch (LLaVA's token mean, not a mean
    of per-example means). Under several ranks the mean is over every rank's tokens: each rank divides its sum by
    the global count and multiplies by the world size, since gradients (and the logged loss) are averaged over
    ranks, so 1 rank and N ranks give the same loss on the same global batch."""
    h = forward(policy, b, device)  # (R,T,H)
    labels = b["labels"].to(device)
    logp = token_logprobs(h, policy.lm_head_weight, labels)  # (R,T), never (R,T,V) logits
    n = (labels != -100).sum().float()
    world = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        n = n.cpu() if dist.get_backend() == "gloo" else n
        dist.all_reduce(n)
    return -logp.sum() * world / n.to(logp.device).clamp_min(1)


def preference(loss_type: str, policy, b: dict, ref: torch.Tensor, P: int, device, beta: float,
               sft_weight: float = 0.0, average: bool = False) -> tuple[torch.Tensor, dict]:
    """Mean over rejected sets of the preference loss of (chosen, rejected set j).

    b rows [0:P] chosen, then k >= 1 blocks of P rejected rows (the data's, then any made during training): POVID's
    loss is 0.5 * L(chosen, data rejected) + 0.5 * L(chosen, noisy-self). ref (R, T): reference log-probs of every
    row. token_weights of b carry DDPO's gamma; average divides each score by its summed weights (RLHF-V's 1/N).
    Metrics: ops.preference_loss's per-pair metrics, mean over pairs, then over rejected sets.
    """
    h = forward(policy, b, device)  # ((k+1)P, T, H)
    labels, w, ref = b["labels"].to(device), b["token_weights"].to(device), ref.to(device)
    rejected_sets = list(range(P, labels.shape[0], P))  # first row of each block of rejected rows
    loss, metrics = 0.0, {}
    for r0 in rejected_sets:
        rows = slice(None, 2 * P) if r0 == P else torch.cat([torch.arange(P), torch.arange(r0, r0 + P)])
        l, m = preference_loss(h[rows], policy.lm_head_weight, labels[rows], w[rows], ref[rows],
                               loss_type=loss_type, beta=beta, sft_weight=sft_weight, average=average)
        loss = loss + l / len(rejected_sets)
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0) + v.float().mean() / len(rejected_sets)
    return loss, metrics


def pair_mean_over_ranks(loss: torch.Tensor, metrics: dict, n_pairs: int) -> tuple[torch.Tensor, dict]:
    """This rank's share of the mean over the pairs kept on every rank. Every rank must call it (one all_reduce).

    loss (scalar) and metrics (0-d tensors): this rank's means over its n_pairs pairs (n_pairs = 0: a placeholder
    batch that only keeps the rank in FSDP's collectives). Why: each rank annotates its own online pairs and ties /
    unparseable verdicts drop a different number on each, while FSDP averages the gradients over ranks (and train.py
    logs the mean over ranks), so a per-rank mean would weight one pair of a rank that kept 1 as much as all four of
    a rank that kept 4. With N = sum over ranks of n_pairs, each rank returns its mean * n_pairs * world / N: the
    average over ranks is then (sum over every rank's pairs of the pair losses) / N, the global mean, for the loss,
    its gradients and the metrics alike. N = 0 (no pair on any rank): zeros (the graph kept, for the backward).
    Departure: with --grad-accum > 1 each micro-step is its own global mean, weighted 1 / grad_accum."""
    world, n = 1, torch.tensor([float(n_pairs)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        n = n if dist.get_backend() == "gloo" else n.to(loss.device)
        dist.all_reduce(n)
    share = n_pairs * world / max(float(n.item()), 1.0)
    return loss * share, {k: v * share for k, v in metrics.items()}
