"""Precision on one process and under FSDP (2 gloo ranks): --dtype bf16 (bf16 weights), --amp (fp32 weights, bf16
compute) and --dtype fp16 (an fp16 base with fp32 LoRA adapters, dynamic loss scaling). Each step runs, its loss is
within the dtype's tolerance of fp32's on the same tiny checkpoint and data, and final/ holds what transformers loads
in the dtype the user asked for.

The tolerance, from the dtype's machine epsilon eps (torch.finfo: bf16 2^-7, fp16 2^-10): rounding a value to the
dtype is a relative error of at most u = eps / 2. A loss of the 2-layer test model goes through about a dozen rounded
stages (embeddings, per layer the attention and the MLP with their norms, the LM head's input); errors of random sign
add like sqrt(n) u, about 2 eps for n = 12. TOL = 4 eps leaves a factor of 2: 3.1e-2 for bf16, 3.9e-3 for fp16. The
measured deviations are well inside (bf16 up to 0.4 eps, fp16 up to 0.1 eps), and each test also checks that the loss
is not fp32's exactly (it did compute in the lower precision)."""
import math
import re
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from test_rl_train import rewards_file, run as run_rl  # noqa: E402,F401
from test_train import run, run_two_ranks, world  # noqa: E402,F401

transformers = pytest.importorskip("transformers")


def tol(dtype) -> float:
    return 4 * torch.finfo(dtype).eps  # relative; derivation in the module docstring


def loaded_dtype(final) -> torch.dtype:
    """The dtype transformers gives the saved checkpoint when the user names none (transformers 5: "auto")."""
    return transformers.LlavaForConditionalGeneration.from_pretrained(str(final)).dtype


def close(recs, ref, dtype):
    assert len(recs) == len(ref)
    for a, b in zip(recs, ref):
        assert math.isfinite(a["loss"]) and math.isfinite(a["grad_norm"])
        assert a["loss"] == pytest.approx(b["loss"], rel=tol(dtype))
    assert any(a["loss"] != b["loss"] for a, b in zip(recs, ref))  # it did compute in the lower precision


@pytest.fixture(scope="module")
def fp32(world, tmp_path_factory):  # noqa: F811
    t = tmp_path_factory.mktemp("fp32")
    return {"sft": run(world, t / "sft", "--algo", "sft", "--max-steps", 2, "--lr", 1e-3, data="llava.json",
                       fmt="llava"),
            "dpo": run(world, t / "dpo", "--algo", "dpo", "--max-steps", 3, "--lr", 1e-3),
            "lora": run(world, t / "lora", "--algo", "dpo", "--max-steps", 3, "--lr", 1e-3, "--lora-rank", 4)}


@pytest.mark.parametrize("flags,backend,saved", [(["--dtype", "bf16"], None, torch.bfloat16),
                                                 (["--amp"], None, torch.float32),
                                                 (["--amp"], "torch", torch.float32)])
def test_bf16_steps_within_tolerance_of_fp32(world, fp32, tmp_path, flags, backend, saved, monkeypatch):  # noqa: F811
    """backend torch: the pure-torch row kernels (the CPU default outside tests), which must not run under autocast.
    final/: --dtype bf16 saves bf16 weights, --amp keeps (and saves) fp32 ones."""
    if backend:
        monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", backend)
    sft = run(world, tmp_path / "sft", "--algo", "sft", "--max-steps", 2, "--lr", 1e-3, *flags, data="llava.json",
              fmt="llava")
    close(sft[:1], fp32["sft"][:1], torch.bfloat16)
    dpo = run(world, tmp_path / "dpo", "--algo", "dpo", "--max-steps", 3, "--lr", 1e-3, *flags)
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    close(dpo, fp32["dpo"], torch.bfloat16)
    assert loaded_dtype(tmp_path / "dpo" / "final") == saved


def test_fp16_lora_steps_with_loss_scaling(world, fp32, tmp_path):  # noqa: F811
    """--dtype fp16 --lora-rank: fp16 base, fp32 adapters (their AdamW state too), the loss scaled by 2^16 before
    backward (logged as loss_scale) and the gradients unscaled before clipping, so grad_norm is the true norm."""
    recs = run(world, tmp_path, "--algo", "dpo", "--max-steps", 3, "--lr", 1e-3, "--lora-rank", 4, "--dtype", "fp16")
    close(recs, fp32["lora"], torch.float16)
    for a, b in zip(recs, fp32["lora"]):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=tol(torch.float16))  # unscaled
    assert [r["loss_scale"] for r in recs] == [2.0 ** 16] * 3  # no overflow: the scale stays (doubles after 2000)
    assert "loss_scale" not in fp32["lora"][0]
    assert loaded_dtype(tmp_path / "final") == torch.float16  # the merged fp16 base


def test_fp16_overflow_skips_the_step_and_halves_the_scale(world, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A scale so large that the fp16 backward overflows: that step is skipped with a line, not an error, the scale
    halves each time, and once it fits the steps train as usual."""
    import train
    real = torch.amp.GradScaler
    monkeypatch.setattr(train.torch.amp, "GradScaler", lambda *a, **k: real(*a, **{**k, "init_scale": 2.0 ** 24}))
    recs = run(world, tmp_path, "--algo", "dpo", "--max-steps", 10, "--lr", 1e-3, "--lora-rank", 4, "--dtype", "fp16",
               "--batch-size", 1)
    skipped = capsys.readouterr().out.count("fp16 loss scale overflow")
    assert skipped >= 1 and len(recs) == 10 - skipped  # 2^24 overflowed here: 2^19 fits (measured)
    assert recs[0]["loss_scale"] == 2.0 ** (24 - skipped)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)


def test_fp16_full_fine_tuning_and_amp_with_low_precision_weights_refused(world, tmp_path, capsys):  # noqa: F811
    """AdamW on fp16 weights: eps 1e-8 is 0 in fp16, so a parameter with a zero gradient gets 0/0 = NaN at step 1.
    Refused by the parser (exit 2, one line), before anything loads."""
    with pytest.raises(SystemExit):
        run(world, tmp_path / "a", "--algo", "dpo", "--max-steps", 1, "--dtype", "fp16")
    assert "--dtype fp16 trains only LoRA adapters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(world, tmp_path / "b", "--algo", "dpo", "--max-steps", 1, "--dtype", "bf16", "--amp")
    assert re.search(r"--amp .* does not combine with --dtype bf16", capsys.readouterr().err)


@pytest.mark.parametrize("flags,ref,dtype,saved", [(["--amp"], "dpo", torch.bfloat16, torch.float32),
                                                   (["--dtype", "fp16", "--lora-rank", 4], "lora", torch.float16,
                                                    torch.float16)])
def test_two_ranks_fsdp(world, fp32, tmp_path, flags, ref, dtype, saved):  # noqa: F811
    """Under FSDP2 on 2 gloo ranks (1 pair each) against 1 rank of fp32 with 2 pairs (equal in fp32: test_train):
    --amp is MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); fp16's loss scale is one for all ranks."""
    argv = ["--model", world / "ckpt", "--data", world / "prefs.jsonl", "--data-format", "prefs", "--image-root",
            world / "img", "--algo", "dpo", "--max-steps", 3, "--lr", 1e-3, *flags]
    recs = run_two_ranks(argv, tmp_path)
    close(recs, fp32[ref], dtype)
    assert loaded_dtype(tmp_path / "final") == saved


def test_rl_step_under_amp_and_fp16_refused(world, tmp_path, rewards_file, capsys):  # noqa: F811
    """RL's objective runs under --amp's autocast on one process too (it was fp32 there before): the first step's
    samples are the fp32 run's (sampling is outside autocast), its KL is 0 and its loss and grad norm are within bf16
    tolerance (absolute, of the grad norm's scale: GRPO's step-1 loss is 0). fp16 RL, which has no loss scaling, is
    refused with one line."""
    rl = ["--algo", "grpo", "--max-steps", 1, "--reward", f"{rewards_file}:length", "--k", 2, "--max-new-tokens", 6,
          "--lr", 1e-3]
    a = run_rl(world, tmp_path / "fp32", *rl)[0]
    b = run_rl(world, tmp_path / "amp", *rl, "--amp")[0]
    assert b["reward_mean"] == a["reward_mean"] and b["resp_len"] == a["resp_len"]  # the same samples
    assert b["kl"] == pytest.approx(0.0, abs=1e-4)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=tol(torch.bfloat16))
    assert b["grad_norm"] != a["grad_norm"]  # computed in bf16
    with pytest.raises(SystemExit):
        run_rl(world, tmp_path / "fp16", *rl, "--dtype", "fp16", "--lora-rank", 4)
    assert "--dtype fp16: --algo grpo's update has no loss scaling" in capsys.readouterr().err
