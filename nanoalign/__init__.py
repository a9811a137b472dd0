"""nanoalign: preference alignment for LLaVA-style vision-language models."""
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

# The Triton kernels live in the top-level kernels/ folder and are imported as `nanoalign.kernels`. An installed
# package maps that name through pyproject.toml; a plain checkout (no `pip install`, e.g. a GPU machine without a
# registry, or a second working tree) maps it here to the kernels/ beside this package, so the code imported is
# always this checkout's own.
_kernels = _Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
if "nanoalign.kernels" not in _sys.modules and _kernels.is_file():
    _spec = _ilu.spec_from_file_location("nanoalign.kernels", _kernels, submodule_search_locations=[str(_kernels.parent)])
    _mod = _ilu.module_from_spec(_spec)
    _sys.modules["nanoalign.kernels"] = _mod
    _spec.loader.exec_module(_mod)
    kernels = _mod  # `import nanoalign.kernels` binds the attribute of the parent package
