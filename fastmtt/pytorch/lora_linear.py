"""Pure-PyTorch LoRA linear: the same function as the fused kernels, computed with PEFT's own ops in PEFT's
order, so a contiguous input gives PEFT's outputs and gradients bit for bit:

    y = (x W^T + bias) + ((drop(x_lora) A^T) B^T) * s,    x_lora = x cast to the adapters' dtype.

Every op makes a new tensor: under torch 2.11's torch.compile, an autograd.Function whose forward returns a
tensor an op handed back as itself (an in-place `addmm_`, a `.to()` to its own dtype) gets all-zero input
gradients; and torch.func.vmap refuses in-place writes that mix batched and unbatched tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Devices where F.dropout runs torch's fused native_dropout (at::dropout's is_fused_kernel_acceptable).
_FUSED_DROPOUT_DEVICES = ("cuda", "xpu")


def torch_dropout(x_lora, dropout_p):
    """(dropped, keep): F.dropout(x_lora, dropout_p) drawn exactly as F.dropout draws it on x_lora's device and
    in its memory layout (so one seed gives PEFT's mask), with what its backward needs: the rescaled mask
    (float, CPU) or native_dropout's boolean mask (CUDA/XPU)."""
    if x_lora.device.type in _FUSED_DROPOUT_DEVICES:
        return torch.native_dropout(x_lora, dropout_p, True)
    keep = torch.empty_like(x_lora).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
    return x_lora * keep, keep


def _dropout_backward(grad, keep, dropout_p):
    if keep.is_floating_point():
        return grad * keep
    return torch.ops.aten.native_dropout_backward(grad, keep, 1.0 / (1.0 - dropout_p))


def _lora_input(x, lora_A, dropped):
    """The LoRA branch's input: drop(x) when dropout ran, else x cast to the adapters' dtype."""
    if dropped is not None:
        return dropped
    return x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropped):
    """x [M, K], weight [N, K] (x's dtype), lora_A [r, K], lora_B [N, r], dropped: drop(x) in the adapters'
    dtype or None (no dropout) -> (y [M, N] in x's dtype, xa = drop(x) A^T [M, r] in the adapters' dtype)."""
    xa = F.linear(_lora_input(x, lora_A, dropped), lora_A)
    lora = F.linear(xa, lora_B) * scaling
    base = F.linear(x, weight, bias) if bias is None or bias.dtype == x.dtype else F.linear(x, weight) + bias
    y = base + lora
    return (y if y.dtype == x.dtype else y.to(x.dtype)), xa


def lora_backward(dy, x, dropped, keep, xa, weight, lora_A, lora_B, scaling, dropout_p, needs):
    """Gradients (dx, dA, dB) for the outputs flagged in `needs` = (x, lora_A, lora_B), None elsewhere, as
    autograd forms them through PEFT's ops: ds = s dy, dB = ds^T xa, g = ds B, dA = g^T drop(x),
    dx = dy W + drop'(g A). Under create_graph (and torch.func) the dropped input and xa are formed again from
    x and lora_A, so the gradients are differentiable."""
    need_dx, need_dA, need_dB = needs
    if torch.is_grad_enabled():
        x_lora = _lora_input(x, lora_A, None)
        dropped = None if keep is None else _dropout_backward(x_lora, keep, dropout_p)
        xa = F.linear(_lora_input(x, lora_A, dropped), lora_A)
    ds = dy.to(lora_A.dtype) * scaling
    dx = dA = dB = None
    if need_dx or need_dA:
        g = ds @ lora_B
    if need_dx:
        dx_lora = g @ lora_A
        if keep is not None:
            dx_lora = _dropout_backward(dx_lora, keep, dropout_p)
        dx = dy @ weight + dx_lora.to(x.dtype)
    if need_dA:
        dA = g.t() @ _lora_input(x, lora_A, dropped)
    if need_dB:
        dB = ds.t() @ xa
    return dx, dA, dB
