"""Responses made during training (the step's second stage): today POVID's noisy-self response.

A rollout function takes the policy and a collated batch of P examples [chosen | data rejected] and returns the batch
with more rows appended, in blocks of P: every extra block is another rejected response of the same prompts, paired
with the chosen rows by the objective (nanoalign/objective.py) and scored by the frozen reference
(nanoalign/refcache.reference_logps). Next: sampled responses (Online-DPO, RLOO, GRPO) and BDHS.
"""
import torch

from nanoalign.batch import collate, row_image
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
    has_image = (b["row_image"][:P] >= 0).tolist()  # (P,) which examples show an image
    b3["row_image"] = row_image(has_image, 3)  # (3P,)
    b3.update(pixel_values=b["pixel_values"], image_sizes=b["image_sizes"],
              image_index=None if b["pixel_values"] is None else b3["row_image"][b3["row_image"] >= 0])
    return b3
