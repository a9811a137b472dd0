"""nanoalign.generate: the CLI end-to-end on tiny checkpoints saved by transformers (its `--ids` output compared
with transformers' own greedy generate on the same input), generate_text's stop strings / batching, CLI errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nanoalign.generate import generate_text, main
from nanoalign.image import ImageProcessor
from nanoalign.tokenizer import Processor, Tokenizer
from test_tokenizer import make_tokenizer_json

transformers = pytest.importorskip("transformers")
PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
IMAGE_ID, PAD_ID, EOS_ID = 48, 3, 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_checkpoint(directory, model_type):
    """A random tiny Llava(Next)ForConditionalGeneration + transformers' PIL image processor + our tokenizer.json,
    all saved by transformers / tokenizers. Returns (hf_model, hf_processor)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=IMAGE_ID + 1, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    if model_type == "llava":
        cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                       pad_token_id=PAD_ID)
        model = transformers.LlavaForConditionalGeneration(cfg)
        ip = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=True)
        proc_cls = transformers.LlavaProcessor
    else:
        cfg = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                           pad_token_id=PAD_ID, image_grid_pinpoints=PINS)
        model = transformers.LlavaNextForConditionalGeneration(cfg)
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=PINS)
        proc_cls = transformers.LlavaNextProcessor
    with torch.no_grad():  # larger weights than the init so greedy decoding is not a constant token
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.eval().save_pretrained(directory)
    ip.save_pretrained(directory)
    path = make_tokenizer_json(directory)
    hft = transformers.PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    proc = proc_cls(image_processor=ip, tokenizer=hft, patch_size=8, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1)
    return model, proc


def write_image(path, h, w, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
def test_cli_ids_match_transformers_greedy(tmp_path, model_type, capsys):
    ckpt = str(tmp_path / "ckpt")
    hf_model, hf_proc = tiny_checkpoint(ckpt, model_type)
    img_path = write_image(str(tmp_path / "img.png"), 24, 50)
    question = "what is in the image ?"
    n_new = 12
    argv = ["--model", ckpt, "--image", img_path, "--prompt", question, "--max-new-tokens", str(n_new), "--ids"]
    if model_type == "llava":  # the real CLI in a fresh interpreter once; in-process otherwise (imports cost seconds)
        r = subprocess.run([sys.executable, "-m", "nanoalign.generate"] + argv, capture_output=True, text=True,
                           cwd=REPO, timeout=120)
        assert r.returncode == 0, r.stderr
        out = r.stdout
    else:
        assert main(argv) == 0
        out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    ours = [int(t) for t in out.split()]
    # transformers on the same prompt (vicuna_v1 template written out by hand) and image
    prompt = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: <image>\nwhat is in the image ? ASSISTANT:")
    enc = hf_proc(text=[prompt], images=[Image.open(img_path)], return_tensors="pt")
    with torch.no_grad():
        ref = hf_model.generate(**enc, max_new_tokens=n_new, do_sample=False, eos_token_id=EOS_ID,
                                pad_token_id=PAD_ID)[0, enc["input_ids"].shape[1]:].tolist()
    assert len(set(ref)) > 1  # a meaningful comparison, not a constant token
    assert ours == ref
    # the raw template with the same text, in-process this time (a subprocess costs seconds of imports): same ids
    raw = prompt.replace("<image>\n", "<image> ")  # WordLevel splits on whitespace: same tokens
    assert main(["--model", ckpt, "--image", img_path, "--prompt", raw, "--template", "raw", "--ids",
                 "--max-new-tokens", str(n_new)]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == ref


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ck") / "llava")
    tiny_checkpoint(d, "llava")
    return d


def test_generate_text_stop_strings_and_batching(ckpt_dir, tmp_path):
    from nanoalign.checkpoint import load_pretrained
    model, processor = load_pretrained(ckpt_dir)
    imgs = [Image.open(write_image(str(tmp_path / f"{i}.png"), 20 + 7 * i, 40 - 5 * i, seed=i)) for i in range(3)]
    qs = ["what is in the image ?", "red cat", "blue dog ?"]
    full = generate_text(model, processor, imgs, qs, max_new_tokens=8, batch_size=3)
    alone = generate_text(model, processor, imgs, qs, max_new_tokens=8, batch_size=1)
    assert full == alone  # left padding in a batch does not change greedy answers
    words = full[0].split()
    assert len(words) >= 3
    stop = words[2]  # cut before the third word's first occurrence
    cut = generate_text(model, processor, imgs[:1], qs[:1], max_new_tokens=8, stop=[stop])[0]
    assert cut == full[0][: full[0].find(stop)].strip()
    # sampling is reproducible with a seed
    s1 = generate_text(model, processor, imgs, qs, max_new_tokens=4, temperature=1.0, top_p=0.9, seed=3)
    s2 = generate_text(model, processor, imgs, qs, max_new_tokens=4, temperature=1.0, top_p=0.9, seed=3)
    assert s1 == s2


def test_cli_errors(ckpt_dir, tmp_path, capsys):
    img = write_image(str(tmp_path / "i.png"), 10, 10)
    cases = [
        (["--model", str(tmp_path / "nope"), "--image", img, "--prompt", "x"],
         f"no such file or folder: {tmp_path / 'nope'} (--model)"),
        (["--model", ckpt_dir, "--image", str(tmp_path / "missing.png"), "--prompt", "x"],
         f"no such file or folder: {tmp_path / 'missing.png'} (--image)"),
        (["--model", ckpt_dir, "--image", __file__, "--prompt", "x"], "cannot read image"),
        (["--model", ckpt_dir, "--image", img, "--prompt", "red cat", "--template", "raw"], "has no <image>"),
        (["--model", ckpt_dir, "--image", img, "--prompt", "<image> a <image>"], "exactly one"),
        (["--model", ckpt_dir, "--image", img, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--model", ckpt_dir, "--image", img, "--prompt", "x", "--temperature", "nan"], "--temperature"),
        (["--model", ckpt_dir, "--image", img, "--prompt", "x", "--temperature", "inf"], "--temperature"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, (argv, err)


def test_generate_text_with_stub_engine_passes_end_ids_and_stop(tmp_path, monkeypatch):
    """Independent of the model: the engine replaced by a stub returning fixed ids (trimmed at the end id)."""
    from nanoalign import engine
    tok = Tokenizer.from_file(make_tokenizer_json(tmp_path))
    cfg = {"model_type": "llava", "image_token_index": IMAGE_ID, "vision_config": {"image_size": 16, "patch_size": 8}}
    proc = Processor(tok, ImageProcessor.from_model_config(cfg), cfg)
    w = tok.tok.token_to_id
    calls = []

    def stub(policy, batch, n_per_prompt, temperature, top_p, max_new_tokens, end_ids, generator, pad_id, stop_fn):
        calls.append((batch, end_ids, pad_id, stop_fn, n_per_prompt))
        rows = [[w("red"), w("cat"), EOS_ID], [w("blue"), w("dog"), w("is"), w("red")]]
        return engine.Rollout(rows[: batch["input_ids"].shape[0]], [True, False])

    monkeypatch.setattr(engine, "sample", stub)
    model = torch.nn.Linear(1, 1)
    out = generate_text(model, proc, [Image.new("RGB", (9, 7)), None], ["what ?", "blue"], stop="is")
    assert out == ["red cat", "blue dog"]
    (batch, end_ids, pad_id, stop_fn, n), = calls
    assert end_ids == [EOS_ID] and pad_id == PAD_ID and n == 1
    assert stop_fn(0, [w("blue"), w("is")]) and not stop_fn(0, [w("blue")])
    ids = batch["input_ids"]
    assert (ids[0] == IMAGE_ID).sum() == 4 and (ids[1] == IMAGE_ID).sum() == 0  # text-only row gets no <image>
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    generate_text(model, proc, [None], ["blue"], end_ids=[5, 7])  # a list of end ids is passed down as given
    assert calls[-1][1] == [5, 7]
