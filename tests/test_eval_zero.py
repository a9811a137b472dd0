"""nanoalign.eval and nanoalign.metrics on the edges a fresh user met: an answer the metric cannot parse is a failed
row (counted by --max-failed, its count in the table), and a ratio over zero rows is "n/a" (None), never 0.00."""
import json

import pytest

from nanoalign import eval as E
from nanoalign import metrics as M
from test_eval import FakeGen, make_images, write_jsonl


def test_ratios_over_zero_rows_are_none():
    # POPE: no "yes" answer -> precision undefined; no "yes" label -> recall undefined; f1 = 2TP / (2TP + FP + FN)
    m = M.pope_metrics(["no", "no"], ["no", "no"])
    assert m["accuracy"] == 1.0 and m["precision"] is None and m["recall"] is None and m["f1"] is None
    assert m["yes_ratio"] == 0.0
    m = M.pope_metrics(["no", None], ["yes", "no"])  # positives, no hit, no yes answer: P n/a, R 0, F1 0
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] == 0.0 and m["unparseable"] == 1
    m = M.pope_metrics(["yes", "yes", "no", "yes"], ["yes", "no", "yes", "yes"])  # TP 2, FP 1, FN 1
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * 2 / (4 + 1 + 1)
    assert all(M.pope_metrics([], [])[k] is None for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
    # CHAIR: a caption naming no object -> CHAIR_i n/a (no mention); no ground truth -> recall n/a
    c = M.chair_scores(["a plain wall"], [set()], {"dog": ["dog"]})
    assert c["chair_s"] == 0.0 and c["chair_i"] is None and c["recall"] is None and c["mean_length"] == 3.0
    assert M.chair_scores([], [])["chair_s"] is None and M.chair_scores([], [])["mean_length"] is None
    # MMHal: no rated answer -> score and rate n/a
    s = M.mmhal_summary([{"rating": None, "question_type": "t"}])
    assert s["score"] is None and s["hallucination_rate"] is None and s["unparseable"] == 1


def test_table_shows_na():
    table = E.markdown_table([("m", {"n": 2, **M.pope_metrics(["no", "no"], ["no", "no"])})], "pope")
    assert "| m | 2 | 100.00 | n/a | n/a | n/a | 0.00 | 0 |" in table


def test_unparseable_answers_fail_the_run(tmp_path, monkeypatch, capsys):
    """POPE answers with neither yes nor no are failures: 2 of 4 unparseable > --max-failed 0.1 -> exit 2 naming
    them; their count is in the table; --max-failed 0.5 lets it pass; nothing parseable -> n/a cells."""
    imgs = tmp_path / "imgs"
    make_images(imgs, ["a.jpg"])
    qs = [f"Is there a {k} in the image?" for k in ("dog", "cat", "car", "bus")]
    write_jsonl(tmp_path / "pope.jsonl", [{"question_id": i, "image": "a.jpg", "text": q, "label": "yes"}
                                          for i, q in enumerate(qs)])
    answers = {qs[0]: "Yes.", qs[1]: "No.", qs[2]: "Perhaps.", qs[3]: "I cannot tell."}
    monkeypatch.setattr(E, "model_generate_fn", lambda d, *a, **k: FakeGen(answers if d.endswith("m") else {},
                                                                            default="hmm"))
    (tmp_path / "m").mkdir()
    args = ["--model", str(tmp_path / "m"), "--task", "pope", "--data", str(tmp_path / "pope.jsonl"),
            "--image-root", str(imgs), "--out", str(tmp_path / "out"), "--no-progress"]
    assert E.main(args) == 2
    out, err = capsys.readouterr()
    assert "error: m: 2 example(s) evaluated, 2 row(s) failed (unparseable=2) > --max-failed 0.1" in err
    assert "| m | 4 | 25.00 | 100.00 | 25.00 | 40.00 | 25.00 | 2 |" in out  # TP 1, FN 3 (2 unparseable)
    assert E.main(args + ["--max-failed", "0.5"]) == 0
    capsys.readouterr()
    (tmp_path / "x").mkdir()  # every answer unparseable: precision n/a, exit 2
    assert E.main([*args[:1], str(tmp_path / "x"), *args[2:-3], "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "| x | 4 | 0.00 | n/a | 0.00 | 0.00 | 0.00 | 4 |" in out
    assert "0 example(s) evaluated, 4 row(s) failed (unparseable=4)" in err
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["precision"] is None


def test_malformed_rows_are_named_from_one(tmp_path, capsys):
    """Malformed rows are named as training names rows: "line N" of a JSONL file, "item N" of a JSON list, from 1."""
    bad = E.Counter()
    write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"}, "{oops",
                                       {"question_id": 2, "image": "a.jpg", "label": "yes"}])
    assert len(E.load_pope([tmp_path / "p.jsonl"], str(tmp_path), bad)) == 1 and bad["malformed_row"] == 2
    err = capsys.readouterr().err
    assert "p.jsonl: line 2: not JSON" in err and "p.jsonl: line 3: needs question_id" in err
    (tmp_path / "m.json").write_text(json.dumps([{"question": "q", "gt_answer": "a", "image": "a.jpg"}, 5, {}]))
    bad = E.Counter()
    E.load_mmhal([tmp_path / "m.json"], str(tmp_path), bad)
    err = capsys.readouterr().err
    assert bad["malformed_row"] == 2 and "m.json: item 2: a int" in err and "m.json: item 3: needs question" in err
