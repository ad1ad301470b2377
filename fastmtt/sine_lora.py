"""SineLoRA: LoRA with a sine on the low-rank update (Ji et al., "Efficient Learning with Sine-Activated
Low-Rank Matrices", arXiv 2403.19243), as a PEFT LoRA variant:

    y = W x + bias + s * sin(omega * B A) / sqrt(in_features) x,    s = lora_alpha / r,

B [out, r] starting at zero, so the adapted model starts as the base. `get_peft_model(model,
SineLoraConfig(...))` gives a PeftModel like LoRA's: `disable_adapter()` serves the base pass (as
`MTTObjective` needs), merging and `save_pretrained` work as for LoRA; load a saved adapter with
`load_sine_lora` (PEFT's own `PeftModel.from_pretrained` would read it as plain LoRA). Each adapter keeps its
own omega and scaling, so adapters of different settings share a layer. Targets: `torch.nn.Linear` and
transformers' `Conv1D` (GPT-2; W stored [in, out]); any other target (an embedding, a convolution, a layer
that already holds a plain LoRA adapter) is a ValueError.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import peft
import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from transformers.pytorch_utils import Conv1D

DEFAULT_OMEGA = 200.0


def sine_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float, scaling: float) -> torch.Tensor:
    """s * sin(omega * B A) / sqrt(in): lora_A [r, in], lora_B [out, r] -> [out, in]."""
    return torch.sin(omega * (lora_B @ lora_A)) * (scaling / math.sqrt(lora_A.shape[1]))


class _SineVariant(lora_layer.LoraVariant):
    """The sine update in PEFT's LoRA-variant hooks (init, forward, merge, unmerge); omega per adapter."""

    @staticmethod
    def init(module, adapter_name, config, **kwargs):
        module.sine_omega[adapter_name] = float(config.sine_omega)

    @staticmethod
    def delta(module, adapter):
        """The update in the base weight's layout: [out, in], or [in, out] for a Conv1D."""
        delta = sine_delta_weight(module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                                  module.sine_omega[adapter], module.scaling[adapter])
        return delta.T if isinstance(module.get_base_layer(), Conv1D) else delta

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return orig_weight + _SineVariant.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight):
        orig_weight.data += _SineVariant.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return orig_weight - _SineVariant.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        delta = sine_delta_weight(module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight,
                                  module.sine_omega[active_adapter], module.scaling[active_adapter])
        return result + F.linear(module.lora_dropout[active_adapter](x), delta.to(x.dtype))


class SineLoraLinear(lora_layer.Linear):
    """PEFT's LoRA Linear (of an nn.Linear or a Conv1D) with the sine update for the adapters of a SineLoraConfig,
    `sine_omega[adapter]` each; an adapter of a plain LoraConfig added to the same layer stays plain LoRA."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        self.sine_omega = {}
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        if isinstance(config, SineLoraConfig):
            return _SineVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.sine_omega.pop(adapter_name, None)


class _Unsupported:
    """The custom-module entry for a layer type SineLoRA cannot adapt: refuses it, naming the module."""

    def __init__(self, target, adapter_name, target_name="", **kwargs):
        layer = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        raise ValueError(f"target_modules: {target_name or adapter_name}: SineLoRA adapts torch.nn.Linear and Conv1D "
                         f"layers, not {type(layer).__name__} (use peft.LoraConfig for it)")


@dataclasses.dataclass
class SineLoraConfig(peft.LoraConfig):
    """peft.LoraConfig with `sine_omega` (default DEFAULT_OMEGA), the sine's frequency of this adapter; every
    targeted torch.nn.Linear or Conv1D becomes a SineLoraLinear, any other target is a ValueError naming it.

    Example:
        >>> import torch, peft
        >>> from fastmtt.sine_lora import SineLoraConfig
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8))
        >>> adapted = peft.get_peft_model(model, SineLoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
        >>> x = torch.randn(3, 16)
        >>> torch.equal(adapted(x), model[0].base_layer(x))  # B starts at zero
        True
    """

    # A LoRA variant for PEFT: a layer type whose LoRA layer lacks it refuses the adapter.
    sine_omega: float = dataclasses.field(default=DEFAULT_OMEGA, metadata={"is_lora_variant": True})

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.sine_omega, (int, float)) and math.isfinite(self.sine_omega) and self.sine_omega > 0):
            raise ValueError(f"sine_omega must be a finite number > 0, got {self.sine_omega!r}")
        for field in dataclasses.fields(self):  # PEFT's other variants: truthy fields, or named init_lora_weights
            other = (field.metadata.get("is_lora_variant") and field.name != "sine_omega" and getattr(self, field.name)
                     or self.init_lora_weights in field.metadata.get("lora_variants", ()))
            if other:
                raise ValueError(f"{field.name}: SineLoRA is its own LoRA variant and does not combine with "
                                 f"{field.name}={getattr(self, field.name)!r}")
        self._register_custom_module({torch.nn.Linear: SineLoraLinear, Conv1D: SineLoraLinear,
                                      torch.nn.Embedding: _Unsupported, torch.nn.modules.conv._ConvNd: _Unsupported,
                                      torch.nn.MultiheadAttention: _Unsupported})


def load_sine_lora(model: torch.nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False,
                   **kwargs) -> peft.PeftModel:
    """The SineLoRA adapter saved at `path` (`save_pretrained` of a SineLoraConfig PeftModel) as `adapter_name`:
    PeftModel.from_pretrained(model, path, config=its SineLoraConfig, ...) for a base model, or one more adapter
    of `model` if it is a PeftModel already (PEFT's own `load_adapter` would read it as plain LoRA). Raises
    ValueError naming `path` if it holds no SineLoRA adapter."""
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as handle:
        values = json.load(handle)
    if "sine_omega" not in values:
        raise ValueError(f"path: {path} holds no SineLoRA adapter (its adapter_config.json has no sine_omega)")
    names = {field.name for field in dataclasses.fields(SineLoraConfig)}
    config = SineLoraConfig(**{key: value for key, value in values.items() if key in names})
    config.inference_mode = not is_trainable
    if not isinstance(model, peft.PeftModel):
        return peft.PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                              config=config, **kwargs)
    model.add_adapter(adapter_name, config)  # load_adapter then loads the weights into these layers
    model.load_adapter(path, adapter_name, is_trainable=is_trainable, **kwargs)
    return model
