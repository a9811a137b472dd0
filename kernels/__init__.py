"""Triton kernels, imported as nanoalign.kernels (see pyproject.toml)."""
