"""--model org/name through the Hugging Face cache: a fake cache laid out as huggingface_hub lays it out
(hub/models--org--name/{refs/main, snapshots/<sha>/...}), HF_HUB_OFFLINE=1, no network."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from test_generate import tiny_checkpoint  # noqa: E402

pytest.importorskip("huggingface_hub")
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """HF_HOME/hub/models--tiny-org--tiny-llava/snapshots/SHA holding a tiny llava checkpoint; refs/main -> SHA."""
    src = tmp_path / "src"
    tiny_checkpoint(str(src), "llava")
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llava"
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C  # the client reads these variables at import: set them for this process
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return snap


def test_org_name_resolves_to_the_cached_snapshot(hub_cache):
    from nanoalign.checkpoint import load_for_cli, resolve_model
    assert resolve_model("tiny-org/tiny-llava").resolve() == hub_cache.resolve()
    assert resolve_model("tiny-org/tiny-llava", revision=SHA).resolve() == hub_cache.resolve()
    model, processor = load_for_cli("tiny-org/tiny-llava")
    assert processor is not None and model.config.model_type == "llava"


def test_local_folder_is_kept_and_bad_ids_are_one_line(hub_cache, tmp_path):
    from nanoalign.checkpoint import resolve_model
    assert resolve_model(hub_cache) == hub_cache  # a folder: as it is
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set and it is not in the hub cache"):
        resolve_model("tiny-org/not-cached")
    with pytest.raises(ValueError, match="not a hub id"):
        resolve_model(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve_model("tiny-org/tiny-llava", revision="no-such-branch")


def test_generate_cli_takes_a_hub_id(hub_cache, tmp_path):
    """The CLI in a fresh process, with only the environment variables (as a user sets them)."""
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "im.png")
    r = subprocess.run([sys.executable, "-m", "nanoalign.generate", "--model", "tiny-org/tiny-llava", "--image",
                        str(tmp_path / "im.png"), "--prompt", "what?", "--max-new-tokens", "3"],
                       capture_output=True, text=True, env=dict(os.environ), cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
