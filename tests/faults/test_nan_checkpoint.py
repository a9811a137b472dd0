"""Seam: loading a checkpoint whose weights hold NaN (generate, train.py)."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import main


def _nan_checkpoint(world, tmp_path):
    ck = tmp_path / "nan"
    shutil.copytree(world / "ckpt", ck)
    sd = load_file(str(ck / "model.safetensors"))
    key = next(k for k in sd if "layers.0" in k and k.endswith("q_proj.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    return ck, key


def test_generate_on_a_nan_checkpoint(world, tmp_path, capsys):
    """`generate` on a checkpoint with NaN weights -> one line naming the checkpoint and tensor, exit 2 (never an
    empty answer with exit 0)."""
    from nanoalign import generate
    from test_train import _png
    ck, key = _nan_checkpoint(world, tmp_path)
    _png(tmp_path / "i.png", 20, 20, 0)
    rc = generate.main(["--model", str(ck), "--image", str(tmp_path / "i.png"), "--prompt", "what ?"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(ck) in err[0] and "non-finite weights" in err[0], err


def test_train_from_a_nan_checkpoint(world, tmp_path):
    """train.py from a checkpoint with NaN weights -> one line naming the checkpoint and the tensor, before any step
    (a NaN loss later names step, rank and example ids)."""
    ck, key = _nan_checkpoint(world, tmp_path)
    with pytest.raises(ValueError, match=rf"{ck}: non-finite weights .*in .*q_proj.weight"):
        main(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 1, "--model", ck)
