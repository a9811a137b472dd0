"""The native CPU log-prob primitive (csrc/logprobs.cpp), built on first use and cached.

    logprob_rows_fwd(h (N,H), w (V,H), y (N,) int64) -> (logp (N,) fp32, lse (N,) fp32)
    logprob_rows_bwd(h, w, y, lse (N,), g (N,) = dL/dlogp) -> (grad_h (N,H) h.dtype, grad_w (V,H) w.dtype)
    logprob_rows_fwd_dh(h, w, y) -> (logp, lse, D (N,H) h.dtype = dlogp/dh)   (frozen LM head: grad_h = g[:, None] D)

logp[n] = logit[n, y[n]] - logsumexp_v logit[n, v] with logits = h @ w.T, computed tile by tile in fp32 and never
held as an (N, V) tensor; see the header of csrc/logprobs.cpp for the design and CONTRACT.md for the contract.

The extension is compiled once per (source, torch version, compiler flags, CPU feature flags) into
$TORCH_EXTENSIONS_DIR/nanoalign/<key> (default ~/.cache/nanoalign/torch_extensions/<key>), <key> a hash of those.
The source is copied into that folder and compiled from there, so every checkout on the machine with the same
source shares one build (ninja's command line names the copy, not the checkout: two checkouts used to rewrite each
other's build.ninja and rebuild on every first use). A finished build is marked by a `built` file and later
processes load the library straight from the folder, without ninja. Compiling says so once on stderr (it takes
15-50 s). Flags: -O3 -fopenmp, plus -march=native because the key includes the CPU flags, so a machine with a
different CPU builds its own copy instead of loading code it cannot run (NANOALIGN_NATIVE_MARCH=0 turns
-march=native off; NANOALIGN_NATIVE_MARCH=x86-64-v3 etc. picks a target). `available()` never raises: without a
compiler or when the build fails it warns once and returns False, and callers fall back to the torch chunked path.

Tiles: each thread's logits tile is a square of rows x vocabulary columns of fp32 filling half of the L2 cache a
thread has (the L2 size divided by the CPUs sharing it, from /sys/devices/system/cpu/cpu0/cache): it stays in L2
between its GEMM and the exp pass, and a square tile re-reads the fewest h and w bytes per logit. 512 KB of L2 gives
256 x 256, 1 MB 352 x 352, 2 MB 512 x 512. NANOALIGN_NATIVE_TILES="rows,vocab" overrides it (benchmarks).
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import time
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
    march = os.environ.get("NANOALIGN_NATIVE_MARCH", "1").strip()
    if march not in ("0", ""):
        flags.append("-march=native" if march == "1" else f"-march={march}")
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


def build_dir() -> Path:
    """The folder this checkout's source, torch and CPU build into (and where the backend choice is cached)."""
    return _cache_root() / _build_key(_cflags())


def _build() -> None:
    if not _SOURCE.is_file():
        raise FileNotFoundError(f"csrc/logprobs.cpp not found at {_SOURCE}")
    flags = _cflags()
    key = _build_key(flags)
    folder = _cache_root() / key
    name = f"nanoalign_native_{key}"
    _STATE["build_dir"] = str(folder)
    library = folder / f"{name}.so"
    if (folder / "built").is_file() and library.is_file():
        torch.ops.load_library(str(library))  # built before, by any checkout with this source: no ninja, no lock
        return
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH)")
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "logprobs.cpp"
    if not source.is_file() or source.read_bytes() != _SOURCE.read_bytes():
        tmp = folder / f".logprobs.cpp.{os.getpid()}"
        tmp.write_bytes(_SOURCE.read_bytes())
        os.replace(tmp, source)  # atomic: a concurrent build never compiles half a file
    print(f"nanoalign.native: compiling {_SOURCE.name} for this CPU into {folder} (once per source, torch and CPU; "
          "15-50 s on an idle machine)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cpp_extension.load(  # takes the folder's lock: a second process waits for this build instead of redoing it
        name=name,
        sources=[str(source)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
    (folder / "built").write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {time.perf_counter() - t0:.1f} s\n")
    print(f"nanoalign.native: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def tiles() -> tuple[int, int]:
    """(rows, vocabulary columns) of a thread's fp32 logits tile: a square filling about half the L2 a thread has,
    side a multiple of 16 in [32, 512] (512 KB of L2 when it is unknown). From NANOALIGN_NATIVE_TILES="rows,vocab"
    when set."""
    if "tiles" in _STATE:
        return _STATE["tiles"]
    env = os.environ.get("NANOALIGN_NATIVE_TILES", "").strip()
    if env:
        try:
            rows, vocab = (int(x) for x in env.split(","))
            if rows < 1 or vocab < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"NANOALIGN_NATIVE_TILES: expected 'rows,vocab' with positive integers, got {env!r}")
        _STATE["tiles"] = (rows, vocab)
        return _STATE["tiles"]
    l2 = _l2_per_cpu() or 512 * 1024
    side = max(32, min(512, math.isqrt(l2 // 2 // 4) // 16 * 16))  # side * side fp32 = half the L2
    _STATE["tiles"] = (side, side)
    return _STATE["tiles"]


def _l2_per_cpu() -> int | None:
    """Bytes of L2 per logical CPU of cpu0 (size / CPUs sharing it: two hyperthreads halve it), None if unknown."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = index / "size"
            text = size.read_text().strip().upper()
            n = int(text.rstrip("KMG"))
            n *= {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
            shared = (index / "shared_cpu_list").read_text().strip()
            count = sum(int(b) - int(a) + 1 if "-" in part else 1
                        for part in shared.split(",") for a, _, b in [part.partition("-")])
            return n // max(1, count)
        except (OSError, ValueError):
            return None
    return None


def available() -> bool:
    """True when torch.ops.nanoalign.logprob_rows_{fwd,bwd,fwd_dh} are usable (building them on the first call)."""
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
        torch.ops.nanoalign.logprob_rows_fwd_dh.default  # noqa: B018
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
    rows, vocab = tiles()
    return torch.ops.nanoalign.logprob_rows_fwd(h.detach(), w.detach(), y, rows, vocab)


def logprob_rows_bwd(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                     need_grad_w: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_h (N,H) in h.dtype, grad_w (V,H) in w.dtype) given lse from the forward and g = dL/dlogp (N,).
    need_grad_w=False (frozen LM head) skips the grad_w GEMM, a third of the work, and returns None for it."""
    _require(h, w, y, "logprob_rows_bwd")
    rows, vocab = tiles()
    gh, gw = torch.ops.nanoalign.logprob_rows_bwd(h.detach(), w.detach(), y, lse.detach(), g.detach(),
                                                  bool(need_grad_w), rows, vocab)
    return gh, (gw if need_grad_w else None)


def logprob_rows_fwd_dh(h: torch.Tensor, w: torch.Tensor,
                        y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen-LM-head forward: (logp (N,) fp32, lse (N,) fp32, D (N,H) in h.dtype) with D[n] = dlogp[n]/dh[n] =
    w[y[n]] - sum_v softmax(h[n] w^T)_v w[v], accumulated in the forward (2 GEMMs per logits tile instead of the 3
    of forward + frozen backward); the gradient of sum(g * logp) w.r.t. h is then g[:, None] * D. logp and lse are
    logprob_rows_fwd's. NaN in D for a row whose logits are all -inf or include a NaN. No autograd."""
    _require(h, w, y, "logprob_rows_fwd_dh")
    rows, vocab = tiles()
    return torch.ops.nanoalign.logprob_rows_fwd_dh(h.detach(), w.detach(), y, rows, vocab)


def build_info() -> dict:
    """Where the extension was built and why it failed, for reports: {"ok", "build_dir", "error"}."""
    return {"ok": _STATE.get("ok"), "build_dir": _STATE.get("build_dir"), "error": _STATE.get("error")}


if __name__ == "__main__":  # python -m nanoalign.native: build and say where
    ok = available()
    print(("ok " if ok else "failed ") + str(build_info()), file=sys.stdout)
