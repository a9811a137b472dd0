"""Seam: a checkpoint's config.json, preprocessor config and weights, read once at load."""
import json
import shutil

import pytest
import torch

from nanoalign.checkpoint import load_pretrained


def _set(d, key, value):
    *path, last = key.split(".")
    for k in path:
        d = d[k]
    d[last] = value


@pytest.mark.parametrize("key,value", [
    ("text_config.hidden_size", "64"), ("text_config.num_hidden_layers", 2.5), ("text_config.rms_norm_eps", "1e-5"),
    ("vision_config.patch_size", 0), ("text_config.num_attention_heads", 0), ("vision_config.num_attention_heads", 0),
    ("text_config", "llama"), ("vision_config", [1, 2]), ("vision_feature_layer", "-2"),
    ("text_config.vocab_size", -3), ("text_config.tie_word_embeddings", "no"), ("image_token_index", 3.5),
    ("vision_config.layer_norm_eps", float("nan")), ("image_grid_pinpoints", [[336]]),
])
def test_bad_config_field(world, tmp_path, key, value):
    """A wrongly typed or out-of-range config.json value (hidden_size "64", num_hidden_layers 2.5, patch_size 0,
    text_config "llama", vision_feature_layer "-2", ...) -> ValueError naming the file and the key, at load."""
    ck = tmp_path / "ck"
    shutil.copytree(world / "ckpt", ck)
    cfg = json.loads((ck / "config.json").read_text())
    _set(cfg, key, value)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_pretrained(ck)
    msg = str(e.value)
    assert str(ck / "config.json") in msg and key in msg and "\n" not in msg, msg


def test_config_not_an_object(world, tmp_path):
    """config.json holding a list -> ValueError naming the file."""
    ck = tmp_path / "ck"
    shutil.copytree(world / "ckpt", ck)
    (ck / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object, got list"):
        load_pretrained(ck)


def test_integer_weight(world, tmp_path):
    """An int64 weight in model.safetensors -> ValueError naming the folder and the tensor."""
    from safetensors.torch import load_file, save_file
    ck = tmp_path / "ck"
    shutil.copytree(world / "ckpt", ck)
    sd = load_file(str(ck / "model.safetensors"))
    key = next(k for k in sd if k.endswith("multi_modal_projector.linear_1.weight"))
    sd[key] = sd[key].to(torch.int64)
    save_file(sd, str(ck / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{ck}: weight {key} has dtype torch.int64"):
        load_pretrained(ck)


def test_bad_crop_size(world, tmp_path):
    """crop_size "abc" in the preprocessor config -> ValueError naming the file and crop_size."""
    ck = tmp_path / "ck"
    shutil.copytree(world / "ckpt", ck)
    f = next(p for p in (ck / "preprocessor_config.json", ck / "processor_config.json") if p.is_file())
    d = json.loads(f.read_text())
    (d.get("image_processor", d))["crop_size"] = "abc"
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"crop_size 'abc': expected an integer"):
        load_pretrained(ck)
