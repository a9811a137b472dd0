"""nanoalign.image vs transformers' PIL-backend image processors (the torchvision ones cannot run here) and the
token counts vs transformers' LlavaNextProcessor, transformers' model and our model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nanoalign.image import ImageProcessor, select_best_resolution

transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil  # noqa: E402

PINS_A = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]   # the llava-v1.6 grid scaled from 336 to 32
PINS_B = [[32, 32], [32, 96], [96, 64], [64, 128]]             # an odd grid


def rand_image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed + 1000 * h + w)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "RGB" else img


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("hw", [(30, 30), (17, 45), (64, 23), (31, 32), (8, 9)])
def test_llava15_matches_transformers(pad, hw):
    hf = LlavaImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, do_pad=pad)
    ours = ImageProcessor.from_dict(hf.to_dict())
    assert ours.model_type == "llava" and ours.pad_to_square == pad
    img = rand_image(*hw)
    ref = hf(images=[img], return_tensors="pt")["pixel_values"]
    out = ours.process([img])
    assert out["pixel_values"].shape == ref.shape == (1, 3, 30, 30)
    assert out["pixel_values"].dtype == torch.float32
    assert (out["pixel_values"] - ref).abs().max().item() == 0.0  # same PIL ops in the same order: bit-identical
    assert out["image_sizes"].tolist() == [list(hw)]


def test_llava15_pad_colour_is_the_mean():
    """A 10x30 black image padded to 30x30: padding rows are (122,116,104)/255 normalized (hand computation)."""
    ip = ImageProcessor(size={"shortest_edge": 30}, crop_size=30, pad_to_square=True)
    x = ip.process([Image.new("RGB", (30, 10), (0, 0, 0))])["pixel_values"][0]  # (3, 30, 30)
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    expect_pad = (np.array([122, 116, 104]) / 255 - mean) / std
    assert np.allclose(x[:, 0, 0].numpy(), expect_pad, atol=1e-5)       # top padding
    assert np.allclose(x[:, 15, 15].numpy(), -mean / std, atol=1e-5)    # the black image in the middle


@pytest.mark.parametrize("pins", [PINS_A, PINS_B])
def test_llava_next_matches_transformers(pins):
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pins)
    ours = ImageProcessor.from_dict(hf.to_dict())
    assert ours.model_type == "llava_next"
    imgs = [rand_image(h, w) for h, w in [(32, 32), (20, 50), (70, 19), (40, 41), (100, 30), (13, 200)]]
    imgs.append(rand_image(25, 60, mode="RGBA"))
    ref = hf(images=imgs, return_tensors="pt")
    out = ours.process(imgs)
    assert out["pixel_values"].shape == ref["pixel_values"].shape
    assert (out["pixel_values"] - ref["pixel_values"]).abs().max().item() == 0.0
    assert out["image_sizes"].tolist() == ref["image_sizes"].tolist()
    # padding over tiles is zeros, and the number of real tiles is base + grid
    for i, img in enumerate(imgs):
        n = ours.num_tiles(img.height, img.width)
        assert out["pixel_values"][i, n:].abs().sum() == 0
        assert out["pixel_values"][i, n - 1].abs().sum() > 0


def test_select_best_resolution_matches_transformers():
    rng = np.random.default_rng(0)
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    for _ in range(300):
        hw = tuple(int(v) for v in rng.integers(1, 1500, size=2))
        assert select_best_resolution(hw, pins) == tuple(hf_select_best_resolution(hw, pins))


def test_token_counts_hand_computed():
    """LLaVA-1.5 336/14: 576 (577 with `full`); LLaVA-1.6: a 672x672 image -> 576 + 48*48 + 48 = 2928."""
    v15 = ImageProcessor(model_type="llava")
    assert v15.num_image_tokens(500, 300) == 576
    assert ImageProcessor(model_type="llava", vision_feature_select_strategy="full").num_image_tokens((1, 1)) == 577
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    v16 = ImageProcessor(model_type="llava_next", image_grid_pinpoints=pins)
    assert v16.num_image_tokens(672, 672) == 2928
    # 336 x 672 (h x w): pinpoint (336, 672) -> grid 24 x 48, nothing to unpad: 576 + 24*48 + 24
    assert v16.num_image_tokens((336, 672)) == 576 + 24 * 48 + 24


def _tiny_next_config(pins, strategy="default"):
    return transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=4),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64, max_position_embeddings=4096),
        image_token_index=60, image_grid_pinpoints=pins, pad_token_id=0, vision_feature_select_strategy=strategy)


SIZES = [(32, 32), (20, 50), (70, 19), (40, 41), (100, 30), (13, 200), (64, 64), (33, 97)]


@pytest.mark.parametrize("pins", [PINS_A, PINS_B])
def test_llava_next_counts_match_transformers_processor_and_model(pins):
    from test_tokenizer import make_tokenizer_json  # tests/ is on sys.path under pytest's default import mode
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = make_tokenizer_json(d)
        hft = transformers.PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<s>", eos_token="</s>",
                                                   pad_token="<pad>", unk_token="<unk>")
    hf_ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_grid_pinpoints=pins)
    proc = transformers.LlavaNextProcessor(image_processor=hf_ip, tokenizer=hft, patch_size=4,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = _tiny_next_config(pins)
    ours = ImageProcessor.from_dict(hf_ip.to_dict(), cfg.to_dict())
    imgs = [rand_image(h, w) for h, w in SIZES]
    enc = proc(text=["w1 <image> w2"] * len(imgs), images=imgs, return_tensors="pt", padding=True)
    image_id = hft.convert_tokens_to_ids("<image>")
    hf_counts = (enc["input_ids"] == image_id).sum(1).tolist()
    assert [ours.num_image_tokens(h, w) for h, w in SIZES] == hf_counts
    # the model's own packed feature count (base + unpadded grid + image_newline per row)
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        feats = model.model.get_image_features(enc["pixel_values"], enc["image_sizes"]).pooler_output
    assert [f.shape[0] for f in feats] == hf_counts


def test_llava_next_full_strategy_count_matches_transformers_processor():
    from test_tokenizer import make_tokenizer_json
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hft = transformers.PreTrainedTokenizerFast(tokenizer_file=make_tokenizer_json(d), bos_token="<s>")
    hf_ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_grid_pinpoints=PINS_A)
    proc = transformers.LlavaNextProcessor(image_processor=hf_ip, tokenizer=hft, patch_size=4,
                                           vision_feature_select_strategy="full", num_additional_image_tokens=1)
    ours = ImageProcessor.from_dict(hf_ip.to_dict(), _tiny_next_config(PINS_A, "full").to_dict())
    n = proc._get_num_multimodal_tokens(image_sizes=SIZES)["num_image_tokens"]
    assert [ours.num_image_tokens(h, w) for h, w in SIZES] == n


def test_counts_match_our_model():
    """model.vision_features(...) length == num_image_tokens, for llava and llava_next (once nanoalign.model exists)."""
    model_mod = pytest.importorskip("nanoalign.model")
    for cfg in (_tiny_next_config(PINS_A), transformers.LlavaConfig(
            vision_config=_tiny_next_config(PINS_A).vision_config.to_dict(),
            text_config=_tiny_next_config(PINS_A).text_config.to_dict(), image_token_index=60, pad_token_id=0)):
        d = cfg.to_dict()
        torch.manual_seed(0)
        model = model_mod.LlavaModel(model_mod.LlavaConfig.from_dict(d)).eval()
        ip = ImageProcessor.from_model_config(d)
        imgs = [rand_image(h, w) for h, w in SIZES[:5]]
        enc = ip.process(imgs)
        with torch.no_grad():
            feats = model.vision_features(enc["pixel_values"], enc["image_sizes"])
        assert [f.shape[0] for f in feats] == [ip.num_image_tokens(h, w) for h, w in SIZES[:5]]


def test_save_load_roundtrip_and_transformers_reads_it(tmp_path):
    ours = ImageProcessor(model_type="llava_next", size={"shortest_edge": 32}, crop_size=32, patch_size=4,
                          image_grid_pinpoints=PINS_B)
    ours.save(str(tmp_path))
    again = ImageProcessor.from_pretrained(str(tmp_path), {"model_type": "llava_next",
                                                           "vision_config": {"patch_size": 4}})
    assert again == ours
    hf = LlavaNextImageProcessorPil.from_pretrained(str(tmp_path))
    imgs = [rand_image(40, 90), rand_image(50, 20)]
    assert torch.equal(hf(images=imgs, return_tensors="pt")["pixel_values"], ours.process(imgs)["pixel_values"])


def test_defaults_from_model_config(tmp_path):
    cfg = {"model_type": "llava", "vision_config": {"image_size": 32, "patch_size": 4},
           "vision_feature_select_strategy": "full"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ip = ImageProcessor.from_pretrained(str(tmp_path))
    assert (ip.crop_size, ip.size, ip.patch_size, ip.pad_to_square) == (32, {"shortest_edge": 32}, 4, True)
    assert ip.num_image_tokens(10, 20) == 65


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="images\\[1\\]"):
        ImageProcessor().process([rand_image(5, 5), np.zeros((5, 5, 3))])
    with pytest.raises(ValueError, match="model_type"):
        ImageProcessor(model_type="blip")
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        ImageProcessor(model_type="llava_next", crop_size=32, image_grid_pinpoints=[[32, 50]])
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        ImageProcessor(model_type="llava_next")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ImageProcessor.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="preprocessor_config.json: not valid JSON"):
        ImageProcessor.from_pretrained(str(tmp_path))
