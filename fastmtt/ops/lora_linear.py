"""lora_linear: y = x W^T + bias + s * (dropout(x) A^T) B^T as one fused op, with its autograd Function.

W is frozen (never gets a gradient); x, A, B and a bias that requires grad do. Dropout applies to
the LoRA branch only (as in PEFT), and backward reuses the forward's mask: the PyTorch path
(fastmtt/pytorch/lora_linear.py) saves the mask and the dropped input (as PEFT's autograd graph does),
the Triton path saves neither and regenerates the mask in-kernel from a seed
(fastmtt/kernels/lora_linear.py).
"""
from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from fastmtt._checks import check_float_tensor, check_same_device
from fastmtt._dispatch import resolve_backend
from fastmtt.reduction import accumulator_dtype, once_differentiable

# Shapes (in_features, out_features, rank, x dtype, dropout) where a GPU measurement showed the fused Triton
# kernel faster than the cuBLAS formulation (x W^T + s (drop(x) A^T) B^T + bias: three GEMMs, no slower than
# PEFT's layer by construction). backend="auto" runs the kernel only there; none has been measured yet, so
# "auto" is cuBLAS everywhere and backend="triton" asks for the kernel.
FUSED_KERNEL_MEASURED_FASTER: frozenset = frozenset()


class LoRALinearFunction(torch.autograd.Function):
    """Inputs: x [M, K], weight [N, K] (detached), lora_A [r, K], lora_B [N, r], bias [N] or None; for the
    PyTorch path the dropped input and its mask (`torch_dropout`, None without dropout), for the Triton path
    the seed that draws the mask in-kernel. Returns (y, xa = drop(x) A^T), xa not differentiable (saved for
    backward). In setup_context style, with a generated vmap rule, so torch.func transforms apply (the
    PyTorch path is plain torch ops)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, lora_A, lora_B, bias, dropped, keep, scaling, dropout_p, seed, backend):
        if backend == "triton":  # imported here: Triton loads only when a kernel runs
            from fastmtt.kernels.lora_linear import lora_forward_triton

            return lora_forward_triton(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)
        from fastmtt.pytorch.lora_linear import lora_forward

        return lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropped)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, lora_A, lora_B, bias, dropped, keep, scaling, dropout_p, seed, backend = inputs
        xa = output[1]
        ctx.mark_non_differentiable(xa)
        ctx.save_for_backward(x, weight, lora_A, lora_B, dropped, keep, xa)
        ctx.options = (scaling, dropout_p, seed, backend, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, dy, _grad_xa):
        """The PyTorch path's backward is torch ops, differentiable again; the Triton path's is once
        differentiable."""
        x, weight, lora_A, lora_B, dropped, keep, xa = ctx.saved_tensors
        scaling, dropout_p, seed, backend, bias_dtype = ctx.options
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 2, 3))
        if backend == "triton":
            dx, dA, dB = _triton_backward(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, needs)
        else:
            from fastmtt.pytorch.lora_linear import lora_backward

            dx, dA, dB = lora_backward(dy, x, dropped, keep, xa, weight, lora_A, lora_B, scaling, dropout_p, needs)
        dbias = dy.sum(0, dtype=accumulator_dtype(dy)).to(bias_dtype) if ctx.needs_input_grad[4] else None
        return dx, None, dA, dB, dbias, None, None, None, None, None, None


@once_differentiable("lora_linear")
def _triton_backward(*args):
    from fastmtt.kernels.lora_linear import lora_backward_triton

    return lora_backward_triton(*args)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear layer:  y = x W^T + bias + scaling * (dropout(x) A^T) B^T.

    Args:
        x: [..., in] floating; gets a gradient when it requires one.
        weight: [out, in] in x's dtype, frozen (detached: never gets a gradient). Any strides work (a
            transposed view serves Conv1D-style [in, out] weights without a copy).
        lora_A: [r, in], lora_B: [out, r], of one dtype, which may differ from x's (x is cast to it for the
            LoRA branch, as PEFT does).
        scaling: the LoRA scale s (PEFT's lora_alpha / r).
        bias: [out] or None (default); gets a gradient when it requires one.
        dropout_p: in [0, 1) (default 0.0): drops entries of x on the LoRA branch only, with a fresh mask per
            call drawn from torch's default generator; pass 0 for eval.
        backend: "auto" (default: the cuBLAS formulation except at shapes measured faster fused), "triton"
            (the fused kernel) or "torch".

    Returns:
        y: [..., out] in x's dtype.

    Example:
        >>> import fastmtt
        >>> x, weight = torch.randn(4, 8), torch.randn(6, 8)
        >>> lora_A, lora_B = torch.randn(2, 8), torch.randn(6, 2)
        >>> y = fastmtt.lora_linear(x, weight, lora_A, lora_B, scaling=2.0)
        >>> bool(torch.allclose(y, x @ weight.T + 2.0 * (x @ lora_A.T) @ lora_B.T, atol=1e-5))
        True
    """
    check_float_tensor("x", x, min_dim=1)
    in_features = x.shape[-1]
    check_float_tensor("weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"weight must have shape [out, {in_features}], got {tuple(weight.shape)}")
    out_features = weight.shape[0]
    check_float_tensor("lora_A", lora_A, min_dim=2)
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must have shape [r, {in_features}] with r >= 1, got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    check_float_tensor("lora_B", lora_B, shape=(out_features, rank))
    if bias is not None:
        check_float_tensor("bias", bias, shape=(out_features,))
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B must have lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p!r}")
    check_same_device(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)

    measured_faster = (in_features, out_features, rank, x.dtype, dropout_p > 0) in FUSED_KERNEL_MEASURED_FASTER
    backend = resolve_backend(backend, x, weight, lora_A, lora_B, *([] if bias is None else [bias]),
                              auto_kernel=measured_faster)
    if backend == "triton":
        from fastmtt.kernels.lora_linear import MAX_RANK

        if rank > MAX_RANK:
            raise ValueError(f"backend='triton' supports lora rank up to {MAX_RANK}, got r={rank}")
        if x.numel() == 0:
            backend = "torch"
    dropped = keep = None
    seed = 0
    if dropout_p > 0 and backend == "triton":
        from fastmtt.kernels.lora_linear import draw_dropout_seed

        seed = draw_dropout_seed()
    elif dropout_p > 0:  # drawn on x's own layout, as PEFT's F.dropout draws it
        from fastmtt.pytorch.lora_linear import torch_dropout

        with torch.no_grad():
            dropped, keep = torch_dropout(x.to(lora_A.dtype), float(dropout_p))
        dropped, keep = dropped.reshape(-1, in_features), keep.reshape(-1, in_features)
    x2d = x.reshape(-1, in_features)
    y, _ = LoRALinearFunction.apply(x2d, weight.detach(), lora_A, lora_B, bias, dropped, keep, float(scaling),
                                    float(dropout_p), seed, backend)
    return y.reshape(*x.shape[:-1], out_features)
