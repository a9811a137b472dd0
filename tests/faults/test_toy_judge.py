"""Seam: the toy world's judge (--reward oracle, --annotator oracle) given a user's --model/--data."""
import json

import pytest

from common import cli, error_lines, main

RL = ["--algo", "grpo", "--k", 2, "--max-new-tokens", 4, "--max-steps", 1]
ONLINE = ["--algo", "online-dpo", "--max-new-tokens", 4, "--max-steps", 1]
REWARD_INSTEAD = "--reward FILE.py:FN (your own rule) or rm:PATH (a reward model)"
ANNOTATOR_INSTEAD = "--annotator rm:PATH (a reward model) or vlm:PATH (a judge VLM)"


def _rows(world, scene_ids=(), keep_id=True):
    """The world's 8 pairs; those whose id is in scene_ids carry a toy scene."""
    rows = [json.loads(line) for line in open(world / "prefs.jsonl")]
    for r in rows:
        if r["id"] in scene_ids:
            r["scene"] = {"objects": []}
        if not keep_id:
            del r["id"]
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("spec,extra,scenes,first,n,why,instead", [
    ("oracle", RL, (), "id 0", 8, "no 'scene' key", REWARD_INSTEAD),
    ("oracle", RL, ("0", "1", "2"), "id 3", 5, "no 'scene' key", REWARD_INSTEAD),
    ("oracle", ONLINE, ("0",), "id 1", 7, "no 'scene' key", ANNOTATOR_INSTEAD),
    ("oracle", ONLINE, None, "line 1", 8, "no 'scene' key", ANNOTATOR_INSTEAD),  # rows without ids: the line
])
def test_toy_judge_on_data_without_scenes(world, tmp_path, spec, extra, scenes, first, n, why, instead):
    """--reward oracle (RL) or --annotator oracle (online) with data whose rows carry no toy `scene` (a user's own
    data) -> one line before training naming the option, the data file, the first row without a scene and how many
    lack one, and what to use instead (--reward FILE.py:FN or rm:PATH; --annotator rm:PATH or vlm:PATH); it failed at
    the first reward call."""
    data = _write(tmp_path / "mine.jsonl", _rows(world, scenes or (), keep_id=scenes is not None))
    option = "--reward" if "grpo" in extra else "--annotator"
    with pytest.raises(ValueError) as e:
        main(world, tmp_path / "out", *extra, option, spec, "--data", data)
    assert str(e.value) == (f"{option} {spec} is the toy world's judge and needs each row's toy scene: {data}: "
                            f"{first} ({n} of 8 rows) has {why}; for this data use {instead}")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_toy_judge_with_a_scenes_file_that_lacks_an_image(world, tmp_path):
    """--reward oracle:SCENES whose scenes file has no scene for some row's image -> one line naming the first such
    row and its image file, before training."""
    data = _write(tmp_path / "mine.jsonl", _rows(world))
    scenes = _write(tmp_path / "scenes.jsonl", [{"image": f"{i}.png", "objects": []} for i in range(8) if i != 5])
    with pytest.raises(ValueError) as e:
        main(world, tmp_path / "out", *RL, "--reward", f"oracle:{scenes}", "--data", data)
    assert str(e.value) == (f"--reward oracle:{scenes} is the toy world's judge and needs each row's toy scene: "
                            f"{data}: id 5 (1 of 8 rows) has no scene: its image '5.png' is not in {scenes}; for this data use "
                            f"{REWARD_INSTEAD}")


def test_toy_judge_refusal_from_the_command_line(world, tmp_path):
    """`python train.py --model M --data MINE --algo rloo --reward oracle` on rows without scenes -> exit 2 and that
    one line (no traceback)."""
    r = cli(world, tmp_path / "out", "--algo", "rloo", "--reward", "oracle", "--k", 2, "--reward-norm", 0,
            "--max-new-tokens", 4, "--max-steps", 1)
    lines = [ln for ln in error_lines(r.stderr)]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --reward oracle is the toy world's judge") and REWARD_INSTEAD in lines[0]
