"""Test setup: Triton kernels run in Triton's CPU interpreter (must be set before any @triton.jit runs), and
tests marked `cuda` are skipped without a GPU. Shared helpers live in tests/utils.py."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
