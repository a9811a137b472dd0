"""nanoalign.plot: draws the logged metrics of train.py's metrics.jsonl; clear errors on bad input."""
import json

import pytest

from nanoalign.plot import main, panels, read_metrics, run_names

pytest.importorskip("matplotlib")


def _run(path, algo, steps=5, loss0=0.7, extra=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"header": {"config": {"algo": algo}}})] + [
        json.dumps({"step": s, "loss": loss0 - 0.01 * s, "margin": 0.1 * s, "lr": 1e-5, "time_s": 1.0,
                    **(extra(s) if extra else {})}) for s in range(1, steps + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_writes_png_constant_series_listed_not_drawn(tmp_path, capsys):
    m = _run(tmp_path / "run" / "metrics.jsonl", "dpo")
    m.write_text(m.read_text() + "{broken\n")
    assert len(read_metrics(str(m))) == 5
    out = tmp_path / "c.png"
    assert main([str(m), "--out", str(out), "--smooth", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 panels, 1 run(s)" in capsys.readouterr().out  # loss, margin; lr is constant; step/time_s never panels


def test_loss_split_per_algorithm_and_eval_keys_after_training_keys():
    runs = {"dpo": [{"step": 1, "loss": 0.69, "margin": 0.0}, {"step": 2, "loss": 0.6, "margin": 0.1}],
            "ipo": [{"step": 1, "loss": 25.0, "margin": 0.0}, {"step": 2, "loss": 20.0, "margin": 0.2,
                                                              "eval/pope_acc": 80.0}]}
    chosen, constant = panels(runs, {"dpo": "dpo", "ipo": "ipo"})
    titles = [t for t, _ in chosen]
    assert titles == ["loss (dpo)", "loss (ipo)", "margin", "eval/pope_acc"]
    assert constant == {}
    assert dict(chosen)["loss (ipo)"] == [("ipo", "loss")]
    same, _ = panels(runs, {"dpo": "dpo", "ipo": "dpo"})
    assert [t for t, _ in same][0] == "loss"


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path, capsys):
    a = _run(tmp_path / "a" / "dpo" / "metrics.jsonl", "dpo")
    b = _run(tmp_path / "b" / "dpo" / "metrics.jsonl", "dpo", loss0=0.9)
    assert run_names([str(a), str(b)]) == ["a/dpo", "b/dpo"]
    assert run_names([str(tmp_path / "x" / "metrics.jsonl"), str(tmp_path / "y" / "metrics.jsonl")]) == ["x", "y"]
    assert main([str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    assert "2 run(s)" in capsys.readouterr().out
    assert main([str(a), str(a)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_plot_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "m.jsonl"
    empty.write_text(json.dumps({"header": {}}) + "\n")
    assert main([str(empty)]) == 2
    assert "no per-step records" in capsys.readouterr().err
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x89\xff\xfe\x00" * 100)
    assert main([str(binary)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: not a text file" in err and err.count("\n") == 1


def test_keys_select_panels_in_order_and_prefixes(tmp_path, capsys):
    runs = {"r": [{"step": 1, "loss": 0.7, "margin": 0.0, "eval/chair_i": 0.2, "eval/recall": 0.9},
                  {"step": 2, "loss": 0.6, "margin": 0.1, "eval/chair_i": 0.1, "eval/recall": 0.8}]}
    chosen, constant = panels(runs, None, ["margin", "eval/"])
    assert [t for t, _ in chosen] == ["margin", "eval/chair_i", "eval/recall"] and constant == {}
    with pytest.raises(ValueError, match="--keys bogus"):
        panels(runs, None, ["bogus"])
    m = _run(tmp_path / "run" / "metrics.jsonl", "dpo")
    assert main([str(m), "--keys", "margin,loss", "--out", str(tmp_path / "c.png")]) == 0
    assert "2 panels" in capsys.readouterr().out
    assert main([str(m), "--keys", "eval/"]) == 2
    assert "--keys eval/: no such numeric metric" in capsys.readouterr().err
