"""fastmtt: fused kernels for the Mask-the-Target loss (CE + target-masked KL to the frozen base)."""
from fastmtt.fused_linear import FusedLinearMTTLoss, fused_linear_mtt_loss
from fastmtt.lora import lora_linear
from fastmtt.loss import DEFAULT_LAM, MTTLoss, mtt_loss
from fastmtt.peft import MTTObjective
from fastmtt.reference import MTTOutput

__version__ = "0.1.0"
__all__ = ["DEFAULT_LAM", "FusedLinearMTTLoss", "MTTLoss", "MTTObjective", "MTTOutput", "fused_linear_mtt_loss",
           "lora_linear", "mtt_loss"]
