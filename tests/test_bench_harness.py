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


PEER = sys.executable  # an existing file: --peer-python is only checked to exist before the world is built


@pytest.mark.parametrize("bench,args,line", [
    ("bench_rl", ["--reps", "0"], "--reps 0: must be >= 1"),
    ("bench_rl", ["--steps", "1"], "--steps 1: must be >= 2 (the first step is dropped)"),
    ("bench_rl", ["--k", "1"], "--k 1: must be >= 2 (grpo and rloo compare each sample with the others of its "
     "prompt)"),
    ("bench_rl", ["--threads", "-1"], "--threads -1: must be >= 0 (0: inherited)"),
    ("bench_rl", ["--max-new", "0"], "--max-new 0: must be >= 1"),
    ("bench_rl", ["--config", "nope"], "argument --config: invalid choice: 'nope' (choose from 'tiny', 'llava')"),
    ("bench_online", ["--prompts=-2"], "--prompts -2: must be >= 1"),
    ("bench_online", ["--reps", "3", "--reps", "0"], "--reps 0: must be >= 1"),
    ("bench_online", ["--threads", "x"], "argument --threads: invalid int value: 'x'"),
    ("bench_shared_prompts", ["--threads", "0"], "--threads 0: must be >= 1"),
    ("bench_shared_prompts", ["--reps", "0"], "--reps 0: must be >= 1"),
    ("bench_shared_prompts", ["--cases", "dpo,ppo"], "--cases dpo,ppo: unknown case 'ppo' (choose from dpo, rl, "
     "comma-separated)"),
])
def test_bad_bench_argument_is_one_line(capsys, bench, args, line):
    """A bad argument of a benchmark: one line naming it, exit 2, before any world or model is built (a traceback
    from torch.set_num_threads, exit 1 from a bare SystemExit, or argparse's usage block before)."""
    import importlib
    mod = importlib.import_module(bench)
    peer = ["--peer-python", PEER] if bench != "bench_shared_prompts" else []
    with pytest.raises(SystemExit) as e:
        mod.main(peer + args)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {line} (python bench/{bench}.py --help lists the options)\n"


def test_missing_peer_python_is_one_line(capsys, tmp_path):
    import bench_online
    with pytest.raises(SystemExit) as e:
        bench_online.main(["--peer-python", str(tmp_path / "nope")])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: no such file or folder: {tmp_path / 'nope'} (--peer-python) (python "
                                       "bench/bench_online.py --help lists the options)\n")
