"""Beyond one machine, simulated on this one: two torchrun agents (`--nnodes 2`, one process each, a c10d rendezvous
on localhost) run 3 DPO steps of train.py on a tiny checkpoint (FSDP2 on gloo) and log the same losses and gradient
norms as the single-node two-process run (`torchrun --standalone --nproc_per_node 2`). On real machines the same
command runs once per node with --rdzv-endpoint set to the first node's address (docs/scaling.md)."""
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import world  # noqa: E402,F401  (the tiny checkpoint + data fixture)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "step" in r]


def test_two_nodes_match_one_node_two_processes(world, tmp_path):  # noqa: F811
    train_args = ["--model", str(world / "ckpt"), "--data", str(world / "prefs.jsonl"), "--image-root",
                  str(world / "img"), "--algo", "dpo", "--max-steps", "3", "--lr", "1e-3", "--batch-size", "1",
                  "--ref-cache", str(tmp_path / "refcache")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "torch.distributed.run"]
    train = os.path.join(REPO, "train.py")
    one = subprocess.run(run + ["--standalone", "--nproc_per_node", "2", train, *train_args, "--out",
                                str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    agents = [subprocess.Popen(run + ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                                      "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                                      "--rdzv-id", "nanoalign-test", train, *train_args, "--out",
                                      str(tmp_path / "two")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for node in (0, 1)]
    outs = []
    for a in agents:
        try:
            outs.append(a.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for b in agents:
                b.kill()
            pytest.fail("two-node run timed out")
    for a, (_, err) in zip(agents, outs):
        assert a.returncode == 0, err[-3000:]
    single, multi = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r["step"] for r in multi] == [1, 2, 3] and [r["step"] for r in single] == [1, 2, 3]
    header = json.loads(open(tmp_path / "two" / "metrics.jsonl").readline())
    assert header["header"]["world"] == 2  # two ranks of one job, not two jobs of one rank
    for a, b in zip(single, multi):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert single[-1]["loss"] != pytest.approx(single[0]["loss"], abs=1e-7)  # the steps moved the policy
