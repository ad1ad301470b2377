"""mtt_loss: the MTT objective on materialized logits, with its autograd Function and nn.Module."""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional, Union

import torch

from fastmtt._checks import (
    check_bool,
    check_ce_rows,
    check_float_tensor,
    check_labels,
    check_num_items,
    check_same_device,
    check_values,
    check_vocab_parallel,
)
from fastmtt._dispatch import check_backend, resolve_backend
from fastmtt.options import DEFAULT_LAM, MTTOptions, options_from
from fastmtt.parallel import VocabParallel
from fastmtt.partials import CE, KL, N_STATS
from fastmtt.reduction import (
    MTTOutput,
    accumulator_dtype,
    gradient_scale,
    keep_gradients,
    once_differentiable,
    reduced_outputs,
    take_gradients,
    take_gradients_of,
)
from fastmtt.rows import mtt_rows


@torch.library.custom_op("fastmtt::mtt_rows", mutates_args=())
def _mtt_rows_op(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor,
                 lam: float, temperature: float, direction: str, mask_target: bool, ignore_index: int,
                 ce_weight: float, need_kl: bool, compute_grad: bool, backend: str,
                 ce_rows: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row statistics [N_STATS, N] (fastmtt/partials.py) and grad_scale * dL/dlogits ([N, V], or empty when
    not compute_grad), as one opaque op so that torch.compile treats the kernel as a single call."""
    options = MTTOptions(lam, temperature, direction, mask_target, ignore_index, ce_weight=ce_weight)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    stats = mtt_rows(logits, base_logits, labels, options, backend=backend, need_kl=need_kl, grad_scale=grad_scale,
                     grad_out=grad if compute_grad else None, ce_rows=ce_rows)
    return stats, grad


@_mtt_rows_op.register_fake
def _mtt_rows_fake(logits, base_logits, labels, grad_scale, lam, temperature, direction, mask_target, ignore_index,
                   ce_weight, need_kl, compute_grad, backend, ce_rows):
    stats = logits.new_empty(N_STATS, logits.shape[0], dtype=accumulator_dtype(logits, base_logits))
    return stats, torch.empty_like(logits) if compute_grad else logits.new_empty(0)


class MTTLossFunction(torch.autograd.Function):
    """Forward computes per-row CE and KL and, in the same pass, the gradient; backward hands it over,
    scaled by the upstream gradient (`take_gradients`). A second backward through a retained graph
    recomputes it from the caller's logits (`_Sources`: weak references, nothing kept alive here), or
    raises where they are gone, changed or overwritten. Double backward raises (kernels form the
    gradient)."""

    @staticmethod
    def forward(ctx, logits, base_logits, labels, ce_rows, options, scale, need_kl, backend, overwrite_logits,
                vocab_parallel, sources):
        compute_grad = ctx.needs_input_grad[0]
        in_place = compute_grad and overwrite_logits and not torch.compiler.is_compiling()
        if in_place or vocab_parallel is not None:
            grad = logits if in_place else (torch.empty_like(logits) if compute_grad else None)
            stats = _rows_with_gradient(logits, base_logits, labels, ce_rows, options, scale, need_kl, backend,
                                        vocab_parallel, grad)
            if in_place:  # a kernel's write does not count as one: autograd must see that logits changed
                torch.autograd.graph.increment_version(logits)
        else:
            stats, grad = _mtt_rows_op(logits, base_logits, labels, scale, options.lam, options.temperature,
                                       options.direction, options.mask_target, options.ignore_index,
                                       options.ce_weight, need_kl, compute_grad, backend, ce_rows)
        keep_gradients(ctx, grad)
        ctx.recompute = None if in_place or sources is None else _Recompute(sources, labels, ce_rows, options, scale,
                                                                             backend, vocab_parallel)
        return reduced_outputs(ctx, stats[CE], stats[KL], options, scale, ce_rows)

    @staticmethod
    @once_differentiable("mtt_loss")
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grads = take_gradients(ctx, grad_loss)
        if grads is None:
            grads = (_recompute_gradient(ctx.recompute, grad_loss),)
        return grads[0], None, None, None, None, None, None, None, None, None, None


def _rows_with_gradient(logits, base_logits, labels, ce_rows, options, scale, need_kl, backend, vocab_parallel,
                        grad_out):
    """The row statistics, writing the gradient into grad_out (None: no gradient)."""
    return mtt_rows(logits, base_logits, labels, options, backend=backend, need_kl=need_kl, grad_scale=scale,
                    grad_out=grad_out, ce_rows=ce_rows, vocab_parallel=vocab_parallel)


def _recompute_gradient(recompute, grad_loss):
    """The gradient again, for a second backward through a retained graph."""
    inputs = None if recompute is None else recompute.sources.flat(recompute.backend)
    if inputs is None:
        raise RuntimeError(
            "mtt_loss: a second backward through the same graph (retain_graph=True) needs the logits again, "
            "and they were overwritten (overwrite_logits=True), changed in place or freed since the forward: "
            "keep them, or compute the loss again")
    logits, base_logits = inputs
    grad = torch.empty_like(logits)
    _rows_with_gradient(logits, base_logits, recompute.labels, recompute.ce_rows, recompute.options, recompute.scale,
                        False, recompute.backend, recompute.vocab_parallel, grad)
    return take_gradients_of(grad, grad_loss)


class _Sources:
    """Weak references to the caller's logits and base logits (to the tensor a view was taken of, with the
    view's layout, so that an inline .view() still counts) and their versions at the forward: the inputs of
    a recomputed gradient while the caller still holds them unchanged."""

    def __init__(self, logits, base_logits):
        self.layouts = tuple((weakref.ref(t if t._base is None else t._base), t._version,
                              None if t._base is None else (t.shape, t.stride(), t.storage_offset()))
                             for t in (logits, base_logits))

    def flat(self, backend):
        """The [N, V] rows of both for `backend` (`_flat_rows`), or None where one is gone or changed."""
        tensors = []
        for ref, version, view in self.layouts:
            tensor = ref()
            if tensor is None or tensor._version != version:
                return None
            tensors.append(tensor.detach() if view is None else tensor.detach().as_strided(*view))
        return _flat_rows(*tensors, backend)


@dataclasses.dataclass(frozen=True)
class _Recompute:
    """What a second backward through a retained graph needs to form the gradient again: the caller's
    logits (weakly held) and the forward's other arguments."""

    sources: _Sources
    labels: torch.Tensor
    ce_rows: Optional[torch.Tensor]
    options: MTTOptions
    scale: torch.Tensor
    backend: str
    vocab_parallel: Optional[VocabParallel]


def _flat_rows(logits, base_logits, backend):
    """[N, V] views (or copies) of the logits as the row implementations take them."""
    n_cols = logits.shape[-1]
    flat_logits = logits.reshape(-1, n_cols)
    flat_base = base_logits.detach().reshape(-1, n_cols)
    if backend == "triton":  # unit column stride
        flat_logits = flat_logits if flat_logits.stride(-1) == 1 else flat_logits.contiguous()
        flat_base = flat_base if flat_base.stride(-1) == 1 else flat_base.contiguous()
    return flat_logits, flat_base


def mtt_loss(
    logits: torch.Tensor,
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = DEFAULT_LAM,
    temperature: float = 1.0,
    direction: str = "forward",
    mask_target: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    return_components: bool = False,
    backend: str = "auto",
    overwrite_logits: bool = False,
    vocab_parallel: Optional[VocabParallel] = None,
    ce_weight: float = 1.0,
):
    """Mask-the-Target loss on logits: mean/sum/none of  ce_weight * CE_i + lam * T^2 * KL_i.

    KL_i is between the two next-token distributions with the target removed and the rest renormalized, at
    temperature T; direction "forward" is KL(base || adapted); mask_target=False gives the full-vocabulary
    KL instead. ce_weight=0 gives the divergence alone (rows whose label is only the target to mask).

    Args:
        logits: [..., V] floating, the adapted model's; gets the gradient.
        base_logits: [..., V] floating, the frozen base model's; never gets a gradient.
        labels: [...] integers in [0, V) or ignore_index, aligned with the logit rows (no shifting).
        lam, temperature, direction, mask_target, ignore_index, reduction, ce_weight: the loss settings, as in
            `MTTOptions` (defaults 0.3, 1.0, "forward", True, -100, "mean", 1.0).
        num_items_in_batch: with reduction "mean", the divisor instead of the number of valid labels (an int
            or one-element integer tensor >= 0; exact gradient accumulation). Default None.
        return_components: return MTTOutput(loss, ce, kl) instead of the loss alone (default False).
        backend: "auto" (default: Triton for CUDA tensors, PyTorch otherwise), "triton" or "torch".
        overwrite_logits: let the kernel store the gradient into `logits` (saves one [N, V] buffer; their
            values are gone afterwards). Default False.
        vocab_parallel: a VocabParallel(start, stop): logits [..., stop - start] are this rank's columns of the
            vocabulary, labels global ids; the ranks exchange per-row statistics only. Default None.

    Returns:
        The loss: a scalar for "mean" and "sum", [...] for "none"; with return_components, MTTOutput(loss,
        ce, kl), ce and kl detached and reduced the same way (ce weighted by ce_weight).

    Raises:
        TypeError, ValueError: naming the argument, for a wrong shape, dtype, device or setting.

    Example:
        >>> import fastmtt
        >>> logits = torch.randn(2, 5, 100, requires_grad=True)
        >>> base_logits = torch.randn(2, 5, 100)
        >>> labels = torch.randint(0, 100, (2, 5))
        >>> loss = fastmtt.mtt_loss(logits, base_logits, labels, lam=0.5)
        >>> loss.backward()
        >>> logits.grad.shape
        torch.Size([2, 5, 100])
    """
    options = MTTOptions(lam=lam, temperature=temperature, direction=direction, mask_target=mask_target,
                         ignore_index=ignore_index, reduction=reduction, ce_weight=ce_weight)
    return mtt_loss_with_options(logits, base_logits, labels, options, num_items_in_batch=num_items_in_batch,
                                 return_components=return_components, backend=backend,
                                 overwrite_logits=overwrite_logits, vocab_parallel=vocab_parallel)


def mtt_loss_with_options(logits, base_logits, labels, options: MTTOptions, *, num_items_in_batch=None,
                          return_components=False, backend="auto", overwrite_logits=False, vocab_parallel=None,
                          ce_rows=None):
    """`mtt_loss` with its loss settings in one MTTOptions.

    Args:
        logits, base_logits, labels: as in `mtt_loss`.
        options: an MTTOptions.
        num_items_in_batch, return_components, backend, overwrite_logits, vocab_parallel: as in `mtt_loss`.
        ce_rows: None (default: CE on every row) or a bool tensor of labels' shape: the rows with CE; on the
            others the divergence alone, their label being only the target to mask (ce_weight=0 there).

    Returns:
        As `mtt_loss`.
    """
    options = options_from(options, {})
    check_float_tensor("logits", logits, min_dim=2)
    n_cols = logits.shape[-1]
    check_float_tensor("base_logits", base_logits, shape=logits.shape)
    check_same_device(logits=logits, base_logits=base_logits, labels=labels)
    check_num_items(num_items_in_batch, options.reduction)
    check_vocab_parallel(vocab_parallel, "logits", n_cols)
    check_labels(labels, logits.shape[:-1])
    check_bool("return_components", return_components)
    check_bool("overwrite_logits", overwrite_logits)
    check_ce_rows(ce_rows, labels)
    check_values(labels, n_cols if vocab_parallel is None else None, options.ignore_index, num_items_in_batch)

    backend = resolve_backend(backend, logits, base_logits)
    flat_logits, flat_base = _flat_rows(logits, base_logits, backend)
    if overwrite_logits and _rows_overlap(flat_logits):
        raise ValueError(f"overwrite_logits=True needs logits whose entries do not share memory, got strides "
                         f"{logits.stride()} (expanded?); pass a copy or overwrite_logits=False")
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    flat_ce_rows = None if ce_rows is None else ce_rows.reshape(-1).contiguous()
    scale = gradient_scale(options.reduction, flat_labels, options.ignore_index, num_items_in_batch, logits.device,
                           accumulator_dtype(logits, base_logits))
    sources = None if overwrite_logits or torch.compiler.is_compiling() else _Sources(logits, base_logits)
    loss, ce, kl = MTTLossFunction.apply(flat_logits, flat_base, flat_labels, flat_ce_rows, options, scale,
                                         return_components, backend, overwrite_logits, vocab_parallel, sources)
    if options.reduction == "none":
        loss, ce, kl = (t.reshape(labels.shape) for t in (loss, ce, kl))
    return MTTOutput(loss, ce, kl) if return_components else loss


def _rows_overlap(matrix):
    """Whether two entries of an [N, V] matrix share memory (a stride-0 or otherwise overlapping layout)."""
    (n_rows, n_cols), (row_stride, col_stride) = matrix.shape, matrix.stride()
    if n_rows <= 1 or n_cols <= 1:
        return (n_cols > 1 and col_stride == 0) or (n_rows > 1 and row_stride == 0)
    (small, small_size), (large, _) = sorted(((col_stride, n_cols), (row_stride, n_rows)))
    return small == 0 or large < small * (small_size - 1) + 1


class MTTLoss(torch.nn.Module):
    """Module form of `mtt_loss`: forward(logits, base_logits, labels, num_items_in_batch=None) returns what
    `mtt_loss` returns.

    Args:
        options: an MTTOptions, or None (default) to build one from `option_kwargs`.
        return_components: return MTTOutput(loss, ce, kl) (default False).
        backend: "auto" (default), "triton" or "torch".
        **option_kwargs: MTTOptions' fields (lam, temperature, direction, mask_target, ignore_index,
            reduction, ce_weight); not together with `options`.

    Example:
        >>> import fastmtt
        >>> criterion = fastmtt.MTTLoss(lam=0.5, temperature=2.0)
        >>> loss = criterion(torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,)))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, options: Optional[MTTOptions] = None, *, return_components: bool = False,
                 backend: str = "auto", **option_kwargs):
        super().__init__()
        check_bool("return_components", return_components)
        check_backend(backend)
        self.options = options_from(options, option_kwargs)
        self.return_components, self.backend = return_components, backend

    def forward(self, logits, base_logits, labels, num_items_in_batch=None):
        return mtt_loss_with_options(logits, base_logits, labels, self.options, num_items_in_batch=num_items_in_batch,
                                     return_components=self.return_components, backend=self.backend)

    def extra_repr(self):
        return repr(self.options)
