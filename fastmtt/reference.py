"""Executable specification of the Mask-the-Target objective (see docs: mtt-math).

The plainest PyTorch: materialized logits, log_softmax over target-masked rows, autograd for the
gradient. Works in any floating dtype; pass float64 for a ground truth. Everything else in fastmtt is
checked against this module.
"""
from __future__ import annotations

from typing import Optional

import torch

import fastmtt.reduction


def masked_kl_rows(logits, base_logits, labels, *, temperature=1.0, direction="forward", ignore_index=-100,
                   mask_target=True):
    """Per-row KL between the target-masked, renormalized distributions at temperature T.

    logits, base_logits: [N, V]; labels: [N]. Returns [N]; 0 at ignored rows, at rows where the
    base has no mass outside the target, and at V == 1. mask_target=False: the full-vocabulary KL.
    """
    valid = labels != ignore_index
    target_mask = torch.zeros_like(logits, dtype=torch.bool)
    if mask_target:
        target_mask[valid, labels[valid]] = True

    z = (logits / temperature).masked_fill(target_mask, float("-inf"))
    b = (base_logits.to(logits.dtype) / temperature).masked_fill(target_mask, float("-inf"))
    base_has_mass = torch.isfinite(b).any(dim=1) | b.isnan().any(dim=1)
    adapted_has_mass = torch.isfinite(z).any(dim=1) | z.isnan().any(dim=1)
    # log_softmax of an all -inf row is NaN; such rows are defined below, so feed them zeros.
    lq = torch.log_softmax(torch.where(adapted_has_mass[:, None], z, 0.0), dim=1)
    lp = torch.log_softmax(torch.where(base_has_mass[:, None], b, 0.0), dim=1)

    if direction == "forward":
        weight, log_ratio, weighted_has_mass = lp.exp(), lp - lq, base_has_mass
    elif direction == "reverse":
        weight, log_ratio, weighted_has_mass = lq.exp(), lq - lp, adapted_has_mass
    else:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    # A term of weight exactly 0 contributes 0, never 0 * inf (inner where keeps the gradient finite).
    terms = weight * torch.where(weight == 0, 0.0, log_ratio)
    kl = terms.sum(dim=1)
    if direction == "forward":
        # The adapted side has no mass outside the target but the base does: KL is +inf.
        kl = torch.where(adapted_has_mass, kl, float("inf"))
    defined = valid & base_has_mass & weighted_has_mass
    kl = torch.where(defined, kl, 0.0)
    # The base's target logit takes no part in the value, but NaN there still poisons the row.
    base_target = base_logits.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1).to(kl.dtype)
    return torch.where(valid & base_target.isnan(), float("nan"), kl)


def cross_entropy_rows(logits, labels, *, ignore_index=-100):
    """Per-row CE = LSE(z) - z_y at T = 1; 0 at ignored rows. [N, V], [N] -> [N]."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    ce = torch.logsumexp(logits, dim=1) - logits.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, ce, 0.0)


def reduce_rows(rows, labels, *, ignore_index=-100, reduction="mean", num_items_in_batch=None):
    """'none' -> rows; 'sum' -> sum; 'mean' -> sum / (num_items_in_batch or n_valid), 0 if that is 0."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    divisor = (labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    divisor = torch.as_tensor(divisor, dtype=rows.dtype, device=rows.device)
    return torch.where(divisor > 0, total / divisor, 0.0)


def mtt_loss(
    logits: torch.Tensor,
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float,
    temperature: float = 1.0,
    direction: str = "forward",
    mask_target: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[int] = None,
    ce_weight: float = 1.0,
) -> fastmtt.reduction.MTTOutput:
    """loss_i = ce_weight * CE_i + lam * T^2 * KL_i, reduced; gradient (autograd) flows to `logits` only.
    The components are the two terms: ce = ce_weight * CE, kl = KL."""
    base_logits = base_logits.detach()
    ce = cross_entropy_rows(logits, labels, ignore_index=ignore_index)
    ce = torch.zeros_like(ce) if ce_weight == 0 else ce_weight * ce  # the KL alone, even where CE is inf
    kl = masked_kl_rows(logits, base_logits, labels, temperature=temperature, direction=direction,
                        ignore_index=ignore_index, mask_target=mask_target)
    loss = ce if lam == 0 else ce + lam * temperature**2 * kl  # lam = 0 is plain CE, even where KL is inf
    reduce = dict(labels=labels, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch)
    return fastmtt.reduction.MTTOutput(reduce_rows(loss, **reduce), reduce_rows(ce, **reduce).detach(),
                     reduce_rows(kl, **reduce).detach())


def linear_logits(hidden, weight, *, bias=None, lora_A=None, lora_B=None, lora_scaling=1.0, softcap=None):
    """softcap(h W^T + bias + s * (h A^T) B^T): hidden [N, H], weight [V, H], bias [V], lora_A [r, H],
    lora_B [V, r] -> [N, V]. softcap(x) = c * tanh(x / c) when c is given."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if lora_A is not None:
        logits = logits + lora_scaling * ((hidden @ lora_A.T) @ lora_B.T)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def fused_linear_mtt_loss(hidden, base_hidden, weight, labels, *, bias=None, lora_A=None, lora_B=None, lora_scaling=1.0,
                          softcap=None, **mtt_options) -> fastmtt.reduction.MTTOutput:
    """mtt_loss on materialized logits: adapted side with the LoRA head, base side (from the frozen
    base pass, detached) without it; both softcapped. `mtt_options` are those of `mtt_loss`."""
    logits = linear_logits(hidden, weight, bias=bias, lora_A=lora_A, lora_B=lora_B, lora_scaling=lora_scaling,
                           softcap=softcap)
    base_logits = linear_logits(base_hidden.detach(), weight, bias=bias, softcap=softcap)
    return mtt_loss(logits, base_logits.detach(), labels, **mtt_options)
