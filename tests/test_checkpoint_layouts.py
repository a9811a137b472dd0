"""Checkpoint folders as transformers 5 writes them (and older layouts), read and written by nanoalign: image-processor
settings from processor_config.json's "image_processor" section or a standalone preprocessor_config.json, the
checkpoint's own chat template, the end-of-turn ids of generation_config.json, and the processor files a saved
checkpoint carries. Every expected value comes from transformers on the same folder: AutoProcessor's pixel values,
apply_chat_template's prompt ids, generate's greedy ids."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nanoalign.checkpoint import load_pretrained
from nanoalign.generate import generate_ids
from nanoalign.image import ImageProcessor
from nanoalign.tokenizer import (Processor, build_prompt, end_ids, read_chat_template, render_chat_template,
                                 template_reads_content_parts)

transformers = pytest.importorskip("transformers")

WORDS = ["USER:", "ASSISTANT:", "A", "chat", "what", "is", "in", "the", "image", "?", "cat", "dog", "red", "blue",
         "system", "user", "assistant"] + [f"w{i}" for i in range(24)]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"]
VOCAB = ["<unk>", "<s>", "</s>", "<pad>"] + WORDS + SPECIALS[4:]
ID = {t: i for i, t in enumerate(VOCAB)}
IMAGE_ID, PAD_ID, EOS_ID = ID["<image>"], ID["<pad>"], ID["</s>"]
QUESTION = "what is in the image ?"

# Chat templates in the three LLaVA-1.6 flavours, written in the style of llava-hf's (typed content parts, block tags
# on their own lines so that trim_blocks / lstrip_blocks matter).
VICUNA = """{% for message in messages %}
    {% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}
    {% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}
    {% for item in message['content'] | selectattr('type', 'equalto', 'text') %}
        {% generation %}{{ item['text'] + ' ' }}{% endgeneration %}
    {% endfor %}
{% endfor %}
{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"""
MISTRAL = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'user' %}
[INST] {% for item in message['content'] %}{% if item['type'] == 'image' %}<image>
{% else %}{{ item['text'] }}{% endif %}{% endfor %} [/INST]
    {% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] + eos_token }}
    {% else %}{{ raise_exception('Only user and assistant roles are supported!') }}
    {% endif %}
{% endfor %}"""
CHATML = """{% for message in messages %}
<|im_start|>{{ message['role'] + '\n' }}{% for item in message['content'] %}{% if item.type == 'image' %}{{ '<image>\n' }}{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}<|im_end|>{{ '\n' }}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
# Llama-3 style (llava-hf's llama3-llava-next): BOS written by the template, text trimmed, turns end with <|eot_id|>
LLAMA3 = """{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}\
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}\
{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}\
{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] | trim }}{% endfor %}\
{{ '<|eot_id|>' }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""
# a text model's template (string content), as kept in tokenizer_config.json
STRING_CHATML = """{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""


def make_tokenizer_json(directory, bos=True):
    """WordLevel over VOCAB; its post-processor puts <s> in front (Llama / Mistral-style) or, bos=False, adds
    nothing (ChatML / Qwen-style)."""
    from tokenizers import AddedToken, Tokenizer as HFTok, models, pre_tokenizers, processors
    tk = HFTok(models.WordLevel({t: i for i, t in enumerate(VOCAB[:-len(SPECIALS[4:])])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A" if bos else "$A",
                                                      special_tokens=[("<s>", 1)] if bos else [])
    assert [tk.token_to_id(t) for t in VOCAB] == list(range(len(VOCAB)))
    path = os.path.join(str(directory), "tokenizer.json")
    tk.save(path)
    return path


PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def make_checkpoint(d, template=MISTRAL, pad=False, gen_eos=None, text_eos=EOS_ID, seed=0, bos=True, nxt=False):
    """A tiny random LlavaForConditionalGeneration and its LlavaProcessor (CLIPImageProcessor: resize + centre crop,
    or with pad=True LlavaImageProcessor padding to square), both written by transformers' save_pretrained (the
    transformers 5 layout: processor_config.json with the image processor nested, chat_template.jinja, no
    preprocessor_config.json). nxt: LlavaNext (AnyRes) instead. gen_eos: generation_config.json's eos_token_id.
    Returns the transformers model."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    os.makedirs(d, exist_ok=True)
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=512, bos_token_id=1,
                eos_token_id=text_eos, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    if nxt:
        cfg = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                           pad_token_id=PAD_ID, image_grid_pinpoints=PINS)
        model = transformers.LlavaNextForConditionalGeneration(cfg)
    else:
        cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                       pad_token_id=PAD_ID)
        model = transformers.LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # larger weights than the init so greedy decoding is not a constant token
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    if gen_eos is not None:
        model.generation_config.eos_token_id = gen_eos
    model.eval().save_pretrained(d)
    kw = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if nxt:
        ip = LlavaNextImageProcessorPil(image_grid_pinpoints=PINS, **kw)
    else:
        ip = LlavaImageProcessorPil(do_pad=True, **kw) if pad else CLIPImageProcessorPil(**kw)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=make_tokenizer_json(d, bos), bos_token="<s>",
                                               eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    proc_cls = transformers.LlavaNextProcessor if nxt else transformers.LlavaProcessor
    proc = proc_cls(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1, chat_template=template)
    proc.save_pretrained(d)
    return model


def image(w=70, h=35, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_inputs(folder, img, question=QUESTION):
    """transformers' processor on the folder: apply_chat_template(add_generation_prompt=True, tokenize=True)."""
    proc = transformers.AutoProcessor.from_pretrained(folder)
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]}]
    return proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")


@pytest.fixture(scope="module")
def v5(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("v5") / "ckpt")
    make_checkpoint(d)
    return d


def test_transformers5_layout_is_what_we_think(v5):
    names = set(os.listdir(v5))
    assert {"processor_config.json", "chat_template.jinja", "config.json"} <= names
    assert "preprocessor_config.json" not in names
    assert "image_processor" in json.load(open(os.path.join(v5, "processor_config.json")))


def test_nested_image_processor_pixels_match_autoprocessor(v5, capsys):
    _, ours = load_pretrained(v5)
    assert capsys.readouterr().out == ""  # every setting is in the file: no fallback line
    ip = ours.image_processor
    assert (ip.pad_to_square, ip.do_center_crop, ip.crop_size) == (False, True, 32)
    img = image()  # 70 x 35: padding to square and centre-cropping give different pixels
    ref = hf_inputs(v5, img)["pixel_values"]
    got = ours(ours.build_prompt(QUESTION), [img])["pixel_values"]
    assert torch.equal(got, ref)
    padded = ImageProcessor(size={"shortest_edge": 32}, crop_size=32, patch_size=8, pad_to_square=True)
    assert not torch.allclose(padded.process([img])["pixel_values"], ref)  # the old fallback would differ


def test_pad_to_square_processor_matches_autoprocessor(tmp_path):
    d = str(tmp_path / "ckpt")
    make_checkpoint(d, pad=True)
    _, ours = load_pretrained(d)
    assert ours.image_processor.pad_to_square
    img = image(35, 70)
    assert torch.equal(ours.image_processor.process([img])["pixel_values"], hf_inputs(d, img)["pixel_values"])


def test_llava_next_nested_layout_matches_autoprocessor(tmp_path, capsys):
    d = str(tmp_path / "ckpt")
    make_checkpoint(d, template=CHATML, nxt=True)
    assert "preprocessor_config.json" not in os.listdir(d)
    _, ours = load_pretrained(d)
    assert capsys.readouterr().out == ""
    assert ours.image_processor.model_type == "llava_next" and ours.image_processor.image_grid_pinpoints == PINS
    for img in (image(), image(35, 70, seed=1)):
        ref = hf_inputs(d, img)
        got = ours(ours.build_prompt(QUESTION), [img])
        assert torch.equal(got["pixel_values"], ref["pixel_values"])
        assert torch.equal(got["image_sizes"], ref["image_sizes"])
        assert ours.prompt_ids(QUESTION, (img.height, img.width)) == ref["input_ids"][0].tolist()


def test_older_layout_standalone_preprocessor_config(v5, tmp_path, capsys):
    """The older layout: preprocessor_config.json (old CLIPFeatureExtractor keys: integer size / crop_size, no
    do_pad), a processor_config.json without the nested section, chat_template.json."""
    import shutil
    d = tmp_path / "old"
    shutil.copytree(v5, d)
    pc = json.loads((d / "processor_config.json").read_text())
    pc.pop("image_processor")
    (d / "processor_config.json").write_text(json.dumps(pc))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "CLIPFeatureExtractor", "size": 32, "crop_size": 32, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25],
        "resample": 3}))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": (d / "chat_template.jinja").read_text()}))
    (d / "chat_template.jinja").unlink()
    _, ours = load_pretrained(d)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "preprocessor_config.json" in out[0] and "rescale_factor" in out[0]
    assert ours.chat_template_source.endswith("chat_template.json")
    img = image()
    ref = hf_inputs(str(d), img)
    assert torch.equal(ours(ours.build_prompt(QUESTION), [img])["pixel_values"], ref["pixel_values"])
    assert ours.prompt_ids(QUESTION, (img.height, img.width)) == ref["input_ids"][0].tolist()


def test_no_image_settings_prints_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "image_aspect_ratio": "square",
                                                      "vision_config": {"image_size": 32, "patch_size": 8}}))
    ip = ImageProcessor.from_pretrained(str(tmp_path))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "config.json" in out[0] and "pad_to_square=False" in out[0]
    assert (ip.crop_size, ip.pad_to_square) == (32, False)


@pytest.mark.parametrize("template,bos", [(VICUNA, True), (MISTRAL, True), (CHATML, False), (CHATML, True)],
                         ids=["vicuna", "mistral", "chatml", "chatml-bos"])
def test_prompt_ids_equal_apply_chat_template(tmp_path, template, bos):
    d = str(tmp_path / "ckpt")
    make_checkpoint(d, template=template, bos=bos)
    _, ours = load_pretrained(d)
    assert ours.chat_template == template
    img = image(40, 56)
    ref = hf_inputs(d, img)["input_ids"][0].tolist()
    assert ours.prompt_ids(QUESTION, (img.height, img.width)) == ref
    assert ours.prompt_ids(QUESTION, (img.height, img.width), "checkpoint") == ref
    assert ours(ours.build_prompt(QUESTION), [img])["input_ids"][0].tolist() == ref  # the generate path
    assert ref.count(ID["<s>"]) == int(bos)  # the mistral template writes BOS itself: not doubled
    # a named template still selects LLaVA's own format
    named = ours.tokenizer.encode(build_prompt(QUESTION, "vicuna_v1"))
    assert ours.prompt_ids(QUESTION, (img.height, img.width), "vicuna_v1") == ours.expand_image_tokens(
        named, [(img.height, img.width)])
    if template is not VICUNA:
        assert ours.prompt_ids(QUESTION, (img.height, img.width), "vicuna_v1") != ref


def test_text_only_prompt_and_string_content_template(tmp_path):
    """A template kept only in tokenizer_config.json that reads string content (a text model's): rendered with
    "<image>\\n" + question as the content, compared with transformers' tokenizer.apply_chat_template."""
    d = str(tmp_path / "ckpt")
    make_checkpoint(d, template=None)
    tc = json.loads(open(os.path.join(d, "tokenizer_config.json")).read())
    tc["chat_template"] = STRING_CHATML
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    assert read_chat_template(d) == (STRING_CHATML, os.path.join(d, "tokenizer_config.json"))
    assert not template_reads_content_parts(STRING_CHATML) and template_reads_content_parts(CHATML)
    _, ours = load_pretrained(d)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    for with_image in (True, False):
        content = ("<image>\n" if with_image else "") + QUESTION
        ref = hf_tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert ours.tokenizer.encode(ours.build_prompt(QUESTION, with_image=with_image), add_bos=False) == ref


def test_template_choice_and_errors(tmp_path):
    d = str(tmp_path / "ckpt")
    make_checkpoint(d, template=None)
    _, ours = load_pretrained(d)
    assert ours.chat_template is None
    assert ours.build_prompt(QUESTION) == build_prompt(QUESTION, "vicuna_v1")  # auto falls back to vicuna_v1
    with pytest.raises(ValueError, match="no chat template"):
        ours.build_prompt(QUESTION, "checkpoint")
    with pytest.raises(ValueError, match="unknown template"):
        ours.build_prompt(QUESTION, "zephyr")
    with pytest.raises(ValueError, match="needs the checkpoint's processor"):
        build_prompt(QUESTION, "auto")
    with pytest.raises(ValueError, match="Only user and assistant"):  # raise_exception reaches the caller, named
        render_chat_template(MISTRAL, [{"role": "system", "content": "x"}], source="x.jinja", bos_token="<s>")
    with pytest.raises(Exception, match="unsafe|SecurityError|access"):  # sandboxed: no way to Python internals
        render_chat_template("{{ messages.__class__.__mro__ }}", [])


def test_end_ids_from_every_place():
    class Tok:
        eos_id = 2
    assert end_ids({"eos_token_id": [7, 2]}, {"text_config": {"eos_token_id": [2, 9]}}, Tok()) == [7, 2, 9]
    assert end_ids(None, {"text_config": {"eos_token_id": 5}}, Tok()) == [5, 2]
    assert end_ids({"eos_token_id": 4}, None, None) == [4]
    assert end_ids(None, None, None) == []


@pytest.fixture(scope="module")
def eos_list_ckpt(tmp_path_factory):
    """A checkpoint whose generation_config.json lists two end ids, the second one a word the model greedily
    produces a few tokens in (so transformers stops there, not at </s>)."""
    d = str(tmp_path_factory.mktemp("eos") / "ckpt")
    model = make_checkpoint(d, template=MISTRAL, seed=2)  # a seed whose greedy ids are not one repeated token
    enc = hf_inputs(d, image())
    with torch.no_grad():
        free = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=PAD_ID)[0, enc["input_ids"].shape[1]:].tolist()
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i] != EOS_ID)
    make_checkpoint(d, template=MISTRAL, gen_eos=[EOS_ID, free[k]], text_eos=[EOS_ID, free[k]], seed=2)
    return d, free, k


def test_greedy_ids_stop_at_every_end_id_like_transformers(eos_list_ckpt, tmp_path, capsys):
    d, free, k = eos_list_ckpt
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(d).eval()
    assert hf_model.generation_config.eos_token_id == [EOS_ID, free[k]]
    img = image()
    enc = hf_inputs(d, img)
    with torch.no_grad():
        ref = hf_model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    assert ref == free[:k + 1]  # transformers stopped at the second end id
    model, ours = load_pretrained(d)
    assert ours.end_ids == [EOS_ID, free[k]]
    got = generate_ids(model, ours, [img], [ours.build_prompt(QUESTION)], max_new_tokens=12)[0]
    assert got == ref
    # the CLI: --template auto (the default) takes the checkpoint's template, and stops at the same id
    from nanoalign.generate import main
    img.save(tmp_path / "img.png")
    capsys.readouterr()
    assert main(["--model", d, "--image", str(tmp_path / "img.png"), "--prompt", QUESTION, "--ids",
                 "--max-new-tokens", "12"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == ref
    ours.end_ids = [EOS_ID]  # what stopping at the tokenizer's EOS alone did: runs past the end of the turn
    assert generate_ids(model, ours, [img], [ours.build_prompt(QUESTION)], max_new_tokens=12)[0] != ref


def test_eval_and_bdhs_stop_at_every_end_id_like_transformers(eos_list_ckpt):
    """eval's generation (model_generate_fn, --template auto) and BDHS's guidance-free draw (greedy, no image token
    masked) end where transformers' greedy generation ends: at the second end id of generation_config.json."""
    from nanoalign.bdhs import BDHSSettings, bdhs_rejected
    from nanoalign.eval import model_generate_fn
    d, free, k = eos_list_ckpt
    ref = free[:k + 1]  # transformers' greedy ids (test above), the last one an end id that is not </s>
    model, ours = load_pretrained(d)
    img = image()
    hf_text = transformers.AutoProcessor.from_pretrained(d).decode(ref, skip_special_tokens=True).strip()
    assert model_generate_fn(d, 12, 1)([img], [QUESTION]) == [hf_text]
    want = ours.tokenizer.decode(ref[:-1]).strip()  # BDHS drops the end id (here a word) from its text

    class Embedder:  # cosine similarity 0 with the reference: the first draw is kept
        def encode(self, texts):
            return [[1.0, 0.0] if t == "w5 w6 ." else [0.0, 1.0] for t in texts]
    settings = BDHSSettings(rho_th=0.0, max_iters=1, temperature=0.0, max_free_tokens=12)
    r = bdhs_rejected(model, ours, [img], [QUESTION], ["w5 w6 ."], settings, embedder=Embedder(), seeds=[0])[0]
    assert r.rejected == want and not r.guided
    ours.end_ids = [EOS_ID]  # stopping at the tokenizer's EOS alone runs past the end of the turn
    r = bdhs_rejected(model, ours, [img], [QUESTION], ["w5 w6 ."], settings, embedder=Embedder(), seeds=[0])[0]
    assert r.rejected != want


def test_train_py_folder_runs_in_transformers_like_the_source(eos_list_ckpt, tmp_path):
    """OUT/final of a 1-step train.py run: the source's processor, tokenizer, template and generation files come
    through byte for byte, and under transformers it gives the pixel values, prompt ids and greedy ids nanoalign
    gives on it."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train
    src, _, _ = eos_list_ckpt
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(2):
        image(30 + 10 * i, 40, seed=i).save(tmp_path / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "prompt": "<image>\n" + QUESTION,
                     "chosen": "red cat w1 w2", "rejected": "blue dog w3 w4"})
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    train.main(train.parse_args(["--model", src, "--data", str(tmp_path / "prefs.jsonl"), "--data-format", "prefs",
                                 "--image-root", str(tmp_path / "img"), "--out", str(out), "--batch-size", "2",
                                 "--max-steps", "1", "--lr", "1e-4"]))
    final = str(out / "final")
    for name in ("processor_config.json", "chat_template.jinja", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert open(os.path.join(final, name), "rb").read() == open(os.path.join(src, name), "rb").read(), name
    assert not os.path.exists(os.path.join(final, "preprocessor_config.json"))
    img = image()
    ref = hf_inputs(final, img)  # AutoProcessor.from_pretrained(final) + apply_chat_template
    model, ours = load_pretrained(final)
    assert torch.equal(ours(ours.build_prompt(QUESTION), [img])["pixel_values"], ref["pixel_values"])
    assert ours.prompt_ids(QUESTION, (img.height, img.width)) == ref["input_ids"][0].tolist()
    assert ref["input_ids"][0].tolist() == hf_inputs(src, img)["input_ids"][0].tolist()  # as on the source
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(final).eval()
    with torch.no_grad():
        hf_ids = hf_model.generate(**ref, max_new_tokens=12, do_sample=False)[0, ref["input_ids"].shape[1]:].tolist()
    assert len(set(hf_ids)) > 1
    assert generate_ids(model, ours, [img], [ours.build_prompt(QUESTION)], max_new_tokens=12)[0] == hf_ids


def test_saved_without_source_files_loads_in_autoprocessor(tmp_path):
    """A processor built in memory (no source folder, e.g. the toy world's) saves a folder AutoProcessor loads:
    processor_config.json with patch_size, the image processor, tokenizer files; pixels and ids match."""
    d = tmp_path / "src"
    make_checkpoint(str(d), template=CHATML)
    _, loaded = load_pretrained(d)
    bare = Processor(loaded.tokenizer, loaded.image_processor, loaded.config, loaded.chat_template)
    bare.save(str(tmp_path / "out"))
    assert {"processor_config.json", "preprocessor_config.json", "chat_template.jinja"} <= set(
        os.listdir(tmp_path / "out"))
    img = image()
    ref = hf_inputs(str(tmp_path / "out"), img)
    assert torch.equal(bare(bare.build_prompt(QUESTION), [img])["pixel_values"], ref["pixel_values"])
    assert bare.prompt_ids(QUESTION, (img.height, img.width)) == ref["input_ids"][0].tolist()
