"""Helpers of the fault suite: train.py in-process or as a CLI on the tiny world of tests/test_train.py."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "train.py")


def argv(world, out, *extra):
    return ["--model", str(world / "ckpt"), "--data", str(world / "prefs.jsonl"), "--image-root", str(world / "img"),
            "--out", str(out), "--batch-size", "2", *map(str, extra)]


def main(world, out, *extra):
    import train
    return train.main(train.parse_args(argv(world, out, *extra)))


def cli(world, out, *extra, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TRAIN, *argv(world, out, *extra)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def steps(out):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "step" in r]


def error_lines(stderr):
    """stderr without progress-bar lines and without the one-time "logprobs backend: ..." line (printed by the first
    run on a new native build and thread count: every change to csrc/logprobs.cpp is a new build)."""
    return [ln for ln in stderr.replace("\r", "\n").strip().splitlines()
            if ln.strip() and "step/s" not in ln and "it/s" not in ln and not ln.startswith("logprobs backend: ")]
