"""MTTOptions: the loss configuration, validated once, shared by every layer.

The public functions keep their keyword signatures and build an MTTOptions from them; the Modules,
MTTObjective, the Trainer mixin and the command line hold one.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from numbers import Integral, Real

# The largest lam keeping 90% of CE only's learning (task CE, accuracy, exact match) on both tasks of the SmolLM2
# experiment, for MTT and the full KL alike (docs/experiments.md#the-defaults).
DEFAULT_LAM = 0.3
# Divergences between the target-masked distributions (docs: mtt-math): "forward" is KL(base || adapted),
# "reverse" is KL(adapted || base). Adding one: kernels/mtt_math.py, fastmtt/pytorch/divergences.py, reference.
DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("mean", "sum", "none")
# Where MTTObjective applies the divergence: with CE at the labelled positions, or at every attended one.
KL_POSITIONS = ("labels", "all")
# MTTObjective's default: every attended position, which left less forgetting at equal learning than the
# labelled positions alone on the SmolLM2 experiment's far task (docs/experiments.md#where-the-regularizer-applies).
DEFAULT_KL_POSITIONS = "all"
# fused_linear_mtt_loss's tiled path, lam = 0 only: Cut Cross-Entropy's filter of gradient tiles for 16-bit inputs.
DEFAULT_GRAD_THRESHOLD = 2.0**-12
# torch.finfo(torch.float32).max: the kernels take 1/T and lam * T^2 as float32 scalars.
FLOAT32_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class MTTOptions:
    """loss_i = ce_weight * CE_i + lam * T^2 * D_i, reduced over rows.

    lam >= 0: regularizer weight. temperature T > 0 (regularizer only; CE uses raw logits). Both finite,
    1/T and lam * T^2 (kl_weight) within float32 range.
    direction: the divergence D, one of DIRECTIONS. mask_target: True (MTT) removes the target from
    both distributions and renormalizes; False is the full-vocabulary KL baseline, everything else
    equal. ignore_index: label of rows without loss (an int or numpy integer). reduction: 'mean', 'sum' or 'none'.
    ce_weight >= 0: CE's weight (1; 0 gives the divergence alone, e.g. on the rows of a prompt, whose
    label is then only the target to mask).

    Args:
        lam: the divergence's weight, >= 0 (default DEFAULT_LAM = 0.3; 0 is plain CE).
        temperature: T > 0 of the divergence (default 1.0).
        direction: "forward" (KL(base || adapted), default) or "reverse" (KL(adapted || base)).
        mask_target: remove the target from both distributions (default True; False: full-vocabulary KL).
        ignore_index: the label of rows without loss (default -100).
        reduction: "mean" (default), "sum" or "none".
        ce_weight: CE's weight, >= 0 (default 1.0).

    Raises:
        TypeError, ValueError: naming the field, for a value outside the ranges above.

    Example:
        >>> from fastmtt import MTTOptions
        >>> options = MTTOptions(lam=0.5, temperature=2.0)
        >>> options.kl_weight  # lam * T^2
        2.0
        >>> options.replace(direction="reverse").reverse
        True
    """

    lam: float = DEFAULT_LAM
    temperature: float = 1.0
    direction: str = "forward"
    mask_target: bool = True
    ignore_index: int = -100
    reduction: str = "mean"
    ce_weight: float = 1.0

    def __post_init__(self):
        for name in ("lam", "temperature", "ce_weight"):
            _check_real(name, getattr(self, name))
        if not 0 <= self.ce_weight < math.inf:
            raise ValueError(f"ce_weight must be finite and >= 0, got {self.ce_weight}")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("lam", "temperature"):
            if math.isinf(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.temperature * FLOAT32_MAX < 2:  # the kernels scale by log2(e) / T
            raise ValueError(f"temperature must be >= {2 / FLOAT32_MAX:.4g} (1/temperature overflows float32), "
                             f"got {self.temperature}")
        if not max(self.kl_weight, self.kl_weight / self.temperature) <= FLOAT32_MAX:  # lam T^2, and lam T^2 / T
            raise ValueError(f"lam * temperature**2 must be <= {FLOAT32_MAX:.4g} (float32), got lam={self.lam}, "
                             f"temperature={self.temperature}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not isinstance(self.mask_target, bool):
            raise TypeError(f"mask_target must be a bool, got {self.mask_target!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, Integral):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("lam", "temperature", "ce_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "ignore_index", operator.index(self.ignore_index))

    @property
    def reverse(self) -> bool:
        return self.direction == "reverse"

    @property
    def kl_weight(self) -> float:
        """lam * T^2: the weight of the divergence in each row's loss."""
        return self.lam * self.temperature * self.temperature

    def replace(self, **changes) -> MTTOptions:
        return dataclasses.replace(self, **changes)


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")


def options_from(options, option_kwargs) -> MTTOptions:
    """The MTTOptions an entry point was given: `options` itself, or one built from the keywords
    `option_kwargs` (a dict of those passed); both at once is an error naming them."""
    if options is None:
        return MTTOptions(**option_kwargs)
    if not isinstance(options, MTTOptions):
        raise TypeError(f"options must be a fastmtt.MTTOptions, got {type(options).__name__}")
    if option_kwargs:
        raise TypeError(f"pass options=MTTOptions(...) or {', '.join(sorted(option_kwargs))}, not both")
    return options
