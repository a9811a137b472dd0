"""Metrics on hand-made inputs whose answers were worked out by hand (nanoalign/metrics.py)."""
import json

import pytest

from nanoalign import metrics as M

# The 80 COCO instance categories, typed independently of the table in metrics.py ("_" joins multi-word names).
COCO_80 = """person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign
parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase
frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle
wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch
potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink
refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"""


def coco80():
    return [w.replace("_", " ") for w in COCO_80.split()]


def test_table_covers_the_80_categories():
    names = coco80()
    assert len(names) == 80 and set(names) == set(M.COCO_SYNONYMS)
    for n in names:  # each category name finds itself
        assert M.extract_objects(f"there is a {n} in it.", None) == [n], n


# ------------------------------------------------------------------------------------------------------------ POPE
def test_parse_yes_no():
    assert M.parse_yes_no("Yes, there is a dog in the image.") == "yes"
    assert M.parse_yes_no("NO.") == "no"
    assert M.parse_yes_no("There is no cat; yes, really") == "no"  # first yes/no word wins
    assert M.parse_yes_no("I cannot tell from this picture.") is None
    assert M.parse_yes_no("Nobody knows, yesterday") is None  # words, not substrings
    assert M.parse_yes_no("") is None


def test_pope_metrics_by_hand():
    preds = ["yes", "yes", "no", None, "no", "yes", None]
    labels = ["yes", "no", "yes", "yes", "no", "yes", "no"]
    # TP=2 (0,5), FP=1 (1), TN=1 (4), FN=1 (2), unparseable=2 (3 label yes, 6 label no: both wrong)
    m = M.pope_metrics(preds, labels)
    assert m["n"] == 7 and m["unparseable"] == 2
    assert m["accuracy"] == pytest.approx(3 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["yes_ratio"] == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        M.pope_metrics(["yes", "no"], ["yes"])


def test_pope_summary_per_split():
    rows = [
        {"answer": "Yes, there is.", "label": "yes", "split": "random"},
        {"answer": "No", "label": "no", "split": "random"},
        {"answer": "yes", "label": "no", "split": "random"},
        {"answer": "maybe", "label": "yes", "split": "adversarial"},
        {"answer": "Yes", "label": "yes", "split": "adversarial"},
    ]
    s = M.pope_summary(rows)
    assert set(s["splits"]) == {"random", "adversarial"}
    r, a = s["splits"]["random"], s["splits"]["adversarial"]
    assert r["accuracy"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(1 / 2)
    assert r["recall"] == pytest.approx(1.0) and r["yes_ratio"] == pytest.approx(2 / 3)
    assert a["accuracy"] == pytest.approx(1 / 2) and a["recall"] == pytest.approx(1 / 2)
    assert a["precision"] == pytest.approx(1.0) and a["unparseable"] == 1
    assert s["accuracy"] == pytest.approx(3 / 5) and s["unparseable"] == 1
    assert s["recall"] == pytest.approx(2 / 3) and s["precision"] == pytest.approx(2 / 3)


def test_pope_split_of():
    assert M.pope_split_of({"category": "Popular"}) == "popular"
    assert M.pope_split_of({}, "coco_pope_adversarial.json") == "adversarial"
    assert M.pope_split_of({"split": "train"}, "x.jsonl") is None


# ----------------------------------------------------------------------------------------------------------- CHAIR
def test_extract_objects_synonyms_plurals_multiword():
    cap = ("Two puppies and a man eat hot dogs near a Teddy bear; cell-phones lie on the dining table. "
           "A polar bear, three kittens, an orange cat and an orange.")
    assert M.extract_objects(cap) == ["dog", "person", "hot dog", "teddy bear", "cell phone", "dining table",
                                      "bear", "cat", "cat", "orange"]
    # a phrase never matches across punctuation; non-object phrases consume their words
    assert M.extract_objects("It was hot. Dog days.") == ["dog"]
    assert M.extract_objects("kids on a tennis court near the bus stop") == ["person"]
    assert M.extract_objects("women holding wine glasses and knives") == ["person", "wine glass", "knife"]
    assert M.extract_objects("a baby elephant and two adult giraffes by a flower bed") == ["elephant", "giraffe"]
    assert M.extract_objects("a toaster oven, a remote island, a tie") == ["toaster", "tie"]


def test_chair_scores_by_hand():
    captions = [
        "A woman rides a horse past two kittens.",  # kittens: hallucinated plural synonym of cat
        "A dog sleeps on a couch next to a dog.",    # all correct (2 dog mentions + couch)
        "An empty room.",                            # no objects
    ]
    gt = [{"person", "horse", "car"}, {"dog", "couch", "tv"}, {"chair"}]
    s = M.chair_scores(captions, gt)
    assert s["per_caption"][0] == {"mentioned": ["person", "horse", "cat"], "hallucinated": ["cat"]}
    assert s["mentions"] == 6 and s["hallucinated_mentions"] == 1
    assert s["chair_i"] == pytest.approx(1 / 6)
    assert s["chair_s"] == pytest.approx(1 / 3)
    assert s["recall"] == pytest.approx((2 + 2 + 0) / (3 + 3 + 1))
    assert s["mean_length"] == pytest.approx((8 + 10 + 3) / 3)


def test_chair_custom_vocabulary_toy_world():
    syn = {"red cube": ["red cube", "red block"], "blue ball": ["blue ball", "blue sphere"]}
    s = M.chair_scores(["Two red blocks and a blue sphere and a dog."], [{"red cube"}], synonyms=syn)
    assert s["per_caption"][0] == {"mentioned": ["red cube", "blue ball"], "hallucinated": ["blue ball"]}
    assert s["chair_i"] == pytest.approx(0.5) and s["recall"] == pytest.approx(1.0)


def test_load_coco_objects(tmp_path):
    d = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
         "categories": [{"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}],
         "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 62},
                         {"image_id": 2, "category_id": 18}, {"image_id": 99, "category_id": 18}]}
    p = tmp_path / "inst.json"
    p.write_text(json.dumps(d))
    objs, names = M.load_coco_objects(p)
    assert objs == {1: {"dog", "chair"}, 2: {"dog"}} and names == {1: "a.jpg", 2: "b.jpg"}
    caps = {"images": [{"id": 5}], "annotations": [{"image_id": 5, "caption": "A cat on a sofa."}]}
    p.write_text(json.dumps(caps))
    assert M.load_coco_objects(p)[0] == {5: {"cat", "couch"}}
    for drop, key in (("annotations", "annotations"), ("images", "images"), ("categories", "categories")):
        p.write_text(json.dumps({k: v for k, v in d.items() if k != drop}))
        with pytest.raises(ValueError, match=key):
            M.load_coco_objects(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        M.load_coco_objects(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------------------------- MMHal
def test_parse_rating():
    assert M.parse_rating("The answer is fine.\nRating: 5") == 5
    assert M.parse_rating("rating: 2 ... on reflection, Rating: 4") == 4  # last one wins
    assert M.parse_rating("**Rating:** 1") == 1
    assert M.parse_rating(" 3 ") == 3
    assert M.parse_rating("Rating: 9") is None
    assert M.parse_rating("I think it deserves a 5 or so") is None


def test_mmhal_summary_and_prompt():
    rows = [{"rating": 6, "question_type": "counting"}, {"rating": 2, "question_type": "counting"},
            {"rating": 0, "question_type": "relation"}, {"rating": None, "question_type": "relation"}]
    s = M.mmhal_summary(rows)
    assert s["n"] == 4 and s["n_rated"] == 3 and s["unparseable"] == 1
    assert s["score"] == pytest.approx(8 / 3) and s["hallucination_rate"] == pytest.approx(2 / 3)
    assert s["question_types"]["counting"] == {"n": 2, "score": 4.0, "hallucination_rate": 0.5}
    p = M.format_judge_prompt({"question": "How many cats?", "gt_answer": "Two.", "image_content": ["cat", "sofa"]},
                              "Three cats.")
    assert "How many cats?" in p and "Two." in p and "cat, sofa" in p and "Three cats." in p and "Rating:" in p
