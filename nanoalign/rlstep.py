"""train.py's stages for the reward model (--algo rm) and RL (rloo, ppo, grpo): rollouts, reward, reference, objective.

One RL step (train.py): for each micro-batch of P prompts, `make_rollout` samples k responses per prompt with the
policy (nanoalign.engine.sample: batched, KV-cached, on a plain or FSDP2-sharded policy), scores them with the
`--reward` function (nanoalign.reward.load_reward), scores their tokens under the frozen reference and computes the
advantages (formulas: nanoalign/rl.py); then `rl_objective` is the loss of one update (rloo, grpo: one update per
batch of rollouts; PPO: --ppo-epochs passes over it, each split by `minibatches` into --ppo-minibatches optimizer
steps). Rows of a rollout batch: B = P * k, rollout j of prompt i is row i * k + j (rl.group's order).
Log-probs of sampled tokens come from the fused op (nanoalign.ops.token_logprobs): never (B, T, V) logits.

Departures (also in train.py's --help): a sampled `<image>` token ends the response and is dropped (the model cannot
embed it as text); a response that would be empty is one EOS. The value head of PPO is a Linear(H, 1) on the
policy's own hidden states (a shared trunk, as TRL's AutoModelForCausalLMWithValueHead), not a separate critic.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from nanoalign import engine
from nanoalign import rl
from nanoalign.batch import collate, select_rows
from nanoalign.forward import forward
from nanoalign.ops import token_logprobs
from nanoalign.reward import bradley_terry_loss, sequence_rewards


# ------------------------------------------------------------------------------------------------- shared helpers
def policy_logps(model, b: dict, device, value_head=None):
    """logps (B, T) of b's labelled tokens (0 elsewhere), mask (B, T) bool, values (B, T) float32 or None.
    values[t] = V of the state whose next token is labels[t] (head on the hidden state at t)."""
    h = forward(model, b, device)  # (B, T, H)
    labels = b["labels"].to(device)
    logps = token_logprobs(h, model.lm_head_weight, labels)  # (B, T), never (B, T, V)
    values = None if value_head is None else value_head(h.to(value_head.weight.dtype)).squeeze(-1).float()
    return logps, labels != -100, values


# ----------------------------------------------------------------------------------------------- reward model
def rm_objective(model, head, b: dict, P: int, device) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry loss (the Apple study's Eq. 1; nanoalign.reward.bradley_terry_loss) of a batch [chosen |
    rejected] of P pairs: r = head(h at the last response token) -> (loss, metrics {accuracy, margin, ...})."""
    r = sequence_rewards(model, head, b, device)  # (2P,)
    return bradley_terry_loss(r[:P], r[P:2 * P])


# ---------------------------------------------------------------------------------------------------- rollouts
def prompt_batch(items, images, processor) -> dict:
    """The engine's prompt batch: input_ids / attention_mask (P, T) left padded, pixel_values / image_sizes of the
    prompts that show an image (in row order)."""
    T = max(len(it.prompt_ids) for it in items)
    ids = torch.full((len(items), T), processor.pad_id, dtype=torch.long)
    am = torch.zeros(len(items), T, dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, T - len(it.prompt_ids):] = torch.tensor(it.prompt_ids)
        am[i, T - len(it.prompt_ids):] = 1
    out = {"input_ids": ids, "attention_mask": am, "pixel_values": None, "image_sizes": None}
    present = [im for im in images if im is not None]
    if present:
        out.update(processor.image_processor.process(present))
    return out


def make_rollout(algo_loss: str, policy, reference, reward_fn, items, examples, images, processor, args, generator,
                 device, value_head=None, reward_norm=(0.0, 1.0)) -> dict:
    """Sample args.k responses per prompt, score them, and prepare the update. items / examples / images: the P
    encoded examples, their Examples and images. Returns a dict: b (the collated B = P * k rows), rewards (B,) raw,
    advantages ((B,) rloo / grpo, (B, T) ppo), old_logps / ref_logps / mask (B, T), and for ppo old_values / returns
    (B, T); live_logps: rloo / grpo with --grad-accum 1 and no --amp, the policy's logps (B, T) with their graph, for
    rl_objective (else None); metrics (floats: reward mean / std, kl, entropy, response length, rollout tokens and
    seconds)."""
    t0 = time.time()
    k, image_token = args.k, processor.tokenizer.image_token_id
    stop = lambda row, ids: ids[-1] == image_token  # noqa: E731  a sampled <image> ends the response (dropped)
    ro = engine.sample(policy, prompt_batch(items, images, processor), n_per_prompt=k, temperature=args.temperature,
                       top_p=args.top_p, max_new_tokens=args.max_new_tokens, end_ids=processor.end_ids,
                       generator=generator, pad_id=processor.pad_id, stop_fn=stop)
    eos = processor.tokenizer.eos_id if processor.tokenizer.eos_id is not None else processor.end_ids[0]
    responses = [[t for t in ids if t != image_token] or [eos] for ids in ro.ids]  # (B,) lists of ids
    rep = lambda xs: [x for x in xs for _ in range(k)]  # noqa: E731  prompt i -> rows i*k .. i*k+k-1
    items_k = [replace(it, chosen_ids=ids, rejected_ids=None, chosen_w=None, rejected_w=None, chosen_labelled=None)
               for it, ids in zip(rep(items), responses)]
    images_k, examples_k = rep(images), rep(examples)
    b = collate(items_k, ["chosen"], processor, images_k, vision_always=True)
    rollout_s = time.time() - t0
    texts = [processor.tokenizer.decode(ids) for ids in responses]
    rewards = reward_fn(examples_k, images_k, texts).float()  # (B,) ValueError naming the example on a bad value

    with torch.no_grad():
        ref_logps = token_logprobs(forward(reference, b, device), reference.lm_head_weight,
                                   b["labels"].to(device)).float() if reference is not None else None
    # rloo / grpo make one update on this rollout right after it: the policy's forward here is the update's own
    # (kept with its graph, rl_objective reuses it), so a step runs 2 forwards + 1 backward instead of 3 + 1 (TRL's
    # GRPOTrainer also skips the old-policy pass with one update per generation). Not with --grad-accum > 1 (every
    # micro-batch's graph would be alive until the updates) nor --amp (the update's forward runs under autocast).
    live = algo_loss in ("rloo", "grpo") and args.grad_accum == 1 and not args.amp
    with torch.set_grad_enabled(live):
        logps, mask, old_values = policy_logps(policy, b, device, value_head)
    old_logps = logps.detach()
    kl_seq = rl.masked_sum(rl.kl_per_token(old_logps, ref_logps, "k1"), mask, dim=1)  # (B,) sequence KL (k1)
    roll = {"b": b, "rewards": rewards, "old_logps": old_logps, "ref_logps": ref_logps, "mask": mask,
            "live_logps": logps if live else None}
    r = rewards.to(device)
    if algo_loss == "rloo":  # Appendix A: normalized reward, sequence-level KL penalty, leave-one-out baseline
        r = rl.kl_penalized_rewards(rl.normalize_rewards(r, *reward_norm), old_logps, ref_logps, mask, args.beta)
        roll["advantages"] = rl.ungroup(rl.rloo_advantages(rl.group(r, k)))
    elif algo_loss == "grpo":
        roll["advantages"] = rl.ungroup(rl.grpo_advantages(rl.group(r, k), scale=args.grpo_loss != "dr_grpo"))
    elif algo_loss == "ppo":  # per-token KL penalty + score on the last token, whitened; GAE; whitened advantages
        tr = rl.token_rewards(r, old_logps, ref_logps, mask, args.beta, args.kl_estimator)
        if not args.no_whiten_rewards:
            tr = rl.whiten(tr, mask, shift_mean=False)
        adv, returns = rl.gae(tr, old_values, mask, args.gamma_ppo, args.lam)
        roll.update(advantages=rl.whiten(adv, mask), returns=returns, old_values=old_values)
    else:
        raise ValueError(f"make_rollout: unknown RL loss {algo_loss!r}")
    n_resp = mask.sum(1).float()
    roll["flat_prompts"] = flat_prompts(rewards, k, algo_loss)
    roll["metrics"] = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
                       "kl": float(kl_seq.mean()), "entropy": float(rl.entropy_estimate(old_logps, mask)),
                       "resp_len": float(n_resp.mean()), "ended_frac": sum(ro.ended) / len(ro.ended),
                       "rollout_tokens": float(n_resp.sum()), "rollout_s": rollout_s}
    return roll


def flat_prompts(rewards: torch.Tensor, k: int, algo_loss: str) -> int:
    """How many of a rollout's prompts got no learning signal from the reward: rewards (P * k,) in rl.group's order.
    rloo / grpo: a prompt whose k rewards are all equal (its group-relative advantages are 0); ppo (k may be 1,
    the baseline is the value head): every prompt when all P * k rewards are equal, else none."""
    if algo_loss == "ppo":
        return rewards.numel() // k if bool((rewards == rewards[0]).all()) else 0
    g = rl.group(rewards, k)  # (P, k)
    return int((g == g[:, :1]).all(1).sum())


def no_signal(seen: dict, limit: int, step: int, algo: str, reward: str, end: bool = False) -> str | None:
    """The one line (for trainutil.Stop, exit 2) of an RL run whose reward gives nothing to learn from, else None.
    seen: "prompts" and "flat" (flat_prompts) summed over this run's steps (since it started or resumed) and ranks,
    "steps", "reward_sum" (sum of the steps' mean rewards). During the run: the first `limit` prompts were all flat
    (--no-signal-limit; 0 = no check, also not at the end); at the end (end True): every prompt of the run was."""
    if not seen["prompts"] or seen["flat"] < seen["prompts"] or (not end and (not limit or seen["prompts"] < limit)):
        return None
    mean = seen["reward_sum"] / seen["steps"]
    what = ("each prompt's samples got one reward" if algo != "ppo" else "every sample of each micro-batch got one "
            "reward")
    if end:
        return (f"error: {algo}: in all {seen['steps']} steps of the run {what} (mean reward {mean:.4g}; "
                f"{seen['prompts']} prompts): the advantages held no reward signal (only KL to the reference), nothing "
                f"was learned from --reward {reward}; final/ is not saved")
    return (f"error: step {step}: {algo}: for the first {seen['prompts']} prompts (steps 1-{seen['steps']} of this "
            f"run, all ranks) {what} (mean reward {mean:.4g}): the advantages hold no reward signal (only KL to the "
            f"reference), --reward {reward} gives nothing to learn from: stopping (--no-signal-limit {limit}; 0 = "
            "no check)")


def reward_stats_before_training(policy, reward_fn, encoded, examples, images_of, processor, args, device,
                                 n_prompts: int = 32) -> tuple[float, float]:
    """RLOO's reward normalization (Appendix A of arXiv:2407.02477): mean and std of the rewards of the policy's
    samples (args.k per prompt) on the first n_prompts training prompts, before step 1; the same on every rank
    (the same prompts and seed)."""
    gen = torch.Generator().manual_seed(args.seed + 7919)
    rewards = []
    for i in range(0, min(n_prompts, len(encoded)), args.batch_size):
        items = encoded[i:i + args.batch_size]
        ims = [images_of(it) for it in items]
        ro = engine.sample(policy, prompt_batch(items, ims, processor), n_per_prompt=args.k,
                           temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           end_ids=processor.end_ids, generator=gen, pad_id=processor.pad_id)
        tok = processor.tokenizer
        texts = [tok.decode([t for t in ids if t != tok.image_token_id]) for ids in ro.ids]
        rep = lambda xs: [x for x in xs for _ in range(args.k)]  # noqa: E731
        rewards.append(reward_fn(rep([examples[it.index] for it in items]), rep(ims), texts))
    return rl.reward_stats(torch.cat(rewards))


# ------------------------------------------------------------------------------------------------- minibatches
ROW_KEYS = ("rewards", "advantages", "old_logps", "ref_logps", "mask", "returns", "old_values")  # (B,) / (B, T)


def slice_rollout(roll: dict, rows) -> dict:
    """The rollout (make_rollout's dict) restricted to `rows` (a slice or a 1-D index tensor): the batch cut by
    nanoalign.batch.select_rows (images kept whole), every per-row tensor cut alike; metrics dropped."""
    out = {k: (v[rows] if v is not None else None) for k, v in roll.items() if k in ROW_KEYS}
    out["b"] = select_rows(roll["b"], rows, vision_always=True)
    return out


def minibatch_order(total: int, seed: int, step: int, epoch: int) -> torch.Tensor:
    """The row order of PPO epoch `epoch` of step `step` (0-based): a permutation of range(total) from a generator
    seeded by (seed, step, epoch) only, so a --resume'd run draws the same orders and nothing else's RNG moves."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + epoch * 7919 + 17)
    return torch.randperm(total, generator=g)


def minibatches(rolls: list[dict], m: int, order: torch.Tensor | None = None) -> list[list[tuple[dict, float]]]:
    """PPO's minibatches: the rank's rollout rows of one step (rolls in order, the grad-accum micro-batches of
    make_rollout; rows concatenated, R in all, global row numbers 0 .. R-1) split into m blocks of R / m rows, one
    optimizer step each (TRL's PPOTrainer num_mini_batches, OpenRLHF's micro-batches of the replay buffer). Block j
    holds rows order[j * R/m : (j + 1) * R/m] (order: a permutation of range(R), `minibatch_order` of the epoch, so
    the blocks are reshuffled every PPO epoch as in TRL and OpenRLHF; None: row order, contiguous blocks).
    Each block is a list of (piece, share): piece = the block's rows inside one roll, in row order (the roll itself
    when it lies whole in the block; else `slice_rollout`), share = block rows / piece rows; the caller backpropagates
    loss(piece) / share, so a block's gradient is the row-weighted mean of its pieces' (exact for per-sequence means;
    for PPO's token mean the same approximation as --grad-accum). m = 1: every roll whole with share = len(rolls),
    one update per epoch whatever the order. ValueError when m < 1 or m does not divide R, or order is not a
    permutation of range(R)."""
    sizes = [r["rewards"].shape[0] for r in rolls]  # rows of each roll (P * k)
    total = sum(sizes)
    if m < 1 or total % m:
        raise ValueError(f"--ppo-minibatches {m}: must be >= 1 and divide the rank's {total} rollouts of a step")
    if order is None or m == 1:
        order = torch.arange(total)
    elif not torch.equal(torch.sort(order).values, torch.arange(total)):
        raise ValueError(f"minibatches: order must be a permutation of range({total})")
    size = total // m
    blocks = []
    for j in range(m):
        rows = torch.sort(order[j * size:(j + 1) * size]).values  # global row numbers of block j
        pieces, start = [], 0
        for roll, n in zip(rolls, sizes):
            mine = rows[(rows >= start) & (rows < start + n)] - start  # the block's rows inside this roll
            if len(mine):
                whole = len(mine) == n
                pieces.append((roll if whole else slice_rollout(roll, mine), size / len(mine)))
            start += n
        blocks.append(pieces)
    return blocks


# --------------------------------------------------------------------------------------------------- objective
def rl_objective(algo_loss: str, policy, roll: dict, args, device, value_head=None) -> tuple[torch.Tensor, dict]:
    """The loss of one update on a rollout (make_rollout's dict) -> (loss, metrics of 0-d tensors / floats).
    rloo: rl.reinforce_loss; grpo: rl.grpo_loss (k3 KL term, --grpo-loss aggregation); ppo: rl.ppo_policy_loss +
    args.vf_coef * rl.ppo_value_loss (the value head's). A rollout holding live_logps (make_rollout's forward with its
    graph) is used once without a new forward: the entry is cleared."""
    if roll.get("live_logps") is not None and algo_loss != "ppo":
        logps, mask, values = roll["live_logps"], roll["mask"], None
        roll["live_logps"] = None  # its graph is freed by the backward; a second call makes its own forward
    else:
        logps, mask, values = policy_logps(policy, roll["b"], device, value_head if algo_loss == "ppo" else None)
    if algo_loss == "rloo":
        return rl.reinforce_loss(logps, mask, roll["advantages"]), {}
    if algo_loss == "grpo":  # its per-token k3 is logged as kl_k3 ("kl" is the rollout's sequence KL, k1)
        loss, m = rl.grpo_loss(logps, roll["old_logps"], roll["ref_logps"], mask, roll["advantages"], beta=args.beta,
                               eps_low=args.clip_ratio, aggregation=args.grpo_loss, max_len=args.max_new_tokens)
        return loss, {("kl_k3" if k == "kl" else k): v for k, v in m.items()}
    pl, pm = rl.ppo_policy_loss(logps, roll["old_logps"], roll["advantages"], mask, args.clip_ratio)
    vl, vm = rl.ppo_value_loss(values, roll["old_values"], roll["returns"], mask, args.clip_value)
    return pl + args.vf_coef * vl, {**pm, **vm, "value_loss": vl.detach(),
                                    "explained_var": rl.explained_variance(values, roll["returns"], mask)}


# ---------------------------------------------------------------------------------------------- collapse guard
def collapse_warnings(rec: dict, args) -> list[str]:
    """Crossed bounds of the collapse guard (response length in tokens, entropy in nats/token, sequence KL in nats)
    -> one line each, empty when none."""
    out = []
    if not args.guard_len_min <= rec["resp_len"] <= args.guard_len_max:
        out.append(f"response length {rec['resp_len']:.1f} outside [{args.guard_len_min}, {args.guard_len_max}]")
    if rec["entropy"] < args.guard_entropy:
        out.append(f"entropy {rec['entropy']:.3f} below {args.guard_entropy}")
    if rec["kl"] > args.guard_kl:
        out.append(f"KL {rec['kl']:.3f} above {args.guard_kl}")
    return out
