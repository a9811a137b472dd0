"""A model on a collated batch (nanoalign/batch.py's dict): hidden states of some rows, per-response log-probs.

Shared by the step's stages (rollout, reference log-probs, objective): the policy and the frozen reference run the
same way. The model returns hidden states, never (R, T, V) logits; nanoalign/ops.py projects only scored rows.
"""
import torch

from nanoalign.ops import token_logprobs


def forward(model, b: dict, device, rows=slice(None)) -> torch.Tensor:
    """Hidden states (R, T, H) of the batch rows `rows` (a slice), each image through the vision tower once."""
    to = lambda x: None if x is None else x.to(device)
    return model(b["input_ids"][rows].to(device), to(b["pixel_values"]), to(b["image_sizes"]),
                 b["attention_mask"][rows].to(device),
                 image_index=None if b["image_index"] is None else to(b["image_index"][rows]))


@torch.no_grad()
def response_logps(model, b: dict, device) -> list[torch.Tensor]:
    """Per-row 1-D CPU float32 tensors of log p(response token) under `model`, in token order (n_scored_r,)."""
    h = forward(model, b, device)
    labels = b["labels"].to(device)
    logp = token_logprobs(h, model.lm_head_weight, labels).cpu()
    return [logp[r][labels[r].cpu() != -100] for r in range(logp.shape[0])]
