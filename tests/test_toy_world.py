"""The toy world (nanoalign.toy.world, nanoalign.toy.files): determinism, pixels vs annotations, co-occurrence
statistics, QA, POPE negatives, the world's files on disk and their caching, the tokenizer round trip, configs."""
import json
import os

import numpy as np
import pytest

from nanoalign.toy import files as F
from nanoalign.toy import oracle as O
from nanoalign.toy import world as W

# A hand-made scene: a red small fork (top left) without its knife, two large blue cups (top right, center), one
# green large plate (bottom).
SCENE = {"width": 48, "height": 48, "objects": [
    {"kind": "fork", "color": "red", "size": "small", "cell": 0, "origin": [2, 2], "bbox": [2, 2, 11, 11]},
    {"kind": "cup", "color": "blue", "size": "large", "cell": 2, "origin": [32, 0], "bbox": [32, 0, 47, 15]},
    {"kind": "cup", "color": "blue", "size": "large", "cell": 4, "origin": [16, 16], "bbox": [16, 16, 31, 31]},
    {"kind": "plate", "color": "green", "size": "large", "cell": 7, "origin": [16, 32], "bbox": [16, 32, 31, 47]}]}


def test_deterministic_for_a_seed():
    a, b, c = W.make_scenes(20, 3, "train"), W.make_scenes(20, 3, "train"), W.make_scenes(20, 4, "train")
    assert a == b and a != c
    assert W.make_scenes(5, 3, "train") == a[:5]  # scene i does not depend on n
    assert all(np.array_equal(W.render(x), W.render(y)) for x, y in zip(a, b))


def test_annotations_match_pixels():
    for sc in W.make_scenes(60, 1, "eval"):
        img = W.render(sc).astype(int)
        covered = np.zeros(img.shape[:2], bool)
        cells = [o["cell"] for o in sc["objects"]]
        assert len(cells) == len(set(cells)) and 1 <= len(cells) <= 9
        for o in sc["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            hit = (img[y0:y1, x0:x1] == W.COLORS[o["color"]]).all(-1)
            # the bbox is tight: its colour touches all four edges
            assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any()
            assert x0 // 16 + 3 * (y0 // 16) == o["cell"] and (x1 - 1) // 16 + 3 * ((y1 - 1) // 16) == o["cell"]
            covered[y0:y1, x0:x1] = True
        assert (img[~covered] == W.BACKGROUND).all()  # background everywhere else


def test_cooccurrence_statistics():
    st = W.world_stats(n=4000, seed=0)
    assert 0.75 < st["p_companion_given_partner"] < 0.9
    assert st["p_companion_given_no_partner"] < 0.2
    # captions put the companion right after its partner
    for sc in W.make_scenes(200, 0, "train"):
        ks = [m["kind"] for m in O.parse(W.caption(sc)) if m["kind"] != "__total__"]
        assert ks == list(W.groups(sc))
        for p, c in W.COMPANION.items():
            if p in ks and c in ks:
                assert ks.index(c) == ks.index(p) + 1


def test_qa_pairs_existence_share_and_answers():
    """n_exist yes/no questions per image alternate present / absent kinds; every answer matches the scene."""
    yes = no = 0
    for i, sc in enumerate(W.make_scenes(200, 2, "train")):
        qa = W.qa_pairs(sc, np.random.default_rng(i), n=7, n_exist=5)
        assert len(qa) == 7
        exist = [(q, a) for q, a in qa if q.startswith("Is there")]
        assert len(exist) == 5 and all(q.startswith("Is there") for q, _ in qa[:5])
        gs = W.groups(sc)
        for q, a in qa:
            assert a == W.answer_question(q, sc) and a is not None
        for q, a in exist:
            kind = q.split()[3]
            assert a == ("Yes." if kind in gs else "No.")
        answers = [a for _, a in exist]
        if len(gs) < len(W.KINDS):  # absent kinds exist: answers alternate
            assert all(x != y for x, y in zip(answers, answers[1:]))
        yes += answers.count("Yes.")
        no += answers.count("No.")
    assert 0.45 < yes / (yes + no) < 0.55
    recs = F.sft_records(W.make_scenes(3, 0, "train"), ["a.png", "b.png", "c.png"], 0, 7, 5)
    assert len(recs) == 3 * 8 and sum(r["conversations"][0]["value"].startswith("<image>\nIs there") for r in recs) == 15


def test_pope_negatives_kinds():
    train = W.make_scenes(500, 0, "train")
    freq, cooc = W.cooccurrence(train)
    rng = np.random.default_rng(0)
    rows = F.pope_rows([SCENE], ["x.png"], rng, freq, cooc)
    by = {cat: [r for r in rows if r["category"] == cat] for cat in ("random", "popular", "adversarial")}
    for cat, rs in by.items():
        yes = {r["object"] for r in rs if r["label"] == "yes"}
        no = [r["object"] for r in rs if r["label"] == "no"]
        assert yes == {"fork", "cup", "plate"} and len(no) == 3 and not set(no) & yes
    assert by["adversarial"][3]["object"] == "knife"  # the absent companion comes first
    popular = sorted((k for k in W.KINDS if k not in ("fork", "cup", "plate")), key=lambda k: -freq[k])[:3]
    assert [r["object"] for r in by["popular"] if r["label"] == "no"] == popular
    # on generated eval scenes: every absent companion of a present partner is an adversarial negative
    for sc in W.make_scenes(50, 0, "eval"):
        gs = W.groups(sc)
        neg = W.pope_negatives(sc, "adversarial", 3, rng, freq, cooc)
        missing = [W.PAIRED[k] for k in gs if k in W.PAIRED and W.PAIRED[k] not in gs]
        assert neg[:len(missing[:3])] == sorted(missing, key=W.KINDS.index)[:3] or set(missing[:3]) <= set(neg)


def test_build_world_cached_and_tokenizer(tmp_path):
    out = tmp_path / "w"
    p = F.build_world(str(out), 30, 6, seed=1)
    mt = {k: os.path.getmtime(v) for k, v in p.items()}
    assert F.build_world(str(out), 30, 6, seed=1) == p
    assert {k: os.path.getmtime(v) for k, v in p.items()} == mt  # reused, not rewritten
    sft = json.load(open(p["sft"]))
    assert len(sft) == 30 * 4 and sft[0]["conversations"][0]["value"].startswith("<image>\n")
    assert all(os.path.exists(os.path.join(p["images"], r["image"])) for r in sft)
    # the grounding stage's file: the SFT mix, then 4 existence questions per image answered from the image's
    # scene, half of them "No."
    ground = json.load(open(p["sft_ground"]))
    scenes = F.load_scenes(p["scenes_train"])
    assert ground[:len(sft)] == sft and len(ground) == len(sft) + 30 * 4
    for r in ground[len(sft):]:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q.startswith("<image>\nIs there a ") and a == W.answer_question(q, scenes[r["image"]])
    assert 0.35 < sum(r["conversations"][1]["value"] == "No." for r in ground[len(sft):]) / (30 * 4) < 0.65
    coco = json.load(open(p["chair_coco"]))
    assert [c["name"] for c in coco["categories"]] == W.KINDS and len(coco["images"]) == 6
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
    assert len(tok.encode(W.caption(W.make_scenes(1, 0, "eval")[0]), add_bos=False)) < 100
    with pytest.raises(ValueError, match="n_train"):
        F.build_world(str(out), 0, 6)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_toy_config_builds_in_transformers(kind):
    import torch
    import transformers
    cfg = F.toy_config(kind, vocab_size=300)
    cls = transformers.LlavaConfig if kind == "llava" else transformers.LlavaNextConfig
    conf = cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model_cls = transformers.LlavaForConditionalGeneration if kind == "llava" else transformers.LlavaNextForConditionalGeneration
    model = model_cls(conf).eval()
    assert model.get_input_embeddings().weight.shape == (300, 128)
    if kind == "llava":
        ids = torch.tensor([[1] + [4] * 36 + [7, 8]])
        out = model(input_ids=ids, pixel_values=torch.zeros(1, 3, 48, 48))
        assert out.logits.shape == (1, 39, 300)
    assert F.toy_preprocessor_config(kind)["crop_size"] == {"height": 48, "width": 48}
    with pytest.raises(ValueError, match="kind"):
        F.toy_config("blip")
