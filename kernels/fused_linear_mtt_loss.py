"""Tiled fused-linear MTT kernels (Cut Cross-Entropy style): logits exist only as on-chip tiles.

Forward: one program per (block of rows, vocabulary split) walks its split in tiles. Each tile of the
output head W is loaded once per hidden-size step and multiplied with both the adapted and the base
hidden rows; the tiles of logits z (with bias, LoRA term and softcap) and b are merged into fp32 online
statistics (kernels/mtt_math.py). Each split stores its partial statistics ([splits, N_PARTIALS, N]);
fastmtt/pytorch/partials.py merges and finalizes them, so a small batch still fills the GPU with splits, and a
vocabulary shard (columns [vocab_start, vocab_start + V) of a wider head) is just another range.

Backward: one program per (row block, vocabulary tile) recomputes the two logit tiles, forms dL/dz_pre
from the finalized statistics and accumulates with fp32 atomics dh += g W, dW += g^T h, dbias += sum g,
and for a LoRA head (g B) and dB += s g^T (h A^T); dh += s (g B) A and dA = s (g B)^T h follow outside
(O(N r)). With lam = 0 (plain CE) a tile whose |dL/dz| is below a threshold everywhere may be skipped;
with lam > 0 nothing is skipped: the divergence's gradient is many small entries that add up.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from fastmtt.kernels.mtt_math import (
    DIVERGENCE_IDS,
    LOG2E,
    N_PARTIALS,
    accumulate_tile,
    gradient_constants,
    load_statistics,
    row_ce_weight,
    store_partials,
    tile_gradient,
)
from fastmtt.kernels.registry import FEATURE_COVER, Launch, compile_specs, meta_tensor, planning_for_gpu, sm_count

from fastmtt import partials as P
from fastmtt._dispatch import interpreting
from fastmtt.head import LinearGrads


@triton.jit
def _tanh(x):
    """tanh through exp, saturating cleanly at +-1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logit_tiles(
    hidden_ptr, base_ptr, weight_ptr, bias_ptr, lora_h_ptr, lora_b_ptr,
    stride_h, stride_b, stride_w, stride_lh, stride_lb,
    rows, row_mask, cols, col_mask, n_hidden, rank, scaling, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, R_PAD: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """fp32 tiles z = softcap(h W^T + bias + s (h A^T) B^T) and b = softcap(h0 W^T + bias); every W
    tile serves both products. Out-of-vocabulary columns hold finite junk; callers mask them."""
    acc_z = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for start in range(0, n_hidden, BLOCK_H):
        ks = start + tl.arange(0, BLOCK_H)
        k_mask = ks < n_hidden
        w = tl.load(weight_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        h = tl.load(hidden_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
            h = h.to(tl.float32)
        acc_z = tl.dot(h, tl.trans(w), acc_z, input_precision=PRECISION)
        if HAS_BASE:
            h0 = tl.load(base_ptr + rows[:, None] * stride_b + ks[None, :],
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                h0 = h0.to(tl.float32)
            acc_b = tl.dot(h0, tl.trans(w), acc_b, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_z += bias[None, :]
        acc_b += bias[None, :]
    if LORA:
        rs = tl.arange(0, R_PAD)
        r_mask = rs < rank
        lora_h = tl.load(lora_h_ptr + rows[:, None] * stride_lh + rs[None, :],
                         mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        lora_b = tl.load(lora_b_ptr + cols[:, None] * stride_lb + rs[None, :],
                         mask=col_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        acc_z += scaling * tl.dot(lora_h, tl.trans(lora_b), input_precision="ieee")
    if SOFTCAP:
        acc_z = softcap * _tanh(acc_z / softcap)
        acc_b = softcap * _tanh(acc_b / softcap)
    return acc_z, acc_b


@triton.jit
def _linear_mtt_fwd_kernel(
    hidden_ptr, base_ptr, weight_ptr, bias_ptr, lora_h_ptr, lora_b_ptr, labels_ptr,
    partials_ptr,
    stride_h, stride_b, stride_w, stride_lh, stride_lb,
    n_rows, n_cols, n_hidden, rank, ignore_index, vocab_start, cols_per_split,
    scaling, softcap, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, R_PAD: tl.constexpr,
    HAS_KL: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr, MASK_TARGET: tl.constexpr,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """partials_ptr: [splits, N_PARTIALS, n_rows]; split s covers columns [s, s + 1) * cols_per_split."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_mask = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (labels != ignore_index)
    local = labels - vocab_start
    split_start = split.to(tl.int64) * cols_per_split
    split_stop = tl.minimum(split_start + cols_per_split, n_cols)
    found = valid & (local >= split_start) & (local < split_stop)

    scale2 = inv_t * LOG2E
    m_z = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # kept z
    s_z = tl.zeros((BLOCK_N,), tl.float32)
    m_r = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # all z (CE at T != 1)
    s_r = tl.zeros((BLOCK_N,), tl.float32)
    m_b = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # kept b
    s_b = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    b_label = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(split_start, split_stop, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < split_stop
        z, b = _logit_tiles(hidden_ptr, base_ptr, weight_ptr, bias_ptr, lora_h_ptr, lora_b_ptr,
                            stride_h, stride_b, stride_w, stride_lh, stride_lb,
                            rows, row_mask, cols, col_mask, n_hidden, rank, scaling, softcap,
                            BLOCK_N, BLOCK_V, BLOCK_H, R_PAD, HAS_KL, HAS_BIAS, LORA, SOFTCAP, UPCAST, PRECISION)
        m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label, b_label = accumulate_tile(
            z, b, col_mask, cols[None, :] == local[:, None], scale2, m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label,
            b_label, HAS_KL, DIVERGENCE, UNIT_TEMPERATURE, MASK_TARGET)
    store_partials(partials_ptr + split.to(tl.int64) * N_PARTIALS * n_rows, n_rows, rows, row_mask, m_z, s_z, m_r,
                   s_r, m_b, s_b, w, d, z_label, b_label, found)


@triton.jit
def _linear_mtt_bwd_kernel(
    hidden_ptr, base_ptr, weight_ptr, bias_ptr, lora_h_ptr, lora_b_ptr, labels_ptr, ce_rows_ptr,
    stats_ptr, coef_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, grad_lora_h_ptr, grad_lora_b_ptr,
    stride_h, stride_b, stride_w, stride_lh, stride_lb,
    n_rows, n_cols, n_hidden, rank, ignore_index, vocab_start,
    scaling, softcap, inv_t, kl_weight, ce_weight, threshold,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, R_PAD: tl.constexpr,
    KL_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr, MASK_TARGET: tl.constexpr,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SOFTCAP: tl.constexpr,
    HIDDEN_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    LORA_H_GRAD: tl.constexpr, LORA_B_GRAD: tl.constexpr, FILTER: tl.constexpr, CE_ROWS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    live = row_mask & (labels != ignore_index)
    z, b = _logit_tiles(hidden_ptr, base_ptr, weight_ptr, bias_ptr, lora_h_ptr, lora_b_ptr,
                        stride_h, stride_b, stride_w, stride_lh, stride_lb,
                        rows, row_mask, cols, col_mask, n_hidden, rank, scaling, softcap,
                        BLOCK_N, BLOCK_V, BLOCK_H, R_PAD, KL_GRAD, HAS_BIAS, LORA, SOFTCAP, UPCAST, PRECISION)
    ref, lse, z_ref, z_lse, b_ref, b_lse, value = load_statistics(stats_ptr, n_rows, rows, live)
    unit = tl.full((BLOCK_N,), 1.0, tl.float32)  # coef scales the gradient below, after the filter
    ce_w = row_ce_weight(ce_rows_ptr, rows, row_mask, ce_weight, BLOCK_N, CE_ROWS)
    lse2, zc2, bc2, soft, kl_coef, shift = gradient_constants(ref, lse, z_ref, z_lse, b_lse, value, unit, inv_t,
                                                              kl_weight, ce_w, DIVERGENCE, UNIT_TEMPERATURE)
    grad = tile_gradient(z, b, col_mask, cols[None, :] == (labels - vocab_start)[:, None], ce_w,
                         inv_t * LOG2E, inv_t, ref, z_ref, b_ref, lse2, zc2, bc2, soft, kl_coef, shift, KL_GRAD,
                         DIVERGENCE, UNIT_TEMPERATURE, MASK_TARGET)
    if SOFTCAP:  # dz_pre = dz * (1 - tanh^2), tanh = z / c
        t = z / softcap
        grad = grad * (1.0 - t * t)
    grad = tl.where(live[:, None] & col_mask[None, :], grad, 0.0)

    skip = False
    if FILTER:
        skip = tl.max(tl.max(tl.abs(grad), 1), 0) < threshold
    if not skip:
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        grad = grad * coef[:, None]
        if UPCAST:
            grad_mm = grad
        else:
            grad_mm = grad.to(weight_ptr.dtype.element_ty)
        if HIDDEN_GRAD or WEIGHT_GRAD:
            for start in range(0, n_hidden, BLOCK_H):
                ks = start + tl.arange(0, BLOCK_H)
                k_mask = ks < n_hidden
                if HIDDEN_GRAD:
                    w = tl.load(weight_ptr + cols[:, None] * stride_w + ks[None, :],
                                mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                    if UPCAST:
                        w = w.to(tl.float32)
                    part = tl.dot(grad_mm, w, input_precision=PRECISION)
                    tl.atomic_add(grad_hidden_ptr + rows[:, None] * n_hidden + ks[None, :], part,
                                  mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
                if WEIGHT_GRAD:
                    h = tl.load(hidden_ptr + rows[:, None] * stride_h + ks[None, :],
                                mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    if UPCAST:
                        h = h.to(tl.float32)
                    part = tl.dot(tl.trans(grad_mm), h, input_precision=PRECISION)
                    tl.atomic_add(grad_weight_ptr + cols[:, None] * n_hidden + ks[None, :], part,
                                  mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")
        if BIAS_GRAD:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, 0), mask=col_mask, sem="relaxed")
        if LORA_H_GRAD or LORA_B_GRAD:
            rs = tl.arange(0, R_PAD)
            r_mask = rs < rank
            if LORA_H_GRAD:  # g B, [BLOCK_N, r]
                lora_b = tl.load(lora_b_ptr + cols[:, None] * stride_lb + rs[None, :],
                                 mask=col_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
                part = tl.dot(grad, lora_b, input_precision="ieee")
                tl.atomic_add(grad_lora_h_ptr + rows[:, None] * rank + rs[None, :], part,
                              mask=row_mask[:, None] & r_mask[None, :], sem="relaxed")
            if LORA_B_GRAD:  # s g^T (h A^T), [BLOCK_V, r]
                lora_h = tl.load(lora_h_ptr + rows[:, None] * stride_lh + rs[None, :],
                                 mask=row_mask[:, None] & r_mask[None, :], other=0.0)
                part = scaling * tl.dot(tl.trans(grad), lora_h, input_precision="ieee")
                tl.atomic_add(grad_lora_b_ptr + cols[:, None] * rank + rs[None, :], part,
                              mask=col_mask[:, None] & r_mask[None, :], sem="relaxed")


# GPU tiles (BLOCK_N, BLOCK_V, BLOCK_H), 8 warps, from `fastmtt compile-check` on sm_90 as launched
# (bf16, N=8192, H=4096, V=128256; registers / stack bytes, forward and backward with the KL term):
#   64x64x32:   plain head 131/0 and 105/0; bias+LoRA+softcap 230/0 and 179/0
#   64x128x64:  plain head 232/0 and 173/0; bias+LoRA+softcap 255/592 and 255/64 (spills)
#   128x128x64: plain head 255/56 (spills) and 255/0
# so 16-bit plain (or biased) heads take 64x128x64 and everything else the spill-free 64x64x32.
WIDE_TILES, SMALL_TILES = (64, 128, 64), (64, 64, 32)


def _config(n_rows, n_cols, n_hidden, rank, *, dtype=None, lora=False, softcap=False):
    """(BLOCK_N, BLOCK_V, BLOCK_H, R_PAD, num_warps). The interpreter's cost grows with tile
    iterations, so it takes large tiles."""
    r_pad = max(16, triton.next_power_of_2(max(rank, 1)))
    if interpreting():
        return (min(64, max(16, triton.next_power_of_2(n_rows))), min(1024, max(16, triton.next_power_of_2(n_cols))),
                min(256, max(16, triton.next_power_of_2(n_hidden))), r_pad, 1)
    wide = dtype in (torch.float16, torch.bfloat16) and not lora and not softcap
    return (*(WIDE_TILES if wide else SMALL_TILES), r_pad, 8)


def _dtype_flags(dtype):
    return dict(UPCAST=interpreting(), PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _dummy(device):
    return torch.empty(1, dtype=torch.float32, device=device)


def _head_args(hidden, base_hidden, head, lora_hidden, labels, vocab_start, options):
    """Arguments both kernels take: inputs, strides, sizes, head scalars."""
    lora = lora_hidden is not None
    dummy = _dummy(hidden.device)
    lora_h = lora_hidden if lora else dummy
    lora_b = head.lora_B if lora else dummy
    return dict(hidden_ptr=hidden, base_ptr=base_hidden, weight_ptr=head.weight,
                bias_ptr=dummy if head.bias is None else head.bias, lora_h_ptr=lora_h, lora_b_ptr=lora_b,
                labels_ptr=labels, stride_h=hidden.stride(0), stride_b=base_hidden.stride(0),
                stride_w=head.weight.stride(0), stride_lh=lora_h.stride(0), stride_lb=lora_b.stride(0),
                n_rows=hidden.shape[0], n_cols=head.weight.shape[0], n_hidden=hidden.shape[1],
                rank=lora_hidden.shape[1] if lora else 2, ignore_index=options.ignore_index, vocab_start=vocab_start,
                scaling=float(head.scaling), softcap=float(head.softcap or 1.0), inv_t=1.0 / options.temperature)


def _head_flags(hidden, head, lora_hidden, options):
    block_n, block_v, block_h, r_pad, num_warps = _config(
        hidden.shape[0], head.weight.shape[0], hidden.shape[1], 1 if lora_hidden is None else lora_hidden.shape[1],
        dtype=hidden.dtype, lora=lora_hidden is not None, softcap=head.softcap is not None)
    flags = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, R_PAD=r_pad,
                 DIVERGENCE=DIVERGENCE_IDS[options.direction], MASK_TARGET=options.mask_target,
                 HAS_BIAS=head.bias is not None, LORA=lora_hidden is not None, SOFTCAP=head.softcap is not None,
                 **_dtype_flags(hidden.dtype))
    return flags, num_warps


def _forward_launch(hidden, base_hidden, head, lora_hidden, labels, partials, options, *, need_kl, vocab_start,
                    cols_per_split):
    flags, num_warps = _head_flags(hidden, head, lora_hidden, options)
    args = _head_args(hidden, base_hidden, head, lora_hidden, labels, vocab_start, options)
    args.update(partials_ptr=partials, cols_per_split=cols_per_split)
    flags.update(HAS_KL=need_kl or options.lam > 0, UNIT_TEMPERATURE=options.temperature == 1.0)
    grid = (triton.cdiv(hidden.shape[0], flags["BLOCK_N"]), partials.shape[0])
    return Launch(_linear_mtt_fwd_kernel, grid, args, flags, num_warps)


def _split_columns(n_rows, n_cols, block_n, block_v, device, splits):
    """(splits, columns per split): enough splits for about two programs per SM, whole tiles each."""
    if splits is None:
        row_blocks = triton.cdiv(n_rows, block_n)
        splits = 1 if interpreting() else triton.cdiv(2 * sm_count(device), row_blocks)
    tiles = triton.cdiv(n_cols, block_v)
    splits = max(1, min(splits, tiles))
    cols_per_split = triton.cdiv(tiles, splits) * block_v
    return triton.cdiv(n_cols, cols_per_split), cols_per_split


def linear_mtt_forward(hidden, base_hidden, head, lora_hidden, labels, options, *, need_kl, vocab_start=0,
                       splits=None):
    """Partial statistics [splits, N_PARTIALS, N] (fastmtt/partials.py) of the head's columns, labels global
    ids (vocab_start: the head's first column in the vocabulary). hidden, base_hidden [N, H] and
    head.weight [V, H] with unit inner stride; lora_hidden = h A^T [N, r] fp32 or None."""
    n_rows = hidden.shape[0]
    flags, _ = _head_flags(hidden, head, lora_hidden, options)
    splits, cols_per_split = _split_columns(n_rows, head.weight.shape[0], flags["BLOCK_N"], flags["BLOCK_V"],
                                            hidden.device, splits)
    partials = torch.empty(splits, P.N_PARTIALS, n_rows, dtype=torch.float32, device=hidden.device)
    if n_rows:
        _forward_launch(hidden, base_hidden, head, lora_hidden, labels, partials, options, need_kl=need_kl,
                        vocab_start=vocab_start, cols_per_split=cols_per_split).run()
    return partials


def _backward_launch(hidden, base_hidden, head, lora_hidden, labels, stats, coef, grads, options, *, threshold,
                     vocab_start, ce_rows):
    flags, num_warps = _head_flags(hidden, head, lora_hidden, options)
    args = _head_args(hidden, base_hidden, head, lora_hidden, labels, vocab_start, options)
    dummy = _dummy(hidden.device)
    names = ("grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr", "grad_lora_h_ptr", "grad_lora_b_ptr")
    args.update({name: dummy if g is None else g for name, g in zip(names, grads)})
    args.update(stats_ptr=stats, coef_ptr=coef, kl_weight=options.kl_weight, ce_weight=options.ce_weight,
                threshold=float(threshold), ce_rows_ptr=labels if ce_rows is None else ce_rows.to(torch.int8))
    flags.update(KL_GRAD=options.lam > 0, UNIT_TEMPERATURE=options.temperature == 1.0,
                 HIDDEN_GRAD=grads[0] is not None, WEIGHT_GRAD=grads[1] is not None, BIAS_GRAD=grads[2] is not None,
                 LORA_H_GRAD=grads[3] is not None, LORA_B_GRAD=grads[4] is not None,
                 FILTER=threshold > 0 and options.lam == 0, CE_ROWS=ce_rows is not None)
    grid = (triton.cdiv(hidden.shape[0], flags["BLOCK_N"]), triton.cdiv(head.weight.shape[0], flags["BLOCK_V"]))
    return Launch(_linear_mtt_bwd_kernel, grid, args, flags, num_warps)


def _alert_not_deterministic(what):
    """Refuse (or warn, with warn_only) under torch.use_deterministic_algorithms, as torch's own ops do:
    the tiled backward sums with fp32 atomics, whose order varies between runs."""
    if torch.are_deterministic_algorithms_enabled():
        message = (f"{what} sums with atomic adds and is not deterministic; use the chunked path "
                   "(tiled=False), which is, or torch.use_deterministic_algorithms(False)")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=3)
        else:
            raise RuntimeError(message)


def linear_mtt_backward(hidden, base_hidden, head, lora_hidden, labels, stats, coef, options, *, threshold, needs,
                        vocab_start=0, ce_rows=None):
    """fp32 gradients of sum_i coef_i * loss_i (CE only on the rows ce_rows [N] marks, where given) as a
    LinearGrads (hidden [N, H], weight [V, H], bias [V], lora_A [r, H], lora_B [V, r]), None where `needs` (a
    LinearGrads of bools) is False; stats: finalized statistics [N_STATS, N]. The kernel forms g B [N, r] for
    a LoRA head; dh += s (g B) A and dA = s (g B)^T h follow here (O(N r H)). With lam = 0, tiles whose
    |dL/dz| is everywhere below `threshold` are skipped (0: exact)."""
    n_rows, n_hidden = hidden.shape
    n_cols = head.weight.shape[0]
    rank = 1 if lora_hidden is None else lora_hidden.shape[1]
    need_grad_lora_h = lora_hidden is not None and (needs.hidden or needs.lora_A)
    kernel_needs = (needs.hidden, needs.weight, needs.bias, need_grad_lora_h, needs.lora_B)
    shapes = ((n_rows, n_hidden), (n_cols, n_hidden), (n_cols,), (n_rows, rank), (n_cols, rank))
    grads = [torch.zeros(shape, dtype=torch.float32, device=hidden.device) if need else None
             for shape, need in zip(shapes, kernel_needs)]
    if n_rows and any(kernel_needs):
        _alert_not_deterministic("fused_linear_mtt_loss(tiled=True) backward")
        _backward_launch(hidden, base_hidden, head, lora_hidden, labels, stats, coef, grads, options,
                         threshold=threshold, vocab_start=vocab_start, ce_rows=ce_rows).run()
    d_hidden, d_weight, d_bias, grad_lora_h, d_lora_B = grads
    d_lora_A = None
    if grad_lora_h is not None:
        if needs.hidden:
            d_hidden.addmm_(grad_lora_h, head.lora_A.float(), alpha=head.scaling)
        if needs.lora_A:
            d_lora_A = (grad_lora_h.T @ hidden.float()).mul_(head.scaling)
    return LinearGrads(d_hidden, d_weight, d_bias, d_lora_A, d_lora_B)


@compile_specs
def _specs():
    """The launches of linear_mtt_forward and linear_mtt_backward at N=8192, H=4096, V=128256 as the tiled
    op makes them: on fp32, fp16 and bf16, the plain head (frozen or trained), a biased softcapped head
    (frozen or trained) and a LoRA head (r=16), by default and as plain CE (with the op's default
    gradient filter); on bf16 also each FEATURE_COVER setting, and CE on some rows only."""
    from fastmtt.head import LinearHead
    from fastmtt.options import DEFAULT_GRAD_THRESHOLD, MTTOptions

    n_rows, n_hidden, n_cols, rank = 8192, 4096, 128256, 16
    labels = meta_tensor(n_rows, dtype=torch.int64)
    stats, coef = meta_tensor(P.N_STATS, n_rows, dtype=torch.float32), meta_tensor(n_rows, dtype=torch.float32)

    def loss(dtype, options, head="plain", trained=False, ce_rows=None):
        weight = meta_tensor(n_cols, n_hidden, dtype=dtype)
        bias = meta_tensor(n_cols, dtype=dtype) if head == "biased" else None
        lora = head == "lora"
        lora_A, lora_B = (meta_tensor(rank, n_hidden, dtype=dtype), meta_tensor(n_cols, rank, dtype=dtype)) if lora \
            else (None, None)
        linear_head = LinearHead(weight, bias, lora_A, lora_B, 2.0, 30.0 if head == "biased" else None)
        hidden, base = meta_tensor(n_rows, n_hidden, dtype=dtype), meta_tensor(n_rows, n_hidden, dtype=dtype)
        lora_hidden = meta_tensor(n_rows, rank, dtype=torch.float32) if lora else None
        linear_mtt_forward(hidden, base, linear_head, lora_hidden, labels, options, need_kl=False)
        needs = LinearGrads(True, trained, trained and bias is not None, lora, lora)
        threshold = DEFAULT_GRAD_THRESHOLD if dtype != torch.float32 and options.lam == 0 else 0.0
        linear_mtt_backward(hidden, base, linear_head, lora_hidden, labels, stats, coef, options,
                            threshold=threshold, needs=needs, ce_rows=ce_rows)

    with planning_for_gpu() as specs:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for head, trained in (("plain", False), ("plain", True), ("biased", False), ("biased", True),
                                  ("lora", False)):
                loss(dtype, MTTOptions(), head, trained)
            loss(dtype, MTTOptions(lam=0.0))
        for settings in FEATURE_COVER:
            loss(torch.bfloat16, MTTOptions(**settings))
        for head in ("plain", "lora"):  # CE on some rows only
            loss(torch.bfloat16, MTTOptions(), head, ce_rows=meta_tensor(n_rows, dtype=torch.bool))
    yield from specs
