"""Data loaders (every format, every skip reason, strict mode, path escape) and DDPO token weights (hand-worked)."""
import io
import json
import os

import pytest
import torch
from PIL import Image

from nanoalign import data as D
from nanoalign import ddpo


@pytest.fixture
def root(tmp_path):
    """tmp/images/{good.png, gray.png, bad.png}, tmp/outside.png (outside the image root)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.new("RGB", (4, 3), (255, 0, 0)).save(img_dir / "good.png")
    Image.new("L", (5, 5), 128).save(img_dir / "gray.png")
    (img_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    Image.new("RGB", (2, 2)).save(tmp_path / "outside.png")
    return img_dir


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _pref(**kw):
    row = {"image": "good.png", "prompt": "<image>\nWhat is this?", "chosen": "A red square.",
           "rejected": "A blue circle."}
    row.update(kw)
    return row


PREF_ROWS = [
    _pref(id="ok1", chosen_segments=[[2, 5]], rejected_segments=[[2, 6], [7, 13]], source="tool-x"),  # line 1
    _pref(id="ok2", image=None, prompt="Text only?"),                       # line 2: text-only, fine
    _pref(image="nope.png"),                                                # line 3: missing_image
    _pref(image="bad.png"),                                                 # line 4: unreadable_image
    _pref(chosen=""),                                                       # line 5: empty_chosen
    _pref(rejected="   "),                                                  # line 6: empty_rejected
    _pref(rejected="A red square. "),                                       # line 7: chosen_equals_rejected
    _pref(id="notag", prompt="What is this?"),                              # line 8: tag put in front (kept)
    _pref(image="../outside.png"),                                          # line 9: path_escape
    '{"image": "good.png", "prompt": ',                                     # line 10: malformed_json
    _pref(chosen_segments=[[5, 2]]),                                        # line 11: bad_segments
    _pref(prompt="<image> and <image>"),                                    # line 12: extra_image_token
    {"image": "good.png", "prompt": "<image>\nq", "chosen": "x"},           # line 13: no_rejected (pairs)
    _pref(image=None),                                                      # line 14: extra_image_token
    _pref(image=["good.png", "gray.png"]),                                  # line 15: multi_image
    _pref(chosen="It says <image> here."),                                  # line 16: image_token_in_response
    _pref(id="one", image=["good.png"]),                                    # line 17: a one-image list is kept
]


def test_prefs_every_skip_reason(tmp_path, root):
    path = _jsonl(tmp_path / "prefs.jsonl", PREF_ROWS)
    exs, counts = D.load_examples(path, "prefs", image_root=str(root), needs="pairs")
    assert [e.id for e in exs] == ["ok1", "ok2", "notag", "one"]
    assert exs[2].prompt == "<image>\nWhat is this?" and exs[3].image == exs[0].image
    e = exs[0]
    assert e.image == os.path.realpath(root / "good.png") and e.prompt == "<image>\nWhat is this?"
    assert e.chosen_segments == [(2, 5)] and e.rejected_segments == [(2, 6), (7, 13)]
    assert e.extra == {"source": "tool-x"}
    assert exs[1].image is None and exs[1].chosen_segments is None
    assert dict(counts) == {"missing_image": 1, "unreadable_image": 1, "empty_chosen": 1, "empty_rejected": 1,
                            "chosen_equals_rejected": 1, "path_escape": 1, "malformed_json": 1,
                            "bad_segments": 1, "extra_image_token": 2, "no_rejected": 1, "multi_image": 1,
                            "image_token_in_response": 1}
    assert counts.rows["malformed_json"] == ["line 10"] and counts.rows["path_escape"] == ["line 9"]
    assert counts.rows["multi_image"] == ["line 15"] and counts.rows["image_token_in_response"] == ["line 16"]
    assert counts.total() == 13
    # write_prefs -> load_examples round trip
    D.write_prefs(str(tmp_path / "again.jsonl"), exs)
    again, counts2 = D.load_examples(str(tmp_path / "again.jsonl"), "prefs", image_root=str(root))
    assert again == exs and not counts2
    lines = str(counts).splitlines()
    assert len(lines) == 12 and any("malformed JSON" in l and "line 10" in l for l in lines)


def test_strict_and_nothing_usable(tmp_path, root):
    path = _jsonl(tmp_path / "prefs.jsonl", PREF_ROWS)
    with pytest.raises(ValueError, match=r"prefs\.jsonl: line 3: missing image file \[missing_image\]"):
        D.load_examples(path, "prefs", image_root=str(root), strict=True)
    bad = _jsonl(tmp_path / "bad.jsonl", PREF_ROWS[2:5])
    with pytest.raises(ValueError, match=r"bad\.jsonl: no usable example in 3 rows .*empty_chosen=1.*missing_image=1"):
        D.load_examples(bad, "prefs", image_root=str(root))
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        D.load_examples(path, "csv")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        D.load_examples(str(tmp_path / "nowhere.jsonl"), "prefs")


def test_path_escape_variants(tmp_path, root):
    outside = str(tmp_path / "outside.png")
    os.symlink(outside, root / "link.png")
    rows = [_pref(image=outside), _pref(image="link.png"), _pref(image="sub/../../outside.png"), _pref(id="ok")]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    exs, counts = D.load_examples(path, "prefs", image_root=str(root))
    assert [e.id for e in exs] == ["ok"] and counts["path_escape"] == 3
    # without image_root: relative paths resolve against the data file's folder, absolute paths are accepted
    path2 = _jsonl(root / "p.jsonl", [_pref(id="abs", image=outside), _pref(id="rel"), _pref(image="../outside.png")])
    exs, counts = D.load_examples(path2, "prefs")
    assert [e.id for e in exs] == ["abs", "rel"] and counts["path_escape"] == 1


def test_povid(tmp_path, root):
    def row(i, human="<image>\nDescribe.", **kw):
        r = {"id": i, "image": "good.png",
             "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "A red square."}],
             "rejected_conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "A dog."}]}
        r.update(kw)
        return r
    path = tmp_path / "povid.json"
    path.write_text(json.dumps([row("a"), row("b", human="Describe."), row("c", image="missing.jpg"),
                                row("d", rejected_conversations=[])]))
    exs, counts = D.load_examples(str(path), "povid", image_root=str(root))
    assert len(exs) == 1
    e = exs[0]
    assert (e.id, e.prompt, e.chosen, e.rejected) == ("a", "<image>\nDescribe.", "A red square.", "A dog.")
    assert dict(counts) == {"no_image_token": 1, "missing_image": 1, "missing_field": 1}  # no prepending for povid


def test_jsonl_given_as_a_json_list_format_names_the_fix(tmp_path, root):
    """A JSONL file given to a JSON-list format (povid, llava): one line naming the file, the line and the likely
    fix, not a bare 'Extra data'."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": "good.png", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" +
                    json.dumps({"image": "good.png", "prompt": "q", "chosen": "c", "rejected": "d"}) + "\n")
    for fmt in ("povid", "llava"):
        with pytest.raises(ValueError) as e:
            D.load_examples(str(path), fmt, image_root=str(root))
        msg = str(e.value)
        assert msg.startswith(f"{path}: not valid JSON (line 2") and "--data-format prefs" in msg and "\n" not in msg


def _turns(*pairs):
    return [t for h, a in pairs for t in ({"from": "human", "value": h}, {"from": "gpt", "value": a})]


def test_povid_multi_turn(tmp_path, root):
    q1, q2, q3 = "<image>\nWhat color?", "What shape?", "How big?"
    rows = [
        # agree on turn 1, differ on turn 2: prompt = turn 1 + q2, responses = the two turn-2 answers
        {"id": "t2", "image": "good.png", "conversations": _turns((q1, "Red."), (q2, "Square.")),
         "rejected_conversations": _turns((q1, "Red."), (q2, "Circle."))},
        # the rejected conversation simply ends after the differing turn: fine
        {"id": "end", "image": "good.png", "conversations": _turns((q1, "Red."), (q2, "Square."), (q3, "Small.")),
         "rejected_conversations": _turns((q1, "Blue."))},
        {"id": "two", "image": "good.png", "conversations": _turns((q1, "Red."), (q2, "Square.")),
         "rejected_conversations": _turns((q1, "Blue."), (q2, "Circle."))},               # differs_in_several_turns
        {"id": "same", "image": "good.png", "conversations": _turns((q1, "Red."), (q2, "Square.")),
         "rejected_conversations": _turns((q1, "Red."), (q2, "Square."))},                # chosen_equals_rejected
        {"id": "q", "image": "good.png", "conversations": _turns((q1, "Red."), (q2, "Square.")),
         "rejected_conversations": _turns((q1, "Red."), (q3, "Big."))},                   # prompts_differ
        {"id": "order", "image": "good.png",  # the answer comes before the question
         "conversations": [{"from": "gpt", "value": "Red."}, {"from": "human", "value": q1}],
         "rejected_conversations": _turns((q1, "Blue."))},                                 # turns_not_alternating
    ]
    path = tmp_path / "povid.json"
    path.write_text(json.dumps(rows))
    exs, counts = D.load_examples(str(path), "povid", image_root=str(root))
    assert [(e.id, e.history, e.prompt, e.chosen, e.rejected) for e in exs] == [
        ("t2", [(q1, "Red.")], q2, "Square.", "Circle."), ("end", [], q1, "Red.", "Blue.")]
    assert dict(counts) == {"differs_in_several_turns": 1, "chosen_equals_rejected": 1, "prompts_differ": 1,
                            "turns_not_alternating": 1}
    # prefs carry the history too, and write_prefs keeps it
    D.write_prefs(str(tmp_path / "h.jsonl"), exs)
    again, _ = D.load_examples(str(tmp_path / "h.jsonl"), "prefs", image_root=str(root))
    assert again == exs
    # a prefs row whose history has the question without the tag: the tag goes in front of the first question
    p = _jsonl(tmp_path / "h2.jsonl", [_pref(history=[["What color?", "Red."]], prompt="Shape?")])
    (e,), _ = D.load_examples(p, "prefs", image_root=str(root))
    assert e.history == [("<image>\nWhat color?", "Red.")] and e.prompt == "Shape?"


def test_not_utf8(tmp_path, root):
    good, good2 = json.dumps(_pref(id="ok")).encode(), json.dumps(_pref(id="ok2")).encode()
    bad = json.dumps(_pref(id="latin1", chosen="caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9")
    assert b"\xe9" in bad
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n" + bad + b"\n" + good2 + b"\n")  # BOM, latin-1
    exs, counts = D.load_examples(str(tmp_path / "p.jsonl"), "prefs", image_root=str(root))
    assert [e.id for e in exs] == ["ok", "ok2"] and dict(counts) == {"not_utf8": 1}
    assert counts.rows["not_utf8"] == ["line 2"]
    with pytest.raises(ValueError, match=r"p\.jsonl: line 2: line is not UTF-8 text \[not_utf8\]"):
        D.load_examples(str(tmp_path / "p.jsonl"), "prefs", image_root=str(root), strict=True)
    conv = json.dumps([{"image": "good.png", "conversations": _turns(("<image>\nq", "caf\u00e9"))}], indent=1)
    (tmp_path / "l.json").write_bytes(conv.encode().replace(b"\\u00e9", b"\xe9"))
    line = conv[:conv.index("caf")].count("\n") + 1  # the line the bad byte is on, counted in the text itself
    with pytest.raises(ValueError, match=rf"l\.json: line {line} is not UTF-8 text \(byte 0xe9"):
        D.load_examples(str(tmp_path / "l.json"), "llava", image_root=str(root))


def test_huge_image_counted_at_load(tmp_path, root, monkeypatch):
    import nanoalign.image as I
    Image.new("L", (300, 200)).save(root / "big.png")
    monkeypatch.setattr(I, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    exs, counts = D.load_examples(_jsonl(tmp_path / "p.jsonl", [_pref(id="ok"), _pref(image="big.png")]), "prefs",
                                  image_root=str(root))
    assert [e.id for e in exs] == ["ok"] and dict(counts) == {"image_too_large": 1}


def test_llava_sft(tmp_path, root):
    conv = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "Square."}]
    rows = [{"id": "m", "image": "good.png", "conversations": conv},
            {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"id": "x", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                               {"from": "gpt", "value": " "}]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    exs, counts = D.load_examples(str(path), "llava", image_root=str(root))
    assert [(e.id, e.prompt, e.chosen, e.rejected) for e in exs] == [
        ("m", "<image>\nWhat color?", "Red.", None), ("t", "Hi", "Hello", None)]
    assert exs[0].later_turns == [("Shape?", "Square.")] and exs[1].image is None
    assert dict(counts) == {"empty_chosen": 1}
    bad = [{"id": "swap", "conversations": [{"from": "gpt", "value": "A."}, {"from": "human", "value": "Q?"}]},
           {"id": "twice", "conversations": _turns(("Q?", "A."))[:1] * 2 + _turns(("Q?", "A."))[1:]},
           {"id": "open", "conversations": _turns(("Q?", "A.")) + [{"from": "human", "value": "And?"}]},
           {"id": "ok", "conversations": [{"from": "user", "value": "Q?"}, {"from": "assistant", "value": "A."}]},
           {"id": "later_tag", "conversations": _turns(("Q?", "A."), ("<image>\nAnd?", "B."))}]
    path.write_text(json.dumps(bad))
    exs, counts = D.load_examples(str(path), "llava", image_root=str(root))
    assert [e.id for e in exs] == ["ok"]
    assert dict(counts) == {"turns_not_alternating": 3, "extra_image_token": 1}
    moved = [{"id": "late", "image": "good.png", "conversations": _turns(("What?", "A."), ("<image>\nAnd?", "B."))}]
    path.write_text(json.dumps(moved))
    (e,), _ = D.load_examples(str(path), "llava", image_root=str(root))
    assert e.prompt == "<image>\nWhat?" and e.later_turns == [("And?", "B.")]


def _completion(model, resp, h, v, e):
    return {"model": model, "response": resp, "annotations": {
        "Helpfulness": {"Rating": h, "Rationale": "."}, "Visual Faithfulness": {"Rating": v, "Rationale": "."},
        "Ethical Considerations": {"Rating": e, "Rationale": "."}}}


def test_vlfeedback_pairs(tmp_path, root):
    row = {"id": "v1", "prompt": "What is shown?", "img_path": "good.png", "models": ["A", "B", "C", "D"],
           "completions": [_completion("A", "a red square", "5", "5", "5"),      # mean 5
                           _completion("B", "a square", "4", "4", "4"),          # mean 4
                           _completion("C", "???", "N/A", "3", "3"),             # non-numeric -> left out
                           _completion("D", "a box", "5", "4", "3")]}            # mean 4: tie with B
    same = {"id": "v2", "prompt": "Q", "img_path": "good.png",
            "completions": [_completion("A", "same", "5", "5", "5"), _completion("B", "same", "1", "1", "1")]}
    path = _jsonl(tmp_path / "vlf.jsonl", [row, "not json", same])
    exs, counts = D.load_examples(path, "vlfeedback", image_root=str(root))
    got = {(e.extra["chosen_model"], e.extra["rejected_model"]) for e in exs}
    assert got == {("A", "B"), ("A", "D")}
    e = next(e for e in exs if e.extra["rejected_model"] == "B")
    assert e.prompt == "<image>\nWhat is shown?" and e.chosen == "a red square" and e.rejected == "a square"
    assert e.extra["chosen_score"] == 5.0 and e.extra["rejected_score"] == 4.0
    assert dict(counts) == {"nonnumeric_rating": 1, "rating_tie": 1, "malformed_json": 1, "chosen_equals_rejected": 1}
    assert counts.rows["malformed_json"] == ["line 2"]
    # strict: the tie is part of the pairing rule (not fatal); the non-numeric rating is
    ok = _jsonl(tmp_path / "ties.jsonl", [{**row, "completions": [row["completions"][i] for i in (0, 1, 3)]}])
    exs, counts = D.load_examples(ok, "vlfeedback", image_root=str(root), strict=True)
    assert len(exs) == 2 and counts["rating_tie"] == 1
    with pytest.raises(ValueError, match=r"line 1 completions\[2\]: missing or non-numeric rating"):
        D.load_examples(_jsonl(tmp_path / "nn.jsonl", [row]), "vlfeedback", image_root=str(root), strict=True)


def _png_bytes(color=(0, 255, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def _rlhfv_rows():
    t = lambda q, c, r: json.dumps({"question": q, "chosen": c, "rejected": r})
    return [{"ds_name": "RLHF-V", "idx": 7, "image": {"bytes": _png_bytes(), "path": None},
             "text": t("What is it?", "A green square.", "A cat on a mat.")},
            {"ds_name": "RLHF-V", "idx": 8, "image": {"bytes": b"garbage", "path": None}, "text": t("q", "a", "b")},
            {"ds_name": "RLHF-V", "idx": 9, "image": {"bytes": _png_bytes(), "path": None}, "text": t("q", "a", "a")},
            {"ds_name": "RLHF-V", "idx": 10, "image": {"bytes": None, "path": None}, "text": t("q", "a", "b")},
            {"ds_name": "RLHF-V", "idx": 11, "image": {"bytes": _png_bytes(), "path": None}, "text": "{oops"}]


def _check_rlhfv(exs, counts):
    assert len(exs) == 1
    e = exs[0]
    assert (e.id, e.prompt, e.chosen, e.rejected) == ("7", "<image>\nWhat is it?", "A green square.", "A cat on a mat.")
    assert D.load_image(e).getpixel((1, 1)) == (0, 255, 0)
    assert dict(counts) == {"unreadable_image": 1, "chosen_equals_rejected": 1, "missing_image": 1,
                            "malformed_json": 1}


def test_rlhfv(tmp_path, monkeypatch):
    path = tmp_path / "rlhfv.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            D.load_examples(str(path), "rlhfv")
        # the row parsing itself, fed the rows pyarrow would give
        monkeypatch.setitem(D._FORMATS, "rlhfv", (lambda ctx: [(f"row {i}", r) for i, r in enumerate(_rlhfv_rows(), 1)],
                                                  *D._FORMATS["rlhfv"][1:]))
        _check_rlhfv(*D.load_examples(str(path), "rlhfv"))
        return
    pq.write_table(pa.Table.from_pylist(_rlhfv_rows()), str(path))
    _check_rlhfv(*D.load_examples(str(path), "rlhfv"))


def test_load_image(tmp_path, root):
    e = D.Example("g", "gray.png", "<image>\nq", "c")
    im = D.load_image(e, str(root))
    assert im.mode == "RGB" and im.size == (5, 5) and im.getpixel((0, 0)) == (128, 128, 128)
    assert D.load_image(D.Example("p", Image.new("RGBA", (2, 2)), "<image>", "c")).mode == "RGB"
    with pytest.raises(D.ImageError, match="example b: .*bad.png"):
        D.load_image(D.Example("b", str(root / "bad.png"), "<image>", "c"))
    with pytest.raises(ValueError, match="example n: has no image"):
        D.load_image(D.Example("n", None, "q", "c"))


# ---------------------------------------------------------------------------------------------------- DDPO

def test_ddpo_diff_hand_worked():
    g = 5.0
    # matching blocks (rejected, chosen, size): (0,0,4) (5,6,4) (9,11,3); gaps: [40] vs [20,21] modified (both
    # sides non-empty) -> gamma; [] vs [30] pure insertion -> 1; [50,51] vs [] pure deletion -> 1
    chosen = [1, 2, 3, 4, 20, 21, 5, 6, 7, 8, 30, 9, 10, 11]
    rejected = [1, 2, 3, 4, 40, 5, 6, 7, 8, 9, 10, 11, 50, 51]
    wc, wr = ddpo.ddpo_token_weights(chosen, rejected, g)
    assert wc.tolist() == [1, 1, 1, 1, g, g, 1, 1, 1, 1, 1, 1, 1, 1]
    assert wr.tolist() == [1, 1, 1, 1, g, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    # a 2-token match (60, 61) inside a modified region is dropped (min_match=3): the whole region is modified
    chosen = [1, 2, 3, 4, 20, 60, 61, 21, 5, 6, 7, 8]
    rejected = [1, 2, 3, 4, 40, 60, 61, 41, 5, 6, 7, 8]
    wc, wr = ddpo.ddpo_token_weights(chosen, rejected, g)
    assert wc.tolist() == [1, 1, 1, 1, g, g, g, g, 1, 1, 1, 1] == wr.tolist()
    wc, wr = ddpo.ddpo_token_weights(chosen, rejected, g, min_match=2)
    assert wc.tolist() == [1, 1, 1, 1, g, 1, 1, g, 1, 1, 1, 1] == wr.tolist()
    # a leading modification and different lengths; identical sequences -> all ones
    wc, wr = ddpo.ddpo_token_weights([7, 8, 1, 2, 3], [9, 1, 2, 3], 2.0)
    assert wc.tolist() == [2, 2, 1, 1, 1] and wr.tolist() == [2, 1, 1, 1]
    wc, wr = ddpo.ddpo_token_weights([1, 2, 3], [1, 2, 3], 2.0)
    assert wc.tolist() == [1, 1, 1] and wr.tolist() == [1, 1, 1]
    assert wc.dtype == torch.float32


def test_span_token_weights():
    # "a red cat": tokens "a" (0,1), " red" (1,5), " cat" (5,9), a special token (0,0); span "red" = [2,5)
    w = ddpo.span_token_weights([(0, 1), (1, 5), (5, 9), (0, 0)], [(2, 5)], 3.0)
    assert w.tolist() == [1, 3, 1, 1]
    assert ddpo.span_token_weights([(0, 1), (1, 5)], None, 3.0).tolist() == [1, 1]
    # with offsets from a real `tokenizers` encoding
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["[UNK]", "there", "are", "two", "three", "dogs", "cats", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text = "there are three dogs ."
    start = text.index("three dogs")
    enc = tok.encode(text)
    w = ddpo.span_token_weights(enc.offsets, [(start, start + len("three dogs"))], 5.0)
    assert enc.tokens == ["there", "are", "three", "dogs", "."] and w.tolist() == [1, 1, 5, 5, 1]
    # example_token_weights picks the spans when the example has them, else the diff
    ex = D.Example("s", None, "q", text, "there are two cats .", chosen_segments=[(start, start + 10)],
                   rejected_segments=[(10, 18)])
    rej = tok.encode(ex.rejected)
    wc, wr = ddpo.example_token_weights(ex, enc.ids, rej.ids, 5.0, enc.offsets, rej.offsets)
    assert wc.tolist() == [1, 1, 5, 5, 1] and wr.tolist() == [1, 1, 5, 5, 1]
    ex.chosen_segments = ex.rejected_segments = None
    wc, wr = ddpo.example_token_weights(ex, [1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 5, 6], 5.0, min_match=2)
    assert wc.tolist() == [1, 1, 1, 5, 1, 1] and wr.tolist() == [1, 1, 1, 5, 1, 1]
