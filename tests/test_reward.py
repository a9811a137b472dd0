"""nanoalign.reward: the Bradley-Terry loss by hand, RM rewards against transformers' hidden states on the same
weights, an RM learning a separable toy preference, the head file beside a checkpoint that still loads as llava-hf,
the one-line failures (missing head, other tokenizer), and the reward specs (rm:, module:function, oracle)."""
import json
import math
import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from nanoalign import reward as rw
from nanoalign.batch import collate, encode_all, open_image
from nanoalign.checkpoint import load_pretrained, save_pretrained
from nanoalign.data import Example, load_examples
from test_generate import tiny_checkpoint

transformers = pytest.importorskip("transformers")
FILLER = ["dog", "red", "blue"] + [f"w{i}" for i in range(28)]  # words of the tiny tokenizer; "cat" is the signal
PROMPT = "<image>\nwhat is in the image ?"


def _png(path, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def write_pairs(path, img_dir, n, seed, signal="cat"):
    """prefs JSONL of n pairs: chosen = 6 filler words with `signal` put at a random place, rejected = the same
    words with a filler word there instead (a preference separable by one token)."""
    rng = random.Random(seed)
    img_dir.mkdir(exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            words = [rng.choice(FILLER) for _ in range(6)]
            pos = rng.randrange(7)
            chosen = words[:pos] + [signal] + words[pos:]
            rejected = words[:pos] + [rng.choice(FILLER)] + words[pos:]
            name = f"{seed}_{i}.png"
            _png(img_dir / name, seed * 1000 + i)
            f.write(json.dumps({"id": f"s{seed}-{i}", "image": name, "prompt": PROMPT, "chosen": " ".join(chosen),
                                "rejected": " ".join(rejected)}) + "\n")
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm") / "ckpt"
    tiny_checkpoint(str(d), "llava")
    return d


def _batches(path, img_dir, processor):
    exs, _ = load_examples(str(path), "prefs", str(img_dir))
    enc, _ = encode_all(exs, processor, str(img_dir), "vicuna_v1", 4096, log=lambda *a: None)
    return exs, enc


def _collate(exs, enc, img_dir, processor, idx):
    items = [enc[i] for i in idx]
    return collate(items, ["chosen", "rejected"], processor, [open_image(exs[it.index], str(img_dir)) for it in items])


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([1.0, 0.0], requires_grad=True), torch.tensor([0.0, 0.0])
    loss, m = rw.bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx((-math.log(1 / (1 + math.exp(-1))) + math.log(2)) / 2)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == 0.5  # the tie counts as wrong
    loss.backward()  # dL/dr_w = -sigmoid(-margin) / P
    assert torch.allclose(rc.grad, torch.tensor([-1 / (1 + math.e) / 2, -0.5 / 2]))


def test_rewards_match_transformers(ckpt, tmp_path):
    """r = head(h at the last response token): our model vs transformers' last_hidden_state on the same ids."""
    model, processor = load_pretrained(ckpt)
    exs, enc = _batches(write_pairs(tmp_path / "p.jsonl", tmp_path / "img", 3, 0), tmp_path / "img", processor)
    b = _collate(exs, enc, tmp_path / "img", processor, range(3))
    head = rw.reward_head(model.config.text_config.hidden_size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = rw.sequence_rewards(model, head, b, "cpu")
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(ckpt)).eval()
        h = hf.model(input_ids=b["input_ids"], pixel_values=b["pixel_values"][b["image_index"]],
                     attention_mask=b["attention_mask"]).last_hidden_state  # (6, T, H)
    last = (b["attention_mask"].sum(1) - 1)  # right padding: the last real token is the last response token
    ref = head(h[torch.arange(6), last]).squeeze(-1)
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)


def test_rm_learns_separable_preference_and_round_trips(ckpt, tmp_path):
    torch.manual_seed(0)
    model, processor = load_pretrained(ckpt)
    img = tmp_path / "img"
    train = _batches(write_pairs(tmp_path / "train.jsonl", img, 48, 1), img, processor)
    held = _batches(write_pairs(tmp_path / "held.jsonl", img, 32, 2), img, processor)
    head = rw.reward_head(model.config.text_config.hidden_size, torch.Generator().manual_seed(0))
    model.train()
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=2e-3)

    def accuracy():
        with torch.no_grad():
            b = _collate(*held, img, processor, range(32))
            r = rw.sequence_rewards(model, head, b, "cpu")
        return float((r[:32] > r[32:]).float().mean()), r

    before, _ = accuracy()
    if before > 0.5:  # the random init already prefers "cat" (a consistent token rule is either way at init):
        for exs, enc in (train, held):  # learn the opposite preference, so that it must move from <= chance
            enc[:] = [replace(e, chosen_ids=e.rejected_ids, rejected_ids=e.chosen_ids) for e in enc]
        before, _ = accuracy()
    assert before <= 0.5
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        idx = torch.randint(0, 48, (8,), generator=g).tolist()
        r = rw.sequence_rewards(model, head, _collate(*train, img, processor, idx), "cpu")
        loss, m = rw.bradley_terry_loss(r[:8], r[8:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after, r_held = accuracy()
    print(f"held-out accuracy {before:.3f} -> {after:.3f} after 40 steps")
    assert after > 0.9, (before, after)

    # save: a plain llava-hf folder + the head file; load back: same rewards; transformers still loads it
    out = tmp_path / "rm"
    save_pretrained(model, processor, out)
    f = rw.save_reward_head(out, head, processor.tokenizer, "vicuna_v1", train_data="train.jsonl")
    assert f.name == rw.HEAD_FILE
    rm = rw.load_reward_model(out, policy_tokenizer=processor.tokenizer)
    assert rm.meta["train_data"] == "train.jsonl" and rm.template == "vicuna_v1"
    rc, rr = rw.pair_rewards(rm, held[0], held[1], str(img), batch_size=16)
    assert torch.allclose(torch.cat([rc, rr]), r_held, atol=1e-5)
    load_pretrained(out)
    transformers.LlavaForConditionalGeneration.from_pretrained(str(out))
    # the text path (re-tokenizing with the RM's processor) gives the same rewards as the batch path
    exs, enc = held[0], held[1][:3]
    score = rw.load_reward(f"rm:{out}", policy_tokenizer=processor.tokenizer)
    ims = [open_image(exs[it.index], str(img)) for it in enc]
    texts = [processor.tokenizer.decode(it.chosen_ids) for it in enc]  # the (possibly swapped) chosen response
    assert torch.allclose(score([exs[it.index] for it in enc], ims, texts), rc[:3], atol=1e-5)


def test_rm_load_failures_are_one_line(ckpt, tmp_path):
    _, processor = load_pretrained(ckpt)
    rm = tmp_path / "rm"
    shutil.copytree(ckpt, rm)
    with pytest.raises(ValueError, match=f"no {rw.HEAD_FILE}: not a reward model") as e:
        rw.load_reward_model(rm)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no reward_head"):
        rw.load_reward(f"rm:{rm}")
    rw.save_reward_head(rm, rw.reward_head(32), processor.tokenizer, "vicuna_v1")
    rw.load_reward_model(rm, policy_tokenizer=processor.tokenizer)  # fine
    # a policy whose tokenizer swaps two ids
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    v = tj["model"]["vocab"]
    v["cat"], v["dog"] = v["dog"], v["cat"]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    _, other_proc = load_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer differs from the policy's .token 'cat' has id") as e:
        rw.load_reward_model(rm, policy_tokenizer=other_proc.tokenizer)
    assert "\n" not in str(e.value)
    # same file, only reformatted: same fingerprint
    (other / "tokenizer.json").write_text(json.dumps(json.loads((ckpt / "tokenizer.json").read_text()), indent=4))
    assert rw.tokenizer_fingerprint(other) == rw.tokenizer_fingerprint(processor.tokenizer)
    # the RM folder's own tokenizer replaced after training
    shutil.copy(other / "tokenizer.json", rm / "tokenizer.json")
    tj["model"]["vocab"] = v
    (rm / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="not the one the reward head was trained with"):
        rw.load_reward_model(rm)
    (rm / rw.HEAD_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        rw.load_reward_model(rm)


def _examples(n, **extra):
    return [Example(f"ex{i}", None, f"q{i}", "", extra={**extra}) for i in range(n)]


def test_user_function_reward(tmp_path):
    (tmp_path / "rules.py").write_text(
        "def length(images, prompts, responses):\n    return [len(r) for r in responses]\n"
        "def picky(images, prompts, responses):\n"
        "    if any('boom' in r for r in responses):\n        raise RuntimeError('cannot judge')\n"
        "    return [1.0] * len(responses)\n"
        "def nan(images, prompts, responses):\n    return [float('nan') if r == 'x' else 0.0 for r in responses]\n"
        "def short(images, prompts, responses):\n    return [0.0]\n"
        "def none(images, prompts, responses):\n    return None\n"
        "def one(images, prompts, responses):\n    return 3.0\n"
        "def text(images, prompts, responses):\n    return 'abc'\n")
    exs = _examples(3)
    f = rw.load_reward(f"{tmp_path}/rules.py:length")
    assert torch.equal(f(exs, [None] * 3, ["a", "bbb", ""]), torch.tensor([1.0, 3.0, 0.0]))
    with pytest.raises(ValueError, match="example ex1: raised RuntimeError: cannot judge"):
        rw.load_reward(f"{tmp_path}/rules.py:picky")(exs, [None] * 3, ["a", "boom", "c"])
    with pytest.raises(ValueError, match="example ex2: non-finite reward nan"):
        rw.load_reward(f"{tmp_path}/rules.py:nan")(exs, [None] * 3, ["a", "b", "x"])
    with pytest.raises(ValueError, match="returned 1 values for 3 responses"):
        rw.load_reward(f"{tmp_path}/rules.py:short")(exs, [None] * 3, ["a", "b", "c"])
    for name, shown in (("none", "NoneType None"), ("one", "float 3.0"), ("text", "str 'abc'")):  # not a list: one line
        with pytest.raises(ValueError, match=f"returned {shown}; it must return a list of 3 numbers"):
            rw.load_reward(f"{tmp_path}/rules.py:{name}")(exs, [None] * 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="has no function 'nope'"):
        rw.load_reward(f"{tmp_path}/rules.py:nope")
    with pytest.raises(ValueError, match="cannot import no_such_module_xyz"):
        rw.load_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="expected rm:PATH"):
        rw.load_reward("justaname")
    # an importable module path works too (math.fsum of nothing: a builtin called with 3 arguments raises)
    with pytest.raises(ValueError, match="example ex0: raised TypeError"):
        rw.load_reward("math:fsum")(exs, [None] * 3, ["a", "b", "c"])


def test_oracle_reward_with_a_stand_in(tmp_path, monkeypatch):
    """The scene comes from the row's `scene` key or, by image file name, from a toy scenes_*.jsonl."""
    calls = []

    def stand_in(response, scene, question=None):
        calls.append((response, scene["tag"], question))
        return {"score": float(len(response))} if scene["tag"] != "plain" else 0.5

    monkeypatch.setattr(rw, "_default_oracle", lambda: stand_in)
    scenes = tmp_path / "scenes_train.jsonl"
    scenes.write_text(json.dumps({"image": "train_000001.png", "tag": "file"}) + "\n")
    exs = [Example("a", "/data/images/train_000001.png", "<image>\nDescribe the image.", ""),
           Example("b", None, "How many cats?", "", extra={"scene": {"tag": "plain"}})]
    f = rw.load_reward(f"oracle:{scenes}")
    assert torch.equal(f(exs, [None, None], ["four", "x"]), torch.tensor([4.0, 0.5]))
    assert calls == [("four", "file", "Describe the image."), ("x", "plain", "How many cats?")]
    lost = [Example("c", "/x/train_000009.png", "<image>\nq", "")]
    with pytest.raises(ValueError, match="example c has no scene; its image 'train_000009.png' is not in"):
        f(lost, [None], ["r"])
    with pytest.raises(ValueError, match="example c has no scene .give oracle:SCENES"):
        rw.load_reward("oracle")(lost, [None], ["r"])


def test_oracle_reward_default_is_the_toy_judge():
    """With no stand-in the adapter calls the toy world's oracle_score: a scene's own caption scores 1."""
    from nanoalign.toy import world as tw
    scene = tw.make_scenes(1, 0, "train")[0]
    ex = Example("t0", None, "<image>\n" + tw.CAPTION_PROMPT, "", extra={"scene": scene})
    assert rw.load_reward("oracle")([ex], [None], [tw.caption(scene)]).item() == pytest.approx(1.0)
