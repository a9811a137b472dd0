"""The toy world: determinism, pixels vs annotations, co-occurrence statistics, POPE negatives, the oracle and its
corrections on hand-written captions, one-fact corruption, the tokenizer round trip, caching, configs."""
import json
import os

import numpy as np
import pytest

from nanoalign import toyworld as tw

# A hand-made scene: a red small fork (top left) without its knife, two large blue cups (top right, center), one
# green large plate (bottom).
SCENE = {"width": 48, "height": 48, "objects": [
    {"kind": "fork", "color": "red", "size": "small", "cell": 0, "origin": [2, 2], "bbox": [2, 2, 11, 11]},
    {"kind": "cup", "color": "blue", "size": "large", "cell": 2, "origin": [32, 0], "bbox": [32, 0, 47, 15]},
    {"kind": "cup", "color": "blue", "size": "large", "cell": 4, "origin": [16, 16], "bbox": [16, 16, 31, 31]},
    {"kind": "plate", "color": "green", "size": "large", "cell": 7, "origin": [16, 32], "bbox": [16, 32, 31, 47]}]}
GOOD = ("There are four objects in the image. A small red fork is at the top left. "
        "Two large blue cups are at the top right and in the center. A large green plate is at the bottom.")


def test_deterministic_for_a_seed():
    a, b, c = tw.make_scenes(20, 3, "train"), tw.make_scenes(20, 3, "train"), tw.make_scenes(20, 4, "train")
    assert a == b and a != c
    assert tw.make_scenes(5, 3, "train") == a[:5]  # scene i does not depend on n
    assert all(np.array_equal(tw.render(x), tw.render(y)) for x, y in zip(a, b))


def test_annotations_match_pixels():
    for sc in tw.make_scenes(60, 1, "eval"):
        img = tw.render(sc).astype(int)
        covered = np.zeros(img.shape[:2], bool)
        cells = [o["cell"] for o in sc["objects"]]
        assert len(cells) == len(set(cells)) and 1 <= len(cells) <= 9
        for o in sc["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            hit = (img[y0:y1, x0:x1] == tw.COLORS[o["color"]]).all(-1)
            # the bbox is tight: its colour touches all four edges
            assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any()
            assert x0 // 16 + 3 * (y0 // 16) == o["cell"] and (x1 - 1) // 16 + 3 * ((y1 - 1) // 16) == o["cell"]
            covered[y0:y1, x0:x1] = True
        assert (img[~covered] == tw.BACKGROUND).all()  # background everywhere else


def test_cooccurrence_statistics():
    st = tw.world_stats(n=4000, seed=0)
    assert 0.75 < st["p_companion_given_partner"] < 0.9
    assert st["p_companion_given_no_partner"] < 0.2
    # captions put the companion right after its partner
    for sc in tw.make_scenes(200, 0, "train"):
        ks = [m["kind"] for m in tw._parse(tw.caption(sc)) if m["kind"] != "__total__"]
        assert ks == list(tw.groups(sc))
        for p, c in tw.COMPANION.items():
            if p in ks and c in ks:
                assert ks.index(c) == ks.index(p) + 1


def test_qa_pairs_existence_share_and_answers():
    """n_exist yes/no questions per image alternate present / absent kinds; every answer matches the scene."""
    yes = no = 0
    for i, sc in enumerate(tw.make_scenes(200, 2, "train")):
        qa = tw.qa_pairs(sc, np.random.default_rng(i), n=7, n_exist=5)
        assert len(qa) == 7
        exist = [(q, a) for q, a in qa if q.startswith("Is there")]
        assert len(exist) == 5 and all(q.startswith("Is there") for q, _ in qa[:5])
        gs = tw.groups(sc)
        for q, a in qa:
            assert a == tw.answer_question(q, sc) and a is not None
        for q, a in exist:
            kind = q.split()[3]
            assert a == ("Yes." if kind in gs else "No.")
        answers = [a for _, a in exist]
        if len(gs) < len(tw.KINDS):  # absent kinds exist: answers alternate
            assert all(x != y for x, y in zip(answers, answers[1:]))
        yes += answers.count("Yes.")
        no += answers.count("No.")
    assert 0.45 < yes / (yes + no) < 0.55
    recs = tw.sft_records(tw.make_scenes(3, 0, "train"), ["a.png", "b.png", "c.png"], 0, 7, 5)
    assert len(recs) == 3 * 8 and sum(r["conversations"][0]["value"].startswith("<image>\nIs there") for r in recs) == 15


def test_pope_negatives_kinds():
    train = tw.make_scenes(500, 0, "train")
    freq, cooc = tw.cooccurrence(train)
    rng = np.random.default_rng(0)
    rows = tw.pope_rows([SCENE], ["x.png"], rng, freq, cooc)
    by = {cat: [r for r in rows if r["category"] == cat] for cat in ("random", "popular", "adversarial")}
    for cat, rs in by.items():
        yes = {r["object"] for r in rs if r["label"] == "yes"}
        no = [r["object"] for r in rs if r["label"] == "no"]
        assert yes == {"fork", "cup", "plate"} and len(no) == 3 and not set(no) & yes
    assert by["adversarial"][3]["object"] == "knife"  # the absent companion comes first
    popular = sorted((k for k in tw.KINDS if k not in ("fork", "cup", "plate")), key=lambda k: -freq[k])[:3]
    assert [r["object"] for r in by["popular"] if r["label"] == "no"] == popular
    # on generated eval scenes: every absent companion of a present partner is an adversarial negative
    for sc in tw.make_scenes(50, 0, "eval"):
        gs = tw.groups(sc)
        neg = tw.pope_negatives(sc, "adversarial", 3, rng, freq, cooc)
        missing = [tw.PAIRED[k] for k in gs if k in tw.PAIRED and tw.PAIRED[k] not in gs]
        assert neg[:len(missing[:3])] == sorted(missing, key=tw.KINDS.index)[:3] or set(missing[:3]) <= set(neg)


def test_oracle_scores_hand_made():
    r = tw.oracle_score(GOOD, SCENE)
    assert r["score"] == 1.0 and r["hallucinated"] == [] and r["recall"] == 1.0
    bad = ("There are five objects in the image. A small red fork is at the top left. A small white knife is on the "
           "left. Two large yellow cups are at the top right and in the center.")
    r = tw.oracle_score(bad, SCENE)
    assert r["hallucinated"] == ["knife"] and r["missed"] == ["plate"]
    assert r["color_errors"] == 1 and r["count_errors"] == 1 and r["position_errors"] == 0
    # P = 2/3, A = 1 - 2/8 (fork: count size color pos; cups: count size color 2 pos; total: count -> 9 facts)
    n_attr = 4 + 5 + 1
    assert r["score"] == pytest.approx(0.5 * 2 / 3 + 0.2 * (1 - 2 / n_attr) + 0.3 * 2 / 3)
    assert tw.oracle_score("Yes, there is.", SCENE, question="Is there a fork in the image?")["score"] == 1.0
    assert tw.oracle_score("Yes.", SCENE, question="Is there a knife in the image?")["score"] == 0.0
    assert tw.oracle_score("Two.", SCENE, question="How many cups are there?")["score"] == 1.0
    assert tw.oracle_score("Red.", SCENE, question="What color is the plate?")["score"] == 0.0
    with pytest.raises(ValueError, match="response"):
        tw.oracle_score(None, SCENE)


def test_corrections_hand_made():
    cap = ("There are five objects in the image. A small red fork is at the top left. A small white knife is on the "
           "left. Two large yellow cups are at the top right and on the left.")
    spans = tw.find_hallucinated_spans(cap, SCENE)
    want = [(10, 14, "four"),                                                      # "five" -> "four"
            (74, 109, "A large green plate is at the bottom."),                    # knife sentence -> missed plate
            (120, 126, "blue"),                                                    # "yellow" -> "blue"
            (157, 168, "in the center")]                                           # "on the left" -> "in the center"
    assert [cap[s:e] for s, e, _ in spans] == ["five", "A small white knife is on the left.", "yellow", "on the left"]
    assert spans == want
    fixed, sp = tw.correct_caption(cap, SCENE)
    assert fixed == ("There are four objects in the image. A small red fork is at the top left. A large green plate "
                     "is at the bottom. Two large blue cups are at the top right and in the center.")
    for (s, e, ns, ne), (_, _, fix) in zip(sp, spans):
        assert fixed[ns:ne] == fix
    assert tw.oracle_score(fixed, SCENE)["score"] == 1.0
    # a wrong count rewrites count..noun and the verb; a sentence with nothing real left is deleted
    cap2 = "A large green plate is at the bottom. One large blue cup is in the center. There is a knife."
    fixed2, _ = tw.correct_caption(cap2, SCENE)
    assert fixed2 == "A large green plate is at the bottom. Two large blue cups are in the center. A small red fork is at the top left."
    fixed3, sp3 = tw.correct_caption(GOOD + " There is a knife.", SCENE)
    assert fixed3 == GOOD and sp3[0][2] == sp3[0][3]
    assert tw.find_hallucinated_spans(GOOD, SCENE) == []
    row = tw.correction_pref(cap, SCENE, "x.png")
    assert row["rejected"][slice(*row["rejected_segments"][1])] == "A small white knife is on the left."
    assert row["chosen"][slice(*row["chosen_segments"][2])] == "blue"


def test_best_worst_pair():
    mid = GOOD.replace("A large green plate is at the bottom.", "A large green knife is at the bottom.")
    worst = "There are four objects in the image. A small red knife is at the top left."
    assert tw.best_worst_pair([mid, worst, GOOD], SCENE) == (GOOD, worst)
    assert tw.best_worst_pair([GOOD, GOOD], SCENE) is None  # a tie: no pair
    assert tw.best_worst_pair([GOOD], SCENE) is None


def test_corrections_of_any_caption_are_clean():
    # captions of other scenes (wrong kinds, counts, colors, sizes and positions at once, several mentions per
    # sentence after a splice) are corrected into non-overlapping spans whose result the oracle finds fully right
    scenes, rng = tw.make_scenes(300, 5, "eval"), np.random.default_rng(0)
    n_wide = 0
    for i, sc in enumerate(scenes):
        other = scenes[(i + 1) % len(scenes)]
        cap = tw.caption(other, rng)
        if i % 3 == 0:  # two sentences fused into one: two mentions in a sentence
            cap = cap.replace(". ", " and ", 1)
        spans = tw.find_hallucinated_spans(cap, sc)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (cap, spans)
        n_wide += any(fix and cap[s:e].count(" ") >= 3 and not fix.endswith(".") for s, e, fix in spans)
        fixed, sp = tw.correct_caption(cap, sc)
        assert tw.find_hallucinated_spans(fixed, sc) == [], (cap, fixed)
        assert fixed == fixed.strip() and "  " not in fixed, (cap, fixed)
        score = tw.oracle_score(fixed, sc)
        assert not score["hallucinated"] and score["attribute_precision"] == 1.0, (cap, fixed)
        assert all(fixed[ns:ne] == fix for (_, _, ns, ne), (_, _, fix) in zip(sp, spans))
    assert n_wide > 10  # count..noun rewrites with attribute words inside them were exercised
    # two deleted sentences in a row, the second ending the caption: one deletion, no trailing space
    cap = GOOD + " There is a knife. A small red bat is on the left."
    assert tw.correct_caption(cap, SCENE)[0] == GOOD


def _facts_wrong(text, scene):
    r = tw.oracle_score(text, scene)
    return len(r["hallucinated"]) + r["attribute_errors"] + r["count_errors"]


def test_corruption_changes_exactly_one_fact():
    rng = np.random.default_rng(0)
    n_obj = n_comp = 0
    for i, sc in enumerate(tw.make_scenes(80, 5, "eval")):
        cap = tw.caption(sc, np.random.default_rng(i))
        bad, (s, e) = tw.corrupt_answer(cap, sc, rng)
        assert bad != cap and _facts_wrong(cap, sc) == 0 and _facts_wrong(bad, sc) == 1, (cap, bad)
        assert bad[:s] == cap[:s] and bad[e:] == cap[len(cap) - (len(bad) - e):]
        halluc = tw.oracle_score(bad, sc)["hallucinated"]
        n_obj += bool(halluc)
        n_comp += bool(halluc) and any(tw.PAIRED.get(k) == halluc[0] for k in tw.groups(sc))
    assert n_obj > 20 and n_comp > n_obj // 3  # object swaps are frequent and often the companion
    # the companion is preferred: fork present, knife absent
    for seed in range(10):
        bad, _ = tw.corrupt_answer("A small red fork is at the top left.", SCENE, np.random.default_rng(seed), p_object=1.0)
        assert bad == "A small red knife is at the top left."
    assert tw.corrupt_answer("Yes.", SCENE, rng)[0] == "No."


def test_ranking_and_prefs(tmp_path):
    resp = [GOOD, GOOD.replace("blue", "red"), GOOD + " There is a knife.", GOOD]
    ranked = tw.rank_responses(resp, SCENE)
    assert [r for _, r in ranked][:2] == [GOOD, GOOD] and ranked[-1][1] == GOOD + " There is a knife."
    pairs = tw.ranked_pairs(resp, SCENE)
    assert len(pairs) == 5 and all(c != r and sc > sr for c, r, sc, sr in pairs)  # the GOOD/GOOD tie is skipped
    path = tmp_path / "p.jsonl"
    rows = [{"image": "x.png", "prompt": "<image>\nQ", "chosen": c, "rejected": r} for c, r, _, _ in pairs]
    assert tw.write_prefs(path, rows) == 5 and len(path.read_text().splitlines()) == 5
    with pytest.raises(ValueError, match="row 0 lacks"):
        tw.write_prefs(path, [{"image": "x.png", "prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match="outside"):
        tw.write_prefs(path, [dict(rows[0], chosen_segments=[[0, 10 ** 6]])])


def test_build_world_cached_and_tokenizer(tmp_path):
    out = tmp_path / "w"
    p = tw.build_world(str(out), 30, 6, seed=1)
    mt = {k: os.path.getmtime(v) for k, v in p.items()}
    assert tw.build_world(str(out), 30, 6, seed=1) == p
    assert {k: os.path.getmtime(v) for k, v in p.items()} == mt  # reused, not rewritten
    sft = json.load(open(p["sft"]))
    assert len(sft) == 30 * 4 and sft[0]["conversations"][0]["value"].startswith("<image>\n")
    assert all(os.path.exists(os.path.join(p["images"], r["image"])) for r in sft)
    # the grounding stage's file: the SFT mix, then 4 existence questions per image answered from the image's
    # scene, half of them "No."
    ground = json.load(open(p["sft_ground"]))
    scenes = tw.load_scenes(p["scenes_train"])
    assert ground[:len(sft)] == sft and len(ground) == len(sft) + 30 * 4
    for r in ground[len(sft):]:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q.startswith("<image>\nIs there a ") and a == tw.answer_question(q, scenes[r["image"]])
    assert 0.35 < sum(r["conversations"][1]["value"] == "No." for r in ground[len(sft):]) / (30 * 4) < 0.65
    coco = json.load(open(p["chair_coco"]))
    assert [c["name"] for c in coco["categories"]] == tw.KINDS and len(coco["images"]) == 6
    assert json.load(open(p["synonyms"]))["knife"] == ["knife", "knives"]
    pope = [json.loads(l) for l in open(p["pope"])]
    assert {r["category"] for r in pope} == {"random", "popular", "adversarial"} and len({r["question_id"] for r in pope}) == len(pope)
    # the tokenizer round-trips the world's text, with <image> as one token, through the project's Tokenizer
    from nanoalign.tokenizer import Tokenizer
    tok = Tokenizer.from_file(p["tokenizer"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id) == (1, 2, 3, 4)
    for r in sft[:40]:
        for c in r["conversations"]:
            ids = tok.encode(c["value"], add_bos=False)
            assert tok.decode(ids, skip_special_tokens=False) == c["value"]
            assert ids.count(4) == c["value"].count("<image>")
    assert len(tok.encode(tw.caption(tw.make_scenes(1, 0, "eval")[0]), add_bos=False)) < 100
    with pytest.raises(ValueError, match="n_train"):
        tw.build_world(str(out), 0, 6)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_toy_config_builds_in_transformers(kind):
    import torch
    import transformers
    cfg = tw.toy_config(kind, vocab_size=300)
    cls = transformers.LlavaConfig if kind == "llava" else transformers.LlavaNextConfig
    conf = cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model_cls = transformers.LlavaForConditionalGeneration if kind == "llava" else transformers.LlavaNextForConditionalGeneration
    model = model_cls(conf).eval()
    assert model.get_input_embeddings().weight.shape == (300, 128)
    if kind == "llava":
        ids = torch.tensor([[1] + [4] * 36 + [7, 8]])
        out = model(input_ids=ids, pixel_values=torch.zeros(1, 3, 48, 48))
        assert out.logits.shape == (1, 39, 300)
    assert tw.toy_preprocessor_config(kind)["crop_size"] == {"height": 48, "width": 48}
    with pytest.raises(ValueError, match="kind"):
        tw.toy_config("blip")
