"""Kernel-vs-reference checks on a CUDA GPU: `TRITON_INTERPRET=0 python -m pytest -m cuda` (tests/conftest.py sets
TRITON_INTERPRET=1 unless it is already set, and interpreted kernels are not the compiled ones). Collected everywhere,
skipped without CUDA. They are the checks of bench/gpu_check.py's correctness section, one test per (kernel, dtype):
every Triton kernel against its float64 pure-torch reference at odd shapes, outputs poisoned first, error at most
2 x that of plain torch in the input precision plus a floor (gpu_check.check_row)."""
import argparse
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_check  # noqa: E402

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(_INTERPRETING, reason="TRITON_INTERPRET=1 (tests/conftest.py): run with TRITON_INTERPRET=0"),
]
CASES = gpu_check.correctness_cases(dry=False)


@pytest.mark.parametrize("name,fn,kw", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_float64_reference(name, fn, kw, monkeypatch):
    ctx = gpu_check.Ctx(argparse.Namespace(dry_run=False, quick=False))
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", "triton")  # the CUDA dispatch's choice, made explicit
    rows = fn(ctx, **kw)
    bad = [r for r in rows if not r["pass"]]
    assert rows and not bad, bad
