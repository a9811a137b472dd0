"""The toy's oracle (nanoalign.toy.oracle): scores and corrections of hand-written captions, corrections of any
caption, one-fact corruption, ranking, the prefs writer of the toy's pairs; importable without PIL or torch."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanoalign.toy import oracle as O
from nanoalign.toy import pairs as P
from nanoalign.toy import world as W

# A hand-made scene: a red small fork (top left) without its knife, two large blue cups (top right, center), one
# green large plate (bottom).
SCENE = {"width": 48, "height": 48, "objects": [
    {"kind": "fork", "color": "red", "size": "small", "cell": 0, "origin": [2, 2], "bbox": [2, 2, 11, 11]},
    {"kind": "cup", "color": "blue", "size": "large", "cell": 2, "origin": [32, 0], "bbox": [32, 0, 47, 15]},
    {"kind": "cup", "color": "blue", "size": "large", "cell": 4, "origin": [16, 16], "bbox": [16, 16, 31, 31]},
    {"kind": "plate", "color": "green", "size": "large", "cell": 7, "origin": [16, 32], "bbox": [16, 32, 31, 47]}]}
GOOD = ("There are four objects in the image. A small red fork is at the top left. "
        "Two large blue cups are at the top right and in the center. A large green plate is at the bottom.")


def test_oracle_scores_hand_made():
    r = O.oracle_score(GOOD, SCENE)
    assert r["score"] == 1.0 and r["hallucinated"] == [] and r["recall"] == 1.0
    bad = ("There are five objects in the image. A small red fork is at the top left. A small white knife is on the "
           "left. Two large yellow cups are at the top right and in the center.")
    r = O.oracle_score(bad, SCENE)
    assert r["hallucinated"] == ["knife"] and r["missed"] == ["plate"]
    assert r["color_errors"] == 1 and r["count_errors"] == 1 and r["position_errors"] == 0
    # P = 2/3, A = 1 - 2/8 (fork: count size color pos; cups: count size color 2 pos; total: count -> 9 facts)
    n_attr = 4 + 5 + 1
    assert r["score"] == pytest.approx(0.5 * 2 / 3 + 0.2 * (1 - 2 / n_attr) + 0.3 * 2 / 3)
    assert O.oracle_score("Yes, there is.", SCENE, question="Is there a fork in the image?")["score"] == 1.0
    assert O.oracle_score("Yes.", SCENE, question="Is there a knife in the image?")["score"] == 0.0
    assert O.oracle_score("Two.", SCENE, question="How many cups are there?")["score"] == 1.0
    assert O.oracle_score("Red.", SCENE, question="What color is the plate?")["score"] == 0.0
    with pytest.raises(ValueError, match="response"):
        O.oracle_score(None, SCENE)


def test_corrections_hand_made():
    cap = ("There are five objects in the image. A small red fork is at the top left. A small white knife is on the "
           "left. Two large yellow cups are at the top right and on the left.")
    spans = O.find_hallucinated_spans(cap, SCENE)
    want = [(10, 14, "four"),                                                      # "five" -> "four"
            (74, 109, "A large green plate is at the bottom."),                    # knife sentence -> missed plate
            (120, 126, "blue"),                                                    # "yellow" -> "blue"
            (157, 168, "in the center")]                                           # "on the left" -> "in the center"
    assert [cap[s:e] for s, e, _ in spans] == ["five", "A small white knife is on the left.", "yellow", "on the left"]
    assert spans == want
    fixed, sp = O.correct_caption(cap, SCENE)
    assert fixed == ("There are four objects in the image. A small red fork is at the top left. A large green plate "
                     "is at the bottom. Two large blue cups are at the top right and in the center.")
    for (s, e, ns, ne), (_, _, fix) in zip(sp, spans):
        assert fixed[ns:ne] == fix
    assert O.oracle_score(fixed, SCENE)["score"] == 1.0
    # a wrong count rewrites count..noun and the verb; a sentence with nothing real left is deleted
    cap2 = "A large green plate is at the bottom. One large blue cup is in the center. There is a knife."
    fixed2, _ = O.correct_caption(cap2, SCENE)
    assert fixed2 == "A large green plate is at the bottom. Two large blue cups are in the center. A small red fork is at the top left."
    fixed3, sp3 = O.correct_caption(GOOD + " There is a knife.", SCENE)
    assert fixed3 == GOOD and sp3[0][2] == sp3[0][3]
    assert O.find_hallucinated_spans(GOOD, SCENE) == []
    row = O.correction_pref(cap, SCENE, "x.png")
    assert row["rejected"][slice(*row["rejected_segments"][1])] == "A small white knife is on the left."
    assert row["chosen"][slice(*row["chosen_segments"][2])] == "blue"


def test_best_worst_pair():
    mid = GOOD.replace("A large green plate is at the bottom.", "A large green knife is at the bottom.")
    worst = "There are four objects in the image. A small red knife is at the top left."
    assert O.best_worst_pair([mid, worst, GOOD], SCENE) == (GOOD, worst)
    assert O.best_worst_pair([GOOD, GOOD], SCENE) is None  # a tie: no pair
    assert O.best_worst_pair([GOOD], SCENE) is None


def test_corrections_of_any_caption_are_clean():
    # captions of other scenes (wrong kinds, counts, colors, sizes and positions at once, several mentions per
    # sentence after a splice) are corrected into non-overlapping spans whose result the oracle finds fully right
    scenes, rng = W.make_scenes(300, 5, "eval"), np.random.default_rng(0)
    n_wide = 0
    for i, sc in enumerate(scenes):
        other = scenes[(i + 1) % len(scenes)]
        cap = W.caption(other, rng)
        if i % 3 == 0:  # two sentences fused into one: two mentions in a sentence
            cap = cap.replace(". ", " and ", 1)
        spans = O.find_hallucinated_spans(cap, sc)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (cap, spans)
        n_wide += any(fix and cap[s:e].count(" ") >= 3 and not fix.endswith(".") for s, e, fix in spans)
        fixed, sp = O.correct_caption(cap, sc)
        assert O.find_hallucinated_spans(fixed, sc) == [], (cap, fixed)
        assert fixed == fixed.strip() and "  " not in fixed, (cap, fixed)
        score = O.oracle_score(fixed, sc)
        assert not score["hallucinated"] and score["attribute_precision"] == 1.0, (cap, fixed)
        assert all(fixed[ns:ne] == fix for (_, _, ns, ne), (_, _, fix) in zip(sp, spans))
    assert n_wide > 10  # count..noun rewrites with attribute words inside them were exercised
    # two deleted sentences in a row, the second ending the caption: one deletion, no trailing space
    cap = GOOD + " There is a knife. A small red bat is on the left."
    assert O.correct_caption(cap, SCENE)[0] == GOOD


def _facts_wrong(text, scene):
    r = O.oracle_score(text, scene)
    return len(r["hallucinated"]) + r["attribute_errors"] + r["count_errors"]


def test_corruption_changes_exactly_one_fact():
    rng = np.random.default_rng(0)
    n_obj = n_comp = 0
    for i, sc in enumerate(W.make_scenes(80, 5, "eval")):
        cap = W.caption(sc, np.random.default_rng(i))
        bad, (s, e) = O.corrupt_answer(cap, sc, rng)
        assert bad != cap and _facts_wrong(cap, sc) == 0 and _facts_wrong(bad, sc) == 1, (cap, bad)
        assert bad[:s] == cap[:s] and bad[e:] == cap[len(cap) - (len(bad) - e):]
        halluc = O.oracle_score(bad, sc)["hallucinated"]
        n_obj += bool(halluc)
        n_comp += bool(halluc) and any(W.PAIRED.get(k) == halluc[0] for k in W.groups(sc))
    assert n_obj > 20 and n_comp > n_obj // 3  # object swaps are frequent and often the companion
    # the companion is preferred: fork present, knife absent
    for seed in range(10):
        bad, _ = O.corrupt_answer("A small red fork is at the top left.", SCENE, np.random.default_rng(seed), p_object=1.0)
        assert bad == "A small red knife is at the top left."
    assert O.corrupt_answer("Yes.", SCENE, rng)[0] == "No."


def test_ranking_and_prefs(tmp_path):
    resp = [GOOD, GOOD.replace("blue", "red"), GOOD + " There is a knife.", GOOD]
    ranked = O.rank_responses(resp, SCENE)
    assert [r for _, r in ranked][:2] == [GOOD, GOOD] and ranked[-1][1] == GOOD + " There is a knife."
    pairs = O.ranked_pairs(resp, SCENE)
    assert len(pairs) == 5 and all(c != r and sc > sr for c, r, sc, sr in pairs)  # the GOOD/GOOD tie is skipped
    path = tmp_path / "p.jsonl"
    rows = [{"image": "x.png", "prompt": "<image>\nQ", "chosen": c, "rejected": r} for c, r, _, _ in pairs]
    assert P.write_prefs(path, rows) == 5 and len(path.read_text().splitlines()) == 5
    with pytest.raises(ValueError, match="row 0 lacks"):
        P.write_prefs(path, [{"image": "x.png", "prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match="outside"):
        P.write_prefs(path, [dict(rows[0], chosen_segments=[[0, 10 ** 6]])])


def test_oracle_imports_neither_drawing_nor_torch():
    """A reward or annotator imports the oracle alone: it must not pull in PIL, torch or the tokenizer library."""
    code = ("import sys; import nanoalign.toy.oracle; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('PIL', 'torch', 'tokenizers', 'transformers')))")
    root = Path(__file__).resolve().parents[1]  # this checkout's nanoalign
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert r.stdout.strip() == "[]", r.stdout
