"""SineLoRA: LoRA with a sine on the low-rank update (Ji et al., "Efficient Learning with Sine-Activated
Low-Rank Matrices", arXiv 2403.19243), as a PEFT LoRA variant:

    y = W x + bias + s * sin(omega * B A) / sqrt(in_features) x,    s = lora_alpha / r,

B [out, r] starting at zero, so the adapted model starts as the base. `get_peft_model(model,
SineLoraConfig(...))` gives a PeftModel like LoRA's: `disable_adapter()` serves the base pass (as
`MTTObjective` needs), merging and `save_pretrained` work as for LoRA; load a saved adapter with
`load_sine_lora` (PEFT's own `PeftModel.from_pretrained` would read it as plain LoRA). Only `torch.nn.Linear`
layers.
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

DEFAULT_OMEGA = 200.0


def sine_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float, scaling: float) -> torch.Tensor:
    """s * sin(omega * B A) / sqrt(in): lora_A [r, in], lora_B [out, r] -> [out, in]."""
    return torch.sin(omega * (lora_B @ lora_A)) * (scaling / math.sqrt(lora_A.shape[1]))


class _SineVariant(lora_layer.LoraVariant):
    """The sine update in PEFT's LoRA-variant hooks (forward, merge, unmerge)."""

    @staticmethod
    def init(module, adapter_name, **kwargs):
        pass

    @staticmethod
    def delta(module, adapter):
        return sine_delta_weight(module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.sine_omega,
                                 module.scaling[adapter])

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
        delta = _SineVariant.delta(module, active_adapter)
        return result + F.linear(module.lora_dropout[active_adapter](x), delta.to(x.dtype))


class SineLoraLinear(lora_layer.Linear):
    """PEFT's LoRA Linear with the sine update; omega from the SineLoraConfig."""

    def resolve_lora_variant(self, *, config, **kwargs):
        self.sine_omega = float(config.sine_omega)
        return _SineVariant()


@dataclasses.dataclass
class SineLoraConfig(peft.LoraConfig):
    """peft.LoraConfig with `sine_omega` (default DEFAULT_OMEGA), the sine's frequency; every targeted
    torch.nn.Linear becomes a SineLoraLinear.

    Example:
        >>> import torch, peft
        >>> from fastmtt.sine_lora import SineLoraConfig
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8))
        >>> adapted = peft.get_peft_model(model, SineLoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
        >>> x = torch.randn(3, 16)
        >>> torch.equal(adapted(x), model[0].base_layer(x))  # B starts at zero
        True
    """

    sine_omega: float = DEFAULT_OMEGA

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.sine_omega, (int, float)) and math.isfinite(self.sine_omega) and self.sine_omega > 0):
            raise ValueError(f"sine_omega must be a finite number > 0, got {self.sine_omega!r}")
        if self.use_dora:
            raise ValueError("use_dora: SineLoRA is its own variant and does not combine with DoRA")
        self._register_custom_module({torch.nn.Linear: SineLoraLinear})


def load_sine_lora(model: torch.nn.Module, path: str, **kwargs) -> peft.PeftModel:
    """PeftModel.from_pretrained(model, path, config=its SineLoraConfig, **kwargs) for an adapter saved from a
    SineLoraConfig PeftModel (`save_pretrained`); raises ValueError naming `path` if it was not one."""
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as handle:
        values = json.load(handle)
    if "sine_omega" not in values:
        raise ValueError(f"path: {path} holds no SineLoRA adapter (its adapter_config.json has no sine_omega)")
    names = {field.name for field in dataclasses.fields(SineLoraConfig)}
    config = SineLoraConfig(**{key: value for key, value in values.items() if key in names})
    return peft.PeftModel.from_pretrained(model, path, config=config, **kwargs)
