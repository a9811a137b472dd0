"""train.py end to end on a tiny llava checkpoint made by transformers: every algorithm and every data format for a few
steps, the first-step loss against the formulas and the policy log-probs against transformers' own logits, 1 rank vs
2 ranks (torchrun, FSDP2 on gloo), the saved checkpoint in transformers, exact resume, and bad input; the step's
stages (POVID's rollout, the reference log-probs) against transformers; the algorithm table and the progress bar."""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
from test_generate import tiny_checkpoint  # noqa: E402

transformers = pytest.importorskip("transformers")
WORDS = ["cat", "dog", "red", "blue"] + [f"w{i}" for i in range(28)]
PROMPT = "<image>\nwhat is in the image ?"


def _png(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _pairs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chosen = [rng.choice(WORDS) for _ in range(8)]
        rejected = list(chosen)
        rejected[2:5] = ["dog", "w7", "w8"] if chosen[2] != "dog" else ["cat", "w9", "w1"]
        out.append((" ".join(chosen), " ".join(rejected)))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, 8 images and the same 8 pairs written in every supported data format."""
    d = tmp_path_factory.mktemp("train")
    tiny_checkpoint(str(d / "ckpt"), "llava")
    (d / "img").mkdir()
    pairs = _pairs(8)
    for i in range(8):
        _png(d / "img" / f"{i}.png", 20 + 3 * i, 40, i)
    with open(d / "prefs.jsonl", "w") as f:
        for i, (c, r) in enumerate(pairs):
            f.write(json.dumps({"id": str(i), "image": f"{i}.png", "prompt": PROMPT, "chosen": c, "rejected": r}) + "\n")
    conv = lambda a: [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": a}]
    (d / "povid.json").write_text(json.dumps([{"id": str(i), "image": f"{i}.png", "conversations": conv(c),
                                               "rejected_conversations": conv(r)} for i, (c, r) in enumerate(pairs)]))
    (d / "llava.json").write_text(json.dumps([{"id": str(i), "image": f"{i}.png", "conversations": conv(c)}
                                              for i, (c, _) in enumerate(pairs)]))
    rate = lambda x: {k: {"Rating": str(x), "Rationale": "."}
                      for k in ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")}
    with open(d / "vlf.jsonl", "w") as f:
        for i, (c, r) in enumerate(pairs):
            f.write(json.dumps({"id": str(i), "prompt": "what is in the image ?", "img_path": f"{i}.png",
                                "completions": [{"model": "a", "response": c, "annotations": rate(5)},
                                                {"model": "b", "response": r, "annotations": rate(2)}]}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = []
    for i, (c, r) in enumerate(pairs):
        rows.append({"ds_name": "t", "idx": i, "image": {"bytes": (d / "img" / f"{i}.png").read_bytes(), "path": None},
                     "text": json.dumps({"question": "what is in the image ?", "chosen": c, "rejected": r})})
    pq.write_table(pa.Table.from_pylist(rows), str(d / "rlhfv.parquet"))
    return d


def run(world, tmp, *extra, data="prefs.jsonl", fmt="prefs"):
    argv = ["--model", str(world / "ckpt"), "--data", str(world / data), "--data-format", fmt,
            "--image-root", str(world / "img"), "--out", str(tmp), "--batch-size", "2", *map(str, extra)]
    train.main(train.parse_args(argv))
    return [r for r in map(json.loads, open(tmp / "metrics.jsonl")) if "step" in r]


def run_two_ranks(argv, out) -> list[dict]:
    """train.py `argv` under torchrun on 2 gloo ranks (FSDP2) with 1 example per rank, into `out`: the step
    records of its metrics.jsonl (compared by the tests with 1 rank and 2 examples)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "train.py"), *map(str, argv), "--batch-size", "1", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [x for x in map(json.loads, open(out / "metrics.jsonl")) if "step" in x]


@pytest.mark.parametrize("algo,beta,first_loss", [
    ("dpo", 0.1, math.log(2)),  # policy == reference at step 1: rho = 0, -log sigmoid(0)
    ("ddpo", 0.5, math.log(2)),
    ("ipo", 0.1, (1 / (2 * 0.1)) ** 2),  # (0 - 1/(2 beta))^2
    ("slic", 0.1, 1.0),  # max(0, 1 - 0)
    ("povid", 0.1, math.log(2)),  # both DPO terms at rho = 0
])
def test_each_algo_three_steps(world, tmp_path, algo, beta, first_loss):
    recs = run(world, tmp_path, "--algo", algo, "--beta", beta, "--max-steps", 3, "--lr", 1e-3)
    assert [r["step"] for r in recs] == [1, 2, 3]
    # a few float32 ulps: on an AVX512 CPU the step-1 margin is ~1e-7, not 0, and IPO's 25 came out one ulp (1.9e-6) low
    assert recs[0]["loss"] == pytest.approx(first_loss, rel=1e-6, abs=1e-6)
    assert recs[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert recs[-1]["loss"] != pytest.approx(first_loss, abs=1e-7)  # the optimizer moved the policy
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in recs)


def test_policy_logps_match_transformers(world, tmp_path):
    """The logged step-1 chosen/rejected scores (fused kernel path) equal sum log softmax of transformers' logits."""
    from nanoalign.batch import collate, encode_all, open_image
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.data import load_examples
    recs = run(world, tmp_path, "--algo", "dpo", "--max-steps", 1)
    _, processor = load_pretrained(world / "ckpt")
    exs, _ = load_examples(str(world / "prefs.jsonl"), "prefs", str(world / "img"))
    enc, _ = encode_all(exs, processor, str(world / "img"), "vicuna_v1", 4096)
    first = torch.randperm(len(enc), generator=torch.Generator().manual_seed(0)).tolist()[:2]  # train.py's order
    items = [enc[i] for i in first]
    b = collate(items, ["chosen", "rejected"], processor, [open_image(exs[it.index], str(world / "img")) for it in items])
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(world / "ckpt")).eval()
    with torch.no_grad():
        logits = hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"][b["image_index"]],  # one image per row
                    attention_mask=b["attention_mask"]).logits
    labels = b["labels"]
    lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    seq = (lp * (labels != -100)).sum(1)  # (4,)
    assert recs[0]["logp_chosen"] == pytest.approx(float(seq[:2].mean()), abs=1e-3)
    assert recs[0]["logp_rejected"] == pytest.approx(float(seq[2:].mean()), abs=1e-3)


@pytest.mark.parametrize("fmt,data,algo", [("povid", "povid.json", "dpo"), ("vlfeedback", "vlf.jsonl", "ipo"),
                                           ("rlhfv", "rlhfv.parquet", "ddpo"), ("llava", "llava.json", "sft")])
def test_every_data_format(world, tmp_path, fmt, data, algo):
    recs = run(world, tmp_path, "--algo", algo, "--max-steps", 3, data=data, fmt=fmt)
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)


def test_sft_step1_loss_matches_transformers(world, tmp_path):
    """sft's logged step-1 loss = the NLL of transformers' logits on the first batch averaged over the batch's tokens
    (LLaVA's token mean, not a mean of per-example means)."""
    from nanoalign.batch import collate, encode_all, open_image
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.data import load_examples
    conv = lambda a: [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": a}]
    data = tmp_path / "sft.json"  # answers of 1..8 words: token mean and mean of example means differ
    data.write_text(json.dumps([{"id": str(i), "image": f"{i}.png", "conversations": conv(" ".join(WORDS[:i + 1]))}
                                for i in range(8)]))
    recs = run(world, tmp_path / "run", "--algo", "sft", "--max-steps", 1, data=data, fmt="llava")
    _, processor = load_pretrained(world / "ckpt")
    exs, _ = load_examples(str(data), "llava", str(world / "img"))
    enc, _ = encode_all(exs, processor, str(world / "img"), "vicuna_v1", 4096)
    first = torch.randperm(len(enc), generator=torch.Generator().manual_seed(0)).tolist()[:2]  # train.py's order
    items = [enc[i] for i in first]
    b = collate(items, ["chosen"], processor, [open_image(exs[it.index], str(world / "img")) for it in items])
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(world / "ckpt")).eval()
    with torch.no_grad():
        logits = hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"][b["image_index"]],
                    attention_mask=b["attention_mask"]).logits
    labels = b["labels"]
    nll = -torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    per_token = float(nll.sum() / (labels != -100).sum())
    per_example = float((nll.sum(1) / (labels != -100).sum(1)).mean())
    assert abs(per_token - per_example) > 1e-3  # the batch can tell the two apart
    assert recs[0]["loss"] == pytest.approx(per_token, abs=1e-4)


def test_checkpoint_loads_in_transformers_and_lora_adapter(world, tmp_path):
    run(world, tmp_path, "--algo", "dpo", "--max-steps", 2, "--lr", 1e-2, "--lora-rank", 4)
    final = tmp_path / "final"
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(final), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from nanoalign.checkpoint import load_pretrained
    ours, _ = load_pretrained(final)
    base, _ = load_pretrained(world / "ckpt")
    ids = torch.tensor([[1, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a = hf(input_ids=ids).logits
        b = ours.logits(ours(ids))
        c = base.logits(base(ids))
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(b, c, atol=1e-4)  # the merged LoRA update is in the saved weights
    assert (final / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_is_exact(world, tmp_path):
    """Interrupted after the step-2 checkpoint and resumed == uninterrupted (LoRA dropout draws random numbers)."""
    args = ["--algo", "ddpo", "--max-steps", 4, "--save-every", 2, "--keep", 3, "--lr", 1e-3, "--lora-rank", 4,
            "--lora-dropout", 0.2]
    full = run(world, tmp_path / "a", *args)
    run(world, tmp_path / "b", *args)
    for p in ["final"]:  # simulate a crash right after the step-2 checkpoint: later state gone
        shutil.rmtree(tmp_path / "b" / p)
    assert (tmp_path / "b" / "step-000002" / "train_state.json").is_file()
    resumed = run(world, tmp_path / "b", *args, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # bit-exact on CPU
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full]


def test_nan_loss_stops_before_the_step_and_keeps_checkpoint(world, tmp_path, monkeypatch):
    from nanoalign import objective
    real = objective.preference_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss, m = real(*a, **kw)
        return (loss * float("nan") if calls["n"] == 3 else loss), m
    monkeypatch.setattr(objective, "preference_loss", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss nan at step 3.*step-000002"):
        run(world, tmp_path, "--algo", "dpo", "--max-steps", 4, "--save-every", 2)
    assert (tmp_path / "step-000002" / "model.safetensors").is_file()
    assert not (tmp_path / "final").exists()


def test_bad_input(world, tmp_path):
    with pytest.raises(ValueError, match="no example left to train on.*prompt_too_long"):
        run(world, tmp_path, "--algo", "dpo", "--max-steps", 1, "--max-len", 10)
    with pytest.raises(ValueError, match="--algo dpo needs prompt, chosen, rejected in each row"):
        run(world, tmp_path, "--algo", "dpo", "--max-steps", 1, data="llava.json", fmt="llava")


def test_two_ranks_match_one_rank(world, tmp_path):
    """FSDP2 on 2 gloo ranks with 1 pair per rank == 1 rank with 2 pairs: same losses and gradient norms."""
    common = ["--model", str(world / "ckpt"), "--data", str(world / "prefs.jsonl"), "--image-root",
              str(world / "img"), "--algo", "dpo", "--max-steps", "3", "--lr", "1e-3"]
    one = run(world, tmp_path / "one", "--algo", "dpo", "--max-steps", 3, "--lr", 1e-3)
    two = run_two_ranks(common, tmp_path / "two")
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_cli_bad_input_is_one_line(world, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--model", str(world / "ckpt"), "--data",
                        str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: no such file or folder: {tmp_path / 'missing.jsonl'} (--data)"]


def test_the_table_drives_the_parser():
    from nanoalign.losses import LOSS_TYPES
    with pytest.raises(SystemExit):
        train.parse_args(["--algo", "nope"])  # choices come from the table
    for name, algo in train.ALGOS.items():
        reward = ["--reward", "oracle"] if name in train.RL else []  # RL needs a reward spec with --model
        args = train.parse_args(["--algo", name, "--model", "m", "--data", "d", *reward])  # (no toy-world defaults)
        assert args.beta == algo.beta and args.out == f"runs/{name}"
        assert algo.loss in (*LOSS_TYPES, "nll", "bt", *train.RL) and algo.weights in (None, "ddpo")
        assert algo.responses in ("none", "noisy_self", "k_samples", *train.rollout.ONLINE)
        assert algo.data in ("pairs", "responses", "prompts") and algo.reward in (None, "annotator", "reward")
    with pytest.raises(SystemExit):
        train.parse_args(["--algo", "grpo", "--model", "m", "--data", "d"])  # RL without --reward
    assert train.ALGOS["ddpo"].loss == "dpo" and train.ALGOS["ddpo"].beta == 0.5  # RLHF-V: a weighting of DPO
    assert train.parse_args(["--algo", "ddpo", "--beta", "0.7", "--model", "m", "--data", "d"]).beta == 0.7


def _logps_by_transformers(hf, b, pixel_values):
    """(R, T) float64 log p(label) from transformers' full logits (0 off-response), one image per row."""
    with torch.no_grad():
        logits = hf(input_ids=b["input_ids"], pixel_values=pixel_values[b["image_index"]],
                    attention_mask=b["attention_mask"]).logits
    labels = b["labels"]
    lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return lp * (labels != -100), logits


def test_rollout_and_reference_stages_match_transformers(world, tmp_path):
    """POVID's noisy-self tokens = argmax of transformers' logits under the same noised image (image token excluded);
    the reference stage's cached rows and frozen-reference rows = transformers' log-probs of the clean image."""
    from nanoalign import rollout
    from nanoalign.batch import collate, encode_all, open_image
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.data import load_examples
    from nanoalign.noise import noisy_pixel_values
    from nanoalign.refcache import build_cache, reference_logps
    img = str(world / "img")
    policy, processor = load_pretrained(world / "ckpt")
    exs, _ = load_examples(str(world / "prefs.jsonl"), "prefs", img)
    enc, _ = encode_all(exs, processor, img, "vicuna_v1", 4096)
    cache, keys = build_cache(policy, exs, enc, processor, world / "ckpt", tmp_path / "rc", img, "vicuna_v1", 3, "cpu")
    items = enc[1:4]
    P = len(items)
    b = collate(items, ["chosen", "rejected"], processor, [open_image(exs[it.index], img) for it in items])
    torch.manual_seed(7)
    b3 = rollout.noisy_self(policy, items, b, processor, 500, "cpu")
    ip = processor.image_processor
    torch.manual_seed(7)
    noisy = noisy_pixel_values(b["pixel_values"], ip.image_mean, ip.image_std, 500)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(world / "ckpt")).eval()
    _, logits = _logps_by_transformers(hf, {**b, "input_ids": b["input_ids"][:P],
                                            "attention_mask": b["attention_mask"][:P], "labels": b["labels"][:P],
                                            "image_index": b["image_index"][:P]}, noisy)
    image_token = hf.config.image_token_id
    logits[..., image_token] = -float("inf")
    for r, it in enumerate(items):
        scored = b["labels"][r] != -100
        assert it.noisy_ids == logits[r][scored].argmax(-1).tolist()
    assert b3["labels"].shape[0] == 3 * P
    T = b["labels"].shape[1]
    assert torch.equal(b3["labels"][:2 * P, :T], b["labels"]) and (b3["labels"][:2 * P, T:] == -100).all()
    ref = reference_logps(b3, [keys[it.index] for it in items], cache, policy, "cpu")  # the policy is untrained
    want, _ = _logps_by_transformers(hf, b3, b3["pixel_values"])
    assert ref.shape == b3["labels"].shape
    assert torch.allclose(ref.double(), want, atol=1e-4)
    assert (ref[2 * P:][b3["labels"][2 * P:] != -100] != 0).all()  # the noisy rows were scored, not left at 0
    no_cache = reference_logps(b3, None, None, policy, "cpu")  # online algorithms: every row from the reference
    assert torch.allclose(no_cache.double(), want, atol=1e-4)


def test_progress_fallback_line_and_counts(monkeypatch, capsys):
    from nanoalign.trainutil import Progress
    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: the plain stderr line
    bar = Progress(5, desc="pairs", unit="ex", enabled=True)
    bar.update(n=2)
    bar.update("last", n=3)
    bar.close()
    err = capsys.readouterr().err
    assert "pairs 5/5" in err and "ex/s" in err and "last" in err and bar.n == 5
    quiet = Progress(3, enabled=False)
    quiet.update()
    quiet.close()
    assert capsys.readouterr().err == "" and quiet.n == 1
