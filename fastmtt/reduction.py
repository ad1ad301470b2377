"""Reductions shared by the ops: the per-row gradient scale, reduced outputs, the saved-gradient rescale."""
from __future__ import annotations

import torch


def gradient_scale(reduction, labels, ignore_index, num_items_in_batch, device, dtype=torch.float32):
    """1-element tensor by which the reduction scales each row's gradient: 1/divisor for 'mean'
    (divisor = num_items_in_batch or the number of valid labels; 0 when the divisor is 0), 1 for
    'sum' and 'none'. It stays on `device`, so no host sync is needed."""
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=device)
    if num_items_in_batch is None:
        divisor = (labels != ignore_index).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=device)
    divisor = divisor.to(device=device, dtype=dtype).reshape(1)
    return torch.where(divisor > 0, 1.0 / divisor, 0.0)


def reduce_loss(rows, reduction, scale):
    """Reduce per-row values: 'none' -> rows, 'sum' -> sum, 'mean' -> sum * scale (from gradient_scale)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total * scale.to(total.dtype).squeeze(0)


def reduced_outputs(ctx, ce, kl, options, scale):
    """(loss, ce, kl) of an autograd Function's forward, reduced from the per-row terms with
    loss_i = ce_weight * ce_i + lam * T^2 * kl_i (CE alone when lam == 0, even where KL is inf; KL alone when
    ce_weight == 0, even where CE is inf); the ce output is the weighted term. ce and kl are marked
    non-differentiable, so loss must be a distinct tensor."""
    if options.ce_weight != 1:
        ce = torch.zeros_like(ce) if options.ce_weight == 0 else ce * options.ce_weight
    loss_rows = ce.clone() if options.lam == 0 else ce + options.kl_weight * kl
    ce_out, kl_out = reduce_loss(ce, options.reduction, scale), reduce_loss(kl, options.reduction, scale)
    ctx.mark_non_differentiable(ce_out, kl_out)
    return reduce_loss(loss_rows, options.reduction, scale), ce_out, kl_out


def scale_saved_grad(ctx, grad, grad_output):
    """The saved gradient times the upstream gradient (a scalar for mean/sum, one value per row for
    'none'). An upstream of exactly 1 returns the saved buffer itself. With ctx.in_place (the caller
    opted into overwriting, or the buffer is private) it is scaled in place, so autograd refuses a
    second backward."""
    if grad_output.dim() > 0:
        grad_output = grad_output.reshape(grad.shape[0], *([1] * (grad.dim() - 1)))
    elif not torch.compiler.is_compiling() and not bool(grad_output != 1):
        return grad
    return grad.mul_(grad_output) if ctx.in_place else grad * grad_output
