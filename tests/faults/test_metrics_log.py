"""Seam: metrics.jsonl, rewritten on resume."""
import json
import os

import pytest

from nanoalign import runs


def _log(path, n):
    path.write_text(json.dumps({"header": {}}) + "\n" + "".join(json.dumps({"step": i}) + "\n" for i in range(1, n + 1)))


def test_torn_last_line_is_recovered(tmp_path, capsys):
    """A torn last line in metrics.jsonl (a kill mid-write) -> dropped on resume with a warning naming file and line."""
    f = tmp_path / "metrics.jsonl"
    _log(f, 3)
    with open(f, "a") as h:
        h.write('{"step": 4, "lo')
    runs.MetricsLog(f, {}, resume_step=3)
    assert f"{f}:5: torn or unreadable line dropped" in capsys.readouterr().out
    assert [json.loads(x).get("step") for x in f.read_text().splitlines()] == [None, 1, 2, 3]


def test_kill_during_rewrite_keeps_the_file(tmp_path, monkeypatch):
    """A kill while metrics.jsonl is rewritten on resume (simulated: the rename never happens) -> the old file is
    whole, never 0 bytes; steps past the resumed one are dropped once the rewrite completes."""
    f = tmp_path / "metrics.jsonl"
    _log(f, 4)
    before = f.read_text()

    def killed(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.MetricsLog(f, {}, resume_step=2)
    assert f.read_text() == before
    monkeypatch.undo()
    runs.MetricsLog(f, {}, resume_step=2)
    assert [json.loads(x).get("step") for x in f.read_text().splitlines()] == [None, 1, 2]
