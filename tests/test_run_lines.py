"""What a run prints: the start lines (examples, steps, ranks, precision, outputs, the eval plan), the progress line
(loss, reward accuracy, margin, tokens/s, ETA; one plain line per N steps off a terminal), the end summary (steps,
time, tokens/s, final and best metrics, first vs last reward accuracy, where final/, metrics.jsonl and the plot are,
the command that evaluates the result), and --help (every option's default)."""
import json
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
from test_train import run, world  # noqa: E402,F401

pytest.importorskip("transformers")


def test_start_progress_and_summary_lines(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with open(world / "pope_rl.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"question_id": i, "image": f"{i}.png", "label": "yes" if i % 2 else "no",
                                "text": "Is there a cat in the image?"}) + "\n")
    out = tmp_path / "o"
    run(world, out, "--algo", "dpo", "--max-steps", 4, "--lr", 1e-3, "--amp", "--eval-data", world / "pope_rl.jsonl",
        "--eval-task", "pope", "--eval-image-root", world / "img", "--eval-every", 2, "--eval-max-new-tokens", 3,
        "--keep-best", "pope_f1")
    o = capsys.readouterr()
    start = o.out[o.out.index("run: dpo"):]
    assert "on 8 examples of" in start and "4 optimizer steps" in start and "1 rank(s)" in start
    assert "bf16 compute (--amp)" in start and f"{out}/final" in start and f"{out}/metrics.jsonl" in start
    assert "eval: pope on 4 held-out examples" in start and "3 times" in start  # steps 0, 2, 4
    assert re.search(r"first step: [\d.]+s; 4 steps take about", o.out)
    # not a terminal: one plain line per step here (4 steps < 20), no carriage return
    lines = [ln for ln in o.err.splitlines() if ln.startswith("train ")]
    assert [ln.split()[1] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"] and "\r" not in o.err
    assert all(re.search(r"step/s ETA \d+m\d\ds loss [\d.]+ \| acc [\d.]+ \| margin -?[\d.]+ \| \d+ tok/s", ln)
               for ln in lines)
    end = o.out[o.out.index("done: 4 steps in"):]
    for field in ("tokens/s", "final: loss", "reward accuracy: first 1 step(s)", "eval: step 0 -> step 4",
                  "pope_f1", f"checkpoint: {out}/final", f"metrics:    {out}/metrics.jsonl",
                  f"evaluate:   python -m nanoalign.eval --model {out}/final --task pope"):
        assert field in end, field
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")][1:]
    acc = [r["accuracy"] for r in recs if "accuracy" in r]
    assert f"{acc[0]:.3f} -> last 1 step(s) {acc[-1]:.3f}" in end
    pytest.importorskip("matplotlib")
    assert f"plot:       {out}/curves.png" in end and (out / "curves.png").is_file()


def test_every_help_option_shows_its_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    opts = re.split(r"\n  (?=--)", text.split("options:", 1)[1])[1:]
    assert len(opts) > 40
    for o in opts:
        name = o.split()[0]
        if name in ("--help",) or "store_true" in o:
            continue
        assert "default" in o or o.rstrip().endswith("(default: False)"), f"{name}: no default in --help"


def test_wandb_offline_run_holds_the_metrics(world, tmp_path):  # noqa: F811
    """--wandb with the client's offline mode (no account, no network): the run file holds the logged keys."""
    pytest.importorskip("wandb")
    import subprocess
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--model", str(world / "ckpt"), "--data",
                        str(world / "prefs.jsonl"), "--image-root", str(world / "img"), "--algo", "dpo",
                        "--max-steps", "2", "--batch-size", "2", "--wandb", "nanoalign-test", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert all(k.encode() in data for k in ("loss", "grad_norm", "margin", "tokens_per_s"))
