"""nanoalign.forward's shared prompts: rows that share a prompt (chosen / rejected of a pair, an RL prompt's k samples)
run it once, and every real token gets the hidden state and every parameter the gradient of the plain forward (the
reference: the same batch with sharing off, each row on its own)."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoalign import forward as fwd  # noqa: E402
from nanoalign.batch import collate, encode_all, open_image  # noqa: E402
from nanoalign.checkpoint import load_pretrained  # noqa: E402
from nanoalign.data import load_examples  # noqa: E402
from nanoalign.ops import token_logprobs  # noqa: E402
from test_generate import tiny_checkpoint  # noqa: E402

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def world(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    tiny_checkpoint(str(d / "ckpt"), request.param)
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    with open(d / "prefs.jsonl", "w") as f:
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (24 + 5 * i, 40, 3), dtype=np.uint8)).save(d / "img" / f"{i}.png")
            img = f"{i}.png" if i != 2 else None  # one text-only row
            f.write(json.dumps({"id": str(i), "image": img, "prompt": "what is in the image , and where ?",
                                "chosen": " ".join(["cat", "dog", "red"][: 1 + i % 3]),
                                "rejected": "blue " * (1 + (i * 2) % 5)}) + "\n")
    model, processor = load_pretrained(d / "ckpt")
    exs, _ = load_examples(str(d / "prefs.jsonl"), "prefs", str(d / "img"))
    enc, _ = encode_all(exs, processor, str(d / "img"), "vicuna_nosys", 4096)
    return model, processor, exs, enc, d


def _check_same(model, b, loss_rows=None):
    """hidden states at real tokens and all parameter gradients of a log-prob loss: shared vs plain."""
    real = b["attention_mask"].bool()
    out = []
    for share in (True, False):
        model.zero_grad()
        h = fwd.forward(model, b, "cpu", share_prompts=share)
        logp = token_logprobs(h, model.lm_head_weight, b["labels"])
        (logp.sum() + (h[real].float() ** 2).mean()).backward()
        out.append((h.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (h1, g1), (h2, g2) = out
    torch.testing.assert_close(h1, h2, atol=2e-5, rtol=1e-4)
    assert g1.keys() == g2.keys() and any(n.startswith("vision_tower") for n in g1)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=2e-5, rtol=1e-3, msg=n)


def test_pairs_share_their_prompt(world):
    model, processor, exs, enc, d = world
    items = enc[:5]
    b = collate(items, ["chosen", "rejected"], processor, [open_image(exs[it.index], str(d / "img")) for it in items])
    p = fwd.pack(b, model.config.image_token_index)
    assert p is not None and p.kv[0].shape[0] == 5  # 10 rows, 5 prompts
    n_real = int(b["attention_mask"].sum())
    n_prompt = sum(len(it.prompt_ids) for it in items)
    assert p.ids.shape[1] == n_real - n_prompt  # every prompt token once instead of twice
    _check_same(model, b)


def test_rl_samples_share_their_prompt(world):
    """k = 3 samples per prompt of different lengths (one with no response token labelled), the prompt's image
    shared by the three rows, a text-only prompt among them."""
    model, processor, exs, enc, d = world
    items, images = [], []
    for it in enc[1:4]:
        im = open_image(exs[it.index], str(d / "img"))
        for j, resp in enumerate([[5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13, 2]]):
            items.append(replace(it, chosen_ids=resp, rejected_ids=None, chosen_w=None, rejected_w=None,
                                 chosen_labelled=None if j else [True, True, False, False]))
            images.append(im)
    b = collate(items, ["chosen"], processor, images, vision_always=True)
    assert b["pixel_values"] is not None
    p = fwd.pack(b, model.config.image_token_index)
    assert p is not None and p.kv[0].shape[0] == 3
    _check_same(model, b)


def test_left_padded_batch_is_not_packed(world):
    """pack reads collate's right-padded layout; a batch padded on the left (as the engine's prompt batches are) takes
    the plain forward, which reads the mask."""
    model, processor, exs, enc, d = world
    items = enc[:3]
    b = collate(items, ["chosen", "rejected"], processor, [open_image(exs[it.index], str(d / "img")) for it in items])
    assert fwd.pack(b, model.config.image_token_index) is not None
    left = dict(b)
    for k, pad in (("input_ids", processor.pad_id), ("attention_mask", 0), ("labels", -100)):
        shift = b[k].clone()
        for r in range(shift.shape[0]):  # move each row's real tokens to the right end
            n = int(b["attention_mask"][r].sum())
            shift[r] = pad
            shift[r, shift.shape[1] - n:] = b[k][r, :n]
        left[k] = shift
    assert fwd.pack(left, model.config.image_token_index) is None


def test_distinct_prompts_are_not_packed(world):
    model, processor, exs, enc, d = world
    items = enc[:4]
    b = collate(items, ["chosen"], processor, [open_image(exs[it.index], str(d / "img")) for it in items])
    assert fwd.pack(b, model.config.image_token_index) is None  # SFT: nothing to share, the plain forward


def test_gradient_checkpointing_takes_the_packed_path(world):
    model, processor, exs, enc, d = world
    items = enc[:3]
    b = collate(items, ["chosen", "rejected"], processor, [open_image(exs[it.index], str(d / "img")) for it in items])
    model.gradient_checkpointing = True
    model.train()
    try:
        _check_same(model, b)
    finally:
        model.gradient_checkpointing = False


def test_rows_share_only_the_same_image_and_prompt(world):
    """Rows share a prompt only when both its tokens and its image are the same: k = 2 samples each of (image A,
    text P), (image B, text P), (image A, text Q), (no image, text P), (no image, text P + earlier turn) are 5 prompts
    (the rule: one per distinct (image, prompt tokens)); the forward is the plain one's."""
    model, processor, exs, enc, d = world
    a, b_img = open_image(exs[0], str(d / "img")), open_image(exs[1], str(d / "img"))
    base = replace(enc[0], rejected_ids=None, rejected_w=None, chosen_w=None, chosen_labelled=None)
    other = replace(base, prompt_ids=base.prompt_ids[:-3] + [9, 10] + base.prompt_ids[-3:])  # text Q
    text_only = replace(enc[2], rejected_ids=None, rejected_w=None, chosen_w=None, chosen_labelled=None)
    history = replace(text_only, prompt_ids=[text_only.prompt_ids[0], 11, 12] + text_only.prompt_ids[1:])
    items, images = [], []
    for it, im in ((base, a), (base, b_img), (other, a), (text_only, None), (history, None)):
        for resp in ([5, 6, 2], [7, 2]):
            items.append(replace(it, chosen_ids=resp))
            images.append(im)
    bt = collate(items, ["chosen"], processor, images)
    p = fwd.pack(bt, model.config.image_token_index)
    assert p is not None and p.kv[0].shape[0] == 5
    assert p.kv[4].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # each row's prompt
    _check_same(model, bt)
