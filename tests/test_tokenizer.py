"""nanoalign.tokenizer: Tokenizer vs transformers' PreTrainedTokenizerFast on the same tokenizer.json, the LLaVA
prompt templates (expected strings written by hand from LLaVA's llava/conversation.py), and Processor vs
transformers' LlavaProcessor / LlavaNextProcessor."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nanoalign.image import ImageProcessor
from nanoalign.tokenizer import Processor, Tokenizer, build_prompt

WORDS = ["USER:", "ASSISTANT:", "A", "chat", "between", "a", "the", "is", "what", "image", "in", "?", "cat", "dog",
         "red", "blue"] + [f"w{i}" for i in range(28)]


def make_tokenizer_json(directory, with_image=True, bos_post_processor=True):
    """A WordLevel tokenizer.json: <unk>=0 <s>=1 </s>=2 <pad>=3, words, then <image> as an added special token."""
    from tokenizers import AddedToken, Tokenizer as HFTok, models, pre_tokenizers, processors
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS)}
    tk = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + (["<image>"] if with_image else [])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos_post_processor:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = os.path.join(str(directory), "tokenizer.json")
    tk.save(path)
    return path


def rand_image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed + h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return make_tokenizer_json(tmp_path_factory.mktemp("tok"))


def hf_tokenizer(path, padding_side="left"):
    transformers = pytest.importorskip("transformers")
    t = transformers.PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<s>", eos_token="</s>",
                                             pad_token="<pad>", unk_token="<unk>")
    t.padding_side = padding_side
    return t


def test_tokenizer_ids_and_encode_decode(tok_path):
    tok = Tokenizer.from_file(tok_path)
    n = 4 + len(WORDS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id, tok.vocab_size) == (1, 2, 3, n, n + 1)
    hft = hf_tokenizer(tok_path)
    text = "what is in the image ? <image> red cat zebra"
    assert tok.encode(text) == hft(text).input_ids                       # BOS via the file's post-processor
    assert tok.encode(text, add_bos=False) == hft(text, add_special_tokens=False).input_ids
    assert tok.encode(text)[0] == 1 and tok.encode(text, add_bos=False)[0] != 1
    ids = tok.encode("red cat") + [2, 3, 3]
    assert tok.decode(ids) == "red cat" == hft.decode(ids, skip_special_tokens=True)
    assert tok.decode(torch.tensor(ids), skip_special_tokens=False).split() == ["<s>", "red", "cat", "</s>", "<pad>",
                                                                               "<pad>"]


def test_tokenizer_errors(tmp_path):
    path = make_tokenizer_json(tmp_path, with_image=False)
    with pytest.raises(ValueError, match="no '<image>' token"):
        Tokenizer.from_file(path)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer.from_file(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="bad.json: cannot be read"):
        Tokenizer.from_file(str(bad))


def test_build_prompt_templates():
    q = "What is in the image?"
    assert build_prompt(q) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT:")
    assert build_prompt(q, "llava_v1") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is in the image? ASSISTANT:")
    assert build_prompt("Look: <image> what?").endswith(" USER: Look: <image> what? ASSISTANT:")  # kept in place
    assert build_prompt(q, "vicuna_nosys") == "USER: <image>\n" + q + " ASSISTANT:"
    assert build_prompt(q, "vicuna_nosys", with_image=False) == "USER: " + q + " ASSISTANT:"
    assert build_prompt("<image> raw text", "raw") == "<image> raw text"
    assert build_prompt("no image", "raw") == "no image"
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        build_prompt(q, "chatml")


def test_processor_matches_transformers_llava15(tok_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    hf_ip = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=True)
    hf = transformers.LlavaProcessor(image_processor=hf_ip, tokenizer=hf_tokenizer(tok_path), patch_size=4,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = {"model_type": "llava", "image_token_index": 48, "vision_config": {"image_size": 32, "patch_size": 4},
           "vision_feature_select_strategy": "default", "text_config": {"vocab_size": 49}}
    ours = Processor(Tokenizer.from_file(tok_path), ImageProcessor.from_dict(hf_ip.to_dict(), cfg), cfg)
    prompts = ["USER: <image> what is in the image ? ASSISTANT:", "<image> red"]
    imgs = [rand_image(40, 20), rand_image(32, 32)]
    ref = hf(text=prompts, images=imgs, return_tensors="pt", padding=True)
    out = ours(prompts, imgs)
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert torch.equal(out["pixel_values"], ref["pixel_values"])
    assert (out["input_ids"] == 48).sum(1).tolist() == [64, 64]


def test_processor_matches_transformers_llava_next(tok_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    pins = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    hf_ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_grid_pinpoints=pins)
    for side in ("left", "right"):
        hf = transformers.LlavaNextProcessor(image_processor=hf_ip, tokenizer=hf_tokenizer(tok_path, side),
                                             patch_size=4, vision_feature_select_strategy="default",
                                             num_additional_image_tokens=1)
        cfg = {"model_type": "llava_next", "image_token_index": 48, "image_grid_pinpoints": pins,
               "vision_config": {"image_size": 32, "patch_size": 4}}
        ours = Processor(Tokenizer.from_file(tok_path), ImageProcessor.from_dict(hf_ip.to_dict(), cfg), cfg)
        prompts = ["what <image> is", "<image> red cat w1 w2 w3", "blue dog <image>"]
        imgs = [rand_image(30, 70), rand_image(90, 31), rand_image(50, 50)]
        ref = hf(text=prompts, images=imgs, return_tensors="pt", padding=True)
        out = ours(prompts, imgs, padding_side=side)
        for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
            assert torch.equal(out[k], ref[k]), (side, k)


def test_processor_text_only_multi_image_and_errors(tok_path):
    cfg = {"model_type": "llava", "image_token_index": 48, "vision_config": {"image_size": 32, "patch_size": 4}}
    p = Processor(Tokenizer.from_file(tok_path), ImageProcessor.from_model_config(cfg), cfg)
    out = p(["red cat", "blue"], [None, None], padding_side="right")
    assert out["pixel_values"] is None
    assert out["input_ids"].tolist() == [[1, 18, 16], [1, 19, 3]]  # <s> red cat / <s> blue <pad> (hand-made ids)
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    two = p(["<image> a <image>"], [[rand_image(8, 8), rand_image(9, 5)]])
    assert two["pixel_values"].shape == (2, 3, 32, 32) and (two["input_ids"] == 48).sum() == 128
    with pytest.raises(ValueError, match="prompt 1 has no <image>"):
        p(["<image> red", "blue cat"], [rand_image(8, 8), rand_image(8, 8)])
    with pytest.raises(ValueError, match="prompt 0 has 2 <image> but 1 image"):
        p(["<image> <image> red"], [rand_image(8, 8)])
    with pytest.raises(ValueError, match="prompt 0 has 1 <image> but 0 image"):
        p(["<image> red"], [None])
    with pytest.raises(ValueError, match="2 prompts but 1 image"):
        p(["<image> red", "x"], [rand_image(8, 8)])
    with pytest.raises(ValueError, match="image_token_index is 7"):
        Processor(p.tokenizer, p.image_processor, {"image_token_index": 7})
    with pytest.raises(ValueError, match="embedding has only 40 rows"):
        Processor(p.tokenizer, p.image_processor, {"text_config": {"vocab_size": 40}})


def test_processor_save_and_from_pretrained(tok_path, tmp_path):
    cfg = {"model_type": "llava_next", "image_token_index": 48, "pad_token_id": 3,
           "image_grid_pinpoints": [[32, 64], [64, 32]], "vision_config": {"image_size": 32, "patch_size": 4}}
    p = Processor(Tokenizer.from_file(tok_path), ImageProcessor.from_model_config(cfg), cfg)
    p.save(str(tmp_path))
    assert {"tokenizer.json", "preprocessor_config.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    q = Processor.from_pretrained(str(tmp_path), cfg)
    assert q.image_processor == p.image_processor
    assert (q.tokenizer.bos_id, q.tokenizer.eos_id, q.pad_id, q.image_token_id) == (1, 2, 3, 48)
    img = rand_image(20, 60)
    a, b = p(["<image> red"], [img]), q(["<image> red"], [img])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bos_follows_the_post_processor_and_is_never_doubled(tmp_path):
    """BOS as transformers' tokenizer puts it (the file's post-processor) and, as in its apply_chat_template, not
    again when the text already starts with it; a file with no post-processor keeps LLaVA's BOS."""
    from tokenizers import processors
    os.makedirs(tmp_path / "a")
    with_bos = Tokenizer.from_file(make_tokenizer_json(tmp_path / "a"))
    hft = hf_tokenizer(with_bos.source)
    red_cat = [with_bos.tok.token_to_id(w) for w in ("red", "cat")]
    assert with_bos.encode("<s> red cat") == hft("<s> red cat", add_special_tokens=False).input_ids == [1] + red_cat
    assert with_bos.encode("red cat") == hft("red cat").input_ids
    os.makedirs(tmp_path / "b")
    path = make_tokenizer_json(tmp_path / "b")
    raw = Tokenizer.from_file(path).tok
    raw.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])  # ChatML/Qwen-style
    raw.save(path)
    no_bos = Tokenizer.from_file(path)
    assert not no_bos.adds_bos and no_bos.encode("red cat") == hf_tokenizer(path)("red cat").input_ids == red_cat
    os.makedirs(tmp_path / "c")
    bare = Tokenizer.from_file(make_tokenizer_json(tmp_path / "c", bos_post_processor=False))
    assert bare.adds_bos and bare.encode("red cat")[0] == 1
