"""patch_lora / unpatch_lora: run PEFT LoRA Linear layers through the fused `lora_linear`.

A layer is patched when its direct base layer (`layer.base_layer`, what PEFT's forward calls) is a plain
float nn.Linear or transformers Conv1D; a LoRA layer stacked on another adapter's layer keeps PEFT's forward.
A patched layer decides per call: the fused path serves exactly one active vanilla LoRA adapter on an
unmerged, enabled layer; every other state (adapters disabled, merged, several active adapters, DoRA and
other variants, mixed-batch `adapter_names`, extra forward arguments, hooks, dropout under autocast) goes to
PEFT's own forward. docs/guarantees.md says where the result is PEFT's bit for bit.
"""
from __future__ import annotations

import functools
from numbers import Real

import torch
from torch import nn

from fastmtt.ops.lora_linear import lora_linear


def lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


@functools.cache
def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _plain_module(module, cls) -> bool:
    """`module` runs `cls.forward` unchanged: no override, no instance-level forward, no hooks."""
    return (isinstance(module, cls) and type(module).forward is cls.forward and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks)


def _plain_weight(weight) -> bool:
    """A plain floating tensor (quantized weights are integer tensors or tensor subclasses)."""
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point()


def _base_weight(base):
    """The base layer's weight as [out, in] (a transposed view for Conv1D), or None if not servable."""
    conv1d = _conv1d_class()
    if _plain_module(base, nn.Linear):
        weight = base.weight
    elif conv1d is not None and _plain_module(base, conv1d):
        weight = base.weight.t()
    else:
        return None
    bias = base.bias
    if not _plain_weight(base.weight) or (bias is not None and not _plain_weight(bias)):
        return None
    return weight


def _servable_adapter(layer, name) -> bool:
    return (name not in layer.lora_variant
            and _plain_module(layer.lora_A[name], nn.Linear) and _plain_module(layer.lora_B[name], nn.Linear)
            and type(layer.lora_dropout[name]) in (nn.Dropout, nn.Identity)
            and isinstance(layer.scaling[name], Real))


def _fused_call(layer, x, backend):
    """The fused output of `layer` for input x, or None when only PEFT's forward reproduces it."""
    if layer.disable_adapters or layer.merged or not torch.is_tensor(x) or not x.is_floating_point():
        return None
    adapters = layer.lora_A
    active = [name for name in layer.active_adapters if name in adapters]
    if len(active) != 1 or not _servable_adapter(layer, active[0]):
        return None
    name = active[0]
    base = layer.base_layer
    weight = _base_weight(base)
    if weight is None or weight.requires_grad:
        return None
    up = layer.lora_B[name]
    lora_A, lora_B = adapters[name].weight, up.weight
    scaling = float(layer.scaling[name])
    bias = base.bias
    if layer.lora_bias.get(name, False):
        lora_bias = scaling * up.bias
        bias = lora_bias if bias is None else bias + lora_bias
    dropout = layer.lora_dropout[name]
    dropout_p = float(dropout.p) if dropout.training and isinstance(dropout, nn.Dropout) else 0.0

    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        if dropout_p > 0:
            return None  # PEFT drops x in the adapters' dtype before autocast casts it: a mask of its own
        # PEFT's linears would all run in the autocast dtype: cast once, then run without autocast.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, backend)
    if x.dtype != weight.dtype or lora_A.dtype != lora_B.dtype:
        return None  # PEFT's forward raises or casts by rules of its own
    if x.dtype != lora_A.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, backend)


class _FusedForward:
    """Instance-level forward of a patched layer: the fused path when it is exact, PEFT's otherwise."""

    def __init__(self, layer, backend):
        self.layer = layer
        self.backend = backend

    def __call__(self, x, *args, **kwargs):
        if not args and not kwargs:
            out = _fused_call(self.layer, x, self.backend)
            if out is not None:
                return out
        return type(self.layer).forward(self.layer, x, *args, **kwargs)


def _patchable(layer) -> bool:
    """A PEFT lora.Linear whose base the fused path can run and with one adapter it can serve."""
    lora_linear_cls = lora_linear_class()
    return (isinstance(layer, lora_linear_cls) and type(layer).forward is lora_linear_cls.forward
            and "forward" not in vars(layer) and _base_weight(layer.base_layer) is not None
            and any(_servable_adapter(layer, name) for name in layer.lora_A))


def patch_lora(model: nn.Module, backend: str = "auto") -> int:
    """Swap the forward of every PEFT lora.Linear in `model` that the fused kernel can serve; return
    how many were swapped (already patched ones are not counted again). `backend` goes to lora_linear."""
    count = 0
    for module in model.modules():
        if _patchable(module):
            module.forward = _FusedForward(module, backend)
            count += 1
    return count


def unpatch_lora(model: nn.Module) -> int:
    """Restore PEFT's forward on every layer patch_lora swapped; return how many."""
    count = 0
    for module in model.modules():
        if isinstance(vars(module).get("forward"), _FusedForward):
            del module.forward
            count += 1
    return count
