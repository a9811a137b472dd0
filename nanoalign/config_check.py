"""Type and range checks of config.json values, run once at load (nanoalign.model's LlavaConfig.from_dict): a wrong
value is a ValueError naming the key (`text_config.hidden_size`); nanoalign.checkpoint.read_config adds the file."""


# config keys that must be integers >= 1 (sizes and counts); every other field is checked against its annotation
_POSITIVE_INTS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "num_channels", "vocab_size", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "image_seq_length"}
_POSITIVE_FLOATS = {"layer_norm_eps", "rms_norm_eps", "rope_theta"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_value(prefix: str, name: str, v, annotation: str) -> None:
    """ValueError `key: expected ..., got ...` when a config.json value has the wrong type or range."""
    key = prefix + name
    if v is None and "None" in annotation:
        return
    if name in _POSITIVE_INTS:
        ok, want = _is_int(v) and v >= 1, "an integer >= 1"
    elif name in _POSITIVE_FLOATS:
        ok = (_is_int(v) or isinstance(v, float)) and v == v and 0 < v < float("inf")
        want = "a finite number > 0"
    elif annotation.startswith("int | list"):  # vision_feature_layer, eos_token_id
        ok = _is_int(v) or (isinstance(v, list) and bool(v) and all(_is_int(x) for x in v))
        want = "an integer or a list of integers"
    elif annotation.startswith("int"):
        ok, want = _is_int(v), "an integer"
    elif annotation.startswith("float"):
        ok, want = (_is_int(v) or isinstance(v, float)) and v == v, "a number"
    elif annotation.startswith("bool"):
        ok, want = isinstance(v, bool), "true or false"
    elif annotation.startswith("str"):
        ok, want = isinstance(v, str), "a string"
    elif annotation.startswith("list"):  # image_grid_pinpoints
        ok = isinstance(v, list) and all(isinstance(x, list) and len(x) == 2 and all(_is_int(y) and y > 0 for y in x)
                                         for x in v)
        want = "a list of [height, width] integer pairs"
    else:
        return
    if not ok:
        raise ValueError(f"key {key}: expected {want}, got {v!r} ({type(v).__name__})")


def section(d, key: str) -> dict:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"key {key}: expected an object, got {v!r} ({type(v).__name__})")
    return v
