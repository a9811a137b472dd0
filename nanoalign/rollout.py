"""Responses made during training (the step's second stage): POVID's noisy-self response and the online pairs.

A rollout function takes the policy and a collated batch of P examples [chosen | data rejected] and returns the batch
with more rows appended, in blocks of P: every extra block is another rejected response of the same prompts, paired
with the chosen rows by the objective (nanoalign/objective.py) and scored by the frozen reference
(nanoalign/refcache.reference_logps).

Online preference learning (Amirloo et al. 2024, "Understanding Alignment in Multimodal LLMs", arXiv:2407.02477,
Sections 3.4 and 5.4-5.6, Eq. 4-5): `online` makes the step's pairs during training, from the current policy through
the generation engine (nanoalign.engine.sample: batched, KV-cached, eval mode, no dropout, FSDP2-gathered):
  sampled  Online-DPO: two samples per prompt, an annotator (nanoalign/annotate.py) picks the chosen one;
  mixed    Mixed-DPO (Eq. 4): per example the data's pair with probability alpha, else an online pair as above;
  bdhs     Online-BDHS (Eq. 5): a BDHS rejected response (nanoalign.bdhs) made with the current policy, the data's
           chosen (reference) answer as the chosen; with a data rejected the batch is [chosen | rejected | bdhs] and
           the objective's loss is the mean of the two DPO losses, without one [chosen | bdhs].
The random draws of a prompt come from its own generator, `prompt_generator(seed, step, example id)` (its samples,
Mixed-DPO's coin, its BDHS seed), a function of the run's seed, the step and the example only: a resumed run draws
what the uninterrupted run drew (the sampling RNG state is implied by the saved step, so nothing more needs saving),
and a prompt draws the same whichever rank, micro-step or batch row it lands on (the engine draws each row from its
own generator), so 1 rank and N ranks with the same global batch make the same responses and pairs, up to the
floating-point rounding of batched forwards of different shapes (tests/test_online_ranks.py). An example drawn twice
in one step (a global batch larger than the data) gets the same responses twice.
"""
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from nanoalign.annotate import left_padded
from nanoalign.batch import collate, row_image
from nanoalign.engine import sample
from nanoalign.forward import forward
from nanoalign.noise import noisy_pixel_values


def noisy_self(policy, items: list, b: dict, processor, noise_step: int, device) -> dict:
    """POVID's noisy-self rejected response (Zhou et al. 2024, arXiv:2402.11411; Amirloo et al. 2024,
    arXiv:2407.02477, Eq. 5): run the chosen tokens under a diffusion-noised image (nanoalign/noise.py, step
    `noise_step`, a fresh draw every call as POVID does) and take the policy's argmax at every response position
    (teacher forcing); those tokens, scored under the clean image, are the rejected response.

    items: the P encoded examples of b (b rows [0:P] chosen, [P:2P] rejected). Sets it.noisy_ids / it.noisy_w on
    each item. Returns the batch re-collated as [chosen | data rejected | noisy-self] (3P rows, text padded to the
    longest of the three), with b's images. Departure: the image placeholder token is never emitted.
    """
    P = len(items)
    noisy = b["pixel_values"]
    if noisy is not None:
        ip = processor.image_processor
        noisy = noisy_pixel_values(noisy, ip.image_mean, ip.image_std, noise_step)
    with torch.no_grad():
        h = forward(policy, {**b, "pixel_values": noisy}, device, rows=slice(0, P))  # (P,T,H) chosen rows
        scored = b["labels"][:P].to(device) != -100  # (P,T)
        logits = h[scored].float() @ policy.lm_head_weight.float().T  # (n_scored, V): response rows only
        image_token = policy.config.image_token_index
        if 0 <= image_token < logits.shape[1]:
            logits[:, image_token] = -float("inf")
        argmax = logits.argmax(-1).cpu()  # (n_scored,)
    for it, toks in zip(items, argmax.split(scored.sum(1).tolist())):
        it.noisy_ids, it.noisy_w = toks.tolist(), None
    b3 = collate(items, ["chosen", "rejected", "noisy"], processor, [None] * P)  # text only, then b's images:
    b3["row_image"] = row_image(b["row_image"][:P].tolist(), 3)  # (3P,) each example's image in b, as in b
    b3.update(pixel_values=b["pixel_values"], image_sizes=b["image_sizes"],
              image_index=None if b["pixel_values"] is None else b3["row_image"][b3["row_image"] >= 0])
    return b3


# ------------------------------------------------------------------------------------------ online preference pairs
ONLINE = ("sampled", "mixed", "bdhs")  # the table's `responses` values handled by `online`


@dataclass
class OnlineSettings:
    temperature: float = 1.0  # sampling of Online-DPO's two responses (the paper samples; its values are not given)
    top_p: float = 1.0
    max_new_tokens: int = 64
    alpha: float = 0.5  # Mixed-DPO: probability of the offline pair (our choice: the paper's value is lost in our text)
    bdhs: object = None  # nanoalign.bdhs.BDHSSettings for Online-BDHS (None = its defaults)
    embedder: object = None  # BDHS's sentence embedder (anything with .encode(list[str]) -> (n, E))


def prompt_generator(seed: int, step: int, example_id: str, device="cpu") -> torch.Generator:
    """The generator of one prompt's random draws at one step: seeded from (seed, step, example id) only, not from
    the rank or the batch, so the prompt's samples do not depend on how the global batch is split over ranks."""
    h = hashlib.sha256(f"{seed}/{step}/{example_id}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h[:7], "little"))


def prompt_batch(items: list, images: list, processor) -> dict:
    """Encoded items -> the engine's prompt batch: input_ids / attention_mask (P,T) left padded, pixel_values /
    image_sizes of the images present (in row order)."""
    batch = left_padded([it.prompt_ids for it in items], processor.pad_id)
    present = [im for im in images if im is not None]
    if present:
        batch.update(processor.image_processor.process(present))
    return batch


def online(kind: str, policy, items: list, examples: list, images: list, processor, annotator,
           settings: OnlineSettings, generators: list) -> tuple[dict, list, Counter]:
    """The rollout + annotation stages of an online algorithm (kind in ONLINE) for P encoded items.

    examples / images: the items' nanoalign.data.Example and PIL image (or None), aligned with items; generators:
    one torch.Generator per item (prompt_generator), the source of all of that prompt's random draws.
    Returns (b, kept, stats): b the collated batch [chosen | rejected] (bdhs: [chosen | (data rejected |) bdhs]) of
    the kept items (each a copy; pairs whose annotation was dropped are left out), vision_always set. When no pair is
    left, b holds the first item's pair as a placeholder and stats["placeholder"] = 1: the caller weights its loss
    by 0 (under FSDP every rank must still run the forward). stats (Counter): online / offline pairs, dropped_<reason>,
    rollout_tokens, rollout_s, chosen_len / rejected_len (summed token counts), the annotator's counts.
    """
    stats = Counter()
    if kind == "bdhs":
        kept = _bdhs_items(policy, items, examples, images, processor, settings, generators, stats)
        sides = ["chosen", "rejected", "bdhs"] if all(it.rejected_ids for it in items) else ["chosen", "bdhs"]
    else:
        kept = _sampled_items(kind, policy, items, examples, images, processor, annotator, settings, generators,
                              stats)
        sides = ["chosen", "rejected"]
    for it in kept:
        stats["chosen_len"] += len(it.chosen_ids)
        stats["rejected_len"] += len(getattr(it, "bdhs_ids", None) or it.rejected_ids)
    if not kept:
        stats["placeholder"] = 1
        it = replace(items[0])
        fill = it.chosen_ids or [processor.tokenizer.eos_id or 0]  # a prompt-only item has no response of its own
        it.chosen_ids, it.chosen_w, it.chosen_labelled = list(fill), None, None
        if kind == "bdhs":
            it.bdhs_ids, it.bdhs_w = list(fill), None
        else:
            it.rejected_ids, it.rejected_w = list(it.rejected_ids or fill), None
        kept = [it]
    pos = {it.index: i for i, it in enumerate(items)}
    b = collate(kept, sides, processor, [images[pos[k.index]] for k in kept], vision_always=True)
    return b, kept, stats


def _sampled_items(kind, policy, items, examples, images, processor, annotator, settings, generators, stats):
    """Online-DPO / Mixed-DPO pairs: copies of the items with chosen_ids / rejected_ids set from two samples of the
    current policy, ordered by the annotator (Mixed-DPO: the data's pair kept with probability alpha)."""
    P = len(items)
    if kind == "mixed":  # each coin from a stream of its own, so alpha 0 samples exactly what online-dpo samples
        coins = [torch.rand(1, generator=torch.Generator().manual_seed(g.initial_seed() ^ 0x5DEECE66D)).item()
                 for g in generators]
        offline = [c < settings.alpha for c in coins]
    else:
        offline = [False] * P
    out = {i: replace(items[i]) for i in range(P) if offline[i]}
    stats["offline"] += len(out)
    todo = [i for i in range(P) if not offline[i]]
    if todo:
        t0 = time.time()
        r = sample(policy, prompt_batch([items[i] for i in todo], [images[i] for i in todo], processor),
                   n_per_prompt=2, temperature=settings.temperature, top_p=settings.top_p,
                   max_new_tokens=settings.max_new_tokens, end_ids=processor.end_ids,
                   generator=[generators[i] for i in todo for _ in range(2)], pad_id=processor.pad_id)  # per row
        stats["rollout_s"] += time.time() - t0
        stats["rollout_tokens"] += sum(len(x) for x in r.ids)
        ids = [(r.ids[2 * k], r.ids[2 * k + 1]) for k in range(len(todo))]
        image_token = processor.tokenizer.image_token_id  # the engine may sample it; it cannot be a response token
        bad = [image_token in a or image_token in b for a, b in ids]
        stats["dropped_image_token"] += sum(bad)
        todo, ids = [i for i, x in zip(todo, bad) if not x], [p for p, x in zip(ids, bad) if not x]
        dec = processor.tokenizer.decode
        verdicts = [] if not todo else annotator([examples[i] for i in todo], [images[i] for i in todo],
                             [dec(a) for a, _ in ids], [dec(b) for _, b in ids])
        stats.update(annotator.take_stats())
        for i, (a, b), v in zip(todo, ids, verdicts):
            if v is None:
                continue
            if a == b:  # same ids decode alike; the annotator already counted it
                continue
            chosen, rejected = (a, b) if v == 0 else (b, a)
            out[i] = replace(items[i], chosen_ids=list(chosen), rejected_ids=list(rejected), chosen_w=None,
                             rejected_w=None, chosen_labelled=None)
            stats["online"] += 1
    return [out[i] for i in sorted(out)]


def _bdhs_items(policy, items, examples, images, processor, settings, generators, stats):
    """Online-BDHS: copies of the items with bdhs_ids, the BDHS rejected response of the current policy."""
    from nanoalign.bdhs import BDHSSettings, bdhs_rejected
    bs = settings.bdhs or BDHSSettings()
    seeds = [int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g, device=g.device)) for g in generators]
    t0 = time.time()
    res = bdhs_rejected(policy, processor, list(images), [ex.prompt for ex in examples],
                        [ex.chosen for ex in examples], bs, embedder=settings.embedder or BowEmbedder(),
                        seeds=seeds)
    stats["rollout_s"] += time.time() - t0
    tok = processor.tokenizer
    out = []
    for it, r in zip(items, res):
        if r.rejected is None:
            stats["dropped_" + (r.reason if r.reason in DROP_REASONS else "other")] += 1
            continue
        ids = tok.encode(r.rejected, add_bos=False) + ([tok.eos_id] if tok.eos_id is not None else [])
        if ids == it.chosen_ids:
            stats["dropped_identical"] += 1
            continue
        new = replace(it)
        new.bdhs_ids, new.bdhs_w = ids, None
        stats["rollout_tokens"] += len(ids)
        stats["online"] += 1
        out.append(new)
    return out


class BowEmbedder:
    """A bag-of-words sentence embedder (hashed word counts, 4096 buckets): BDHS's similarity check without a
    sentence-transformers download (`--bdhs-embedder bow`; tests, the toy world's closed vocabulary). Not the
    paper's all-mpnet-base-v2: it compares words, not meanings."""

    def encode(self, texts):
        out = torch.zeros(len(texts), 4096)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int.from_bytes(hashlib.md5(w.encode()).digest()[:4], "little") % 4096] += 1.0
        return out


DROP_REASONS = ("identical", "tie", "unparseable", "inconsistent", "image_token", "empty_reference", "bad_input",
                "other")
STAT_KEYS = ("online", "offline", "parsed", "first_wins", "chosen_len", "rejected_len", "rollout_tokens", "rollout_s",
             *("dropped_" + r for r in DROP_REASONS))  # the same keys on every rank (summed collectively)


def nothing_kept(seen: Counter, limit: int, step: int, algo: str, annotator: str | None, end: bool = False) \
        -> str | None:
    """The one line (for trainutil.Stop, exit 2) of an online run that has nothing to train on, else None.
    seen: STAT_KEYS summed over this run's steps so far (since it started or resumed) and over ranks, plus "steps"
    and "applied" (steps whose optimizer step ran). During the run (end False): the first `limit` pairs sampled
    (online kept + dropped) were all dropped (--no-signal-limit; 0 = no check, also not at the end), so Online-DPO
    trains on nothing and Mixed-DPO only on its offline pairs. At the end (end True): no optimizer step ran in the
    whole run."""
    sampled = seen["online"] + sum(seen["dropped_" + r] for r in DROP_REASONS)
    if seen["online"] or not sampled or (not end and (not limit or sampled < limit)) or (end and seen["applied"]):
        return None
    why = ", ".join(f"{r} {seen['dropped_' + r]}" for r in DROP_REASONS if seen["dropped_" + r])
    judge = f"the annotator (--annotator {annotator}) " if annotator else "BDHS "
    if end:
        return (f"error: {algo}: no pair kept in any of the run's {seen['steps']} steps ({sampled} sampled, all "
                f"dropped: {why}); {judge}left nothing to train on, so no step was taken and final/ is not saved")
    return (f"error: step {step}: {algo} kept none of the first {sampled} pairs sampled (steps 1-{seen['steps']} of "
            f"this run, all ranks; dropped: {why}); {judge}leaves no sampled pair to train on: stopping "
            f"(--no-signal-limit {limit}; 0 = no check)")


def online_metrics(total: dict, rec: dict, beta: float, world: int) -> dict:
    """Per-step metrics of the online stages. total: STAT_KEYS summed over micro-steps and ranks; rec: the step's
    record (the objective's metrics, means over ranks). Returns online_share, pairs, dropped_<reason> (counts),
    position_bias (share of parsed VLM verdicts won by the response shown first; absent without a VLM judge),
    chosen_len / rejected_len (mean tokens per pair), rollout_s (per rank), rollout_tokens_per_s (all ranks), kl_ref
    (the mean over pairs of the two responses' sum_t log pi - log ref: a one-sample estimate of KL(pi || ref) when
    both are sampled; for offline or BDHS rows it is their log-ratio, not a KL)."""
    n = total["online"] + total["offline"]
    out = {"online_share": total["online"] / n if n else 0.0, "pairs": n}
    out.update({"dropped_" + r: total["dropped_" + r] for r in DROP_REASONS})
    if total["parsed"]:
        out["position_bias"] = total["first_wins"] / total["parsed"]
    if n:
        out["chosen_len"] = total["chosen_len"] / n
        out["rejected_len"] = total["rejected_len"] / n
    out["rollout_s"] = total["rollout_s"] / world
    if total["rollout_s"] > 0:
        out["rollout_tokens_per_s"] = total["rollout_tokens"] / out["rollout_s"]
    if n and "reward_chosen" in rec and beta > 0:
        out["kl_ref"] = (rec["reward_chosen"] + rec["reward_rejected"]) / (2 * beta)
    return out
