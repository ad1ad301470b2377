"""fastmtt: fused kernels for the Mask-the-Target loss (CE + target-masked KL to the frozen base)."""
from fastmtt.objective import MTTObjective
from fastmtt.ops.fused_linear_mtt_loss import FusedLinearMTTLoss, fused_linear_mtt_loss
from fastmtt.ops.lora_linear import lora_linear
from fastmtt.ops.mtt_loss import DEFAULT_LAM, MTTLoss, mtt_loss
from fastmtt.options import MTTOptions
from fastmtt.parallel import VocabParallel
from fastmtt.reference import MTTOutput

__version__ = "0.1.0"
__all__ = ["DEFAULT_LAM", "FusedLinearMTTLoss", "MTTLoss", "MTTObjective", "MTTOptions", "MTTOutput", "VocabParallel",
           "fused_linear_mtt_loss", "lora_linear", "mtt_loss"]
