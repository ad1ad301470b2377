"""fastmtt: fused kernels for the Mask-the-Target loss (CE + target-masked KL to the frozen base).

The public names load on first use (module `__getattr__`), so `import fastmtt` and the `fastmtt` command's
`--help` do not pay for importing torch and the kernels.
"""
import importlib

from fastmtt.options import DEFAULT_LAM, MTTOptions

__version__ = "0.1.0"

_LAZY = {
    "FusedLinearMTTLoss": "fastmtt.ops.fused_linear_mtt_loss",
    "fused_linear_mtt_loss": "fastmtt.ops.fused_linear_mtt_loss",
    "MTTLoss": "fastmtt.ops.mtt_loss",
    "mtt_loss": "fastmtt.ops.mtt_loss",
    "lora_linear": "fastmtt.ops.lora_linear",
    "BaseCache": "fastmtt.base_cache",
    "MTTObjective": "fastmtt.objective",
    "MTTOutput": "fastmtt.reduction",
    "VocabParallel": "fastmtt.parallel",
}
__all__ = ["DEFAULT_LAM", "MTTOptions", *sorted(_LAZY)]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastmtt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
