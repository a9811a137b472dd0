"""bench/gpu_check.py: the GPU proof script never rots between GPU loans. Its --dry-run (the same code at tiny
shapes on the CPU, Triton kernels interpreted) runs here, and its correctness rule is shown to fail a wrong kernel."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_check  # noqa: E402

SECTIONS = ["ceilings", "correctness", "fused_loss", "decode_attention", "train_step", "bdhs_generation"]


def test_dry_run_writes_every_section(tmp_path):
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "--dry-run", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("gpu_check dry-run: budget ceilings") and "total" in first  # the budget comes first
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert list(report["sections"]) == SECTIONS
    for name in SECTIONS:
        sec = report["sections"][name]
        assert sec["status"].startswith("ok"), (name, sec.get("error"), sec.get("traceback"))
        assert sec["rows"], name
        assert not [row for row in sec["rows"] if row.get("error")], (name, sec["rows"])
    corr = report["sections"]["correctness"]["rows"]
    assert {r["dtype"] for r in corr} == {"float32", "bfloat16", "float16"}
    assert all(r["pass"] for r in corr) and report["correct"]
    kinds = {r["check"].split(" ")[0] for r in corr}
    assert kinds == {"logprobs", "preference_loss", "decode_attention"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert r.stdout.rstrip().endswith(md.rstrip())  # the table is printed last
    steps = report["sections"]["train_step"]["rows"]
    assert [s["run"] for s in steps] == ["full", "LoRA r128", "TRL DPOTrainer"]
    assert steps[1]["trainable M"] < steps[0]["trainable M"]  # LoRA trains only the adapters
    print(f"dry run: {wall:.1f} s wall, sections {report['seconds']:.1f} s")


def _ctx():
    import argparse
    return gpu_check.Ctx(argparse.Namespace(dry_run=True, quick=False))


def test_rule_fails_a_wrong_kernel(monkeypatch):
    """A decode kernel 1% off (or leaving NaN) fails its check; the real one passes the same check."""
    from nanoalign.kernels import decode_attention as K
    real = K.decode_attention
    ctx = _ctx()
    kw = dict(dtype=torch.float32, B=3, Hq=4, Hkv=2, T=20, D=16)
    assert gpu_check.check_decode_attention(ctx, **kw)[0]["pass"]
    monkeypatch.setattr(K, "decode_attention", lambda *a, **k: real(*a, **k) * 1.01)
    row = gpu_check.check_decode_attention(ctx, **kw)[0]
    assert not row["pass"] and row["err"] > row["bound"]
    monkeypatch.setattr(K, "decode_attention", lambda *a, **k: real(*a, **k).fill_(float("nan")))
    assert not gpu_check.check_decode_attention(ctx, **kw)[0]["pass"]


def test_rule_bound_is_twice_plain_torch_plus_floor():
    row = gpu_check.check_row("x", torch.bfloat16, 0.015, 0.005, torch.bfloat16)
    assert row["bound"] == pytest.approx(2 * 0.005 + 2.0 ** -8) and not row["pass"]  # bf16 unit roundoff 2^-8
    row = gpu_check.check_row("x", torch.float32, 2e-5, 4e-6, torch.float32)
    assert row["bound"] == pytest.approx(1.8e-5) and not row["pass"]


def test_exit_code_says_whether_correctness_passed(tmp_path, monkeypatch):
    """One failing correctness check -> exit code 1 and the failure in the JSON; a crashing check is a failure too."""
    def broken(ctx, dtype):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(gpu_check, "correctness_cases", lambda dry: [("boom", broken, dict(dtype=torch.float32))])
    for var in ("NANOALIGN_LOGPROBS_BACKEND", "TRITON_INTERPRET"):  # main() sets them: restored after the test
        monkeypatch.setenv(var, os.environ.get(var, ""))
        monkeypatch.delenv(var)
    assert gpu_check.main(["--dry-run", "--only", "correctness", "--out", str(tmp_path)]) == 1
    rep = json.load(open(tmp_path / "gpu_check.json"))
    row = rep["sections"]["correctness"]["rows"][0]
    assert row["pass"] is False and "kernel exploded" in row["error"] and rep["correct"] is False


def test_bdhs_sampler_adapter():
    generate_compact, sample_image_mask = gpu_check.bdhs_sampler()
    assert callable(generate_compact) and sample_image_mask(100, 0.0).all()
