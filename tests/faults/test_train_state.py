"""Seam: the training state read on --resume (train_state.json + train_state.safetensors)."""
import json
import os
import pickle

import pytest

from common import cli, error_lines, main


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_planted_pickle_is_refused(world, tmp_path):
    """A pickle planted as step-N/train_state.pt (code that runs when unpickled) -> --resume refuses it in one line
    (exit 2) and never unpickles it: the payload does not run."""
    main(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 2, "--save-every", 1)
    step = tmp_path / "o" / "step-000001"
    (step / "train_state.json").unlink()
    (step / "train_state.safetensors").unlink()
    (step / "train_state.pt").write_bytes(pickle.dumps(_Payload()))
    import shutil
    shutil.rmtree(tmp_path / "o" / "final")
    r = cli(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 2, "--save-every", 1, "--resume")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "train_state.pt: a pickle, never read" in lines[0], lines
    assert not (tmp_path / "o" / "PWNED").exists() and not os.path.exists("PWNED")


def test_damaged_state_is_one_line(world, tmp_path):
    """A damaged train_state.json (truncated JSON) -> --resume stops with one line naming the checkpoint."""
    main(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 2, "--save-every", 1)
    import shutil
    shutil.rmtree(tmp_path / "o" / "final")
    f = tmp_path / "o" / "step-000001" / "train_state.json"
    f.write_text(f.read_text()[:50])
    with pytest.raises(ValueError, match="step-000001: cannot read the training state"):
        main(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 2, "--save-every", 1, "--resume")


def test_state_holds_only_plain_types(world, tmp_path):
    """The saved training state -> JSON of plain types plus a safetensors file of tensors; no pickle is written."""
    main(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 1)
    final = tmp_path / "o" / "final"
    assert not list(final.glob("*.pt")) and not list(final.glob("*.pkl"))
    meta = json.loads((final / "train_state.json").read_text())
    assert meta["step"] == 1 and meta["world"] == 1
    from safetensors.torch import load_file
    assert any(k.startswith("optimizer.") for k in load_file(str(final / "train_state.safetensors")))
