"""Training sequences through the checkpoint's own chat template (--template auto / checkpoint), compared with
transformers on tiny checkpoints it writes itself: the prompt ids of a training example = the processor's
apply_chat_template(turns before the answer, add_generation_prompt=True); the whole training sequence = its
apply_chat_template of the whole conversation; every answer ends with what the template puts after an assistant
message (so the policy learns to stop where generation stops); only answer tokens are labelled. Four template
flavours: llava-hf's vicuna (ends an answer with nothing: the tokenizer's EOS is appended, as LLaVA trains),
mistral [INST] (</s>), chatml (<|im_end|>), Llama-3 (<|eot_id|>)."""
import json
import os
import sys

import pytest
import torch

from nanoalign.batch import collate, encode_all, encode_example
from nanoalign.checkpoint import load_pretrained
from nanoalign.data import Example
from nanoalign.refcache import example_keys
from test_checkpoint_layouts import CHATML, ID, LLAMA3, MISTRAL, VICUNA, image, make_checkpoint

transformers = pytest.importorskip("transformers")

# name -> (template, tokenizer adds BOS, the id that ends an answer, the text between the generation prompt and an
# answer: both read off each template by hand)
FLAVOURS = {
    "vicuna": (VICUNA, True, ID["</s>"], " "),
    "mistral": (MISTRAL, True, ID["</s>"], ""),
    "chatml": (CHATML, False, ID["<|im_end|>"], ""),
    "llama3": (LLAMA3, True, ID["<|eot_id|>"], ""),
}
CASES = [(name, ws) for name in FLAVOURS for ws in (False, True)]
IDS = [name + ("-ws" if ws else "") for name, ws in CASES]
Q1, A1, Q2, A2, Q3, A3 = "what is in the image ?", "red cat", "what is the dog ?", "blue dog w1", "w2 ?", "w3 w4"


def keep_whitespace(folder):
    """Rewrite the folder's tokenizer.json so that every space and newline is a token of its own (ids of two unused
    words): whitespace the template writes then shows in the ids, so the comparisons are exact to the character."""
    path = os.path.join(folder, "tokenizer.json")
    tk = json.load(open(path))
    vocab = tk["model"]["vocab"]
    vocab[" "], vocab["\n"] = vocab.pop("w22"), vocab.pop("w23")
    tk["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "\\s"}, "behavior": "Isolated", "invert": False}
    json.dump(tk, open(path, "w"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> folder (whitespace-splitting word tokenizer); name + "/ws" -> the same with whitespace tokens."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for name, (template, bos, _, _) in FLAVOURS.items():
        for ws in (False, True):
            d = str(root / (name + ("_ws" if ws else "")))
            make_checkpoint(d, template=template, bos=bos)
            if ws:
                keep_whitespace(d)
            out[name + ("/ws" if ws else "")] = d
    return out


def strip_ws(ids):
    """ids without trailing whitespace tokens (after the last answer's end of turn: not part of the response)."""
    while ids and ids[-1] in (ID["w22"], ID["w23"]):
        ids = ids[:-1]
    return ids


def hf_ids(folder, turns, add_generation_prompt, img=None):
    """transformers' processor.apply_chat_template(tokenize=True) of [(role, text)], the image (if any) as an image
    part in front of the first user turn. Expanded image tokens included."""
    proc = transformers.AutoProcessor.from_pretrained(folder)
    conv = [{"role": r, "content": ([{"type": "image", "image": img}] if img is not None and k == 0 else []) +
             [{"type": "text", "text": t}]} for k, (r, t) in enumerate(turns)]
    out = proc.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=True,
                                   return_dict=True, return_tensors="pt")
    return out["input_ids"][0].tolist()


def answered(name, text):
    """The assistant text given to transformers: for a template that ends an answer with nothing (llava-hf's
    vicuna), the answer followed by the tokenizer's EOS -- LLaVA's training text "ASSISTANT: a</s>"."""
    return text + "</s>" if name == "vicuna" else text


def labelled_ids(it, processor, img):
    b = collate([it], ["chosen"], processor, [img])
    return [t for t in b["labels"][0].tolist() if t != -100]


@pytest.mark.parametrize("name,ws", CASES, ids=IDS)
def test_single_turn_pair_equals_apply_chat_template(ckpts, name, ws):
    """prompt ids = apply_chat_template([user], add_generation_prompt=True); prompt + response =
    apply_chat_template([user, assistant]) up to the end of turn (trailing whitespace is not part of a response)."""
    d = ckpts[name + ("/ws" if ws else "")]
    _, processor = load_pretrained(d)
    img = image(40, 56)
    img.save(os.path.join(d, "img.png"))
    ex = Example("e", os.path.join(d, "img.png"), "<image>\n" + Q1, A1, A2)
    it = encode_example(0, ex, processor, None, "auto", 4096)
    assert it.prompt_ids == hf_ids(d, [("user", Q1)], True, img)
    for resp, text in ((it.chosen_ids, A1), (it.rejected_ids, A2)):
        ref = hf_ids(d, [("user", Q1), ("assistant", answered(name, text))], False, img)
        assert it.prompt_ids + resp == strip_ws(ref)
        assert resp[-1] == FLAVOURS[name][2]  # the answer ends with the template's end of turn
    # a text-only row: no image part, no image tokens
    tex = Example("t", None, Q1, A1, A2)
    tit = encode_example(0, tex, processor, None, "auto", 4096)
    assert tit.prompt_ids + tit.chosen_ids == strip_ws(hf_ids(d, [("user", Q1), ("assistant", answered(name, A1))],
                                                              False))
    assert tit.prompt_ids == hf_ids(d, [("user", Q1)], True)


@pytest.mark.parametrize("name,ws", CASES, ids=IDS)
def test_multi_turn_equals_apply_chat_template(ckpts, name, ws):
    """A preference row with history (POVID-style): prompt = apply_chat_template(u1, a1, u2, gen prompt). An SFT
    conversation (LLaVA-Instruct): the whole sequence = apply_chat_template of the whole conversation, labels on
    each answer and its end of turn only (vicuna: each trained answer + EOS, as LLaVA trains every turn)."""
    d = ckpts[name + ("/ws" if ws else "")]
    _, processor = load_pretrained(d)
    tok, end, sep = processor.tokenizer, FLAVOURS[name][2], FLAVOURS[name][3]
    img = image(56, 40, seed=3)
    path = os.path.join(d, "img2.png")
    img.save(path)
    pex = Example("p", path, Q2, A2, A3, history=[("<image>\n" + Q1, A1)])
    it = encode_example(0, pex, processor, None, "auto", 4096)
    # the history as the template renders it (no EOS added to an earlier answer: what generation is prompted with)
    assert it.prompt_ids == hf_ids(d, [("user", Q1), ("assistant", A1), ("user", Q2)], True, img)
    full = hf_ids(d, [("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", answered(name, A3))], False, img)
    assert it.prompt_ids + it.rejected_ids == strip_ws(full)
    assert labelled_ids(it, processor, img) == tok.encode(sep + A2, add_bos=False) + [end]

    sex = Example("s", path, "<image>\n" + Q1, A1, later_turns=[(Q2, A2), (Q3, A3)])
    sit = encode_example(0, sex, processor, None, "auto", 4096)
    conv = [("user", Q1), ("assistant", answered(name, A1)), ("user", Q2), ("assistant", answered(name, A2)),
            ("user", Q3), ("assistant", answered(name, A3))]
    assert sit.prompt_ids == hf_ids(d, conv[:1], True, img)
    assert sit.prompt_ids + sit.chosen_ids == strip_ws(hf_ids(d, conv, False, img))
    want = [t for a in (A1, A2, A3) for t in tok.encode(sep + a, add_bos=False) + [end]]
    assert labelled_ids(sit, processor, img) == want
    # a named template still renders LLaVA's conversation; llava-hf's vicuna template is LLaVA's vicuna_nosys
    # (same ids with this whitespace-splitting tokenizer), the others are not
    nit = encode_example(0, sex, processor, None, "vicuna_nosys", 4096)
    same = (nit.prompt_ids + nit.chosen_ids, nit.chosen_labelled) == (sit.prompt_ids + sit.chosen_ids,
                                                                      sit.chosen_labelled)
    if not ws:
        assert same == (name == "vicuna")


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_answer_frame_from_transformers_rendering(ckpts, name):
    """What comes between the generation prompt and an answer, and after it, as transformers renders [user] +
    generation prompt and [user, assistant]."""
    _, processor = load_pretrained(ckpts[name])
    proc = transformers.AutoProcessor.from_pretrained(ckpts[name])
    user = [{"role": "user", "content": [{"type": "text", "text": Q1}]}]
    prompt = proc.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = proc.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": A1}]}],
                                    tokenize=False)
    before, after = full[len(prompt):].split(A1)
    assert processor.answer_frame() == (before, after.rstrip())
    assert processor.answer_frame("vicuna_v1") == (" ", "")


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_bdhs_continues_an_answer_as_the_template_writes_it(ckpts, name):
    """BDHS feeds a prefix of the reference answer after the prompt: its ids are those of the answer in
    transformers' rendering of [user, assistant] (whitespace tokens on, so a space too many shows)."""
    from nanoalign.bdhs import _response_ids
    d = ckpts[name + "/ws"]
    _, processor = load_pretrained(d)
    tok = processor.tokenizer
    prompt = processor.build_prompt(Q1, with_image=False)
    got = _response_ids(tok, prompt, tok.encode(prompt), A1, processor.answer_frame()[0])
    n = len(hf_ids(d, [("user", Q1)], True))
    assert got + [FLAVOURS[name][2]] == strip_ws(hf_ids(d, [("user", Q1), ("assistant", answered(name, A1))],
                                                        False))[n:]


def test_end_of_turn_not_an_end_id_is_noted(tmp_path):
    """chatml checkpoint whose generation config stops at </s> only: training warns that the policy learns to end
    with <|im_end|>, where generation will not stop; with <|im_end|> among the end ids, no note."""
    img = image()
    img.save(tmp_path / "i.png")
    ex = [Example("e", str(tmp_path / "i.png"), "<image>\n" + Q1, A1, A2)]
    for gen_eos, noted in ((None, True), ([ID["<|im_end|>"], ID["</s>"]], False)):
        d = str(tmp_path / f"ck{noted}")
        make_checkpoint(d, template=CHATML, bos=False, gen_eos=gen_eos)
        _, processor = load_pretrained(d)
        lines = []
        encode_all(ex, processor, None, "auto", 4096, log=lines.append)
        assert lines[0].startswith("prompt template: the checkpoint's chat template")
        assert any("not an end id" in x for x in lines) == noted, lines


def test_refcache_key_holds_the_template_text(ckpts):
    """Two chat templates that give the same ids (one has a Jinja comment more) get different keys; "auto" on a
    checkpoint without a template and "vicuna_v1" are the same template, the same key."""
    _, processor = load_pretrained(ckpts["chatml"])
    ex = [Example("t", None, Q1, A1, A2)]
    enc, _ = encode_all(ex, processor, None, "auto", 4096, log=lambda *_: None)
    key = example_keys(ex, enc, processor, None, "auto")
    processor.chat_template = "{# edited #}" + processor.chat_template
    enc2, _ = encode_all(ex, processor, None, "auto", 4096, log=lambda *_: None)
    assert enc2[0].prompt_ids + enc2[0].chosen_ids == enc[0].prompt_ids + enc[0].chosen_ids
    assert example_keys(ex, enc2, processor, None, "auto") != key
    processor.chat_template = None
    enc3, _ = encode_all(ex, processor, None, "auto", 4096, log=lambda *_: None)
    assert example_keys(ex, enc3, processor, None, "auto") == example_keys(ex, enc3, processor, None, "vicuna_v1")


def test_train_py_sft_multi_turn_with_chat_template(ckpts, tmp_path, capsys):
    """train.py --algo sft on a multi-turn LLaVA file with the default --template auto: the chatml checkpoint's
    template is used, and the run trains."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train
    image(48, 40).save(tmp_path / "0.png")
    turns = [{"from": f, "value": v} for f, v in (("human", "<image>\n" + Q1), ("gpt", A1), ("human", Q2),
                                                  ("gpt", A2))]
    (tmp_path / "d.json").write_text(json.dumps([{"id": "0", "image": "0.png", "conversations": turns},
                                                 {"id": "1", "conversations": turns[2:]}]))
    train.main(train.parse_args(["--model", ckpts["chatml"], "--data", str(tmp_path / "d.json"), "--data-format",
                                 "llava", "--algo", "sft", "--out", str(tmp_path / "out"), "--batch-size", "2",
                                 "--max-steps", "1"]))
    assert "prompt template: the checkpoint's chat template" in capsys.readouterr().out
    rows = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert any("step" in r and torch.isfinite(torch.tensor(r["loss"])) for r in rows)
