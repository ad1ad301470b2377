"""fused_linear_mtt_loss: the MTT objective from final hidden states and the output head, never
materializing the [N, V] logits (docs: mtt-math, "From hidden states").

PyTorch path (chunked): walk the rows in chunks; per chunk form both logit slabs, run the MTT row
function with the gradient written in place, and turn the slab gradient into the hidden, weight, bias
and LoRA gradients right away. Only gradients are saved for backward.
Triton path (tiled, kernels/fused_linear_mtt.py): logits exist only as on-chip tiles; forward keeps
O(N) statistics, backward recomputes the tiles.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from fastmtt._checks import check_float_tensor, check_labels, check_options, check_same_device
from fastmtt._dispatch import resolve_backend
from fastmtt.ops.mtt_loss import DEFAULT_LAM, gradient_scale, reduced_outputs, scale_saved_grad
from fastmtt.pytorch.mtt_loss import accumulator_dtype, mtt_rows_torch
from fastmtt.reference import MTTOutput

GRAD_INPUTS = ("hidden", "weight", "bias", "lora_A", "lora_B")


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """The output head: weight [V, H], optional bias [V], optional LoRA (lora_A [r, H], lora_B [V, r],
    scaling s) on the adapted side only, optional softcap c."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    scaling: float = 1.0
    softcap: Optional[float] = None

    def logits(self, hidden, base_hidden=None, lora_hidden=None):
        """Adapted slab softcap(h W^T + bias + s * lora_hidden B^T) [n, V] (lora_hidden = h A^T) and, when
        base_hidden is given, base slab softcap(h0 W^T + bias) [n, V]: one product, one read of W."""
        rows = hidden if base_hidden is None else torch.cat((hidden, base_hidden))
        if self.bias is None:
            slab = rows @ self.weight.T
        else:
            slab = torch.addmm(self.bias, rows, self.weight.T)
        adapted, base = slab[: hidden.shape[0]], slab[hidden.shape[0]:]
        if lora_hidden is not None:
            adapted.addmm_(lora_hidden, self.lora_B.T, alpha=self.scaling)
        if self.softcap is not None:
            slab.div_(self.softcap).tanh_().mul_(self.softcap)
        return adapted, (None if base_hidden is None else base)


@dataclasses.dataclass(frozen=True)
class _Options:
    lam: float
    temperature: float
    reverse: bool
    ignore_index: int
    reduction: str
    need_kl: bool
    scale: torch.Tensor
    chunk_size: int
    grad_threshold: float

    def row_kwargs(self):
        return dict(lam=self.lam, temperature=self.temperature, reverse=self.reverse,
                    ignore_index=self.ignore_index, need_kl=self.need_kl)


MIN_CHUNK_ROWS = 256
DEFAULT_GRAD_THRESHOLD = 2.0**-12  # Cut Cross-Entropy's gradient filter for 16-bit inputs


def default_chunk_size(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk: a [rows, V] logit slab about the size of the hidden states [N, H], rounded up to
    a multiple of 16 and at least MIN_CHUNK_ROWS (every chunk streams the whole weight once; fewer rows
    leave the matrix products bound by that read)."""
    rows = -(-n_rows * hidden_size // max(vocab_size, 1))
    return max(MIN_CHUNK_ROWS, -(-rows // 16) * 16)


def chunked_linear_mtt(hidden, base_hidden, labels, head: LinearHead, options: _Options, needs,
                       row_weights=None):
    """Per-row (ce, kl) [N] and the gradients flagged in `needs` (hidden, weight, bias, lora_A, lora_B;
    None where not flagged) of sum_i w_i * scale * loss_i, with scale = options.scale (1/divisor for 'mean', else 1)
    and w = row_weights (else 1). Parameter gradients accumulate in fp32 (fp64 for fp64 inputs)."""
    n_rows, hidden_size = hidden.shape
    vocab_size = head.weight.shape[0]
    acc = accumulator_dtype(hidden)
    device = hidden.device
    ce = torch.empty(n_rows, dtype=acc, device=device)
    kl = torch.empty_like(ce)
    need_dh, need_dw, need_db, need_da, need_db_lora = needs
    lora = head.lora_A is not None
    dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_dh else None
    dw = torch.zeros(vocab_size, hidden_size, dtype=acc, device=device) if need_dw else None
    db = torch.zeros(vocab_size, dtype=acc, device=device) if need_db else None
    da = torch.zeros(head.lora_A.shape, dtype=acc, device=device) if need_da else None
    db_lora = torch.zeros(head.lora_B.shape, dtype=acc, device=device) if need_db_lora else None
    any_grad = any(needs)
    has_kl = options.lam > 0 or options.need_kl

    for start in range(0, n_rows, options.chunk_size):
        rows = slice(start, start + options.chunk_size)
        h = hidden[rows]
        lora_h = h @ head.lora_A.T if lora else None
        z, b = head.logits(h, base_hidden[rows] if has_kl else None, lora_h)
        b = z if b is None else b  # not read without the KL term
        # The row function writes dL/dz over a slab it has read; z itself is still needed under a softcap.
        grad = None
        if any_grad:
            grad = z if head.softcap is None else (b if has_kl else torch.empty_like(z))
        ce[rows], kl[rows] = mtt_rows_torch(z, b, labels[rows], **options.row_kwargs(),
                                             grad_scale=options.scale, grad_out=grad)
        if grad is None:
            continue
        if head.softcap is not None:  # dz_pre = dz * (1 - tanh^2(pre / c)), tanh(pre / c) = z / c
            grad.mul_(z.div_(head.softcap).square_().neg_().add_(1.0))
        if row_weights is not None:
            grad.mul_(row_weights[rows, None].to(grad.dtype))
        if need_dh:
            torch.mm(grad, head.weight, out=dh[rows])
        if lora and (need_dh or need_da):
            grad_b = grad @ head.lora_B  # [n, r]
            if need_dh:
                dh[rows].addmm_(grad_b, head.lora_A, alpha=head.scaling)
            if need_da:
                da.addmm_(grad_b.T.to(acc), h.to(acc), alpha=head.scaling)
        if need_dw or need_db or need_db_lora:
            grad_acc = grad.to(acc)
            if need_dw:
                dw.addmm_(grad_acc.T, h.to(acc))
            if need_db:
                db.add_(grad_acc.sum(0))
            if need_db_lora:
                db_lora.addmm_(grad_acc.T, lora_h.to(acc), alpha=head.scaling)

    params = (head.weight, head.bias, head.lora_A, head.lora_B)
    grads = (dh,) + tuple(None if g is None else g.to(p.dtype) for g, p in zip((dw, db, da, db_lora), params))
    return ce, kl, grads


class FusedLinearMTTFunction(torch.autograd.Function):
    """Forward walks the chunks and forms the gradients; backward scales them by the upstream gradient.
    reduction='none' with a parameter gradient needs per-row upstream weights inside the parameter
    sums, so that case recomputes the walk in backward instead."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_A, lora_B, base_hidden, labels, head_options, options):
        head = LinearHead(weight, bias, lora_A, lora_B, **head_options)
        needs = tuple(ctx.needs_input_grad[:5])
        ctx.deferred = options.reduction == "none" and any(needs[1:])
        ce, kl, grads = chunked_linear_mtt(hidden, base_hidden, labels, head, options,
                                           (False,) * 5 if ctx.deferred else needs)
        ctx.in_place = True  # the saved gradients are private buffers: scale them in place
        if ctx.deferred:
            ctx.save_for_backward(hidden, weight, bias, lora_A, lora_B, base_hidden, labels)
            ctx.head_options, ctx.options, ctx.needs = head_options, options, needs
        else:
            ctx.save_for_backward(*grads)
        return reduced_outputs(ctx, ce, kl, lam=options.lam, temperature=options.temperature,
                               reduction=options.reduction, scale=options.scale)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        if ctx.deferred:
            hidden, weight, bias, lora_A, lora_B, base_hidden, labels = ctx.saved_tensors
            head = LinearHead(weight, bias, lora_A, lora_B, **ctx.head_options)
            _, _, grads = chunked_linear_mtt(hidden, base_hidden, labels, head, ctx.options, ctx.needs,
                                             row_weights=grad_loss)
        else:
            grads = tuple(None if g is None else scale_saved_grad(ctx, g, grad_loss) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None)


class TiledFusedLinearMTTFunction(torch.autograd.Function):
    """Triton tiles (kernels/fused_linear_mtt.py): forward keeps O(N) statistics, backward recomputes
    the logit tiles and accumulates the gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_A, lora_B, base_hidden, labels, head_options, options):
        from fastmtt.kernels.fused_linear_mtt_loss import STAT_KL, linear_mtt_forward_triton

        lora_hidden = None if lora_A is None else hidden.float() @ lora_A.float().T
        ce, stats = linear_mtt_forward_triton(hidden, base_hidden, weight, bias, lora_hidden, lora_B, labels,
                                              **head_options, **options.row_kwargs())
        kl = stats[STAT_KL.value]
        ctx.save_for_backward(hidden, weight, bias, lora_A, lora_B, base_hidden, labels, lora_hidden, stats)
        ctx.head_options, ctx.options = head_options, options
        return reduced_outputs(ctx, ce, kl, lam=options.lam, temperature=options.temperature,
                               reduction=options.reduction, scale=options.scale)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        from fastmtt.kernels.fused_linear_mtt_loss import linear_mtt_backward_triton

        hidden, weight, bias, lora_A, lora_B, base_hidden, labels, lora_hidden, stats = ctx.saved_tensors
        options, head_options = ctx.options, ctx.head_options
        need_dh, need_dw, need_db, need_da, need_db_lora = ctx.needs_input_grad[:5]
        coef = grad_loss.float().expand(labels.shape[0]) * options.scale.float()
        coef = torch.where(labels != options.ignore_index, coef, 0.0).contiguous()
        lora = lora_A is not None
        needs = (need_dh, need_dw, need_db, lora and (need_dh or need_da), need_db_lora)
        dh, dw, db, grad_lora_h, db_lora = linear_mtt_backward_triton(
            hidden, base_hidden, weight, bias, lora_hidden, lora_B, labels, stats, coef, **head_options,
            lam=options.lam, temperature=options.temperature, reverse=options.reverse,
            ignore_index=options.ignore_index, threshold=options.grad_threshold, needs=needs)
        scaling = head_options["scaling"]
        da = None
        if grad_lora_h is not None:  # dh += s (g B) A,  dA = s (g B)^T h
            if need_dh:
                dh.addmm_(grad_lora_h, lora_A.float(), alpha=scaling)
            if need_da:
                da = (grad_lora_h.T @ hidden.float()).mul_(scaling)
        grads = (dh, dw, db, da, db_lora)
        inputs = (hidden, weight, bias, lora_A, lora_B)
        return (*(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)), None, None, None, None)


@torch.compiler.disable
def _apply_eagerly(function, *args):
    """function.apply(*args) outside any torch.compile graph: the chunk walk writes gradients into
    private buffers in place, which a traced graph does not reproduce; eagerly it is one fused op."""
    return function.apply(*args)


def _check_head(hidden, weight, bias, lora_A, lora_B, lora_scaling, softcap):
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
    if isinstance(lora_scaling, bool) or not isinstance(lora_scaling, (int, float)):
        raise TypeError(f"lora_scaling must be a float, got {type(lora_scaling).__name__}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


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
    lam: float = DEFAULT_LAM,
    temperature: float = 1.0,
    direction: str = "forward",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    return_components: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    grad_threshold: Optional[float] = None,
):
    """Mask-the-Target loss from final hidden states: mtt_loss(softcap(h W^T + bias + s (h A^T) B^T),
    softcap(h0 W^T + bias), labels), without materializing the [N, V] logits.

    hidden [..., H] (adapted model, gets the gradient), base_hidden [..., H] (frozen base pass, never
    gets a gradient), weight [V, H], bias [V], lora_A [r, H], lora_B [V, r] (LoRA on the output head,
    adapted side only), labels [...] aligned with the rows. weight, bias, lora_A, lora_B get gradients
    when they require them. softcap c: logits c * tanh(x / c) on both sides. chunk_size: rows per
    chunk (default: `default_chunk_size`, a [rows, V] slab about the size of the hidden states, at
    least 256 rows; PyTorch path). grad_threshold (Triton path): backward skips a tile of logits whose
    |dL_i/dz| is below it everywhere; 0 is exact, None picks 2**-12 for fp16/bf16 and 0 for fp32.
    Other arguments as in `mtt_loss`.
    """
    check_float_tensor("hidden", hidden, min_dim=2)
    check_float_tensor("base_hidden", base_hidden, shape=hidden.shape)
    _check_head(hidden, weight, bias, lora_A, lora_B, lora_scaling, softcap)
    check_same_device(hidden=hidden, base_hidden=base_hidden, weight=weight, labels=labels, bias=bias,
                      lora_A=lora_A, lora_B=lora_B)
    check_options(lam=lam, temperature=temperature, direction=direction, reduction=reduction,
                  num_items_in_batch=num_items_in_batch)
    vocab_size, hidden_size = weight.shape
    check_labels(labels, hidden.shape[:-1], vocab_size, ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if grad_threshold is not None and not grad_threshold >= 0:
        raise ValueError(f"grad_threshold must be None or >= 0, got {grad_threshold!r}")

    backend = resolve_backend(backend, hidden, weight)
    flat_hidden = hidden.reshape(-1, hidden_size)
    flat_base = base_hidden.detach().to(hidden.dtype).reshape(-1, hidden_size)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    n_rows = flat_hidden.shape[0]
    if lora_A is not None:  # autograd carries the gradient back through the casts
        lora_A, lora_B = lora_A.to(hidden.dtype), lora_B.to(hidden.dtype)
    if grad_threshold is None:
        grad_threshold = DEFAULT_GRAD_THRESHOLD if hidden.dtype in (torch.float16, torch.bfloat16) else 0.0
    options = _Options(
        lam=float(lam), temperature=float(temperature),
        reverse=direction == "reverse", ignore_index=int(ignore_index), reduction=reduction,
        need_kl=return_components,
        scale=gradient_scale(reduction, flat_labels, ignore_index, num_items_in_batch, hidden.device,
                             accumulator_dtype(hidden)),
        chunk_size=chunk_size or default_chunk_size(n_rows, hidden_size, vocab_size),
        grad_threshold=float(grad_threshold))
    head_options = dict(scaling=float(lora_scaling), softcap=None if softcap is None else float(softcap))
    tensors = (flat_hidden, weight, bias, lora_A, lora_B, flat_base)
    if backend == "triton":
        function = TiledFusedLinearMTTFunction
        tensors = tuple(None if t is None else t.contiguous() for t in tensors)
    else:
        function = FusedLinearMTTFunction
    loss, ce, kl = _apply_eagerly(function, *tensors, flat_labels, head_options, options)
    if reduction == "none":
        loss, ce, kl = (t.reshape(labels.shape) for t in (loss, ce, kl))
    return MTTOutput(loss, ce, kl) if return_components else loss


class FusedLinearMTTLoss(torch.nn.Module):
    """Module form of `fused_linear_mtt_loss`:
    forward(hidden, base_hidden, weight, labels, bias=None, lora_A=None, lora_B=None, num_items_in_batch=None)."""

    def __init__(self, lam: float = DEFAULT_LAM, temperature: float = 1.0, direction: str = "forward",
                 ignore_index: int = -100, reduction: str = "mean", lora_scaling: float = 1.0,
                 softcap: Optional[float] = None, return_components: bool = False, backend: str = "auto",
                 chunk_size: Optional[int] = None):
        super().__init__()
        check_options(lam=lam, temperature=temperature, direction=direction, reduction=reduction,
                      num_items_in_batch=None)
        self.lam, self.temperature, self.direction = lam, temperature, direction
        self.ignore_index, self.reduction = ignore_index, reduction
        self.lora_scaling, self.softcap = lora_scaling, softcap
        self.return_components, self.backend, self.chunk_size = return_components, backend, chunk_size

    def forward(self, hidden, base_hidden, weight, labels, bias=None, lora_A=None, lora_B=None,
                num_items_in_batch=None):
        return fused_linear_mtt_loss(
            hidden, base_hidden, weight, labels, bias=bias, lora_A=lora_A, lora_B=lora_B,
            lora_scaling=self.lora_scaling, softcap=self.softcap, lam=self.lam, temperature=self.temperature,
            direction=self.direction, ignore_index=self.ignore_index, reduction=self.reduction,
            num_items_in_batch=num_items_in_batch, return_components=self.return_components,
            backend=self.backend, chunk_size=self.chunk_size)

    def extra_repr(self):
        return (f"lam={self.lam}, temperature={self.temperature}, direction={self.direction!r}, "
                f"reduction={self.reduction!r}, softcap={self.softcap}")
