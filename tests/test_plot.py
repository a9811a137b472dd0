"""nanoalign.plot: draws every logged metric from train.py's metrics.jsonl; clear errors on bad input."""
import json

import pytest

from nanoalign.plot import main, read_metrics

pytest.importorskip("matplotlib")


def test_plot_writes_png_with_a_panel_per_metric(tmp_path, capsys):
    m = tmp_path / "run" / "metrics.jsonl"
    m.parent.mkdir()
    lines = [json.dumps({"header": {"config": {}}})] + [
        json.dumps({"step": s, "loss": 0.7 - 0.01 * s, "margin": 0.1 * s, "lr": 1e-5, "time_s": 1.0}) for s in range(1, 6)]
    m.write_text("\n".join(lines) + "\n{broken\n")
    assert len(read_metrics(str(m))) == 5
    out = tmp_path / "c.png"
    assert main([str(m), "--out", str(out), "--smooth", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 panels, 1 run(s)" in capsys.readouterr().out  # loss, margin, lr (step and time_s are not panels)


def test_plot_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "m.jsonl"
    empty.write_text(json.dumps({"header": {}}) + "\n")
    assert main([str(empty)]) == 2
    assert "no per-step records" in capsys.readouterr().err
