"""Backend choice: Triton kernels on CUDA, PyTorch on CPU, Triton's interpreter on request. Each op file
(fastmtt/ops/) then calls the chosen implementation itself, imported inside the function that runs it."""
from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")


def allows_tf32() -> bool:
    """Whether torch allows tf32 for fp32 CUDA matmuls: the new fp32_precision setting where torch has it
    and it is set (reading the legacy flag then raises), the legacy allow_tf32 flag otherwise."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision == "none":
        return bool(matmul.allow_tf32)
    return precision == "tf32"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


if interpreting():
    # The interpreter evaluates masked-off lanes too (e.g. -inf - -inf on padded vocabulary), which numpy
    # reports as RuntimeWarnings; the kernels discard those lanes. Only warnings raised inside the interpreter.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    # Triton 3.6's interpreter converts one-element arrays to scalars, which numpy >= 1.25 deprecates.
    warnings.filterwarnings("ignore", message="Conversion of an array with ndim > 0 to a scalar",
                            category=DeprecationWarning, module=r"triton\.runtime\.interpreter")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _warn_no_triton():
    warnings.warn("fastmtt: triton is not installed, so backend='auto' runs the PyTorch path on CUDA tensors "
                  "(correct, but slower and with more memory than the kernels); pip install triton",
                  RuntimeWarning, stacklevel=3)


def check_backend(backend) -> None:
    """backend: one of BACKENDS (at a Module's or objective's construction, and at every call)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, *tensors: torch.Tensor, auto_kernel: bool = True) -> str:
    """Map `backend` ("auto", "triton" or "torch") to the path that runs: "triton" or "torch".

    "auto" picks Triton for CUDA tensors of a kernel dtype where the op's kernel serves the call
    (`auto_kernel`), PyTorch otherwise. "triton" on CPU tensors needs TRITON_INTERPRET=1 set before fastmtt
    is imported (the kernels are then interpreted).
    """
    check_backend(backend)
    on_cuda = all(t.is_cuda for t in tensors)
    kernel_dtypes = all(t.dtype in TRITON_DTYPES for t in tensors if t.is_floating_point())
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if on_cuda and kernel_dtypes and auto_kernel and not triton_available():
            _warn_no_triton()
        return "triton" if on_cuda and kernel_dtypes and auto_kernel and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not kernel_dtypes:
        raise TypeError(
            f"backend='triton' supports {[str(d) for d in TRITON_DTYPES]} floating inputs; "
            "use backend='torch' for float64"
        )
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before importing fastmtt"
        )
    return "triton"
