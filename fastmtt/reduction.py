"""Shared by the ops and their implementations: what the losses return (`MTTOutput`), the dtype of the row
math (`accumulator_dtype`), the per-row gradient scale, reduced outputs, gradients formed in forward and
handed to backward, and backward formed by kernels (once differentiable)."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch._C import _functions


class MTTOutput(NamedTuple):
    """What the losses return with return_components=True: the loss with its two terms.

    Attributes:
        loss: the objective, reduced as asked (a scalar, or per row for reduction='none'); carries the gradient.
        ce: the cross-entropy term, weighted by ce_weight and reduced like `loss`; detached.
        kl: the divergence term D (before lam * T^2), reduced like `loss`; detached.

    Example:
        >>> import fastmtt
        >>> logits, base = torch.randn(4, 10), torch.randn(4, 10)
        >>> out = fastmtt.mtt_loss(logits, base, torch.tensor([1, 2, 3, -100]), return_components=True)
        >>> loss, ce, kl = out  # a tuple too
        >>> bool(torch.allclose(out.loss, out.ce + fastmtt.DEFAULT_LAM * out.kl))  # lam = 0.3 (the default), T = 1
        True
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def accumulator_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise: the dtype of the row math."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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


def reduced_outputs(ctx, ce, kl, options, scale, ce_rows=None):
    """(loss, ce, kl) of an autograd Function's forward, reduced from the per-row terms with
    loss_i = ce_weight * ce_i + lam * T^2 * kl_i (CE alone when lam == 0, even where KL is inf; KL alone when
    ce_weight == 0 or on a row that ce_rows [N] (bool, where given) leaves out, even where CE is inf); the ce
    output is the weighted term. ce and kl are marked non-differentiable, so loss must be a distinct tensor."""
    if ce_rows is not None:
        ce = torch.where(ce_rows, ce, 0.0)
    if options.ce_weight != 1:
        ce = torch.zeros_like(ce) if options.ce_weight == 0 else ce * options.ce_weight
    loss_rows = ce.clone() if options.lam == 0 else ce + options.kl_weight * kl
    ce_out, kl_out = reduce_loss(ce, options.reduction, scale), reduce_loss(kl, options.reduction, scale)
    ctx.mark_non_differentiable(ce_out, kl_out)
    return reduce_loss(loss_rows, options.reduction, scale), ce_out, kl_out


def keep_gradients(ctx, *grads):
    """Hold the gradients formed in forward (None entries allowed) until backward: eagerly as plain
    attributes, which `take_gradients` hands over once; under torch.compile as saved tensors."""
    if torch.compiler.is_compiling():
        ctx.save_for_backward(*grads)
        ctx.kept_gradients = None
    else:
        ctx.kept_gradients = grads


def take_gradients(ctx, grad_output):
    """The kept gradients times the upstream gradient (a scalar for mean/sum, one value per row for
    'none'), or None when an earlier backward through the same graph took them.

    Eagerly each buffer is handed over and forgotten, scaled in place (an upstream of exactly 1 leaves it
    as it is): a buffer still held here could not be handed out, since AccumulateGrad adopts a tensor (or a
    view of it) that nothing else references as a leaf's .grad, which later accumulation or .zero_()
    changes. Under torch.compile: new tensors on every backward."""
    if ctx.kept_gradients is None:
        return tuple(None if g is None else g * _per_row(grad_output, g) for g in ctx.saved_tensors)
    grads, ctx.kept_gradients = ctx.kept_gradients, ()
    if not grads:
        return None
    return tuple(None if g is None else take_gradients_of(g, grad_output) for g in grads)


def take_gradients_of(grad, grad_output):
    """A gradient buffer this backward owns, scaled in place by the upstream gradient (on the CPU left as it
    is for an upstream of exactly 1; on a GPU always scaled, as reading the upstream would be a host sync)."""
    if grad_output.dim() == 0 and reads_are_free(grad_output) and not bool(grad_output != 1):
        return grad
    return grad.mul_(_per_row(grad_output, grad))


def reads_are_free(tensor) -> bool:
    """Whether reading a value of `tensor` on the host costs nothing: a CPU tensor outside torch.compile (on
    a GPU it is a host sync, which also blocks CUDA graphs)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _per_row(grad_output, grad):
    """The upstream gradient broadcast over a gradient's rows ('none': one value per row)."""
    if grad_output.dim() == 0:
        return grad_output
    return grad_output.reshape(grad.shape[0], *([1] * (grad.dim() - 1)))


def once_differentiable(op_name):
    """Decorator for a backward formed by kernels rather than differentiable ops: runs it without recording
    and, under create_graph=True, returns gradients that raise an error naming `op_name` when
    differentiated again (torch's own once_differentiable does so only when an upstream gradient requires
    grad, and is silent otherwise)."""
    message = (f"{op_name}: double backward (differentiating its gradient, create_graph=True) is not "
               "supported; its backward is formed by kernels").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            error = _functions.DelayedError(message, len(grads))
            return error(*(None if g is None else g.detach().requires_grad_() for g in grads))
        return wrapper
    return decorate
