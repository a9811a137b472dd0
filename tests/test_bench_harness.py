"""The TRL step benchmarks' own side runs (bench/bench_rl.py, bench/bench_online.py).

Their harness patches train.py from outside (a per-step CPU-time and memory probe on the metrics log) and feeds
train.py the same flags as the peer; when the metrics log moved from trainutil to runs, both benchmarks failed at
their first run and no test noticed. This runs our side of each for two tiny steps (TRL is not needed) and checks
the figures the tables are made from.
"""
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import bench_rl
    d = tmp_path_factory.mktemp("benchworld")
    bench_rl.make_world(d, n=4)
    return d


ARGS = types.SimpleNamespace(steps=2, k=2, max_new=4, prompts=2)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rl_bench_ours_side_runs(world, algo):
    import bench_rl
    t, cpu, mem, mem_all, anon, mean_len = bench_rl.ours(algo, world, ARGS, "t")
    assert len(t) == 1 and len(cpu) == 1 and t[0] > 0 and cpu[0] > 0  # 2 steps, the first dropped
    assert mem > 0 and mem_all >= mem and anon > 0
    assert mean_len == ARGS.max_new  # EOS is never sampled in the bench world: every response is max_new long


def test_online_bench_ours_side_runs(world):
    import bench_online
    kept = []
    t, cpu, mem, mem_all, anon, mean_len = bench_online.ours(world, ARGS, "t", kept)
    assert len(t) == 1 and len(cpu) == 1 and t[0] > 0 and cpu[0] > 0
    assert mem > 0 and anon > 0 and mean_len == ARGS.max_new
    assert len(kept) == 2 and all(0 <= k <= ARGS.prompts for k in kept)
