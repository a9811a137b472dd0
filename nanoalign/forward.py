"""A model on a collated batch (nanoalign/batch.py's dict): hidden states of some rows, per-response log-probs.

Shared by the step's stages (rollout, reference log-probs, objective): the policy and the frozen reference run the
same way. The model returns hidden states, never (R, T, V) logits; nanoalign/ops.py projects only scored rows.
"""
from typing import NamedTuple

import torch

from nanoalign.batch import select_rows
from nanoalign.model import attention
from nanoalign.ops import token_logprobs

# Share prompts only when it removes at least this share of the batch's tokens (below it the packing's gathers cost
# more than they save; a batch of distinct prompts, e.g. SFT, never packs).
SHARE_MIN_SAVING = 0.2


def forward(model, b: dict, device, rows=slice(None), share_prompts: bool = True) -> torch.Tensor:
    """Hidden states (R, T, H) of the batch rows `rows` (a slice or index tensor), each image through the vision
    tower once. The tower runs even when none of these rows has an image (batch.collate's vision_always): under
    FSDP every rank must gather its parameters and reduce its gradients, and a step whose rows are all text-only
    then gives it zero gradients (AdamW still moves it by its momentum) on 1 rank as on N.

    Rows that share a prompt (chosen and rejected of a pair, the k samples of an RL prompt) run it once
    (share_prompts, when that saves SHARE_MIN_SAVING of the tokens; `pack`): the same hidden states at every real
    token as the plain forward, up to fp32 rounding; padding positions hold other rows' values (nothing reads them)."""
    if not (isinstance(rows, slice) and rows == slice(None)):
        b = select_rows(b, rows, vision_always=True)
    to = lambda x: None if x is None else x.to(device)
    packed = pack(b, model.config.image_token_index) if share_prompts else None
    if packed is None:
        return model(b["input_ids"].to(device), to(b["pixel_values"]), to(b["image_sizes"]),
                     b["attention_mask"].to(device), image_index=to(b["image_index"]))
    kv = SharedPrompts(*(t.to(device) for t in packed.kv))
    h = model(packed.ids.to(device), to(b["pixel_values"]), to(b["image_sizes"]), None,
              position_ids=packed.pos.to(device), image_index=to(packed.image_index), kv=kv)  # (1, Ttot, H)
    return h[0][packed.where.to(device)]  # (R, T, H)


# ------------------------------------------------------------------------------------------- shared prompts
class Packed(NamedTuple):
    ids: torch.Tensor  # (1, Ttot) the G distinct prompts, then every row's response tokens, no padding
    pos: torch.Tensor  # (1, Ttot) RoPE positions: a prompt's 0..n-1, a response's n..L-1 (as in its own row)
    image_index: torch.Tensor | None  # (n_prompts_with_image,) each prompt's image among b's pixel_values
    where: torch.Tensor  # (R, T) long: the packed token holding row r's position t (padding -> 0)
    kv: tuple  # SharedPrompts' index tensors


def pack(b: dict, image_token: int) -> Packed | None:
    """The packed layout of a right-padded batch whose rows share prompts, or None when sharing saves less than
    SHARE_MIN_SAVING of the tokens. A row's prompt is its tokens up to and including the one that predicts its first
    labelled token (the whole row when nothing is labelled); rows with the same prompt tokens and the same image
    share it. A batch with an image token past a prompt, or not right padded (not what collate makes), is not packed."""
    ids, am, labels, ri = b["input_ids"], b["attention_mask"], b["labels"], b.get("row_image")
    if ri is None or ids.shape[0] < 2:
        return None
    R, T = ids.shape
    if not bool((am.bool() == (torch.arange(T) < am.sum(1, keepdim=True))).all()):
        return None  # not collate's right-padded layout (e.g. left padding): the plain forward reads the mask
    L = am.sum(1).tolist()  # (R,) real tokens (right padded)
    lab = labels != -100
    n = (torch.where(lab.any(1), lab.float().argmax(1), am.sum(1) - 1) + 1).tolist()  # (R,) prompt lengths
    first, group = {}, []  # prompt key -> group; group[r]
    for r in range(R):
        group.append(first.setdefault((int(ri[r]), tuple(ids[r, :n[r]].tolist())), len(first)))
    lead = {}  # group -> its first row
    for r in range(R):
        lead.setdefault(group[r], r)
    G = len(lead)
    n_g = [n[lead[g]] for g in range(G)]
    total = sum(n_g) + sum(L[r] - n[r] for r in range(R))
    if total > (1 - SHARE_MIN_SAVING) * sum(L):
        return None
    if any(image_token in ids[r, n[r]:L[r]].tolist() for r in range(R)):
        return None
    # packed order: prompt 0 .. G-1, then row 0's response .. row R-1's
    p_start = [sum(n_g[:g]) for g in range(G)]
    r_start, o = [], sum(n_g)
    for r in range(R):
        r_start.append(o)
        o += L[r] - n[r]
    packed_ids = torch.cat([ids[lead[g], :n_g[g]] for g in range(G)] + [ids[r, n[r]:L[r]] for r in range(R)])
    pos = torch.cat([torch.arange(m) for m in n_g] + [torch.arange(n[r], L[r]) for r in range(R)])
    where = torch.zeros(R, T, dtype=torch.long)
    for r in range(R):
        where[r, :n[r]] = torch.arange(p_start[group[r]], p_start[group[r]] + n[r])
        where[r, n[r]:L[r]] = torch.arange(r_start[r], r_start[r] + L[r] - n[r])
    image_index = None
    if b.get("image_index") is not None:
        image_index = torch.tensor([int(ri[lead[g]]) for g in range(G) if int(ri[lead[g]]) >= 0], dtype=torch.long)
    # attention index tensors: prompts (G, Lp) and responses (R, Lr) as packed positions, padding -> 0 (masked)
    Lp, Lr = max(n_g), max(1, max(L[r] - n[r] for r in range(R)))
    p_idx, p_keep = torch.zeros(G, Lp, dtype=torch.long), torch.zeros(G, Lp, dtype=torch.bool)
    for g in range(G):
        p_idx[g, :n_g[g]] = torch.arange(p_start[g], p_start[g] + n_g[g])
        p_keep[g, :n_g[g]] = True
    r_idx, r_keep = torch.zeros(R, Lr, dtype=torch.long), torch.zeros(R, Lr, dtype=torch.bool)
    for r in range(R):
        r_idx[r, :L[r] - n[r]] = torch.arange(r_start[r], r_start[r] + L[r] - n[r])
        r_keep[r, :L[r] - n[r]] = True
    return Packed(packed_ids[None], pos[None], image_index, where,
                  (p_idx, p_keep, r_idx, r_keep, torch.tensor(group, dtype=torch.long)))


class SharedPrompts:
    """Attention of a packed batch (Packed): each prompt attends causally to itself, each response to all of its
    prompt's tokens and causally to its own, as in the row it came from. Every layer calls attend(). Prefix sharing
    for preference pairs: Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing",
    arXiv:2410.20305 (here for every stage that runs nanoalign.forward, RL's k samples of a prompt included)."""

    def __init__(self, p_idx, p_keep, r_idx, r_keep, group):
        self.p_idx, self.p_keep, self.r_idx, self.r_keep, self.group = p_idx, p_keep, r_idx, r_keep, group
        Lp, Lr = p_idx.shape[1], r_idx.shape[1]
        causal_p = torch.ones(Lp, Lp, dtype=torch.bool, device=p_idx.device).tril()
        causal_r = torch.ones(Lr, Lr, dtype=torch.bool, device=p_idx.device).tril()
        # (G,1,Lp,Lp): real keys up to the query (a padded query still sees key 0: finite, never read)
        self.mask_p = (causal_p[None] & p_keep[:, None, :])[:, None]
        # (R,1,Lr,Lp+Lr): the prompt's real keys, then the response's own up to the query (itself at least)
        own = causal_r[None] & (r_keep[:, None, :] | torch.eye(Lr, dtype=torch.bool, device=p_idx.device)[None])
        self.mask_r = torch.cat([p_keep[group][:, None, :].expand(-1, Lr, -1), own], dim=2)[:, None]

    def attend(self, q, k, v, mask):
        """q (1,nh,Ttot,D), k/v (1,nkv,Ttot,D) (RoPE applied) -> (1,Ttot,nh*D)."""
        take = lambda t, idx: t[0][:, idx].transpose(0, 1)  # noqa: E731  (h,Ttot,D) -> (n,h,L,D)
        kp, vp = take(k, self.p_idx), take(v, self.p_idx)  # (G,nkv,Lp,D)
        out_p = attention(take(q, self.p_idx), kp, vp, self.mask_p)  # (G,Lp,nh*D)
        kr = torch.cat([kp[self.group], take(k, self.r_idx)], dim=2)  # (R,nkv,Lp+Lr,D)
        vr = torch.cat([vp[self.group], take(v, self.r_idx)], dim=2)
        out_r = attention(take(q, self.r_idx), kr, vr, self.mask_r)  # (R,Lr,nh*D)
        # the real tokens in row-major order are the packed order itself (prompts, then responses)
        return torch.cat([out_p[self.p_keep], out_r[self.r_keep]])[None]


@torch.no_grad()
def response_logps(model, b: dict, device) -> list[torch.Tensor]:
    """Per-row 1-D CPU float32 tensors of log p(response token) under `model`, in token order (n_scored_r,)."""
    h = forward(model, b, device)
    labels = b["labels"].to(device)
    logp = token_logprobs(h, model.lm_head_weight, labels).cpu()
    return [logp[r][labels[r].cpu() != -100] for r in range(logp.shape[0])]
