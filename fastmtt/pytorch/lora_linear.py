"""Pure-PyTorch LoRA linear: the same function as the fused kernels, as PEFT computes it.

The dropout mask and the dropped input are saved for backward, as PEFT's autograd graph keeps them.
"""
from __future__ import annotations

import torch


def _torch_forward(x, weight, lora_A, lora_B, bias, scaling, keep):
    """PyTorch path: base product in x's dtype; LoRA products in the adapters' dtype on x cast to it
    (as PEFT does) times the rescaled keep mask; summed in the wider dtype. Returns (y, x_lora, xa)."""
    lora_dtype = lora_A.dtype
    x_lora = x if x.dtype == lora_dtype else x.to(lora_dtype)
    if keep is not None:
        x_lora = x_lora * keep
    xa = x_lora @ lora_A.t()
    if lora_dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        out = torch.nn.functional.linear(x, weight, bias)
        return out.addmm_(xa, lora_B.t(), alpha=scaling), x_lora, xa
    wide = torch.promote_types(x.dtype, lora_dtype)
    out = torch.nn.functional.linear(x, weight).to(wide).addmm_(xa.to(wide), lora_B.t().to(wide), alpha=scaling)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype), x_lora, xa


def _torch_backward(dy, x_dtype, weight, lora_A, lora_B, x_lora, xa, scaling, keep, needs):
    need_dx, need_dA, need_dB = needs
    dy_lora = dy.to(lora_A.dtype)
    dx = dA = dB = None
    if need_dx or need_dA:
        g = (dy_lora @ lora_B).mul_(scaling)  # s dy B, [M, r]
    if need_dx:
        dx_lora = g @ lora_A
        if keep is not None:
            dx_lora.mul_(keep)
        dx = (dy @ weight).add_(dx_lora) if dx_lora.dtype == x_dtype else (dy @ weight + dx_lora).to(x_dtype)
    if need_dA:
        dA = g.t() @ x_lora
    if need_dB:
        dB = (dy_lora.t() @ xa).mul_(scaling)
    return dx, dA, dB


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p):
    """(y, saved tensors (x_lora, xa, keep), None): keep is the rescaled dropout mask (None without dropout),
    the same draw as torch.nn.functional.dropout on x in the adapters' dtype."""
    keep = None
    if dropout_p > 0:
        keep = torch.empty(x.shape, dtype=lora_A.dtype, device=x.device).bernoulli_(1 - dropout_p)
        keep.div_(1 - dropout_p)
    y, x_lora, xa = _torch_forward(x, weight, lora_A, lora_B, bias, scaling, keep)
    return y, (x_lora, xa, keep), None


def lora_backward(dy, saved, _seed, weight, lora_A, lora_B, scaling, dropout_p, needs):
    """Gradients (dx, dA, dB) for the outputs flagged in `needs` = (x, lora_A, lora_B); None elsewhere."""
    x_lora, xa, keep = saved
    return _torch_backward(dy, dy.dtype, weight, lora_A, lora_B, x_lora, xa, scaling, keep, needs)
