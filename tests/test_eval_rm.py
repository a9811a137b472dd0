"""python -m nanoalign.eval_rm: accuracy per (reward model, data set) against rewards computed with transformers'
hidden states on the same weights and ids, the Table 7 layout, and bad input (one line, exit code 2)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanoalign import eval_rm
from nanoalign import reward as rw
from nanoalign.batch import collate, encode_all, open_image
from nanoalign.checkpoint import load_pretrained
from nanoalign.data import load_examples
from test_generate import tiny_checkpoint
from test_reward import write_pairs

transformers = pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_rm")
    tiny_checkpoint(str(d / "ckpt"), "llava")
    _, processor = load_pretrained(d / "ckpt")
    rms = []
    for seed, train_data in ((0, "setA"), (1, None)):
        rm = d / f"rm{seed}"
        shutil.copytree(d / "ckpt", rm)
        head = rw.reward_head(32, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            head.bias.fill_(0.3 * seed)  # the bias cancels in every margin
        rw.save_reward_head(rm, head, processor.tokenizer, "vicuna_v1", train_data=train_data)
        rms.append((rm, head))
    write_pairs(d / "a.jsonl", d / "img", 6, 3)
    write_pairs(d / "b.jsonl", d / "img", 5, 4, signal="dog")
    return d, rms


def _reference_margins(ckpt, head, data, img):
    """r(chosen) - r(rejected) with transformers' LlavaModel hidden states at the last response token."""
    _, processor = load_pretrained(ckpt)
    exs, _ = load_examples(str(data), "prefs", str(img))
    enc, _ = encode_all(exs, processor, str(img), "vicuna_v1", 4096, log=lambda *a: None)
    b = collate(enc, ["chosen", "rejected"], processor, [open_image(exs[it.index], str(img)) for it in enc])
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        h = hf.model(input_ids=b["input_ids"], pixel_values=b["pixel_values"][b["image_index"]],
                     attention_mask=b["attention_mask"]).last_hidden_state
        last = b["attention_mask"].sum(1) - 1  # right padding: the last real token ends the response
        r = head(h[torch.arange(h.shape[0]), last]).squeeze(-1)
    P = len(enc)
    return r[:P] - r[P:]


def test_accuracy_table_matches_transformers(setup, tmp_path, capsys):
    d, rms = setup
    argv = ["--image-root", str(d / "img"), "--json", str(tmp_path / "t.json"), "--batch-size", "4"]
    for rm, _ in rms:
        argv += ["--model", str(rm)]
    for name in ("a.jsonl", "b.jsonl"):
        argv += ["--data", str(d / name), "--data-format", "prefs"]
    assert eval_rm.main(argv) == 0
    table = capsys.readouterr().out.strip().splitlines()
    out = json.loads((tmp_path / "t.json").read_text())
    assert len(out["results"]) == 4
    for res in out["results"]:
        head = dict((str(p), h) for p, h in rms)[res["model"]]
        margin = _reference_margins(d / "ckpt", head, res["data"], d / "img")
        assert (margin.abs() > 1e-4).all()  # no near-tie that rounding could flip
        assert res["pairs"] == len(margin) and res["ties"] == 0
        assert res["accuracy"] == pytest.approx(float((margin > 0).float().mean()))
        assert res["mean_margin"] == pytest.approx(float(margin.mean()), abs=1e-5)
    # Table 7 layout: a header, a rule, one row per model; the train data recorded at training labels the row
    assert table[0] == "| reward model | train data | a.jsonl | b.jsonl |"
    assert len(table) == 4 and "| setA |" in table[2] and "| ? |" in table[3]
    cells = {(r["model"], r["data_label"]): r["accuracy"] for r in out["results"]}
    assert table[2].endswith(f"| {cells[(str(rms[0][0]), 'a.jsonl')]:.2f} | {cells[(str(rms[0][0]), 'b.jsonl')]:.2f} |")


def test_bad_input_one_line_exit_2(setup, tmp_path, capsys):
    d, rms = setup
    base = ["--image-root", str(d / "img"), "--data", str(d / "a.jsonl")]
    cases = [
        (["--model", str(d / "ckpt")], "no reward_head.safetensors"),  # a checkpoint without a head
        (["--model", str(tmp_path / "nope")], f"no such file or folder: {tmp_path / 'nope'} (--model)"),
        (["--model", str(rms[0][0]), "--data", str(tmp_path / "missing.jsonl")],
         f"no such file or folder: {tmp_path / 'missing.jsonl'} (--data)"),
    ]
    for i, (extra, msg) in enumerate(cases):
        if i == 0:  # the real command line once, in a fresh interpreter; in-process otherwise (imports cost seconds)
            r = subprocess.run([sys.executable, "-m", "nanoalign.eval_rm", *base, *extra], capture_output=True,
                               text=True, cwd=REPO, timeout=120)
            rc, stderr = r.returncode, r.stderr
        else:
            rc = eval_rm.main(base + extra)
            stderr = capsys.readouterr().err
        assert rc == 2, stderr
        err = [l for l in stderr.splitlines() if l.startswith("error:")]
        assert len(err) == 1 and msg in err[0], stderr
        assert "Traceback" not in stderr
    with pytest.raises(SystemExit) as e:  # argparse: --data-format neither once nor once per --data
        eval_rm.parse_args(["--model", "m", "--data", "a", "--data", "b", "--data", "c", "--data-format", "prefs",
                            "--data-format", "povid"])
    assert e.value.code == 2
