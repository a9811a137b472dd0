"""What each algorithm reads from a data row (nanoalign.data.NEEDS, driven by train.py's ALGOS `data` column):
prompt-only rows for the algorithms that make their responses (online-dpo, rloo, ppo, grpo), the same prompts from
every format as its pairs give, a counted skip and a one-line stop for the algorithms that need the data's pairs;
duplicate ids skipped in every format that carries ids; 1-based row names."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from nanoalign import data as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (4 + i, 3), (40 * i, 0, 0)).save(d / f"{i}.png")
    return d


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _turns(*pairs):
    out = []
    for h, a in pairs:
        out += [{"from": "human", "value": h}, {"from": "gpt", "value": a}]
    return out


def test_table_drives_the_loader():
    """Every algorithm's data column is a key of NEEDS; the algorithms that make their responses read prompts."""
    assert {a.data for a in train.ALGOS.values()} <= set(D.NEEDS)
    prompts = {name for name, a in train.ALGOS.items() if a.data == "prompts"}
    assert prompts == {"online-dpo", "rloo", "ppo", "grpo"}
    for name in ("dpo", "ipo", "slic", "ddpo", "povid", "mixed-dpo", "rm"):
        assert "chosen" in D.NEEDS[train.ALGOS[name].data] and "rejected" in D.NEEDS[train.ALGOS[name].data], name
    assert D.NEEDS[train.ALGOS["online-bdhs"].data] == ("chosen",)  # its rejected is used when the row has one


def test_prompt_only_prefs_rows(tmp_path, root):
    rows = [{"id": "a", "image": "0.png", "prompt": "what is it ?"},
            {"id": "b", "prompt": "text only ?", "history": [["hi", "hello"]]},
            {"id": "c", "image": "1.png", "prompt": "q", "chosen": "x", "rejected": "y"}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    exs, counts = D.load_examples(path, "prefs", str(root), needs="prompts")
    assert [(e.id, e.prompt, e.chosen, e.rejected) for e in exs] == [
        ("a", "<image>\nwhat is it ?", None, None), ("b", "text only ?", None, None), ("c", "<image>\nq", None, None)]
    assert exs[1].history == [("hi", "hello")] and not counts
    # an algorithm that trains on the data's pairs: prompt-only rows are a counted skip of their own
    exs, counts = D.load_examples(path, "prefs", str(root), needs="pairs")
    assert [e.id for e in exs] == ["c"] and dict(counts) == {"prompt_only": 2}
    assert counts.rows["prompt_only"] == ["line 1", "line 2"]
    with pytest.raises(ValueError, match=r"p\.jsonl: line 1: no chosen response .*\[prompt_only\]"):
        D.load_examples(path, "prefs", str(root), needs="pairs", strict=True)
    # a file of prompts only: one line naming who needs which fields
    only = _jsonl(tmp_path / "prompts.jsonl", rows[:2])
    with pytest.raises(ValueError) as e:
        D.load_examples(only, "prefs", str(root), needs="pairs", who="--algo dpo")
    msg = str(e.value)
    assert "\n" not in msg and "--algo dpo needs prompt, chosen, rejected in each row" in msg
    assert "none of its 2 rows" in msg and "prompt_only=2" in msg
    # responses (sft, online-bdhs): a chosen is enough, a rejected kept when there is one
    half = _jsonl(tmp_path / "half.jsonl", [{"id": "s", "image": "0.png", "prompt": "q", "chosen": "x"}, rows[2]])
    exs, counts = D.load_examples(half, "prefs", str(root), needs="responses")
    assert [(e.id, e.rejected) for e in exs] == [("s", None), ("c", "y")] and not counts
    exs, counts = D.load_examples(half, "prefs", str(root), needs="pairs")
    assert [e.id for e in exs] == ["c"] and dict(counts) == {"no_rejected": 1}
    # prompts: the responses are not read, so not checked; the prompt still is
    odd = _jsonl(tmp_path / "odd.jsonl", [{"id": "r", "image": "0.png", "prompt": "q", "chosen": 5},
                                          {"id": "t", "image": "0.png", "prompt": "<image> <image>"}])
    exs, counts = D.load_examples(odd, "prefs", str(root), needs="prompts")
    assert [e.id for e in exs] == ["r"] and dict(counts) == {"extra_image_token": 1}
    with pytest.raises(ValueError, match="needs must be one of"):
        D.load_examples(path, "prefs", str(root), needs="prompt")


def _formats(tmp_path, root):
    """The same two pairs (one with a history where the format has one) in every format -> {fmt: path}."""
    q, hq = "what is in the image ?", "and the dog ?"
    pairs = [("red cat", "blue cat"), ("a dog", "two dogs")]
    out = {}
    out["prefs"] = _jsonl(tmp_path / "p.jsonl", [
        {"id": "0", "image": "0.png", "prompt": q, "chosen": pairs[0][0], "rejected": pairs[0][1]},
        {"id": "1", "image": "1.png", "prompt": hq, "history": [["<image>\n" + q, "a cat"]], "chosen": pairs[1][0],
         "rejected": pairs[1][1]}])
    pov = [{"id": "0", "image": "0.png", "conversations": _turns(("<image>\n" + q, pairs[0][0])),
            "rejected_conversations": _turns(("<image>\n" + q, pairs[0][1]))},
           {"id": "1", "image": "1.png", "conversations": _turns(("<image>\n" + q, "a cat"), (hq, pairs[1][0])),
            "rejected_conversations": _turns(("<image>\n" + q, "a cat"), (hq, pairs[1][1]))}]
    (tmp_path / "povid.json").write_text(json.dumps(pov))
    out["povid"] = str(tmp_path / "povid.json")
    rate = lambda x: {k: {"Rating": x} for k in ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")}
    out["vlfeedback"] = _jsonl(tmp_path / "v.jsonl", [
        {"id": str(i), "prompt": q, "img_path": f"{i}.png",
         "completions": [{"model": "a", "response": c, "annotations": rate(5)},
                         {"model": "b", "response": r, "annotations": rate(2)},
                         {"model": "c", "response": r + " too", "annotations": rate(1)}]}
        for i, (c, r) in enumerate(pairs)])
    (tmp_path / "l.json").write_text(json.dumps([
        {"id": "0", "image": "0.png", "conversations": _turns(("<image>\n" + q, pairs[0][0]))},
        {"id": "1", "image": "1.png", "conversations": _turns((q, pairs[1][0]), ("<image>\n" + hq, "w1"))}]))
    out["llava"] = str(tmp_path / "l.json")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([
        {"idx": i, "image": {"bytes": (root / f"{i}.png").read_bytes(), "path": None},
         "text": json.dumps({"question": q, "chosen": c, "rejected": r})} for i, (c, r) in enumerate(pairs)]),
        str(tmp_path / "r.parquet"))
    out["rlhfv"] = str(tmp_path / "r.parquet")
    return out


def _prompt(e):
    return (e.image if isinstance(e.image, str) else len(e.image), e.prompt, tuple(map(tuple, e.history)))


@pytest.mark.parametrize("fmt", list(D.FORMATS))
def test_each_format_gives_online_dpo_the_prompts_of_its_pairs(tmp_path, root, fmt):
    """online-dpo (needs prompts) reads from every format the prompts (image, prompt, history) that dpo's pairs (sft's
    responses for llava, which has no pairs) have, one per row, and nothing of the responses."""
    pytest.importorskip("pyarrow")
    path = _formats(tmp_path, root)[fmt]
    kind = "responses" if fmt == "llava" else train.ALGOS["dpo"].data
    pairs, _ = D.load_examples(path, fmt, str(root), needs=kind)
    prompts, counts = D.load_examples(path, fmt, str(root), needs=train.ALGOS["online-dpo"].data)
    assert not counts and len(prompts) == 2
    assert [_prompt(e) for e in prompts] == list(dict.fromkeys(_prompt(e) for e in pairs))
    assert all(e.chosen is None and e.rejected is None and not e.later_turns for e in prompts)
    if fmt == "vlfeedback":
        assert len(pairs) == 6 and [e.id for e in prompts] == ["0", "1"]  # 3 pairs per row, 1 prompt per row
    if fmt == "llava":  # the prompt is the first question (its tag moved there), later turns dropped
        assert prompts[1].prompt == "<image>\nwhat is in the image ?"
        # a prompt-only conversation: the question alone
        (tmp_path / "q.json").write_text(json.dumps([{"id": "q", "image": "0.png",
                                                      "conversations": [{"from": "human", "value": "<image>\nq"}]}]))
        (e,), _ = D.load_examples(str(tmp_path / "q.json"), "llava", str(root), needs="prompts")
        assert e.prompt == "<image>\nq"
        with pytest.raises(ValueError, match="none of its 2 rows .*no_rejected=2"):
            D.load_examples(path, fmt, str(root), needs="pairs", who="--algo mixed-dpo")


def test_prompt_only_encoding_is_the_pairs_prompt(tmp_path):
    """A prompt-only example encodes to the prompt ids its pair has, under a named template and under the
    checkpoint's chat template (= transformers' apply_chat_template(..., add_generation_prompt=True))."""
    from test_chat_training import CHATML, hf_ids, image, make_checkpoint
    from nanoalign.batch import encode_example
    from nanoalign.checkpoint import load_pretrained
    d = str(tmp_path / "chatml")
    make_checkpoint(d, template=CHATML, bos=False)
    _, processor = load_pretrained(d)
    img = image(56, 40, seed=1)
    img.save(os.path.join(d, "i.png"))
    hist = [("<image>\nwhat is in the image ?", "red cat")]
    pair = D.Example("p", os.path.join(d, "i.png"), "what is the dog ?", "blue dog", "red dog", history=hist)
    prompt = D.Example("p", pair.image, pair.prompt, None, history=hist)
    for template in ("auto", "vicuna_v1"):
        a, b = (encode_example(0, e, processor, None, template, 4096) for e in (pair, prompt))
        assert b.prompt_ids == a.prompt_ids and b.chosen_ids == [] and b.rejected_ids is None
    want = hf_ids(d, [("user", hist[0][0].split("\n", 1)[1]), ("assistant", "red cat"),
                      ("user", "what is the dog ?")], True, img)
    assert encode_example(0, prompt, processor, None, "auto", 4096).prompt_ids == want


@pytest.mark.parametrize("fmt", list(D.FORMATS))
def test_duplicate_ids_are_skipped(tmp_path, root, fmt):
    """A second row with an id already used is skipped (duplicate_id), the first kept, in every format with ids."""
    pytest.importorskip("pyarrow")
    path = _formats(tmp_path, root)[fmt]
    if fmt == "rlhfv":
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
        import pyarrow as pa
        pq.write_table(pa.Table.from_pylist(rows + [dict(rows[0], text=rows[1]["text"])]), path)
    elif path.endswith(".json"):
        rows = json.load(open(path))
        json.dump(rows + [dict(rows[1], id="0")], open(path, "w"))
    else:
        rows = [json.loads(x) for x in open(path)]
        _jsonl(type(tmp_path)(path), rows + [dict(rows[1], id="0")])
    for needs in ("prompts", "responses"):
        exs, counts = D.load_examples(path, fmt, str(root), needs=needs)
        assert dict(counts).get("duplicate_id") == 1, (needs, dict(counts))
        label = {"prefs": "line 3", "vlfeedback": "line 3", "rlhfv": "row 3"}.get(fmt, "item 3")
        assert counts.rows["duplicate_id"] == [label]
        assert len({e.id for e in exs}) == len(exs)
    with pytest.raises(ValueError, match=rf"{label}: id already used by an earlier row .*\[duplicate_id\]"):
        D.load_examples(path, fmt, str(root), strict=True)


def test_rows_are_named_from_one(tmp_path, root):
    """JSON lists and parquet tables name their rows from 1, as JSONL lines are (skip examples and --strict)."""
    row = {"id": "a", "image": "nope.png", "conversations": _turns(("q", "a"))}
    (tmp_path / "l.json").write_text(json.dumps([row]))
    with pytest.raises(ValueError, match=r"l\.json: item 1: missing image file"):
        D.load_examples(str(tmp_path / "l.json"), "llava", str(root), strict=True)
    (tmp_path / "m.json").write_text(json.dumps([{"conversations": _turns(("q", "a"))}, 5]))
    exs, counts = D.load_examples(str(tmp_path / "m.json"), "llava", str(root))
    assert exs[0].id == "item 1" and counts.rows["missing_field"] == ["item 2"]


# ---------------------------------------------------------------------------------------------- through train.py
def test_readme_prompt_lines(tmp_path):
    """README: `train.py --algo grpo --model DIR --data prompts.jsonl --reward rm:PATH --k 4` and `--algo rloo ...
    --reward my_rewards.py:score` train on a file of {image, prompt} rows (2 steps), online-dpo too (a reward model
    as annotator); `--algo dpo` on the same file stops with one line naming what it needs (exit 2)."""
    import shutil

    import torch
    from test_generate import tiny_checkpoint

    from nanoalign import reward as rw
    from nanoalign.checkpoint import load_pretrained
    tiny_checkpoint(str(tmp_path / "ckpt"), "llava")
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (20 + 3 * i, 40), (60 * i, 10, 200)).save(tmp_path / "img" / f"{i}.png")
    data = _jsonl(tmp_path / "prompts.jsonl", [{"image": f"img/{i}.png", "prompt": "what is in the image ?"}
                                               for i in range(4)])
    shutil.copytree(tmp_path / "ckpt", tmp_path / "rm")
    _, processor = load_pretrained(tmp_path / "rm")
    rw.save_reward_head(tmp_path / "rm", rw.reward_head(32, torch.Generator().manual_seed(0)), processor.tokenizer,
                        "vicuna_v1")
    (tmp_path / "my_rewards.py").write_text("def score(images, prompts, responses):\n"
                                            "    return [float(len(r)) for r in responses]\n")
    common = ["--model", str(tmp_path / "ckpt"), "--data", data, "--max-steps", "2", "--batch-size", "2",
              "--max-new-tokens", "4"]  # rloo: the default --reward-norm samples the prompts before training
    for algo, reward in (("grpo", f"rm:{tmp_path / 'rm'}"), ("rloo", f"{tmp_path / 'my_rewards.py'}:score")):
        train.main(train.parse_args([*common, "--algo", algo, "--reward", reward, "--k", "2",
                                     "--out", str(tmp_path / algo)]))
        recs = [r for r in map(json.loads, open(tmp_path / algo / "metrics.jsonl")) if "step" in r]
        assert [r["step"] for r in recs] == [1, 2], algo
    train.main(train.parse_args([*common, "--algo", "online-dpo", "--annotator", f"rm:{tmp_path / 'rm'}",
                                 "--out", str(tmp_path / "online")]))
    recs = [r for r in map(json.loads, open(tmp_path / "online" / "metrics.jsonl")) if "step" in r]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["pairs"] + sum(v for k, v in r.items() if k.startswith("dropped_")) == 2 for r in recs)
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--algo", "dpo", "--model",
                        str(tmp_path / "ckpt"), "--data", data, "--out", str(tmp_path / "dpo")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--algo dpo needs prompt, chosen, rejected in each row; none of its 4 rows" in r.stderr


@pytest.mark.parametrize("needs", ["prompts", "pairs"])
def test_a_row_with_nothing_to_answer_is_skipped(tmp_path, root, needs):
    """No image and a whitespace-only (or tag-only) question -> counted skip empty_prompt; an image with an empty
    question is a captioning prompt and is kept."""
    pair = {"chosen": "x", "rejected": "y"} if needs == "pairs" else {}
    rows = [{"id": "a", "prompt": "", **pair}, {"id": "b", "prompt": "   ", **pair},
            {"id": "c", "image": "0.png", "prompt": "", **pair}, {"id": "d", "prompt": "ok ?", **pair}]
    exs, counts = D.load_examples(_jsonl(tmp_path / "e.jsonl", rows), "prefs", str(root), needs=needs)
    assert [e.id for e in exs] == ["c", "d"] and exs[0].prompt.strip() == "<image>"
    assert counts["empty_prompt"] == 2
