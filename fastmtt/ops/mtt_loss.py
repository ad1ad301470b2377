"""mtt_loss: the MTT objective on materialized logits, with its autograd Function and nn.Module."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fastmtt._checks import check_float_tensor, check_labels, check_options, check_same_device
from fastmtt._dispatch import resolve_backend
from fastmtt.pytorch.mtt_loss import accumulator_dtype, mtt_rows_torch
from fastmtt.reference import MTTOutput

DEFAULT_LAM = 1.0


def _rows_fn(backend: str):
    if backend == "triton":
        from fastmtt.kernels.mtt_loss import mtt_rows_triton

        return mtt_rows_triton
    return mtt_rows_torch


@torch.library.custom_op("fastmtt::mtt_rows", mutates_args=())
def mtt_rows(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor,
             lam: float, temperature: float, reverse: bool, ignore_index: int, need_kl: bool,
             compute_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (ce, kl) and grad_scale * dL/dlogits ([N, V], or empty when not compute_grad), as one
    opaque op so that torch.compile treats the kernel as a single call."""
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    ce, kl = _rows_fn(backend)(logits, base_logits, labels, lam=lam, temperature=temperature, reverse=reverse,
                               ignore_index=ignore_index, need_kl=need_kl, grad_scale=grad_scale,
                               grad_out=grad if compute_grad else None)
    return ce, kl, grad


@mtt_rows.register_fake
def _mtt_rows_fake(logits, base_logits, labels, grad_scale, lam, temperature, reverse, ignore_index, need_kl,
                   compute_grad, backend):
    rows = logits.new_empty(logits.shape[0], dtype=accumulator_dtype(logits, base_logits))
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return rows, torch.empty_like(rows), grad


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


def reduced_outputs(ctx, ce, kl, *, lam, temperature, reduction, scale):
    """(loss, ce, kl) of an autograd Function's forward, reduced from the per-row terms with
    loss_i = ce_i + lam * T^2 * kl_i (plain CE when lam == 0, even where KL is inf); ce and kl are
    marked non-differentiable, so loss must be a distinct tensor."""
    loss_rows = ce.clone() if lam == 0 else ce + (lam * temperature * temperature) * kl
    ce_out, kl_out = reduce_loss(ce, reduction, scale), reduce_loss(kl, reduction, scale)
    ctx.mark_non_differentiable(ce_out, kl_out)
    return reduce_loss(loss_rows, reduction, scale), ce_out, kl_out


def scale_saved_grad(ctx, grad, grad_output):
    """The saved gradient times the upstream gradient (a scalar for mean/sum, one value per row for
    'none'). An upstream of exactly 1 returns the saved buffer itself. With ctx.in_place (the caller
    opted into overwriting) the buffer is scaled in place, so autograd refuses a second backward."""
    if grad_output.dim() > 0:
        grad_output = grad_output.reshape(grad.shape[0], *([1] * (grad.dim() - 1)))
    elif not torch.compiler.is_compiling() and not bool(grad_output != 1):
        return grad
    return grad.mul_(grad_output) if ctx.in_place else grad * grad_output


class MTTLossFunction(torch.autograd.Function):
    """Forward computes per-row CE and KL and, in the same pass, the gradient; backward scales it."""

    @staticmethod
    def forward(ctx, logits, base_logits, labels, options):
        lam, temperature, reduction, scale = (options[k] for k in ("lam", "temperature", "reduction", "scale"))
        compute_grad = ctx.needs_input_grad[0]
        args = dict(lam=lam, temperature=temperature, reverse=options["direction"] == "reverse",
                    ignore_index=options["ignore_index"], need_kl=options["need_kl"])
        ctx.in_place = compute_grad and options["overwrite_logits"] and not torch.compiler.is_compiling()
        if ctx.in_place:
            ce, kl = _rows_fn(options["backend"])(logits, base_logits, labels, grad_scale=scale, grad_out=logits, **args)
            grad = logits
        else:
            ce, kl, grad = mtt_rows(logits, base_logits, labels, scale, compute_grad=compute_grad,
                                    backend=options["backend"], **args)
        ctx.save_for_backward(grad)
        return reduced_outputs(ctx, ce, kl, lam=lam, temperature=temperature, reduction=reduction, scale=scale)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return scale_saved_grad(ctx, grad, grad_loss), None, None, None


def mtt_loss(
    logits: torch.Tensor,
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = DEFAULT_LAM,
    temperature: float = 1.0,
    direction: str = "forward",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    return_components: bool = False,
    backend: str = "auto",
    overwrite_logits: bool = False,
):
    """Mask-the-Target loss on logits: mean/sum/none of  CE_i + lam * T^2 * KL_i.

    logits [..., V] (adapted model, gets the gradient), base_logits [..., V] (frozen base, never gets
    a gradient), labels [...] int, aligned with the logit rows (no shifting). KL_i is between the two
    next-token distributions with the target removed and the rest renormalized, at temperature T;
    direction "forward" is KL(base || adapted). With return_components=True returns
    MTTOutput(loss, ce, kl), the last two detached. overwrite_logits=True lets the kernel store the
    gradient into `logits` (saves one [N, V] buffer; their values are gone afterwards).
    """
    check_float_tensor("logits", logits, min_dim=2)
    n_cols = logits.shape[-1]
    check_float_tensor("base_logits", base_logits, shape=logits.shape)
    check_same_device(logits=logits, base_logits=base_logits, labels=labels)
    check_options(lam=lam, temperature=temperature, direction=direction, reduction=reduction,
                  num_items_in_batch=num_items_in_batch)
    check_labels(labels, logits.shape[:-1], n_cols, ignore_index)

    backend = resolve_backend(backend, logits, base_logits)
    flat_logits = logits.reshape(-1, n_cols)
    flat_base = base_logits.detach().reshape(-1, n_cols)
    if backend == "triton":
        flat_logits = flat_logits if flat_logits.stride(-1) == 1 else flat_logits.contiguous()
        flat_base = flat_base if flat_base.stride(-1) == 1 else flat_base.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    options = dict(backend=backend, lam=float(lam), temperature=float(temperature), direction=direction,
                   ignore_index=int(ignore_index), reduction=reduction, need_kl=return_components,
                   scale=gradient_scale(reduction, flat_labels, ignore_index, num_items_in_batch, logits.device,
                                        accumulator_dtype(logits, base_logits)),
                   overwrite_logits=overwrite_logits)
    loss, ce, kl = MTTLossFunction.apply(flat_logits, flat_base, flat_labels, options)
    if reduction == "none":
        loss, ce, kl = (t.reshape(labels.shape) for t in (loss, ce, kl))
    return MTTOutput(loss, ce, kl) if return_components else loss


class MTTLoss(torch.nn.Module):
    """Module form of `mtt_loss`: forward(logits, base_logits, labels, num_items_in_batch=None)."""

    def __init__(self, lam: float = DEFAULT_LAM, temperature: float = 1.0, direction: str = "forward",
                 ignore_index: int = -100, reduction: str = "mean", return_components: bool = False,
                 backend: str = "auto"):
        super().__init__()
        check_options(lam=lam, temperature=temperature, direction=direction, reduction=reduction,
                      num_items_in_batch=None)
        self.lam, self.temperature, self.direction = lam, temperature, direction
        self.ignore_index, self.reduction = ignore_index, reduction
        self.return_components, self.backend = return_components, backend

    def forward(self, logits, base_logits, labels, num_items_in_batch=None):
        return mtt_loss(logits, base_logits, labels, lam=self.lam, temperature=self.temperature,
                        direction=self.direction, ignore_index=self.ignore_index, reduction=self.reduction,
                        num_items_in_batch=num_items_in_batch, return_components=self.return_components,
                        backend=self.backend)

    def extra_repr(self):
        return f"lam={self.lam}, temperature={self.temperature}, direction={self.direction!r}, reduction={self.reduction!r}"
