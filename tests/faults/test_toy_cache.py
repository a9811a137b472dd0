"""Seam: the toy cache (--toy-cache): one toy pipeline per cache at a time, and a lock left by a dead one is no lock.
The pipelines here are train.py's real default run with the world/base-model stage (prepare_base) replaced by a wait
or a stop, so each test takes seconds."""
import os
import signal
import subprocess
import sys

from common import REPO, TRAIN, error_lines

# train.py's default run with its prepare_base (the first stage after the lock) replaced: "wait" holds the cache
# (the first pipeline, busy building), "stop" exits 3 there (a second pipeline that got past the lock)
PIPELINE = """import runpy, sys, time
sys.path.insert(0, sys.argv[1])
import nanoalign.toy.run as r
def wait(*a, **k):
    print("building", flush=True)
    time.sleep(120)
def stop(*a, **k):
    sys.exit(3)
r.prepare_base = wait if sys.argv[4] == "wait" else stop
sys.argv = ["train.py", "--algo", "dpo", "--toy-cache", sys.argv[2], "--out", sys.argv[3]]
runpy.run_path(%r, run_name="__main__")
""" % TRAIN


def pipeline(tmp_path, out, mode, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-c", PIPELINE, REPO, str(tmp_path / "cache"), str(tmp_path / out), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def cache_of(root):
    from nanoalign.toy import base
    return base.cache_dir({**base.SETTINGS, "toy_seed": 0}, root)


def start_holder(tmp_path):
    holder = pipeline(tmp_path, "a", "wait")
    line = holder.stdout.readline()
    while line and line.strip() != "building":  # the pipeline's start lines, then the wait inside the lock
        line = holder.stdout.readline()
    assert line.strip() == "building", holder.stderr.read()[-2000:]
    return holder


def test_second_toy_run_on_the_same_cache_refused(tmp_path):
    """A second toy pipeline on a --toy-cache that a running one holds -> refused with one line naming the cache
    and the holder's pid, exit 2, before it builds or writes anything."""
    holder = start_holder(tmp_path)
    try:
        second = pipeline(tmp_path, "b", "stop")
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-2000:]  # 3: it got past the lock
        lines = error_lines(err)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {cache_of(tmp_path / 'cache')} is in use by another run (pid {holder.pid}")
        assert not (tmp_path / "b").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_toy_cache_lock_of_a_dead_process_does_not_block(tmp_path):
    """The lock file of a toy pipeline killed with SIGKILL (its pid still written in it) -> the next pipeline on that
    cache takes the lock and goes on (the kernel released the dead process's flock)."""
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = cache_of(tmp_path / "cache") / ".lock"
    assert lock.read_text().strip() == str(holder.pid)  # stale: the dead holder's pid
    second = pipeline(tmp_path, "b", "stop")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 3, err[-2000:]  # past the lock, stopped at the world/base stage
    assert lock.read_text().strip() == str(second.pid)
