"""nanoalign/eval.py with fake generators: resumability, bad-input counting, summaries, the CLI."""
import json
import zlib

import pytest
from PIL import Image

from nanoalign import eval as E


def make_images(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", (8, 6), (10 * i, 50, 200)).save(root / n)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


class FakeGen:
    """generate_fn(images, prompts) answering from a prompt -> answer dict; counts calls and prompts seen."""

    def __init__(self, answers, default="no", stop_after=None):
        self.answers, self.default, self.calls, self.prompts, self.stop_after = answers, default, 0, [], stop_after

    def __call__(self, images, prompts):
        assert len(images) == len(prompts) and all(im.size == (8, 6) for im in images)
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt  # the run is killed here
        self.calls += 1
        self.prompts += prompts
        return [self.answers.get(p, self.default) for p in prompts]


def pope_files(tmp_path):
    imgs = tmp_path / "imgs"
    make_images(imgs, ["a.jpg", "b.jpg"])
    (imgs / "broken.jpg").write_text("not an image")
    random_rows = [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"},
        {"question_id": 4, "image": "b.jpg", "text": "Is there a bus in the image?", "label": "no"},
        {"question_id": 5, "image": "missing.jpg", "text": "Is there a cow in the image?", "label": "yes"},
        {"question_id": 6, "image": "broken.jpg", "text": "Is there a cup in the image?", "label": "yes"},
        '{"question_id": 7, "image": "a.jpg", "text": "trunc',          # malformed JSON
        {"question_id": 8, "image": "a.jpg", "label": "yes"},           # no text
        {"question_id": 9, "image": "a.jpg", "text": "Is?", "label": "maybe"},  # bad label
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},  # duplicate
    ]
    adv_rows = [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a fork in the image?", "label": "no"},
        {"question_id": 2, "image": "b.jpg", "text": "Is there a knife in the image?", "label": "yes"},
    ]
    write_jsonl(tmp_path / "coco_pope_random.json", random_rows)
    write_jsonl(tmp_path / "coco_pope_adversarial.json", adv_rows)
    answers = {"Is there a dog in the image?": "Yes, there is a dog.",
               "Is there a cat in the image?": "No.",
               "Is there a car in the image?": "I am not sure.",          # unparseable, label yes
               "Is there a bus in the image?": "yes",                     # FP
               "Is there a fork in the image?": "Yes there is a fork",     # FP
               "Is there a knife in the image?": "Yes"}
    return imgs, [tmp_path / "coco_pope_random.json", tmp_path / "coco_pope_adversarial.json"], answers


def test_pope_counts_bad_input_and_resumes(tmp_path):
    imgs, files, answers = pope_files(tmp_path)
    bad = E.Counter()
    ex = E.dedupe(E.load_pope(files, imgs, bad), bad)
    assert dict(bad) == {"malformed_row": 3, "duplicate_question_id": 1}
    assert len(ex) == 8 and {e["split"] for e in ex} == {"random", "adversarial"}
    out = tmp_path / "out" / "m"
    # interrupted after the first batch of 2
    gen1 = FakeGen(answers, stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        E.run_task("pope", ex, gen1, out, batch_size=2, bad=bad, progress=False)
    assert len(E.read_results(out / "results.jsonl")) == 2
    with open(out / "results.jsonl", "a") as f:  # killed in the middle of writing a line
        f.write('{"question_id": "coco_pope_random:3", "ans')
    gen2 = FakeGen(answers)
    s = E.run_task("pope", ex, gen2, out, batch_size=2, bad=bad, progress=False)
    # 8 examples - 2 done - missing.jpg - broken.jpg = 4 generated, in batches of at most 2
    assert len(gen2.prompts) == 4 and "Is there a dog in the image?" not in gen2.prompts
    rows = E.read_results(out / "results.jsonl")
    assert len(rows) == 6 and len({r["question_id"] for r in rows}) == 6
    # overall: TP=2 (dog, knife), FP=2 (bus, fork), TN=1 (cat), unparseable=1 (car, label yes); N=6, positives=3
    assert s["accuracy"] == pytest.approx(3 / 6) and s["precision"] == pytest.approx(2 / 4)
    assert s["recall"] == pytest.approx(2 / 3) and s["yes_ratio"] == pytest.approx(4 / 6)
    assert s["unparseable"] == 1 and s["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    r, a = s["splits"]["random"], s["splits"]["adversarial"]
    assert r["n"] == 4 and r["accuracy"] == pytest.approx(2 / 4) and r["recall"] == pytest.approx(1 / 2)
    assert a["n"] == 2 and a["accuracy"] == pytest.approx(1 / 2) and a["precision"] == pytest.approx(1 / 2)
    assert s["bad_input"] == {"malformed_row": 3, "duplicate_question_id": 1, "missing_image": 1,
                              "unreadable_image": 1, "corrupt_result_line": 1}
    assert "reward_model" in s
    assert json.loads((out / "summary.json").read_text())["accuracy"] == s["accuracy"]
    # a third run has nothing left to generate except the two bad images
    gen3 = FakeGen(answers)
    s3 = E.run_task("pope", ex[:3], gen3, out, batch_size=2, progress=False)
    assert gen3.calls == 0
    assert s3["n"] == 3 and s3["accuracy"] == pytest.approx(2 / 3)  # the summary covers the examples asked for


def test_generation_error_is_counted_not_fatal(tmp_path):
    imgs, files, answers = pope_files(tmp_path)
    ex = E.load_pope(files[1:], imgs, E.Counter())

    def flaky(images, prompts):
        if "fork" in prompts[0]:
            raise RuntimeError("out of memory")
        return ["yes"] * len(prompts)
    s = E.run_task("pope", ex, flaky, tmp_path / "o", batch_size=1, progress=False)
    assert s["n"] == 1 and s["bad_input"] == {"generation_error": 1}

    def unloadable(images, prompts):
        raise E.CheckpointError("cannot load m: config.json not found")
    with pytest.raises(E.CheckpointError):  # a model that cannot load stops the run instead of being counted
        E.run_task("pope", ex, unloadable, tmp_path / "o2", batch_size=1, progress=False)


def coco_files(tmp_path):
    imgs = tmp_path / "coco"
    make_images(imgs, ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"])
    ann = {"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                      {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"}],
           "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"},
                          {"id": 58, "name": "hot dog"}],
           "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 18},
                           {"image_id": 2, "category_id": 58}, {"image_id": 2, "category_id": 3}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    write_jsonl(tmp_path / "chair.jsonl", [{"image_id": 1}, {"image": "COCO_val2014_000000000002.jpg"},
                                           {"image_id": 7}, {"prompt": "no image"}])
    return imgs


def test_chair_end_to_end(tmp_path):
    imgs = coco_files(tmp_path)
    bad = E.Counter()
    ex, cats = E.load_chair([tmp_path / "chair.jsonl"], imgs, tmp_path / "ann.json", bad)
    assert cats == ["person", "dog", "car", "hot dog"]
    assert dict(bad) == {"image_not_in_annotations": 1, "malformed_row": 1}
    P = E.M.CHAIR_PROMPTS  # deterministic choice: crc32 of the example key
    assert [e["prompt"] for e in ex] == [P[zlib.crc32(b"1") % len(P)], P[zlib.crc32(b"2") % len(P)]]
    caps = {ex[0]["prompt"]: "A man walks two dogs past parked cars.",   # cars hallucinated (plural synonym)
            ex[1]["prompt"]: "A car and a hot dog."}
    s = E.run_task("chair", ex, FakeGen(caps), tmp_path / "o", progress=False, bad=bad)
    # mentions: person, dog, car | car, hot dog -> 1 hallucinated of 5; recall (2 + 2) / (2 + 2)
    assert s["chair_i"] == pytest.approx(1 / 5) and s["chair_s"] == pytest.approx(1 / 2)
    assert s["recall"] == pytest.approx(1.0) and s["mean_length"] == pytest.approx((8 + 6) / 2)
    row = E.read_results(tmp_path / "o" / "results.jsonl")[0]
    assert row["hallucinated"] == ["car"] and row["gt_objects"] == ["dog", "person"]


def test_chair_bad_annotation_file_still_runs(tmp_path):
    imgs = coco_files(tmp_path)
    (tmp_path / "bad_ann.json").write_text(json.dumps({"images": [], "categories": []}))
    write_jsonl(tmp_path / "c2.jsonl", [{"image": "COCO_val2014_000000000001.jpg"}])
    bad = E.Counter()
    ex, _ = E.load_chair([tmp_path / "c2.jsonl"], imgs, tmp_path / "bad_ann.json", bad)
    s = E.run_task("chair", ex, FakeGen({}, default="a dog"), tmp_path / "o", progress=False, bad=bad)
    assert s["bad_input"] == {"bad_annotation_file": 1} and s["chair_i"] is None
    assert s["n"] == 1 and s["mean_length"] == 2.0


def test_mmhal_with_fake_judge(tmp_path):
    imgs = tmp_path / "mm"
    make_images(imgs, ["x.jpg", "y.jpg"])
    rows = [{"question_type": "counting", "question": "How many dogs?", "gt_answer": "Two.",
             "image_content": ["dog"], "image_src": "https://example.org/path/x.jpg"},
            {"question_type": "relation", "question": "What is left of the cat?", "gt_answer": "A cup.",
             "image_id": "y"},
            {"question_type": "other", "gt_answer": "no question"}]
    (tmp_path / "mmhal.json").write_text(json.dumps(rows))
    bad = E.Counter()
    ex = E.load_mmhal([tmp_path / "mmhal.json"], imgs, bad)
    assert bad["malformed_row"] == 1 and [e["image"].split("/")[-1] for e in ex] == ["x.jpg", "y.jpg"]
    seen = []

    def judge(image, prompt):
        seen.append(prompt)
        return "Looks right.\nRating: 5" if "Two dogs" in prompt else "Wrong object.\nRating: 1"
    s = E.run_task("mmhal", ex, FakeGen({"How many dogs?": "Two dogs."}, default="A fork."), tmp_path / "o",
                   judge_fn=judge, progress=False)
    assert s["score"] == pytest.approx(3.0) and s["hallucination_rate"] == pytest.approx(0.5)
    assert "How many dogs?" in seen[0] and "Two." in seen[0] and "Two dogs." in seen[0]
    with pytest.raises(ValueError, match="judge"):
        E.run_task("mmhal", ex, FakeGen({}), tmp_path / "o2", progress=False)


def test_cli_two_models_and_toy_vocabulary(tmp_path, monkeypatch, capsys):
    """Toy-world style files (POPE JSONL + COCO-style captions JSON with non-COCO categories) through the CLI."""
    imgs = tmp_path / "toy"
    make_images(imgs, ["0.png", "1.png"])
    ann = {"images": [{"id": 0, "file_name": "0.png"}, {"id": 1, "file_name": "1.png"}],
           "categories": [{"id": 1, "name": "red square"}, {"id": 2, "name": "blue circle"}],
           "annotations": [{"image_id": 0, "category_id": 1}, {"image_id": 1, "category_id": 2}]}
    (tmp_path / "toy_ann.json").write_text(json.dumps(ann))
    write_jsonl(tmp_path / "toy_chair.jsonl", [{"image_id": 0, "prompt": "Describe."},
                                               {"image_id": 1, "prompt": "Describe it."}])
    for m in ("base", "aligned"):
        (tmp_path / m).mkdir()
    fakes = {"base": {"Describe.": "A red square and a blue circle.", "Describe it.": "A blue circle."},
             "aligned": {"Describe.": "A red square.", "Describe it.": "A blue circle."}}
    monkeypatch.setattr(E, "model_generate_fn", lambda d, max_new, bs, template="vicuna_v1": FakeGen(fakes[d.split("/")[-1]]))
    rc = E.main(["--model", str(tmp_path / "base"), str(tmp_path / "aligned"), "--task", "chair",
                 "--data", str(tmp_path / "toy_chair.jsonl"), "--image-root", str(imgs),
                 "--annotations", str(tmp_path / "toy_ann.json"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    top = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert top["models"]["base"]["chair_i"] == pytest.approx(1 / 3)
    assert top["models"]["aligned"]["chair_i"] == 0.0
    table = capsys.readouterr().out
    assert "| base | 2 | 50.00 | 33.33 | 100.00 |" in table and "| aligned | 2 | 0.00 | 0.00 | 100.00 |" in table
    one = json.loads((tmp_path / "out" / "aligned" / "summary.json").read_text())
    assert one["chair_s"] == 0.0 and one["model"] == "aligned"


def test_cli_single_model_pope_and_errors(tmp_path, monkeypatch, capsys):
    imgs, files, answers = pope_files(tmp_path)
    (tmp_path / "m").mkdir()
    monkeypatch.setattr(E, "model_generate_fn", lambda d, max_new, bs, template="vicuna_v1": FakeGen(answers))
    args = ["--model", str(tmp_path / "m"), "--task", "pope", "--data", *map(str, files), "--image-root",
            str(imgs), "--out", str(tmp_path / "out"), "--limit", "4", "--no-progress"]
    # 3 malformed rows + 1 unparseable answer of 7 attempted (3 scored) > the default share 0.1: the table is
    # written, the exit is 2
    assert E.main(args) == 2
    assert "error: m: 3 example(s) evaluated, 4 row(s) failed (malformed_row=3, unparseable=1)" in \
        capsys.readouterr().err
    assert E.main(args + ["--max-failed", "0.5"]) == 2  # 4 / 7 > 0.5
    rc = E.main(args + ["--max-failed", "0.6"])
    assert rc == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    # first 4 valid random rows: dog yes/yes, cat no/no, car unparseable/yes, bus yes/no
    assert s["n"] == 4 and s["accuracy"] == 0.5 and s["unparseable"] == 1 and set(s["splits"]) == {"random"}
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable"} <= set(s)
    assert "| m | 4 | 50.00 |" in capsys.readouterr().out
    assert E.main(["--model", str(tmp_path / "nope"), "--task", "pope", "--data", str(files[0]),
                   "--image-root", str(imgs), "--out", str(tmp_path / "o")]) == 2
    assert E.main(["--model", str(tmp_path / "m"), "--task", "pope", "--data", str(tmp_path / "none.jsonl"),
                   "--image-root", str(imgs), "--out", str(tmp_path / "o")]) == 2
    assert E.main(["--model", str(tmp_path / "m"), "--task", "mmhal", "--data", str(files[0]),
                   "--image-root", str(imgs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: no such file or folder: {tmp_path / 'nope'} (--model)" in err and "--judge" in err
    assert f"error: no such file or folder: {tmp_path / 'none.jsonl'} (--data)" in err
    (tmp_path / "afile").write_text("x")  # --out a file, --limit 0: one line each, before any generation
    assert E.main(args[:-5] + ["--out", str(tmp_path / "afile")]) == 2
    assert E.main(args[:-5] + ["--out", str(tmp_path / "o2"), "--limit", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "afile: a file, not a folder" in err[0] and "--limit 0" in err[1] and len(err) == 2


def test_toy_world_files_through_the_cli(tmp_path, monkeypatch, capsys):
    """The toy world's own POPE JSONL, COCO-style annotations, caption questions and synonyms evaluate here; an
    oracle that reads the scene gets POPE accuracy 1 and CHAIR 0 / Recall 1 (ground truth from the world's scenes)."""
    from nanoalign.toy import files
    from nanoalign.toy import world as T
    paths = files.build_world(str(tmp_path / "world"), n_train=20, n_eval=4)
    scenes = files.load_scenes(paths["scenes_eval"])
    by_pixels = {T.render(sc).tobytes(): sc for sc in scenes.values()}

    def oracle(images, prompts):
        out = []
        for im, p in zip(images, prompts):
            import numpy as np
            sc = by_pixels[np.asarray(im).tobytes()]
            if p.startswith("Is there a"):
                kind = p[len("Is there a"):].split(" in the image")[0].strip()
                out.append("Yes, there is." if kind in T.groups(sc) else "No, there is not.")
            else:
                out.append(T.caption(sc))
        return out
    monkeypatch.setattr(E, "model_generate_fn", lambda d, max_new, bs, template="vicuna_v1": oracle)
    (tmp_path / "oracle").mkdir()
    common = ["--model", str(tmp_path / "oracle"), "--image-root", paths["images"], "--no-progress"]
    assert E.main(common + ["--task", "pope", "--data", paths["pope"], "--out", str(tmp_path / "p")]) == 0
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["accuracy"] == 1.0 and s["unparseable"] == 0 and set(s["splits"]) == set(E.M.POPE_SPLITS)
    for extra in ([], ["--synonyms", paths["synonyms"]]):  # the world's table, or its category names alone
        out = tmp_path / f"c{len(extra)}"
        assert E.main(common + ["--task", "chair", "--data", paths["chair_questions"], "--annotations",
                                paths["chair_coco"], "--out", str(out)] + extra) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["n_scored"] == 4 and s["chair_i"] == 0.0 and s["recall"] == 1.0 and s["mentions"] > 0


def test_image_paths_outside_the_root_are_refused(tmp_path, monkeypatch, capsys):
    """eval applies training's path check: '..', absolute paths and symlinks out of --image-root are counted
    (path_escape), never opened."""
    imgs = tmp_path / "imgs"
    make_images(imgs, ["a.jpg"])
    make_images(tmp_path / "secret", ["s.jpg"])
    (imgs / "link.jpg").symlink_to(tmp_path / "secret" / "s.jpg")
    q = lambda i, img: {"question_id": i, "image": img, "text": f"Is there a thing {i}?", "label": "yes"}
    write_jsonl(tmp_path / "pope.jsonl", [q(1, "a.jpg"), q(2, "../secret/s.jpg"), q(3, str(tmp_path / "secret/s.jpg")),
                                          q(4, "link.jpg")])
    bad = E.Counter()
    ex = E.load_pope([tmp_path / "pope.jsonl"], str(imgs), bad)
    assert [e["question_id"] for e in ex] == ["pope:1"] and dict(bad) == {"path_escape": 3}
    mm = {"question": "q", "gt_answer": "a", "image": "../secret/s.jpg"}
    write_jsonl(tmp_path / "mmhal.jsonl", [mm])
    bad = E.Counter()
    assert E.load_mmhal([tmp_path / "mmhal.jsonl"], str(imgs), bad) == [] and dict(bad) == {"path_escape": 1}


def test_nothing_evaluated_or_nothing_needed_exits_2(tmp_path, monkeypatch, capsys):
    imgs = tmp_path / "imgs"
    make_images(imgs, ["a.jpg"])
    (tmp_path / "m").mkdir()
    gen = FakeGen({})
    monkeypatch.setattr(E, "model_generate_fn", lambda d, max_new, bs, template="vicuna_v1": gen)
    common = ["--model", str(tmp_path / "m"), "--image-root", str(imgs), "--no-progress"]
    # every image missing: nothing evaluated -> 2 with the counted reason (the run itself went through)
    write_jsonl(tmp_path / "pope.jsonl", [{"question_id": i, "image": f"gone{i}.jpg", "text": "Is?", "label": "no"}
                                          for i in range(3)])
    assert E.main(common + ["--task", "pope", "--data", str(tmp_path / "pope.jsonl"), "--out", str(tmp_path / "o1")]) == 2
    assert "error: m: 0 example(s) evaluated, 3 row(s) failed (missing_image=3)" in capsys.readouterr().err
    # the wrong file (no POPE rows at all): refused before any generation
    write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x", "chosen": "y"}])
    assert E.main(common + ["--task", "pope", "--data", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert "no usable example" in capsys.readouterr().err and gen.calls == 0
    # CHAIR without annotations: refused before generating any caption
    write_jsonl(tmp_path / "chair.jsonl", [{"image": "a.jpg"}])
    assert E.main(common + ["--task", "chair", "--data", str(tmp_path / "chair.jsonl"), "--out", str(tmp_path / "o3")]) == 2
    assert "needs --annotations" in capsys.readouterr().err and gen.calls == 0
    (tmp_path / "ann.json").write_text("{}")
    assert E.main(common + ["--task", "chair", "--data", str(tmp_path / "chair.jsonl"), "--annotations",
                            str(tmp_path / "ann.json"), "--out", str(tmp_path / "o4")]) == 2
    assert "unusable for CHAIR" in capsys.readouterr().err and gen.calls == 0
    # a file that is not UTF-8: one line naming the file and line
    (tmp_path / "latin.jsonl").write_bytes(b'{"question_id": 1, "image": "a.jpg", "text": "caf\xe9?", "label": "no"}\n')
    assert E.main(common + ["--task", "pope", "--data", str(tmp_path / "latin.jsonl"), "--out", str(tmp_path / "o5")]) == 2
    assert "latin.jsonl: line 1 is not UTF-8" in capsys.readouterr().err
