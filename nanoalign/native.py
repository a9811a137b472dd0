"""The native CPU log-prob primitive (csrc/logprobs.cpp), built on first use and cached.

    logprob_rows_fwd(h (N,H), w (V,H), y (N,) int64) -> (logp (N,) fp32, lse (N,) fp32)
    logprob_rows_bwd(h, w, y, lse (N,), g (N,) = dL/dlogp) -> (grad_h (N,H) h.dtype, grad_w (V,H) w.dtype)

logp[n] = logit[n, y[n]] - logsumexp_v logit[n, v] with logits = h @ w.T, computed tile by tile in fp32 and never
held as an (N, V) tensor; see the header of csrc/logprobs.cpp for the design and CONTRACT.md for the contract.

The extension is compiled once with torch.utils.cpp_extension.load into
$TORCH_EXTENSIONS_DIR/nanoalign/<key> (default ~/.cache/nanoalign/torch_extensions/<key>), where <key> hashes the
source, the torch version, the compiler flags and the CPU's feature flags. Flags: -O3 -fopenmp, plus -march=native
because the key includes the CPU flags, so a machine with a different CPU builds its own copy instead of loading
code it cannot run (NANOALIGN_NATIVE_MARCH=0 turns -march=native off). `available()` never raises: without a
compiler or when the build fails it warns once and returns False, and callers fall back to the torch chunked path.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "logprobs.cpp"
_STATE: dict = {}  # "ok": bool once a build was attempted, "error": str, "build_dir": str


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if os.environ.get("NANOALIGN_NATIVE_MARCH", "1") != "0":
        flags.append("-march=native")
    return flags


def _build_key(flags: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(_SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(flags).encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "nanoalign"
    return Path.home() / ".cache" / "nanoalign" / "torch_extensions"


def _build() -> None:
    if not _SOURCE.is_file():
        raise FileNotFoundError(f"csrc/logprobs.cpp not found at {_SOURCE}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH)")
    from torch.utils import cpp_extension

    flags = _cflags()
    key = _build_key(flags)
    build_dir = _cache_root() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    _STATE["build_dir"] = str(build_dir)
    cpp_extension.load(
        name=f"nanoalign_native_{key}",
        sources=[str(_SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def available() -> bool:
    """True when torch.ops.nanoalign.logprob_rows_{fwd,bwd} are usable (building them on the first call)."""
    if "ok" not in _STATE:
        if _ops_registered():
            _STATE["ok"] = True  # already registered in this process (e.g. loaded by hand)
            return True
        try:
            _build()
            _STATE["ok"] = _ops_registered()
            if not _STATE["ok"]:
                raise RuntimeError("the library loaded but torch.ops.nanoalign.logprob_rows_fwd is missing")
        except Exception as exc:  # noqa: BLE001 - any failure means "use the torch fallback"
            _STATE["ok"] = False
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            first_error = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
            _STATE["error"] = f"{type(exc).__name__}: {first_error[:300]}"
            warnings.warn(f"nanoalign.native: C++ op unavailable, using the torch path ({_STATE['error']})",
                          RuntimeWarning, stacklevel=2)
    return _STATE["ok"]


def _ops_registered() -> bool:
    try:
        torch.ops.nanoalign.logprob_rows_fwd.default  # noqa: B018
        torch.ops.nanoalign.logprob_rows_bwd.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _require(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, fn: str) -> None:
    for name, t in (("h", h), ("w", w), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"nanoalign.native.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"nanoalign.native.{fn}: {name} must be on the CPU, got {t.device}")
    if not available():
        raise RuntimeError(f"nanoalign.native.{fn}: the C++ op could not be built ({_STATE.get('error')})")


def logprob_rows_fwd(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (N,), lse (N,)) in fp32 for rows h (N,H), LM head w (V,H), targets y (N,) in [0, V). No autograd."""
    _require(h, w, y, "logprob_rows_fwd")
    return torch.ops.nanoalign.logprob_rows_fwd(h.detach(), w.detach(), y)


def logprob_rows_bwd(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                     need_grad_w: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_h (N,H) in h.dtype, grad_w (V,H) in w.dtype) given lse from the forward and g = dL/dlogp (N,).
    need_grad_w=False (frozen LM head) skips the grad_w GEMM, a third of the work, and returns None for it."""
    _require(h, w, y, "logprob_rows_bwd")
    gh, gw = torch.ops.nanoalign.logprob_rows_bwd(h.detach(), w.detach(), y, lse.detach(), g.detach(),
                                                  bool(need_grad_w))
    return gh, (gw if need_grad_w else None)


def build_info() -> dict:
    """Where the extension was built and why it failed, for reports: {"ok", "build_dir", "error"}."""
    return {"ok": _STATE.get("ok"), "build_dir": _STATE.get("build_dir"), "error": _STATE.get("error")}


if __name__ == "__main__":  # python -m nanoalign.native: build and say where
    ok = available()
    print(("ok " if ok else "failed ") + str(build_info()), file=sys.stdout)
