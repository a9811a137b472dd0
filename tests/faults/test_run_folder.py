"""Seam: the output folder (--out): one run per folder, resume only what matches, a lock for the life of the run."""
import subprocess
import sys

import pytest

from common import REPO, cli, error_lines, main, steps


def test_folder_holding_a_run_is_refused(world, tmp_path):
    """A non-empty --out holding a run, without --resume or --overwrite -> refused with one line; --overwrite
    starts over (the old metrics and checkpoints are gone)."""
    main(world, tmp_path, "--algo", "dpo", "--max-steps", 2, "--save-every", 1)
    with pytest.raises(ValueError, match="holds a run.*--resume.*--overwrite"):
        main(world, tmp_path, "--algo", "dpo", "--max-steps", 2)
    main(world, tmp_path, "--algo", "dpo", "--max-steps", 1, "--overwrite")
    assert [r["step"] for r in steps(tmp_path)] == [1]
    assert not list(tmp_path.glob("step-*"))


def test_resume_with_changed_settings_names_each(world, tmp_path):
    """--resume with changed settings (here --seed and --lr; every setting but output/logging ones, and the world
    size, is compared) -> stops with one line naming each changed setting; --allow-changed continues deliberately."""
    base = ["--algo", "dpo", "--max-steps", 3, "--save-every", 1]
    main(world, tmp_path, *base)
    import shutil
    shutil.rmtree(tmp_path / "final")
    with pytest.raises(ValueError) as e:
        main(world, tmp_path, *base, "--resume", "--seed", 5, "--lr", 1e-3)
    msg = str(e.value)
    assert "--seed: 0 -> 5" in msg and "--lr: 1e-05 -> 0.001" in msg and "--allow-changed" in msg
    main(world, tmp_path, *base, "--resume", "--seed", 5, "--allow-changed")
    assert (tmp_path / "final").is_dir()


def test_finished_run_says_so(world, tmp_path):
    """--resume on a finished run -> says so and exits 0 without training or overwriting final/."""
    main(world, tmp_path, "--algo", "dpo", "--max-steps", 1)
    before = (tmp_path / "final" / "model.safetensors").stat().st_mtime_ns
    r = cli(world, tmp_path, "--algo", "dpo", "--max-steps", 1, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "this run is finished" in r.stdout
    assert (tmp_path / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_out_or_ref_cache_is_a_file(world, tmp_path):
    """--out or --ref-cache pointing at a file -> one line, exit 2."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="--out .*file: is a file"):
        main(world, f, "--algo", "dpo", "--max-steps", 1)
    with pytest.raises(ValueError, match="--ref-cache .*file: is a file"):
        main(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 1, "--ref-cache", f)


def test_second_process_in_the_same_folder(world, tmp_path):
    """A second run in an --out that a live process holds (an orphaned worker, a concurrent run) -> refused with one
    line naming the holder's pid, exit 2; the folder is free again once the holder exits."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from nanoalign import runs; runs.lock(sys.argv[2]); print('locked', flush=True);"
                               "time.sleep(120)", REPO, str(tmp_path / "o")],
                              stdout=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = cli(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 1)
        assert r.returncode == 2
        lines = error_lines(r.stderr)
        assert len(lines) == 1 and f"in use by another run (pid {holder.pid}" in lines[0], lines
    finally:
        holder.kill()
        holder.wait()
    main(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 1)


def test_partial_saves_removed_at_start(world, tmp_path):
    """Temporary folders of a save killed earlier (.step-N.tmp-PID) -> removed at the start of the next run."""
    (tmp_path / ".step-000002.tmp-999").mkdir(parents=True)
    (tmp_path / ".step-000002.tmp-999" / "model.safetensors").write_bytes(b"\0" * 1000)
    main(world, tmp_path, "--algo", "dpo", "--max-steps", 1)
    assert not list(tmp_path.glob(".*tmp-*"))


def test_resume_of_a_run_saved_before_an_option_existed(world, tmp_path):
    """--resume of a checkpoint written by an older version, whose saved arguments lack a newer option -> the option
    at its default is no change (it keeps the old behaviour); set away from its default, it is named."""
    import json
    base = ["--algo", "dpo", "--max-steps", 3, "--save-every", 1]
    main(world, tmp_path, *base)
    import shutil
    shutil.rmtree(tmp_path / "final")
    for ckpt in tmp_path.glob("step-*"):  # what an older version wrote: no --sft-weight, no non_default
        path = ckpt / "train_state.json"
        state = json.loads(path.read_text())
        for k in ("sft_weight", "non_default"):
            state["args"].pop(k, None)
        path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="--sft-weight: None -> 0.5"):
        main(world, tmp_path, *base, "--resume", "--sft-weight", 0.5)
    main(world, tmp_path, *base, "--resume")
    assert (tmp_path / "final").is_dir()


@pytest.mark.parametrize("new_lr", [1e-4, 1e-5])  # 1e-5: train.py's default, typed on the command line
def test_resume_allow_changed_lr_uses_the_new_rate(world, tmp_path, new_lr):
    """--resume --allow-changed with another --lr, also when the new one is train.py's default typed explicitly
    (--lr 1e-5 after a run at 1e-3) -> without --allow-changed refused naming `--lr: 0.001 -> 1e-05`; with it the
    steps after the checkpoint run on the new rate's schedule (the fresh run's rate at the same step), not the saved
    rate (the restored scheduler carried the old one)."""
    import shutil
    base = ["--algo", "dpo", "--max-steps", 4, "--save-every", 1]
    main(world, tmp_path / "a", *base, "--lr", 1e-3)
    shutil.rmtree(tmp_path / "a" / "final")
    shutil.rmtree(tmp_path / "a" / "step-000003")
    with pytest.raises(ValueError, match=f"--lr: 0.001 -> {new_lr}"):
        main(world, tmp_path / "a", *base, "--lr", new_lr, "--resume")
    main(world, tmp_path / "a", *base, "--lr", new_lr, "--resume", "--allow-changed")
    main(world, tmp_path / "b", *base, "--lr", new_lr)
    lr = lambda d: {r["step"]: r["lr"] for r in steps(d)}  # noqa: E731
    assert lr(tmp_path / "a")[3] == lr(tmp_path / "b")[3] and lr(tmp_path / "a")[4] == lr(tmp_path / "b")[4]
    assert lr(tmp_path / "a")[2] == pytest.approx(1e-3 / new_lr * lr(tmp_path / "b")[2])  # before: the old rate


def test_resume_refuses_another_algo_and_extending_a_finished_run(world, tmp_path):
    """--resume of a finished run with a larger --max-steps (it said 'nothing to do' after a warning that promised
    the change), or with another --algo even under --allow-changed (a ppo run continued as rloo) -> one line
    naming the way on (a new run from the weights), nothing trained."""
    main(world, tmp_path, "--algo", "dpo", "--max-steps", 2, "--save-every", 1)
    with pytest.raises(ValueError, match=r"is finished .*does not extend a finished one \(--max-steps: 2 -> 3\)"):
        main(world, tmp_path, "--algo", "dpo", "--max-steps", 3, "--resume", "--allow-changed")
    import shutil
    shutil.rmtree(tmp_path / "final")
    assert list(tmp_path.glob("step-*"))
    with pytest.raises(ValueError, match="is a --algo dpo run; --algo ipo cannot continue it"):
        main(world, tmp_path, "--algo", "ipo", "--max-steps", 2, "--resume", "--allow-changed")
    assert [r["step"] for r in steps(tmp_path)] == [1, 2]
