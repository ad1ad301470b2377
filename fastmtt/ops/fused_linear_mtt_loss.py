"""fused_linear_mtt_loss: the MTT objective from final hidden states and the output head, never
materializing the [N, V] logits (docs: mtt-math, "From hidden states").

Two paths, the same function:
- chunked (default): per chunk of rows, one product forms both logit slabs in fp32, the MTT row function
  (the Triton row kernel on CUDA, PyTorch on CPU) writes the slab gradient, and the hidden, weight, bias
  and LoRA gradients follow at once (fastmtt/ops/chunked_linear_mtt.py). The floor of the work:
  adapted logits, base logits and dh, no recompute. Memory: the slabs of one chunk.
- tiled (tiled=True, Triton only): logits exist only as on-chip tiles (kernels/fused_linear_mtt_loss.py);
  forward keeps O(N) statistics, backward recomputes the tiles. Least memory, more work.
Rows with ignore_index never enter a product.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import torch

from fastmtt._checks import (
    check_bool,
    check_ce_rows,
    check_float_tensor,
    check_labels,
    check_num_items,
    check_number,
    check_same_device,
    check_values,
    check_vocab_parallel,
)
from fastmtt._dispatch import check_backend, resolve_backend
from fastmtt.head import LinearGrads, LinearHead
from fastmtt.ops.chunked_linear_mtt import chunked_linear_mtt, default_chunk_size, slab_bytes_per_entry
from fastmtt.options import DEFAULT_GRAD_THRESHOLD, DEFAULT_LAM, MTTOptions, options_from
from fastmtt.parallel import VocabParallel
from fastmtt.partials import CE, KL
from fastmtt.reduction import (
    MTTOutput,
    accumulator_dtype,
    gradient_scale,
    keep_gradients,
    once_differentiable,
    reduced_outputs,
    take_gradients,
)
from fastmtt.rows import merged_statistics


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything but the tensors: the head's scalars, the loss options and how to run."""

    lora_scaling: float  # the head's scalars; its tensors are the Function's inputs
    softcap: Optional[float]
    options: MTTOptions
    scale: torch.Tensor
    need_kl: bool
    backend: str
    chunk_size: int
    grad_threshold: float
    splits: Optional[int]
    vocab_parallel: Optional[VocabParallel]
    ce_rows: Optional[torch.Tensor]  # [N] bool: the rows with CE (None: all)

    def head_with(self, weight, bias, lora_A, lora_B) -> LinearHead:
        """The LinearHead of these tensors with the plan's scalars."""
        return LinearHead(weight, bias, lora_A, lora_B, self.lora_scaling, self.softcap)


class FusedLinearMTTFunction(torch.autograd.Function):
    """Chunked path: forward walks the chunks and forms the gradients; backward hands them over, scaled by
    the upstream gradient (`take_gradients`). reduction='none' with a parameter gradient needs per-row
    upstream weights inside the parameter sums, so that case walks the chunks in backward instead, as
    does a second backward through a retained graph. Once differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_A, lora_B, base_hidden, labels, plan):
        needs = LinearGrads(*ctx.needs_input_grad[:5])
        deferred = plan.options.reduction == "none" and any(needs[1:])  # a parameter's gradient
        stats, grads = _walk(hidden, base_hidden, labels, plan.head_with(weight, bias, lora_A, lora_B), plan,
                             LinearGrads(*(False,) * 5) if deferred else needs)
        ctx.save_for_backward(hidden, weight, bias, lora_A, lora_B, base_hidden, labels)
        ctx.plan, ctx.needs = plan, needs
        keep_gradients(ctx, *(() if deferred else grads))
        return reduced_outputs(ctx, stats[CE], stats[KL], plan.options, plan.scale, plan.ce_rows)

    @staticmethod
    @once_differentiable("fused_linear_mtt_loss")
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grads = take_gradients(ctx, grad_loss)
        if not grads:  # deferred, or taken by an earlier backward
            hidden, weight, bias, lora_A, lora_B, base_hidden, labels = ctx.saved_tensors
            head = ctx.plan.head_with(weight, bias, lora_A, lora_B)
            _, grads = _walk(hidden, base_hidden, labels, head, ctx.plan, ctx.needs,
                             row_weights=grad_loss.expand(labels.shape[0]))
        return (*grads, None, None, None)


def _walk(hidden, base_hidden, labels, head, plan, needs, row_weights=None):
    """The chunk walk; across a vocabulary split the rows exchange statistics and the gradients that sum over
    the vocabulary (dh, dA) are summed across ranks."""
    vocab_parallel = plan.vocab_parallel
    stats, grads = chunked_linear_mtt(hidden, base_hidden, labels, head, plan.options, backend=plan.backend,
                                      vocab_parallel=vocab_parallel, ce_rows=plan.ce_rows, need_kl=plan.need_kl,
                                      scale=plan.scale, chunk_size=plan.chunk_size, needs=needs,
                                      row_weights=row_weights)
    if vocab_parallel is not None:
        vocab_parallel.sum_across_ranks(grads.hidden, grads.lora_A)
    return stats, grads


class TiledFusedLinearMTTFunction(torch.autograd.Function):
    """Tiled path: forward keeps O(N) statistics (split partials, merged), backward recomputes the logit
    tiles and accumulates the gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_A, lora_B, base_hidden, labels, plan):
        head = plan.head_with(weight, bias, lora_A, lora_B)
        lora_hidden = None if lora_A is None else hidden.float() @ lora_A.float().T
        vocab_parallel = plan.vocab_parallel
        from fastmtt.kernels.fused_linear_mtt_loss import linear_mtt_forward  # Triton loads only when it runs

        partials = linear_mtt_forward(
            hidden, base_hidden, head, lora_hidden, labels, plan.options, need_kl=plan.need_kl, splits=plan.splits,
            vocab_start=0 if vocab_parallel is None else vocab_parallel.start)
        stats = merged_statistics(partials, labels, plan.options, plan.need_kl, vocab_parallel)
        ctx.save_for_backward(hidden, weight, bias, lora_A, lora_B, base_hidden, labels, lora_hidden, stats)
        ctx.plan = plan
        return reduced_outputs(ctx, stats[CE], stats[KL], plan.options, plan.scale, plan.ce_rows)

    @staticmethod
    @once_differentiable("fused_linear_mtt_loss")
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        hidden, weight, bias, lora_A, lora_B, base_hidden, labels, lora_hidden, stats = ctx.saved_tensors
        plan = ctx.plan
        row_coef = (grad_loss.float().expand(labels.shape[0]) * plan.scale.float()).contiguous()
        vocab_parallel = plan.vocab_parallel
        from fastmtt.kernels.fused_linear_mtt_loss import linear_mtt_backward

        grads = linear_mtt_backward(
            hidden, base_hidden, plan.head_with(weight, bias, lora_A, lora_B), lora_hidden, labels, stats,
            row_coef, plan.options, threshold=plan.grad_threshold, needs=LinearGrads(*ctx.needs_input_grad[:5]),
            vocab_start=0 if vocab_parallel is None else vocab_parallel.start, ce_rows=plan.ce_rows)
        if vocab_parallel is not None:
            vocab_parallel.sum_across_ranks(grads.hidden, grads.lora_A)
        inputs = (hidden, weight, bias, lora_A, lora_B)
        return (*(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)), None, None, None)


def _apply_eagerly(function, *args):
    """function.apply(*args) outside any torch.compile graph: the chunk walk writes gradients into
    private buffers in place, which a traced graph does not reproduce; eagerly it is one fused op."""
    return _eager_apply()(function, *args)


@functools.cache
def _eager_apply():
    # torch.compiler.disable imports torch._dynamo (seconds): pay for it on the first call, not on import.
    return torch.compiler.disable(lambda function, *args: function.apply(*args))


def _check_settings(*, lora_scaling=1.0, softcap=None, return_components=False, backend="auto", tiled=False,
                    chunk_size=None, grad_threshold=None):
    """The settings of `fused_linear_mtt_loss` and `FusedLinearMTTLoss` that are not tensors."""
    check_number("lora_scaling", lora_scaling)
    check_number("softcap", softcap, above=0, optional=True)
    check_bool("return_components", return_components)
    check_backend(backend)
    check_bool("tiled", tiled)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_number("grad_threshold", grad_threshold, least=0, optional=True)


def _check_head(hidden, weight, bias, lora_A, lora_B):
    hidden_size = hidden.shape[-1]
    check_float_tensor("weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ValueError(f"weight must have shape [V, {hidden_size}] (hidden size {hidden_size}), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    vocab_size = weight.shape[0]
    if bias is not None:
        check_float_tensor("bias", bias, shape=(vocab_size,))
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if lora_A is not None:
        check_float_tensor("lora_A", lora_A, min_dim=2)
        if lora_A.dim() != 2 or lora_A.shape[1] != hidden_size:
            raise ValueError(f"lora_A must have shape [r, {hidden_size}], got {tuple(lora_A.shape)}")
        check_float_tensor("lora_B", lora_B, shape=(vocab_size, lora_A.shape[0]))


def fused_linear_mtt_loss(
    hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    lora_scaling: float = 1.0,
    softcap: Optional[float] = None,
    lam: float = DEFAULT_LAM, temperature: float = 1.0, direction: str = "forward", mask_target: bool = True,
    ignore_index: int = -100, reduction: str = "mean", num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    return_components: bool = False,
    backend: str = "auto",
    tiled: bool = False,
    chunk_size: Optional[int] = None,
    grad_threshold: Optional[float] = None,
    vocab_parallel: Optional[VocabParallel] = None,
    ce_weight: float = 1.0,
):
    """Mask-the-Target loss from final hidden states: mtt_loss(softcap(h W^T + bias + s (h A^T) B^T),
    softcap(h0 W^T + bias), labels), without materializing the [N, V] logits.

    Args:
        hidden: [..., H] floating, the adapted model's final hidden states; gets the gradient.
        base_hidden: [..., H], the frozen base pass's; never gets a gradient.
        weight: [V, H] in hidden's dtype, the output head; gets a gradient when it requires one.
        labels: [...] integers in [0, V) or ignore_index, aligned with the rows (no shifting).
        bias: [V] or None (default); gets a gradient when it requires one.
        lora_A, lora_B: [r, H] and [V, r], or None (defaults None, None): LoRA on the head, adapted side only;
            they get gradients when they require them.
        lora_scaling: the LoRA s (default 1.0).
        softcap: c > 0 or None (default): logits c * tanh(x / c) on both sides.
        lam, temperature, direction, mask_target, ignore_index, reduction, ce_weight, num_items_in_batch,
            return_components, backend: as in `mtt_loss`.
        tiled: False (default): the chunked path. True: the tiled Triton kernels (least memory, about 5/3
            the matrix work; CUDA, or backend="triton" with TRITON_INTERPRET=1).
        chunk_size: rows per chunk of the chunked path (default None: `default_chunk_size`, on a GPU equal
            chunks in multiples of 128 rows whose slabs take at most half the free memory and 4 GiB, but at
            least 1024 rows).
        grad_threshold: tiled path with lam = 0 only: skips tiles whose |dL/dz| is below it (default None:
            2**-12 for fp16/bf16, 0 for fp32).
        vocab_parallel: a VocabParallel(start, stop): weight, bias and lora_B hold this rank's vocabulary
            rows [start, stop), labels are global ids; the ranks exchange per-row statistics and sum dh (and
            dA) unless told not to. Default None.

    Returns:
        As `mtt_loss`: the loss (a scalar, or [...] for reduction "none"), or MTTOutput(loss, ce, kl).

    Raises:
        TypeError, ValueError: naming the argument, for a wrong shape, dtype, device or setting.

    Example:
        >>> import fastmtt
        >>> hidden = torch.randn(2, 6, 16, requires_grad=True)
        >>> base_hidden = torch.randn(2, 6, 16)
        >>> weight = torch.randn(100, 16, requires_grad=True)
        >>> labels = torch.randint(0, 100, (2, 6))
        >>> loss = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, lam=0.5)
        >>> loss.backward()
        >>> hidden.grad.shape, weight.grad.shape
        (torch.Size([2, 6, 16]), torch.Size([100, 16]))
    """
    options = MTTOptions(lam=lam, temperature=temperature, direction=direction, mask_target=mask_target,
                         ignore_index=ignore_index, reduction=reduction, ce_weight=ce_weight)
    head = LinearHead(weight, bias, lora_A, lora_B, lora_scaling, softcap)
    return fused_linear_mtt_loss_with_options(hidden, base_hidden, head, labels, options,
                                              num_items_in_batch=num_items_in_batch,
                                              return_components=return_components, backend=backend, tiled=tiled,
                                              chunk_size=chunk_size, grad_threshold=grad_threshold,
                                              vocab_parallel=vocab_parallel)


def fused_linear_mtt_loss_with_options(hidden, base_hidden, head: LinearHead, labels, options: MTTOptions, *,
                                       num_items_in_batch=None, return_components=False, backend="auto",
                                       tiled=False, chunk_size=None, grad_threshold=None, splits=None,
                                       vocab_parallel=None, ce_rows=None):
    """`fused_linear_mtt_loss` with the head in one LinearHead and the loss settings in one MTTOptions.

    Args:
        hidden, base_hidden, labels: as in `fused_linear_mtt_loss`.
        head: a LinearHead (weight, bias, lora_A, lora_B, scaling, softcap).
        options: an MTTOptions.
        splits: tiled path: vocabulary splits of the forward (default None: enough to fill the GPU).
        ce_rows: None (default: CE on every row) or a bool tensor of labels' shape: the rows with CE, as in
            `mtt_loss_with_options` (MTTObjective's every-position KL in one call).
        Others: as in `fused_linear_mtt_loss`.

    Returns:
        As `fused_linear_mtt_loss`.
    """
    options = options_from(options, {})
    check_float_tensor("hidden", hidden, min_dim=2)
    check_float_tensor("base_hidden", base_hidden, shape=hidden.shape)
    _check_head(hidden, head.weight, head.bias, head.lora_A, head.lora_B)
    _check_settings(lora_scaling=head.scaling, softcap=head.softcap, return_components=return_components,
                    backend=backend, tiled=tiled, chunk_size=chunk_size, grad_threshold=grad_threshold)
    check_same_device(hidden=hidden, base_hidden=base_hidden, weight=head.weight, labels=labels, bias=head.bias,
                      lora_A=head.lora_A, lora_B=head.lora_B)
    check_num_items(num_items_in_batch, options.reduction)
    vocab_size, hidden_size = head.weight.shape
    check_vocab_parallel(vocab_parallel, "weight", vocab_size)
    check_labels(labels, hidden.shape[:-1])
    check_ce_rows(ce_rows, labels)
    n_predicted = check_values(labels, vocab_size if vocab_parallel is None else None, options.ignore_index,
                               num_items_in_batch, count_predicted=True)

    backend = resolve_backend(backend, hidden, head.weight)
    if tiled and backend != "triton":
        raise ValueError("tiled=True runs the Triton kernels: use CUDA tensors (or backend='triton' with "
                         "TRITON_INTERPRET=1 on CPU)")
    flat_hidden = hidden.reshape(-1, hidden_size)
    flat_base = base_hidden.detach().to(hidden.dtype).reshape(-1, hidden_size)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    flat_ce_rows = None if ce_rows is None else ce_rows.reshape(-1)
    scale = gradient_scale(options.reduction, flat_labels, options.ignore_index, num_items_in_batch, hidden.device,
                           accumulator_dtype(hidden))
    # Only predicted rows enter the products; 'none' puts the ignored rows' zeros back afterwards.
    predicted = flat_labels != options.ignore_index
    kept = predicted.nonzero() if n_predicted is None else torch.nonzero_static(predicted, size=n_predicted)
    kept = kept.squeeze(1)
    compact = kept.numel() < flat_labels.numel()
    if compact:
        flat_hidden, flat_base, flat_labels = (t.index_select(0, kept) for t in (flat_hidden, flat_base, flat_labels))
        flat_ce_rows = None if flat_ce_rows is None else flat_ce_rows.index_select(0, kept)
    if head.has_lora:  # autograd carries the gradient back through the casts
        head = head.with_tensors(head.weight, head.bias, head.lora_A.to(hidden.dtype), head.lora_B.to(hidden.dtype))
    if grad_threshold is None:
        grad_threshold = DEFAULT_GRAD_THRESHOLD if hidden.dtype in (torch.float16, torch.bfloat16) else 0.0
    plan = _Plan(lora_scaling=head.scaling, softcap=head.softcap, options=options, scale=scale,
                 need_kl=return_components, backend=backend,
                 chunk_size=chunk_size or default_chunk_size(
                     flat_hidden.shape[0], hidden_size, vocab_size, hidden.device,
                     bytes_per_entry=slab_bytes_per_entry(hidden.dtype, head.softcap)),
                 grad_threshold=float(grad_threshold), splits=splits, vocab_parallel=vocab_parallel,
                 ce_rows=None if flat_ce_rows is None else flat_ce_rows.contiguous())
    tensors = (flat_hidden, *head.tensors(), flat_base)
    function = FusedLinearMTTFunction
    if tiled:
        function = TiledFusedLinearMTTFunction
        tensors = tuple(None if t is None else t.contiguous() for t in tensors)
    loss, ce, kl = _apply_eagerly(function, *tensors, flat_labels, plan)
    if options.reduction == "none":
        if compact:
            loss, ce, kl = (t.new_zeros(labels.numel()).index_copy(0, kept, t) for t in (loss, ce, kl))
        loss, ce, kl = (t.reshape(labels.shape) for t in (loss, ce, kl))
    return MTTOutput(loss, ce, kl) if return_components else loss


class FusedLinearMTTLoss(torch.nn.Module):
    """Module form of `fused_linear_mtt_loss`: forward(hidden, base_hidden, weight, labels, bias=None,
    lora_A=None, lora_B=None, num_items_in_batch=None) returns what `fused_linear_mtt_loss` returns.

    Args:
        options: an MTTOptions, or None (default) to build one from `option_kwargs`.
        lora_scaling, softcap, return_components, backend, tiled, chunk_size: as in `fused_linear_mtt_loss`
            (defaults 1.0, None, False, "auto", False, None).
        **option_kwargs: MTTOptions' fields; not together with `options`.

    Example:
        >>> import fastmtt
        >>> criterion = fastmtt.FusedLinearMTTLoss(lam=0.5)
        >>> hidden, base_hidden, weight = torch.randn(8, 16), torch.randn(8, 16), torch.randn(100, 16)
        >>> loss = criterion(hidden, base_hidden, weight, torch.randint(0, 100, (8,)))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, options: Optional[MTTOptions] = None, *, lora_scaling: float = 1.0,
                 softcap: Optional[float] = None, return_components: bool = False, backend: str = "auto",
                 tiled: bool = False, chunk_size: Optional[int] = None, **option_kwargs):
        super().__init__()
        _check_settings(lora_scaling=lora_scaling, softcap=softcap, return_components=return_components,
                        backend=backend, tiled=tiled, chunk_size=chunk_size)
        self.options = options_from(options, option_kwargs)
        self.lora_scaling, self.softcap = lora_scaling, softcap
        self.return_components, self.backend = return_components, backend
        self.tiled, self.chunk_size = tiled, chunk_size

    def forward(self, hidden, base_hidden, weight, labels, bias=None, lora_A=None, lora_B=None,
                num_items_in_batch=None):
        head = LinearHead(weight, bias, lora_A, lora_B, self.lora_scaling, self.softcap)
        return fused_linear_mtt_loss_with_options(
            hidden, base_hidden, head, labels, self.options, num_items_in_batch=num_items_in_batch,
            return_components=self.return_components, backend=self.backend, tiled=self.tiled,
            chunk_size=self.chunk_size)

    def extra_repr(self):
        return f"{self.options!r}, softcap={self.softcap}, tiled={self.tiled}"
