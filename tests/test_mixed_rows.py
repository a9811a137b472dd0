"""Rows as public data has them, through batch.py and train.py: text-only rows mixed with image rows in one batch
(SFT, DPO reference log-probs, 1 rank vs 2 ranks), multi-turn conversations (LLaVA's rendering and labels), the
image tag inside an answer, reasons that say what happened."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
from nanoalign.batch import Unusable, collate, encode_all, encode_example, open_image, select_rows  # noqa: E402
from nanoalign.checkpoint import load_pretrained  # noqa: E402
from nanoalign.data import Example, load_examples  # noqa: E402
from test_generate import tiny_checkpoint  # noqa: E402

transformers = pytest.importorskip("transformers")
W = ["cat", "dog", "red", "blue"] + [f"w{i}" for i in range(28)]


def _turns(*pairs):
    return [t for h, a in pairs for t in ({"from": "human", "value": h}, {"from": "gpt", "value": a})]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    tiny_checkpoint(str(d / "ckpt"), "llava")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 40, 3), dtype=np.uint8)).save(d / "img" / f"{i}.png")
    with open(d / "prefs.jsonl", "w") as f:  # image rows and text-only rows interleaved
        for i in range(8):
            c = " ".join(W[(i + k) % 8] for k in range(6))
            r = " ".join(W[(i + k) % 8 + 8] for k in range(6))
            img = f"{i}.png" if i % 3 else None
            f.write(json.dumps({"id": str(i), "image": img, "prompt": "what is in the image ?" if img else "w3 w4 ?",
                                "chosen": c, "rejected": r}) + "\n")
    rows = []
    for i in range(8):
        pairs = [("<image>\nwhat is in the image ?" if i % 2 else "w1 w2 ?", f"{W[i]} {W[i + 1]}"),
                 ("red ?", f"{W[i + 2]} w9")] + ([("blue ?", "w10 w11 w12")] if i % 3 == 0 else [])
        rows.append({"id": str(i), **({"image": f"{i}.png"} if i % 2 else {}), "conversations": _turns(*pairs)})
    (d / "llava.json").write_text(json.dumps(rows))
    return d


def run(world, out, *extra, data="prefs.jsonl", fmt="prefs"):
    argv = ["--model", str(world / "ckpt"), "--data", str(world / data), "--data-format", fmt,
            "--image-root", str(world / "img"), "--out", str(out), "--batch-size", "2", "--template", "vicuna_nosys",
            *map(str, extra)]
    train.main(train.parse_args(argv))
    return [x for x in map(json.loads, open(out / "metrics.jsonl")) if "step" in x]


def test_multi_turn_sft_sequence_is_llavas(world):
    """The sequence of a 3-turn conversation = the tokenizer's ids of LLaVA's rendering of the whole conversation
    (SeparatorStyle.TWO: 'USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...'), labels on the answers and their
    </s> only."""
    _, processor = load_pretrained(world / "ckpt")
    tok = processor.tokenizer
    pairs = [("<image>\nwhat is in the image ?", "cat dog"), ("red ?", "w1 w2"), ("blue ?", "w3")]
    ex = Example("m", str(world / "img" / "1.png"), pairs[0][0], pairs[0][1], later_turns=pairs[1:])
    it = encode_example(0, ex, processor, None, "vicuna_nosys", 4096)
    text = "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in pairs)
    want = tok.encode(text)
    b = collate([it], ["chosen"], processor, [open_image(ex, None)])
    n_img = processor.image_processor.num_image_tokens(23, 40)
    ids = b["input_ids"][0].tolist()
    assert ids.count(tok.image_token_id) == n_img
    k = want.index(tok.image_token_id)
    assert ids == want[:k] + [tok.image_token_id] * n_img + want[k + 1:]
    # labels: the targets are exactly the answer tokens and their </s>; the questions of turns 2 and 3 are context
    labelled = [t for t in b["labels"][0].tolist() if t != -100]
    answers = [t for q, a in pairs for t in tok.encode(a, add_bos=False) + [tok.eos_id]]
    assert labelled == answers
    # a history (preference prompt) is rendered the same way, unlabelled
    pex = Example("p", str(world / "img" / "1.png"), "blue ?", "w3", "w4", history=pairs[:2])
    pit = encode_example(0, pex, processor, None, "vicuna_nosys", 4096)
    assert pit.prompt_ids == ids[:len(pit.prompt_ids)] and pit.chosen_ids == tok.encode("w3", add_bos=False) + [2]


def test_mixed_batch_rows_equal_rows_alone(world):
    """A batch mixing text-only and image rows gives every row the hidden states it has in a batch of its own."""
    model, processor = load_pretrained(world / "ckpt")
    exs, _ = load_examples(str(world / "prefs.jsonl"), "prefs", str(world / "img"))
    enc, _ = encode_all(exs, processor, str(world / "img"), "vicuna_nosys", 4096)
    items = enc[:4]  # ids 0 (text), 1, 2 (image), 3 (text)
    images = [open_image(exs[it.index], None) for it in items]
    assert [im is None for im in images] == [True, False, False, True]
    b = collate(items, ["chosen", "rejected"], processor, images)
    assert b["row_image"].tolist() == [-1, 0, 1, -1, -1, 0, 1, -1] and b["image_index"].tolist() == [0, 1, 0, 1]
    fwd = lambda bb: model(bb["input_ids"], bb["pixel_values"], bb["image_sizes"], bb["attention_mask"],
                           image_index=bb["image_index"])
    with torch.no_grad():
        h = fwd(b)
        for side, r0 in (("chosen", 0), ("rejected", 4)):
            for k, (it, im) in enumerate(zip(items, images)):
                alone = collate([it], [side], processor, [im])
                ha = fwd(alone)
                n = ha.shape[1]
                torch.testing.assert_close(h[r0 + k, :n], ha[0], atol=1e-5, rtol=1e-5)
        for rows in (slice(0, 4), slice(4, 8), slice(0, 1), slice(1, 3)):  # part of a batch (POVID's rollout)
            torch.testing.assert_close(fwd(select_rows(b, rows)), h[rows], atol=1e-5, rtol=1e-5)
    assert select_rows(b, slice(0, 1))["pixel_values"] is None  # a text-only part runs no vision tower
    kept = select_rows(b, slice(0, 1), vision_always=True)  # unless FSDP needs the tower run on every rank
    assert kept["pixel_values"] is b["pixel_values"] and kept["image_index"].tolist() == []


def test_shared_image_object_runs_the_tower_once(world):
    """An image object shown by several items (an RL rollout's k samples of one prompt) is processed once and its
    features feed every row that shows it: the same hidden states and the same parameter gradients as k separate
    copies of the image (the reference: each row with its own image, as before the sharing)."""
    model, processor = load_pretrained(world / "ckpt")
    exs, _ = load_examples(str(world / "prefs.jsonl"), "prefs", str(world / "img"))
    enc, _ = encode_all(exs, processor, str(world / "img"), "vicuna_nosys", 4096)
    items = enc[:4]  # ids 0 (text), 1, 2 (image), 3 (text)
    a, c = open_image(exs[items[1].index], None), open_image(exs[items[2].index], None)
    rows = [items[1], items[1], items[0], items[2], items[1]]
    shared = collate(rows, ["chosen"], processor, [a, a, None, c, a])
    copies = collate(rows, ["chosen"], processor, [a.copy(), a.copy(), None, c, a.copy()])
    assert shared["pixel_values"].shape[0] == 2 and copies["pixel_values"].shape[0] == 4
    assert shared["row_image"].tolist() == [0, 0, -1, 1, 0] and shared["image_index"].tolist() == [0, 0, 1, 0]
    assert torch.equal(shared["input_ids"], copies["input_ids"])

    def run(b):
        model.zero_grad()
        h = model(b["input_ids"], b["pixel_values"], b["image_sizes"], b["attention_mask"],
                  image_index=b["image_index"])
        (h.float() ** 2).mean().backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    h1, g1 = run(shared)
    h2, g2 = run(copies)
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys() and any(n.startswith("vision_tower") for n in g1)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)
    part = select_rows(shared, slice(3, 5))  # a part of the batch keeps pointing at the shared features
    assert part["image_index"].tolist() == [1, 0]


def test_vision_always_blank_image(world):
    """collate(vision_always=True) on a text-only batch: one blank crop-size image, used by no row."""
    _, processor = load_pretrained(world / "ckpt")
    exs, _ = load_examples(str(world / "prefs.jsonl"), "prefs", str(world / "img"))
    enc, _ = encode_all(exs, processor, str(world / "img"), "vicuna_nosys", 4096)
    text = [it for it in enc if exs[it.index].image is None][:2]
    plain = collate(text, ["chosen"], processor, [None, None])
    b = collate(text, ["chosen"], processor, [None, None], vision_always=True)
    assert plain["pixel_values"] is None and plain["image_index"] is None
    S = processor.image_processor.crop_size
    assert b["pixel_values"].shape == (1, 3, S, S) and b["image_index"].tolist() == [] and b["row_image"].tolist() == [-1, -1]
    assert torch.equal(b["input_ids"], plain["input_ids"]) and torch.equal(b["labels"], plain["labels"])


def test_train_on_mixed_files(world, tmp_path):
    """SFT on mixed multi-turn llava rows and DPO (reference log-probs first) on mixed prefs rows train."""
    sft = run(world, tmp_path / "sft", "--algo", "sft", "--max-steps", 3, data="llava.json", fmt="llava")
    dpo = run(world, tmp_path / "dpo", "--algo", "dpo", "--max-steps", 3)
    assert len(sft) == len(dpo) == 3 and all(math.isfinite(r["loss"]) for r in sft + dpo)


def test_image_tag_in_answer_is_a_counted_row(world, tmp_path):
    """An answer holding the text <image> is one counted row, never a whole-run failure; also when only the
    tokenizer turns an answer into the image token (checked after tokenization)."""
    _, processor = load_pretrained(world / "ckpt")
    rows = [json.loads(line) for line in open(world / "prefs.jsonl")]
    rows[1]["chosen"] = "cat <image> dog"
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    exs, counts = load_examples(str(tmp_path / "p.jsonl"), "prefs", str(world / "img"))
    assert len(exs) == 7 and dict(counts) == {"image_token_in_response": 1}
    ex = Example("x", None, "q", "cat <image>", "dog")  # bypassing the loader: caught after tokenization
    with pytest.raises(Unusable) as e:
        encode_example(0, ex, processor, None, "vicuna_nosys", 4096)
    assert e.value.reason == "image_token_in_response"


def test_identical_reasons(world):
    """Responses that tokenize alike (the toy tokenizer splits on whitespace) vs alike only within --max-len."""
    _, processor = load_pretrained(world / "ckpt")
    same = Example("s", None, "q", "cat  dog", "cat dog")
    with pytest.raises(Unusable) as e:
        encode_example(0, same, processor, None, "vicuna_nosys", 4096)
    assert e.value.reason == "identical_after_tokenization"
    cut = Example("c", None, "q", "cat dog red", "cat dog blue")
    n_prompt = len(processor.tokenizer.encode("USER: q ASSISTANT:"))
    with pytest.raises(Unusable) as e:
        encode_example(0, cut, processor, None, "vicuna_nosys", n_prompt + 2)
    assert e.value.reason == "identical_after_truncation"


@pytest.mark.parametrize("algo", ["dpo", "sft"])
def test_two_ranks_match_one_rank_on_mixed_rows(world, tmp_path, algo):
    """FSDP2 on 2 gloo ranks, 1 row per rank (so one rank may see only text while the other sees an image) ==
    1 rank with 2 rows: same losses (sft: the token mean over both ranks' tokens, not a mean of per-rank means)."""
    data, fmt = ("prefs.jsonl", "prefs") if algo == "dpo" else ("llava.json", "llava")
    one = run(world, tmp_path / "one", "--algo", algo, "--max-steps", 4, "--lr", 1e-3, data=data, fmt=fmt)
    common = ["--model", str(world / "ckpt"), "--data", str(world / data), "--data-format", fmt, "--image-root",
              str(world / "img"), "--algo", algo, "--max-steps", "4", "--lr", "1e-3", "--template", "vicuna_nosys"]
    from test_train import run_two_ranks
    two = run_two_ranks(common, tmp_path / "two")
    assert len(two) == len(one) == 4
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
