"""DDPO's per-token weights (RLHF-V, Yu et al. 2024, arXiv:2312.00849): gamma on the tokens of corrected segments,
1 elsewhere; from the data's character spans when a row has them, else from a token diff of the pair."""
from __future__ import annotations

import difflib

import torch

from nanoalign.data import Example


def ddpo_token_weights(chosen_ids: list[int], rejected_ids: list[int], gamma: float, min_match: int = 3,
                       autojunk: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token DDPO weights of the two responses from a token-level diff (RLHF-V rule).

    RLHF-V (Yu et al. 2024, shared/papers/001_b3fc2a759b82d26f.txt, Eq. 5) scores a response as
        log pi(y|x) = (1/N) [ sum_{y_i in y_u} log p(y_i|.) + gamma * sum_{y_i in y_c} log p(y_i|.) ],
        N = |y_u| + gamma |y_c|,
    y_c = tokens of corrected segments, y_u = unchanged tokens. With w_i = gamma on y_c and 1 on y_u this is
    sum_i w_i log p_i / sum_i w_i (the "average" form; the sum form drops the division -- the caller's flag).

    The corrected segments are not stored in the data; as in RLHF-V's public code (thunlp/Muffin) they are found by
    diffing the token ids: difflib.SequenceMatcher(None, rejected, chosen) (autojunk as difflib's default), matching
    blocks shorter than `min_match` tokens dropped, the gaps between the remaining blocks (and before the first /
    after the last) are modified spans; a gap non-empty on both sides gets weight gamma on its tokens on both sides,
    a pure insertion or deletion keeps weight 1. Ids are the response tokens only.
    Returns (w_chosen (len(chosen_ids),), w_rejected (len(rejected_ids),)) float32.
    """
    rej, cho = list(rejected_ids), list(chosen_ids)
    w_c, w_r = torch.ones(len(cho)), torch.ones(len(rej))
    blocks = difflib.SequenceMatcher(None, rej, cho, autojunk=autojunk).get_matching_blocks()
    kept = [b for b in blocks[:-1] if b.size >= min_match] + [blocks[-1]]  # last = (len(rej), len(cho), 0)
    r0 = c0 = 0
    for b in kept:
        if b.a > r0 and b.b > c0:  # gap non-empty on both sides: a modified span
            w_r[r0:b.a] = gamma
            w_c[c0:b.b] = gamma
        r0, c0 = b.a + b.size, b.b + b.size
    return w_c, w_r


def span_token_weights(offsets: list[tuple[int, int]], spans: list[tuple[int, int]] | None,
                       gamma: float) -> torch.Tensor:
    """Weights (len(offsets),) float32 from explicit character spans: a token whose character range
    [start, end) (from the tokenizer's encoding of the response) overlaps any span [s, e) gets gamma, others 1.
    Zero-width tokens (special tokens) keep 1."""
    w = torch.ones(len(offsets))
    for i, (a, b) in enumerate(offsets):
        if b > a and any(a < e and s < b for s, e in spans or ()):
            w[i] = gamma
    return w


def example_token_weights(example: Example, chosen_ids: list[int], rejected_ids: list[int], gamma: float,
                          chosen_offsets: list[tuple[int, int]] | None = None,
                          rejected_offsets: list[tuple[int, int]] | None = None,
                          min_match: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPO weights for one pair: from the example's character spans when it has them (and offsets are given),
    else from the token diff. A side without spans in a pair that has them keeps weight 1."""
    has_spans = example.chosen_segments is not None or example.rejected_segments is not None
    if has_spans and chosen_offsets is not None and rejected_offsets is not None:
        return (span_token_weights(chosen_offsets, example.chosen_segments, gamma),
                span_token_weights(rejected_offsets, example.rejected_segments, gamma))
    return ddpo_token_weights(chosen_ids, rejected_ids, gamma, min_match)
