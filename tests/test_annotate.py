"""nanoalign/annotate.py: verdict parsing, drop reasons, both-orders consistency, position bias, the oracle on toy
scenes, load errors."""
import pytest
import torch

from nanoalign.annotate import JUDGE_PROMPT, Annotator, load_annotator, parse_verdict
from nanoalign.data import Example


@pytest.mark.parametrize("text,want", [
    ("Better: 1", 0), ("better: 2", 1), ("Better: tie", "tie"), ("Response 2 is better.", 1),
    ("I prefer response 1 because it is accurate", 0), ("2", 1), (" (1) ", 0), ("The second response is better", 1),
    ("Both are equally good.", "tie"), ("", None), ("cat dog w7 w8", None), ("12345", None),
])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def _ex(n):
    return [Example(str(i), None, f"question {i}", "x") for i in range(n)]


def fixed_judge(replies):
    """A judge that answers from a list, in call order (first call: the given order; second: swapped)."""
    calls = iter(replies)
    return lambda ex, im, a, b: next(calls)


def test_drop_reasons_and_position_bias():
    ann = Annotator("vlm:fake", judge=fixed_judge([["Better: 1", "Better: 2", "no idea", "Better: tie"]]))
    v = ann(_ex(5), [None] * 5, ["a", "b", "c", "d", "same"], ["A", "B", "C", "D", "same"])
    # the identical pair is dropped before the judge is asked: 4 replies for 4 pairs
    assert v == [0, 1, None, None, None]
    s = ann.take_stats()
    assert s["dropped_identical"] == 1 and s["dropped_unparseable"] == 1 and s["dropped_tie"] == 1
    assert s["parsed"] == 2 and s["first_wins"] == 1 and s["pairs"] == 5
    assert ann.take_stats() == {}


def test_both_orders_keeps_only_consistent_verdicts():
    first = ["Better: 1", "Better: 1", "Better: 2", "Better: 1"]
    swapped = ["Better: 2", "Better: 1", "Better: 1", "garbage"]  # agree, position-biased, agree, unparseable
    ann = Annotator("vlm:fake", judge=fixed_judge([first, swapped]), both_orders=True)
    v = ann(_ex(4), [None] * 4, ["a", "b", "c", "d"], ["A", "B", "C", "D"])
    assert v == [0, None, 1, None]
    s = ann.take_stats()
    assert s["dropped_inconsistent"] == 1 and s["dropped_unparseable"] == 1
    assert s["parsed"] == 7 and s["first_wins"] == 5  # "Response 1" won 3 + 2 of the 7 parsed verdicts


def test_score_annotator_ties_drop():
    ann = Annotator("rm:fake", score=lambda ex, im, r: torch.tensor([float(len(x)) for x in r]))
    assert ann(_ex(3), [None] * 3, ["long one", "ab", "xy"], ["short", "abc", "yx"]) == [0, 1, None]
    assert ann.take_stats()["dropped_tie"] == 1


def test_oracle_annotator_on_toy_scenes():
    """The toy world's judge: a faithful caption of the scene beats one naming an absent object."""
    from nanoalign.toy.world import CAPTION_PROMPT, caption, make_scenes
    scene = make_scenes(1, 0, "train")[0]
    good = caption(scene)
    present = {o.get("kind") for o in scene["objects"]} if isinstance(scene, dict) and "objects" in scene else set()
    from nanoalign.toy.world import KINDS
    absent = next(k for k in KINDS if k not in present and k not in good)
    bad = good + f" There is a {absent}."
    ann = load_annotator("oracle")
    ex = [Example("0", None, CAPTION_PROMPT, "x", extra={"scene": scene})]
    assert ann(ex + ex, [None, None], [bad, good], [good, bad]) == [1, 0]


def test_load_errors_are_one_line(tmp_path):
    for spec, pat in [("", "empty spec"), ("nope", "expected oracle"), (f"vlm:{tmp_path}", "cannot load the judge"),
                      (f"vlm:{tmp_path}/x", r"^no such file or folder: .*/x \(--annotator\)$"),
                      (f"rm:{tmp_path}", r"^--annotator rm:")]:
        with pytest.raises(ValueError, match=pat) as e:
            load_annotator(spec)
        assert "\n" not in str(e.value)


def test_judge_prompt_names_both_responses():
    text = JUDGE_PROMPT.format(question="q?", first="AAA", second="BBB")
    assert "Response 1: AAA" in text and "Response 2: BBB" in text and "Better: 1" in text
