"""The CPU log-prob dispatcher picks the faster row primitive, measures once, caches the choice and honours it.

No test here times anything real: the measurement is fed fake primitives and a fake clock, so the outcome is fixed.
"""
import json
import types

import pytest
import torch

from nanoalign import ops


class FakeClock:
    """A clock that only moves when a fake primitive 'runs' (advance)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, s):
        self.now += s


@pytest.fixture
def fake_native(tmp_path, monkeypatch):
    """A native module stand-in whose build folder is tmp_path; the process-level choice is cleared."""
    fake = types.SimpleNamespace(__name__="fake_native", build_dir=lambda: tmp_path,
                                 logprob_rows_fwd=ops.logprob_rows_fwd_torch,
                                 logprob_rows_bwd=ops.logprob_rows_bwd_torch)
    monkeypatch.setattr(ops, "_native_module", lambda: (fake, ""))
    monkeypatch.setattr(ops, "_cpu_choices", {})
    monkeypatch.delenv("NANOALIGN_LOGPROBS_BACKEND", raising=False)
    monkeypatch.delenv("NANOALIGN_LOGPROBS_AUTOTUNE", raising=False)
    return fake


def _fake_measure(native_s, torch_s, calls):
    def measure(fns):
        assert set(fns) == {"native", "torch"}
        calls.append(1)
        return {"native": native_s, "torch": torch_s, "rounds": 5}
    return measure


@pytest.mark.parametrize("native_s,torch_s,expected", [(1.0, 1.4, "native"), (1.2, 1.0, "torch")])
def test_choice_is_measured_once_cached_and_honoured(fake_native, monkeypatch, capsys, native_s, torch_s, expected):
    calls = []
    monkeypatch.setattr(ops, "_measure_cpu_backends", _fake_measure(native_s, torch_s, calls))
    backend = ops._backend(torch.device("cpu"))
    assert backend is (fake_native if expected == "native" else ops._TORCH)
    err = capsys.readouterr().err
    assert f"logprobs backend: {'native' if expected == 'native' else 'torch chunked'} (" in err
    assert ("1.40x faster than torch chunked" if expected == "native" else "1.20x faster than native") in err
    path = fake_native.build_dir() / f"backend-{torch.get_num_threads()}threads.json"
    assert str(path) in err
    saved = json.loads(path.read_text())
    assert saved["backend"] == expected and saved["native_s"] == native_s and saved["torch_s"] == torch_s
    # later calls in this process: no new measurement, no new line
    for _ in range(3):
        ops._backend(torch.device("cpu"))
    assert len(calls) == 1 and capsys.readouterr().err == ""
    # a new process (empty in-process memo) reads the cache instead of measuring again
    monkeypatch.setattr(ops, "_cpu_choices", {})
    monkeypatch.setattr(ops, "_measure_cpu_backends", lambda fns: pytest.fail("measured again despite the cache"))
    assert ops._backend(torch.device("cpu")) is backend
    # and the loss really runs through the chosen primitive
    used = []
    monkeypatch.setattr(fake_native, "logprob_rows_fwd", lambda *a: used.append("native") or ops.logprob_rows_fwd_torch(*a))
    monkeypatch.setattr(ops._TORCH, "logprob_rows_fwd", lambda *a: used.append("torch") or ops.logprob_rows_fwd_torch(*a))
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.tensor([[1, 2, -100, 3, 4], [5, -100, 6, 7, 8]])
    ops.token_logprobs(hidden, weight, labels)
    assert used == [expected]


def test_cached_torch_choice_is_overridden_by_the_environment(fake_native, monkeypatch):
    path = fake_native.build_dir() / f"backend-{torch.get_num_threads()}threads.json"
    path.write_text(json.dumps({"backend": "torch"}))
    monkeypatch.setattr(ops, "_measure_cpu_backends", lambda fns: pytest.fail("must not measure: cached"))
    assert ops._backend(torch.device("cpu")) is ops._TORCH
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", "native")
    assert ops._backend(torch.device("cpu")) is fake_native
    path.write_text(json.dumps({"backend": "native"}))
    monkeypatch.setattr(ops, "_cpu_choices", {})
    monkeypatch.setenv("NANOALIGN_LOGPROBS_BACKEND", "torch")
    assert ops._backend(torch.device("cpu")) is ops._TORCH


def test_autotune_off_skips_the_measurement(fake_native, monkeypatch):
    monkeypatch.setenv("NANOALIGN_LOGPROBS_AUTOTUNE", "0")
    monkeypatch.setattr(ops, "_measure_cpu_backends", lambda fns: pytest.fail("NANOALIGN_LOGPROBS_AUTOTUNE=0"))
    assert ops._backend(torch.device("cpu")) is fake_native
    assert not list(fake_native.build_dir().iterdir())  # nothing cached either


def test_unreadable_cache_is_measured_again(fake_native, monkeypatch):
    path = fake_native.build_dir() / f"backend-{torch.get_num_threads()}threads.json"
    path.write_text("{not json")
    calls = []
    monkeypatch.setattr(ops, "_measure_cpu_backends", _fake_measure(2.0, 1.0, calls))
    assert ops._backend(torch.device("cpu")) is ops._TORCH and len(calls) == 1
    assert json.loads(path.read_text())["backend"] == "torch"


def test_failed_measurement_keeps_native_with_a_warning(fake_native, monkeypatch):
    def boom(fns):
        raise RuntimeError("out of memory (test)")
    monkeypatch.setattr(ops, "_measure_cpu_backends", boom)
    with pytest.warns(UserWarning, match="could not compare"):
        assert ops._backend(torch.device("cpu")) is fake_native


def test_measurement_is_interleaved_median_with_a_budget():
    clock = FakeClock()
    order = []
    cost = {"native": [0.1, 0.9, 0.1, 0.1, 0.1, 0.1], "torch": [0.2, 0.2, 0.2, 5.0, 0.2, 0.2]}  # warm-up first

    def fn(name):
        def run():
            order.append(name)
            clock.advance(cost[name][sum(1 for o in order if o == name) - 1])
        return run
    out = ops._measure_cpu_backends({"native": fn("native"), "torch": fn("torch")}, rounds=5, budget_s=100,
                                    clock=clock)
    # warm-up once each, then rounds alternating the order: n t | t n | n t | t n | n t
    assert order == ["native", "torch"] + ["native", "torch", "torch", "native"] * 2 + ["native", "torch"]
    assert out == {"native": pytest.approx(0.1), "torch": pytest.approx(0.2), "rounds": 5}  # medians ignore the one slow round of each
    # a budget stops after 3 rounds
    clock2, order2 = FakeClock(), []

    def slow():
        order2.append(1)
        clock2.advance(10.0)
    out = ops._measure_cpu_backends({"a": slow, "b": slow}, rounds=5, budget_s=1.0, clock=clock2)
    assert out["rounds"] == 3 and len(order2) == 2 + 3 * 2


def test_timed_callables_call_each_primitive_forward_and_backward(monkeypatch):
    monkeypatch.setattr(ops, "_CHOICE_SHAPE", (8, 16, 40))
    seen = []
    fake = types.SimpleNamespace(
        logprob_rows_fwd=lambda h, w, y: seen.append(("fwd", h.shape, w.shape)) or ops.logprob_rows_fwd_torch(h, w, y),
        logprob_rows_bwd=lambda h, w, y, lse, g: seen.append(("bwd", h.shape, w.shape)) or (None, None))
    fns = ops._choice_fns(fake)
    assert set(fns) == {"native", "torch"}
    fns["native"]()
    assert seen == [("fwd", (8, 16), (40, 16)), ("bwd", (8, 16), (40, 16))]
