"""Test setup: Triton kernels run in Triton's CPU interpreter (must be set before any @triton.jit runs)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Absolute slack on top of the same-dtype PyTorch error (CCE rule), per dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def assert_parity(name, got, same_dtype, truth, dtype):
    """CCE rule: |truth - got| <= |truth - same_dtype_torch| + tol, on the worst element."""
    got, same_dtype, truth = (t.detach().double() for t in (got, same_dtype, truth))
    finite = truth.isfinite()
    assert torch.equal(got.isfinite(), finite), f"{name}: non-finite pattern differs"
    assert torch.equal(got[~finite].nan_to_num(), truth[~finite].nan_to_num()), f"{name}: non-finite values differ"
    err = (got - truth)[finite].abs().max().item() if finite.any() else 0.0
    ref_err = (same_dtype - truth)[finite].abs().max().item() if finite.any() else 0.0
    scale = max(1.0, truth[finite].abs().max().item()) if finite.any() else 1.0
    assert err <= ref_err + TOLERANCE[dtype] * scale, f"{name}: error {err:.3g} > torch {ref_err:.3g} + tol"
