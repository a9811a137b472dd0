"""A model on a collated batch (nanoalign/batch.py's dict): hidden states of some rows, per-response log-probs.

Shared by the step's stages (rollout, reference log-probs, objective): the policy and the frozen reference run the
same way. The model returns hidden states, never (R, T, V) logits; nanoalign/ops.py projects only scored rows.
"""
import torch

from nanoalign.batch import select_rows
from nanoalign.ops import token_logprobs


def forward(model, b: dict, device, rows=slice(None)) -> torch.Tensor:
    """Hidden states (R, T, H) of the batch rows `rows` (a slice or index tensor), each image through the vision
    tower once. The tower runs even when none of these rows has an image (batch.collate's vision_always): under
    FSDP every rank must gather its parameters and reduce its gradients, and a step whose rows are all text-only
    then gives it zero gradients (AdamW still moves it by its momentum) on 1 rank as on N."""
    if not (isinstance(rows, slice) and rows == slice(None)):
        b = select_rows(b, rows, vision_always=True)
    to = lambda x: None if x is None else x.to(device)
    return model(b["input_ids"].to(device), to(b["pixel_values"]), to(b["image_sizes"]),
                 b["attention_mask"].to(device), image_index=to(b["image_index"]))


@torch.no_grad()
def response_logps(model, b: dict, device) -> list[torch.Tensor]:
    """Per-row 1-D CPU float32 tensors of log p(response token) under `model`, in token order (n_scored_r,)."""
    h = forward(model, b, device)
    labels = b["labels"].to(device)
    logp = token_logprobs(h, model.lm_head_weight, labels).cpu()
    return [logp[r][labels[r].cpu() != -100] for r in range(logp.shape[0])]
