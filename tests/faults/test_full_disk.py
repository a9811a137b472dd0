"""Seam: writing a checkpoint."""
import errno

import pytest

from common import main


def test_full_disk_while_saving(world, tmp_path, monkeypatch):
    """A full disk while saving (a write raising ENOSPC) -> one line naming the path and the space needed; the
    partial folder is removed and the previous checkpoint stays loadable."""
    main(world, tmp_path, "--algo", "dpo", "--max-steps", 3, "--save-every", 1, "--keep", 5)
    import shutil
    shutil.rmtree(tmp_path / "final")
    shutil.rmtree(tmp_path / "step-000002")
    from nanoalign import checkpoint
    real = checkpoint.save_file

    def full(sd, path, **kw):
        if "step-000002" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(sd, path, **kw)
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(SystemExit) as e:
        main(world, tmp_path, "--algo", "dpo", "--max-steps", 3, "--save-every", 1, "--keep", 5, "--resume")
    msg = str(e.value)
    assert "no space left" in msg and "step-000002" in msg and "MiB are free" in msg and "\n" not in msg
    assert not list(tmp_path.glob(".*tmp-*")) and not list(tmp_path.glob("*tmp-*"))
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.trainutil import load_train_state
    load_pretrained(tmp_path / "step-000001")
    assert load_train_state(tmp_path / "step-000001")["step"] == 1
