"""Evaluation during training (nanoalign/evaltrain.py) on a tiny checkpoint: the eval keys land on the right steps of
metrics.jsonl on 1 and 2 ranks; step 0's POPE / CHAIR numbers equal `python -m nanoalign.eval` on the initial
checkpoint (the evaluator as users run it); 2 ranks give 1 rank's held-out preference metrics; --keep-best keeps the
best checkpoint; bad eval options are one line."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
from test_train import run, world  # noqa: E402,F401  (world: the module fixture)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def heldout(world):  # noqa: F811
    """POPE questions and CHAIR rows + COCO annotations over the tiny world's 8 images (cat = 17, dog = 18)."""
    d = world
    with open(d / "pope.jsonl", "w") as f:
        for i in range(5):
            for obj, label in (("cat", "yes" if i % 2 else "no"), ("dog", "no" if i % 2 else "yes")):
                f.write(json.dumps({"question_id": f"{i}{obj}", "image": f"{i}.png", "label": label,
                                    "text": f"Is there a {obj} in the image?"}) + "\n")
    ann = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(8)],
           "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}],
           "annotations": [{"image_id": i, "category_id": 17 if i % 2 else 18} for i in range(8)]}
    (d / "ann.json").write_text(json.dumps(ann))
    with open(d / "chair.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"image_id": i, "prompt": "Describe the image."}) + "\n")
    return d


def _evals(out):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
            for r in map(json.loads, open(out / "metrics.jsonl")) if "step" in r}


def test_eval_keys_on_the_right_steps_and_step0_equals_the_eval_cli(heldout, tmp_path):
    d = heldout
    run(d, tmp_path / "pope", "--algo", "dpo", "--max-steps", 5, "--lr", 1e-3, "--eval-data", d / "pope.jsonl",
        "--eval-task", "pope", "--eval-every", 2, "--eval-image-root", d / "img", "--eval-max-new-tokens", 4)
    ev = _evals(tmp_path / "pope")
    assert sorted(s for s, e in ev.items() if e) == [0, 2, 4, 5]  # before, every 2, after the last
    # a ratio over zero rows (precision without a "yes" answer) is not logged
    assert {"eval/pope_accuracy", "eval/pope_yes_ratio"} <= set(ev[2]) <= \
        {f"eval/pope_{k}" for k in ("accuracy", "f1", "precision", "recall", "yes_ratio")}
    # the initial policy through the CLI evaluator (its own loading, batching and prompt path)
    from nanoalign import eval as E
    rc = E.main(["--model", str(d / "ckpt"), "--task", "pope", "--data", str(d / "pope.jsonl"), "--image-root",
                 str(d / "img"), "--out", str(tmp_path / "cli"), "--max-new-tokens", "4", "--no-progress"])
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert rc in (0, 2)
    for k in ("accuracy", "f1", "precision", "recall", "yes_ratio"):
        if cli[k] is None:  # n/a in the CLI's table: absent from the training log
            assert f"eval/pope_{k}" not in ev[0]
        else:
            assert ev[0][f"eval/pope_{k}"] == pytest.approx(cli[k])


def test_chair_during_training_and_keep_best(heldout, tmp_path):
    d = heldout
    run(d, tmp_path / "c", "--algo", "dpo", "--max-steps", 2, "--lr", 1e-3, "--eval-data", d / "chair.jsonl",
        "--eval-task", "chair", "--eval-annotations", d / "ann.json", "--eval-image-root", d / "img",
        "--eval-max-new-tokens", 12, "--keep-best", "chair_s")
    ev = _evals(tmp_path / "c")
    assert sorted(s for s, e in ev.items() if e) == [0, 2]
    from nanoalign import eval as E
    E.main(["--model", str(d / "ckpt"), "--task", "chair", "--data", str(d / "chair.jsonl"), "--image-root",
            str(d / "img"), "--annotations", str(d / "ann.json"), "--out", str(tmp_path / "cli"),
            "--max-new-tokens", "12", "--no-progress"])
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert ev[0]["eval/chair_length"] == pytest.approx(cli["mean_length"]) and cli["mean_length"] > 0
    if cli["chair_i"] is not None:
        assert ev[0]["eval/chair_i"] == pytest.approx(cli["chair_i"])
    else:  # no object named: CHAIR_i is n/a (the CLI's null), not logged, never 0
        assert "eval/chair_i" not in ev[0]
    assert ev[0]["eval/chair_s"] == pytest.approx(cli["chair_s"])
    assert (tmp_path / "c" / "best" / "model.safetensors").is_file()


def test_prefs_eval_two_ranks_match_one_rank(heldout, tmp_path):
    """FSDP2 on 2 gloo ranks, an odd --eval-limit (ranks get 3 and 2 pairs, the short one pads): the same held-out
    accuracy and margin as 1 rank, at the same steps."""
    d = heldout
    common = ["--model", str(d / "ckpt"), "--data", str(d / "prefs.jsonl"), "--image-root", str(d / "img"),
              "--algo", "dpo", "--max-steps", "3", "--lr", "1e-3", "--eval-data", str(d / "prefs.jsonl"),
              "--eval-task", "prefs", "--eval-every", "2", "--eval-limit", "5", "--eval-batch-size", "2",
              "--eval-image-root", str(d / "img")]
    run(d, tmp_path / "one", *common[6:])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "train.py"), *common, "--batch-size", "1", "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _evals(tmp_path / "one"), _evals(tmp_path / "two")
    assert sorted(s for s, e in one.items() if e) == sorted(s for s, e in two.items() if e) == [0, 2, 3]
    assert one[0]["eval/pref_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before training
    assert one[3]["eval/pref_margin"] != pytest.approx(0.0, abs=1e-6)  # the optimizer moved the policy
    for s in (0, 2, 3):
        assert two[s]["eval/pref_accuracy"] == pytest.approx(one[s]["eval/pref_accuracy"])
        assert two[s]["eval/pref_margin"] == pytest.approx(one[s]["eval/pref_margin"], abs=1e-5)


def test_bad_eval_options_are_one_line(heldout):
    d = heldout
    base = ["--model", str(d / "ckpt"), "--data", str(d / "prefs.jsonl")]
    for extra, msg in ((["--eval-task", "pope"], "go together"),
                       (["--eval-data", "x", "--eval-task", "chair"], "needs --eval-annotations"),
                       (["--eval-data", "x", "--eval-task", "pope", "--keep-best", "chair_i"], "not a metric")):
        with pytest.raises(SystemExit):
            train.parse_args(base + extra)


@pytest.mark.parametrize("algo", ["grpo", "online-dpo", "rm"])
def test_eval_keys_in_every_branch_of_the_loop(heldout, tmp_path, algo):
    """RL, online and reward-model steps evaluate on the same steps as the preference step (the loop's branches share
    its end of step); before, an RL run evaluated only at step 0."""
    d = heldout
    extra = {"grpo": ["--k", 2, "--max-new-tokens", 4, "--reward", "oracle", "--no-signal-limit", 0],  # the oracle
             "online-dpo": ["--max-new-tokens", 4, "--annotator", "oracle", "--no-signal-limit", 0],  # ties all: no
             "rm": []}[algo]  # nothing-learned check (the eval keys are the point here)
    if algo != "rm":  # the toy judge's scenes: every row names its scene (none of the tiny world's words are kinds)
        rows = [json.loads(line) for line in open(d / "prefs.jsonl")]
        with open(d / f"prefs_{algo}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({**r, "scene": {"objects": []}}) + "\n")
    data = d / (f"prefs_{algo}.jsonl" if algo != "rm" else "prefs.jsonl")
    argv = ["--model", str(d / "ckpt"), "--data", str(data), "--image-root", str(d / "img"), "--out",
            str(tmp_path / algo), "--batch-size", "2", "--algo", algo, "--max-steps", "3", "--eval-data",
            str(d / "pope.jsonl"), "--eval-task", "pope", "--eval-every", "2", "--eval-image-root", str(d / "img"),
            "--eval-max-new-tokens", "2", *map(str, extra)]
    train.main(train.parse_args(argv))
    ev = _evals(tmp_path / algo)
    assert sorted(s for s, e in ev.items() if e) == [0, 2, 3]
