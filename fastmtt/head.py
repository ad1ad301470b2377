"""LinearHead: the output head of a causal LM as the fused-linear MTT loss sees it."""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple, Optional

import torch


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """z = softcap(h W^T + bias + s * (h A^T) B^T) (adapted side), b = softcap(h0 W^T + bias) (base side).

    weight [V, H], optional bias [V], optional LoRA (lora_A [r, H], lora_B [V, r], scaling s) on the adapted
    side only, optional softcap c: c * tanh(x / c)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    scaling: float = 1.0
    softcap: Optional[float] = None

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    def tensors(self):
        """(weight, bias, lora_A, lora_B): the head's tensors, in the order the autograd Functions take them."""
        return self.weight, self.bias, self.lora_A, self.lora_B

    def with_tensors(self, weight, bias, lora_A, lora_B) -> LinearHead:
        return dataclasses.replace(self, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)

    def logits(self, hidden, base_hidden=None, lora_hidden=None, dtype=None):
        """Adapted slab [n, V] (lora_hidden = h A^T) and, when base_hidden is given, the base slab [n, V]:
        one product, one read of W. `dtype` (default: the inputs') is the slabs' dtype; a wider one than the
        inputs' is formed with fp32 accumulation straight into it."""
        rows = hidden if base_hidden is None else torch.cat((hidden, base_hidden))
        slab = matmul_to(rows, self.weight.T, dtype or rows.dtype)
        if self.bias is not None:
            slab.add_(self.bias)
        adapted, base = slab[: hidden.shape[0]], slab[hidden.shape[0]:]
        if lora_hidden is not None:
            adapted.addmm_(lora_hidden.to(slab.dtype), self.lora_B.T.to(slab.dtype), alpha=self.scaling)
        if self.softcap is not None:
            slab.div_(self.softcap).tanh_().mul_(self.softcap)
        return adapted, (None if base_hidden is None else base)


class LinearGrads(NamedTuple):
    """One entry per differentiable input of the fused-linear loss, in the order its autograd Functions take
    them: the gradients (tensors; None where not formed) or, as `needs`, whether each is wanted (bools)."""

    hidden: Any
    weight: Any
    bias: Any
    lora_A: Any
    lora_B: Any


def matmul_to(a, b, dtype):
    """a @ b as a `dtype` tensor, with fp32 accumulation for 16-bit a, b: cuBLAS writes a wider output
    directly where torch supports it (torch.mm(..., out_dtype)); elsewhere the inputs are widened first
    (exact for 16-bit values, so the result is the same fp32 sum of exact products)."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda and _out_dtype_supported("mm", a.dtype, dtype):
        return torch.mm(a, b, out_dtype=dtype)
    return a.to(dtype) @ b.to(dtype)


def accumulate_matmul(total, a, b, alpha=1.0):
    """total += alpha * a @ b in place, total wider (fp32) than 16-bit a, b: cuBLAS multiplies the 16-bit
    inputs on tensor cores and accumulates in fp32 straight into total where torch supports it
    (torch.addmm(..., out_dtype, out=total)); elsewhere on widened copies (the same exact products)."""
    if a.dtype == total.dtype:
        return total.addmm_(a, b, alpha=alpha)
    if a.is_cuda and _out_dtype_supported("addmm", a.dtype, total.dtype):
        return torch.addmm(total, a, b, out_dtype=total.dtype, alpha=alpha, out=total)
    return total.addmm_(a.to(total.dtype), b.to(total.dtype), alpha=alpha)


@functools.cache
def _out_dtype_supported(op, in_dtype, out_dtype) -> bool:
    """Whether torch.mm / torch.addmm (op) with out_dtype=out_dtype runs on this GPU for in_dtype inputs;
    warns once (per op and dtype pair) with the reason when not, since the fallback is a GEMM on widened
    copies, several times slower (no 16-bit tensor cores)."""
    ones = torch.ones(16, 16, dtype=in_dtype, device="cuda")
    try:
        if op == "mm":
            torch.mm(ones, ones, out_dtype=out_dtype)
        else:
            total = torch.zeros(16, 16, dtype=out_dtype, device="cuda")
            torch.addmm(total, ones, ones, out_dtype=out_dtype, out=total)
    except (TypeError, RuntimeError) as error:
        warnings.warn(f"fastmtt: torch.{op}(out_dtype={out_dtype}) is unavailable for {in_dtype} inputs "
                      f"({str(error).splitlines()[0]}); the fused linear loss widens its inputs to {out_dtype} "
                      "for every chunk instead, a slower GEMM", RuntimeWarning, stacklevel=2)
        return False
    return True
