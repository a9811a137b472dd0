"""Parity of nanoalign.model / nanoalign.checkpoint with transformers on tiny random checkpoints.

The checkpoints are made by transformers itself (LlavaForConditionalGeneration / LlavaNextForConditionalGeneration
from small configs, `save_pretrained` into a tmp dir, once per module). pixel_values and image_sizes come from
transformers' own PIL image processors (LlavaImageProcessorPil / LlavaNextImageProcessorPil, no torchvision needed);
input_ids are built here: random text ids with the image token repeated exactly as many times as transformers'
model produces features for that image (`get_image_features(...).pooler_output`), left padded. Since transformers'
forward does not derive position ids from the attention mask (only its generate does), the padded forward passes
transformers the cumsum position ids explicitly; ours derives them itself.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nanoalign.checkpoint import load_pretrained, save_pretrained
from nanoalign.model import LlavaConfig

transformers = pytest.importorskip("transformers")

IMG = 120  # image_token_index (inside the 128-token vocab, as in llava-hf)
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, image_size=28, patch_size=7, projection_dim=16)
TEXT = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
            rope_theta=500000.0)
SIZES = [(40, 40), (30, 70)]  # (height, width): a square and a non-square image


def _hf_models():
    T = transformers
    text_mha_tied = dict(TEXT, num_key_value_heads=4, rope_theta=10000.0)
    return {
        "llava": T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=VISION, text_config=TEXT, image_token_index=IMG, image_seq_length=16)),
        # variant: several vision layers concatenated, CLS kept, MHA, tied embeddings
        "llava_full": T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=VISION, text_config=text_mha_tied, image_token_index=IMG, image_seq_length=17,
            vision_feature_layer=[-3, -1], vision_feature_select_strategy="full", tie_word_embeddings=True)),
        "llava_next": T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(
            vision_config=VISION, text_config=TEXT, image_token_index=IMG, image_seq_length=16,
            image_grid_pinpoints=PINPOINTS)),
    }


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, hf in _hf_models().items():
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d)
        out[name] = (d, hf.eval())
    return out


def _pixels(kind):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    kw = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    if kind == "llava_next":
        enc = transformers.LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **kw)(imgs, return_tensors="pt")
        return enc["pixel_values"], enc["image_sizes"]
    enc = transformers.LlavaImageProcessorPil(**kw)(imgs, return_tensors="pt")
    return enc["pixel_values"], None


def _hf_feature_counts(hf, pv, sizes):
    with torch.no_grad():
        kw = {} if sizes is None else {"image_sizes": sizes}
        return [int(f.shape[0]) for f in hf.model.get_image_features(pv, **kw).pooler_output]


def _batch(counts, text_lens, seed=0):
    """One image per row: [bos, text..., <image> * n, text...], left padded with 0. -> input_ids, attention_mask"""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, (a, b) in zip(counts, text_lens):
        rows.append([1] + torch.randint(3, 100, (a,), generator=g).tolist() + [IMG] * n
                    + torch.randint(3, 100, (b,), generator=g).tolist())
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _inputs(kind, hf, which):
    pv, sizes = _pixels(kind)
    pv, sizes = pv[which], (None if sizes is None else sizes[which])
    counts = _hf_feature_counts(hf, pv, sizes)
    ids, mask = _batch(counts, [(3, 5), (7, 2)][: len(counts)])
    return ids, mask, pv, sizes


def _hf_kw(pv, sizes):
    return {"pixel_values": pv} if sizes is None else {"pixel_values": pv, "image_sizes": sizes}


@pytest.mark.parametrize("kind", ["llava", "llava_full", "llava_next"])
@pytest.mark.parametrize("which", [[0], [1], [0, 1]], ids=["square", "nonsquare", "batch2"])
def test_logits_match_transformers(ckpts, kind, which):
    path, hf = ckpts[kind]
    model, _ = load_pretrained(path)
    ids, mask, pv, sizes = _inputs(kind, hf, which)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, **_hf_kw(pv, sizes)).logits
        ours = model.logits(model(ids, pv, sizes, attention_mask=mask))
    valid = mask.bool()
    assert ours.shape == ref.shape
    err = (ours[valid] - ref[valid]).abs().max().item()
    assert err < 1e-4, f"{kind}: max |logit diff| {err}"


@pytest.mark.parametrize("kind", ["llava", "llava_full", "llava_next"])
def test_saved_checkpoint_loads_in_transformers(ckpts, kind, tmp_path):
    path, hf = ckpts[kind]
    model, _ = load_pretrained(path)
    out = tmp_path / "saved"
    out.mkdir()
    (out / "stale").write_text("x")  # an old checkpoint is replaced as a whole
    save_pretrained(model, None, out)
    assert not (out / "stale").exists() and not list(tmp_path.glob("saved.*"))
    cls = type(hf)
    hf2, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, pv, sizes = _inputs(kind, hf, [0, 1])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, position_ids=pos, **_hf_kw(pv, sizes)).logits
        b = hf2.eval()(input_ids=ids, attention_mask=mask, position_ids=pos, **_hf_kw(pv, sizes)).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert load_pretrained(out)[0].config == model.config


def _rename(sd, rules):
    out = {}
    for k, v in sd.items():
        for old, new in rules:
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            raise AssertionError(k)
    return out


T5_PREFIXED = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.vision_model.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."), ("image_newline", "model.image_newline")]
LIUHAOTIAN = [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
              ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
              ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("image_newline", "model.image_newline")]


def _write(d, config_src, tensors):
    d.mkdir()
    shutil.copy(config_src / "config.json", d / "config.json")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_key_layouts_load_identically(ckpts, tmp_path):
    path, _ = ckpts["llava_next"]  # written by transformers 5.23: vision_tower.embeddings.* (no vision_model.)
    assert any(k.startswith("vision_tower.embeddings.") for k in load_file(path / "model.safetensors"))
    ref, _ = load_pretrained(path)
    hub = {k: v.clone() for k, v in ref.state_dict().items()}
    assert "vision_tower.vision_model.pre_layrnorm.weight" in hub
    dirs = [_write(tmp_path / "hub", path, hub),
            _write(tmp_path / "t5", path, _rename(hub, T5_PREFIXED)),
            _write(tmp_path / "liuhaotian", path, _rename(hub, LIUHAOTIAN))]
    shard = tmp_path / "sharded"  # hub layout split over two files with an index
    shard.mkdir()
    shutil.copy(path / "config.json", shard / "config.json")
    keys = sorted(hub)
    wm = {}
    for i, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2:]]):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: hub[k] for k in part}, str(shard / name), metadata={"format": "pt"})
        wm.update({k: name for k in part})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    for d in dirs + [shard]:
        sd = load_pretrained(d)[0].state_dict()
        assert sd.keys() == hub.keys(), d.name
        assert all(torch.equal(sd[k], hub[k]) for k in hub), d.name


def test_tied_embeddings_and_dtype(ckpts):
    model, _ = load_pretrained(ckpts["llava_full"][0], dtype=torch.bfloat16)
    assert model.lm_head_weight is model.language_model.model.embed_tokens.weight
    assert model.lm_head_weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture()
def hub_copy(ckpts, tmp_path):
    path, _ = ckpts["llava"]
    d = tmp_path / "ck"
    shutil.copytree(path, d)
    return d


def test_missing_weights_file(hub_copy):
    (hub_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(hub_copy)


def test_truncated_weights_file(hub_copy):
    f = hub_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or corrupt"):
        load_pretrained(hub_copy)


def test_missing_shard(hub_copy):
    sd = load_file(hub_copy / "model.safetensors")
    (hub_copy / "model.safetensors").unlink()
    save_file(sd, str(hub_copy / "a.safetensors"))
    wm = {k: ("a.safetensors" if i else "b.safetensors") for i, k in enumerate(sd)}
    (hub_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(FileNotFoundError, match="b.safetensors"):
        load_pretrained(hub_copy)


def _edit_weights(d, fn):
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, str(d / "model.safetensors"))


def test_missing_and_unexpected_keys(hub_copy):
    _edit_weights(hub_copy, lambda sd: sd.pop("language_model.model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing 1 keys: language_model\.model\.norm\.weight"):
        load_pretrained(hub_copy)
    _edit_weights(hub_copy, lambda sd: sd.update({"language_model.model.norm.weight": torch.ones(32),
                                                  "extra.thing": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"1 unexpected keys: extra\.thing"):
        load_pretrained(hub_copy)


def test_shape_mismatch(hub_copy):
    _edit_weights(hub_copy, lambda sd: sd.update({"multi_modal_projector.linear_1.bias": torch.zeros(31)}))
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.bias: expected \(32,\), found \(31,\)"):
        load_pretrained(hub_copy)


def test_unsupported_model_type(hub_copy):
    cfg = json.loads((hub_copy / "config.json").read_text())
    cfg["model_type"] = "blip-2"
    (hub_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'blip-2'"):
        load_pretrained(hub_copy)


def test_image_token_count_mismatch(ckpts):
    path, hf = ckpts["llava_next"]
    model, _ = load_pretrained(path)
    ids, mask, pv, sizes = _inputs("llava_next", hf, [1])
    n = int((ids == IMG).sum())
    ids = ids[:, 1:]  # drop the bos: still n tokens, then drop one image token
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0, (ids[0] == IMG).nonzero()[0, 0]] = False
    ids = ids[keep].view(1, -1)
    with pytest.raises(ValueError, match=f"hold {n - 1} tokens.*give {n} features"):
        model(ids, pv, sizes)


# ------------------------------------------------------------------------------------------------ config
def test_config_forms():
    base = {"model_type": "llava", "text_config": {"hidden_size": 64, "num_attention_heads": 4}}
    old = LlavaConfig.from_dict({**base, "text_config": {**base["text_config"], "rope_theta": 1e6}})
    new = LlavaConfig.from_dict({**base, "text_config": {**base["text_config"],
                                                         "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 1e6}}})
    assert old == new and old.text_config.rope_theta == 1e6
    tc = old.text_config  # LLaMA defaults for what the dict leaves out
    assert (tc.head_dim, tc.num_key_value_heads, tc.rms_norm_eps, tc.vocab_size) == (16, 4, 1e-6, 32000)
    assert LlavaConfig.from_dict(old.to_dict()) == old
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        LlavaConfig.from_dict({**base, "text_config": {"rope_parameters": {"rope_type": "yarn"}}})


def test_anyres_packing_matches_transformers_over_aspect_ratios(ckpts):
    """pixel_values built directly (random 5-patch tensors), image_sizes chosen to hit the unpad rounding paths."""
    path, hf = ckpts["llava_next"]
    model, _ = load_pretrained(path)
    sizes = [(1, 100), (100, 1), (33, 47), (47, 33), (56, 57), (13, 29), (500, 333), (28, 28), (29, 85), (85, 29)]
    pv = torch.randn(len(sizes), 5, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    st = torch.tensor(sizes)
    with torch.no_grad():
        ref = hf.model.get_image_features(pv, st).pooler_output
        ours = model.vision_features(pv, st)
    for size, a, b in zip(sizes, ref, ours):
        assert a.shape == b.shape, size
        assert (a - b).abs().max() < 1e-5, size
        assert model.num_image_features(size) == a.shape[0], size


def _tokenizer_json(d, n):
    """A WordLevel tokenizer.json with n tokens (ids 0..n-1), '<image>' at IMG as the config says."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = [f"w{i}" for i in range(n)]
    names[0], names[1], names[2], names[IMG] = "<unk>", "<s>", "</s>", "<image>"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))


def test_processor_loaded_and_vocab_checked(ckpts, tmp_path):
    pytest.importorskip("nanoalign.tokenizer")
    path, _ = ckpts["llava_next"]
    d = tmp_path / "withtok"
    shutil.copytree(path, d)
    model, proc = load_pretrained(d)
    assert proc is None  # no tokenizer.json
    _tokenizer_json(d, 128)
    model, proc = load_pretrained(d)
    assert proc is not None
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 70, 3), dtype=np.uint8))
    batch = proc(["w5 <image> w7 w9"], [img])
    hidden = model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"])
    assert hidden.shape[1] == batch["input_ids"].shape[1]
    out = tmp_path / "resaved"
    save_pretrained(model, proc, out)
    assert (out / "tokenizer.json").is_file() and load_pretrained(out)[1] is not None
    _tokenizer_json(d, 130)
    with pytest.raises(ValueError, match="130 tokens.*128 rows"):
        load_pretrained(d)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
def test_gqa_attention_equals_repeated_kv_heads(masked):
    """model.attention with fewer kv heads (SDPA's enable_gqa, no copy) == softmax(q k^T / sqrt(D) + mask) v written
    out by hand with each kv head repeated for its group of query heads (query head h reads kv head h // (Hq/Hkv)),
    outputs and gradients."""
    from nanoalign.model import attention
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 2, 6, 2, 5, 8
    q, k, v = (torch.randn(B, h, T, D, generator=g, requires_grad=True) for h in (Hq, Hkv, Hkv))
    causal = torch.ones(T, T).tril().bool()
    mask = (torch.rand(B, 1, T, T, generator=g) > 0.4) & causal | torch.eye(T, dtype=torch.bool) if masked else None
    ours = attention(q, k, v, mask, is_causal=not masked)
    kr, vr = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    s = q @ kr.transpose(-1, -2) / D ** 0.5
    s = s.masked_fill(~(mask if masked else causal), float("-inf"))
    ref = (s.softmax(-1) @ vr).transpose(1, 2).reshape(B, T, Hq * D)
    assert (ours - ref).abs().max() < 1e-5
    w = torch.randn(ref.shape, generator=g)
    g_ours = torch.autograd.grad((ours * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(g_ours, g_ref))
