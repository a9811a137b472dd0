"""Seam: the user stopping a run (Ctrl-C) and the process group's timeout."""
import datetime
import os
import signal
import subprocess
import sys
import time

from common import TRAIN, argv, error_lines


def test_ctrl_c_is_one_line(world, tmp_path):
    """Ctrl-C (SIGINT) during training -> one line saying where the last checkpoint is and the --resume command;
    exit 130."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, TRAIN, *argv(world, tmp_path, "--algo", "dpo", "--max-steps", 400,
                                                         "--save-every", 1)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         # a suite started in the background (`pytest &` in a script) inherits SIGINT ignored, and
                         # Python then installs no KeyboardInterrupt handler: give the run a terminal's default
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t = time.time()
    while not (tmp_path / "step-000001" / "train_state.json").exists():
        assert p.poll() is None and time.time() - t < 240, p.stderr.read()[-2000:] if p.poll() is not None else ""
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"interrupted; last checkpoint: {tmp_path}/step-") and "--resume" in lines[0]
    assert f"--out {tmp_path}" in lines[0]


def test_process_group_timeout_is_long(tmp_path):
    """A long single-rank phase under torchrun (the toy's base training while the others wait) -> the process group
    is created with a 240-minute timeout (NANOALIGN_PG_TIMEOUT_MIN), not gloo's 30-minute default."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    from common import REPO
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import datetime, torch.distributed as dist; "
             "from nanoalign import trainutil as tu; seen = {}; real = dist.init_process_group\n"
             "def spy(*a, **kw):\n    seen.update(kw); return real(*a, **kw)\n"
             "dist.init_process_group = spy; tu.init_distributed(False); print(seen['timeout'].total_seconds())")
    r = subprocess.run([sys.executable, "-c", probe, REPO], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip()) == datetime.timedelta(minutes=240).total_seconds()
