"""Test set-up shared by every test file.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, at import time of the
test session, before any test module imports nanoalign.kernels (see shared notes: launching a kernel without a GPU
fails with "0 active drivers" otherwise).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
