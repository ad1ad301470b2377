"""Tiled fused-linear MTT kernels (Cut Cross-Entropy style): logits exist only as on-chip tiles.

Forward: one program per block of rows walks the vocabulary in tiles. Each tile of the output head W
is loaded once per hidden-size step and multiplied with both the adapted and the base hidden rows;
the tile of logits z (with bias, LoRA term and softcap) and b is merged into fp32 online statistics
(docs: mtt-math, "One streaming pass"). Only O(N) floats leave the kernel: CE, KL and the three
log-normalizers LSE(z), Z' and B' per row.

Backward: one program per (row block, vocabulary tile) recomputes the two logit tiles, forms
dL/dz_pre from the saved statistics, skips the tile when every entry is below a threshold (0: exact)
and accumulates with fp32 atomics dh += g W, dW += g^T h, dbias += sum g, and for a LoRA head
(g B) and dB += s g^T (h A^T); dh += s (g B) A and dA = s (g B)^T h follow outside (O(N r)).
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from fastmtt.kernels.mtt_loss import kl_gradient, kl_summands, log_normalizer, lse_with_label, masked_kl

from fastmtt._dispatch import interpreting

# Rows of the saved [4, N] statistics: LSE(z), Z', B', KL (constexpr so kernels can read them).
STAT_LSE, STAT_Z, STAT_B, STAT_KL = (tl.constexpr(i) for i in range(4))


@triton.jit
def _tanh(x):
    """tanh through exp, saturating cleanly at +-1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _online_rows(m, s, x):
    """Merge tile x [BLOCK_N, BLOCK_V] into per-row running (max m, sum of exp(. - m) s)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(x - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    return m_new, s * alpha + tl.sum(e, 1), e, alpha


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
    ce_ptr, stats_ptr,
    stride_h, stride_b, stride_w, stride_lh, stride_lb,
    n_rows, n_cols, n_hidden, rank, ignore_index,
    scaling, softcap, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, R_PAD: tl.constexpr,
    HAS_KL: tl.constexpr, REVERSE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = labels != ignore_index
    label_ok = (labels >= 0) & (labels < n_cols)

    m_z = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # masked adapted z/T
    s_z = tl.zeros((BLOCK_N,), tl.float32)
    m_r = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # raw z over all columns (CE at T != 1)
    s_r = tl.zeros((BLOCK_N,), tl.float32)
    m_b = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # masked base b/T
    s_b = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)  # sum over the weighting side of exp(. - m) * log-ratio
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    b_label = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < n_cols
        z, b = _logit_tiles(hidden_ptr, base_ptr, weight_ptr, bias_ptr, lora_h_ptr, lora_b_ptr,
                            stride_h, stride_b, stride_w, stride_lh, stride_lb,
                            rows, row_mask, cols, col_mask, n_hidden, rank, scaling, softcap,
                            BLOCK_N, BLOCK_V, BLOCK_H, R_PAD, HAS_KL, HAS_BIAS, LORA, SOFTCAP, UPCAST, PRECISION)
        is_label = cols[None, :] == labels[:, None]
        keep = col_mask[None, :] & ~is_label
        z_label += tl.sum(tl.where(is_label, z, 0.0), 1)
        if not UNIT_TEMPERATURE:
            m_r, s_r, _e, _a = _online_rows(m_r, s_r, tl.where(col_mask[None, :], z, float("-inf")))
        zt = tl.where(keep, z * inv_t, float("-inf"))
        m_z, s_z, e_z, alpha_z = _online_rows(m_z, s_z, zt)
        if HAS_KL:
            b_label += tl.sum(tl.where(is_label, b, 0.0), 1)
            bt = tl.where(keep, b * inv_t, float("-inf"))
            m_b, s_b, e_b, alpha_b = _online_rows(m_b, s_b, bt)
            w = w * (alpha_z if REVERSE else alpha_b) + tl.sum(kl_summands(e_z, e_b, zt, bt, REVERSE), 1)

    z_lse = log_normalizer(m_z, s_z)  # Z'
    if UNIT_TEMPERATURE:
        lse = lse_with_label(z_lse, z_label)
    else:
        lse = log_normalizer(m_r, s_r)
    lse = tl.where(label_ok, lse, float("nan"))
    z_label = tl.where(label_ok, z_label, float("nan"))
    kl = tl.zeros((BLOCK_N,), tl.float32)
    b_lse = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # B'
    if HAS_KL:
        b_lse = log_normalizer(m_b, s_b)
        kl = masked_kl(w, s_z, s_b, z_lse, b_lse, b_label, REVERSE)
    tl.store(ce_ptr + rows, tl.where(valid, lse - z_label, 0.0), mask=row_mask)
    tl.store(stats_ptr + STAT_LSE * n_rows + rows, lse, mask=row_mask)
    tl.store(stats_ptr + STAT_Z * n_rows + rows, z_lse, mask=row_mask)
    tl.store(stats_ptr + STAT_B * n_rows + rows, b_lse, mask=row_mask)
    tl.store(stats_ptr + STAT_KL * n_rows + rows, tl.where(valid, kl, 0.0), mask=row_mask)


@triton.jit
def _linear_mtt_bwd_kernel(
    hidden_ptr, base_ptr, weight_ptr, bias_ptr, lora_h_ptr, lora_b_ptr, labels_ptr,
    stats_ptr, coef_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, grad_lora_h_ptr, grad_lora_b_ptr,
    stride_h, stride_b, stride_w, stride_lh, stride_lb,
    n_rows, n_cols, n_hidden, rank, ignore_index,
    scaling, softcap, inv_t, lam_t2, threshold,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, R_PAD: tl.constexpr,
    KL_GRAD: tl.constexpr, REVERSE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SOFTCAP: tl.constexpr,
    HIDDEN_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    LORA_H_GRAD: tl.constexpr, LORA_B_GRAD: tl.constexpr, FILTER: tl.constexpr,
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
    lse = tl.load(stats_ptr + STAT_LSE * n_rows + rows, mask=live, other=0.0)
    is_label = cols[None, :] == labels[:, None]
    keep = col_mask[None, :] & ~is_label
    grad = tl.exp(z - lse[:, None]) - tl.where(is_label, 1.0, 0.0)
    if KL_GRAD:
        z_lse = tl.load(stats_ptr + STAT_Z * n_rows + rows, mask=live, other=0.0)
        b_lse = tl.load(stats_ptr + STAT_B * n_rows + rows, mask=live, other=0.0)
        z_empty = z_lse == float("-inf")
        b_empty = b_lse == float("-inf")
        zt = tl.where(keep, z * inv_t, float("-inf"))
        bt = tl.where(keep, b * inv_t, float("-inf"))
        kl = tl.load(stats_ptr + STAT_KL * n_rows + rows, mask=live, other=0.0)
        constant = b_empty | z_empty | (kl == float("inf"))
        grad += lam_t2 * inv_t * kl_gradient(zt - tl.where(z_empty, 0.0, z_lse)[:, None],
                                             bt - tl.where(b_empty, 0.0, b_lse)[:, None],
                                             kl[:, None], constant[:, None], REVERSE)
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
                                  mask=row_mask[:, None] & k_mask[None, :])
                if WEIGHT_GRAD:
                    h = tl.load(hidden_ptr + rows[:, None] * stride_h + ks[None, :],
                                mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    if UPCAST:
                        h = h.to(tl.float32)
                    part = tl.dot(tl.trans(grad_mm), h, input_precision=PRECISION)
                    tl.atomic_add(grad_weight_ptr + cols[:, None] * n_hidden + ks[None, :], part,
                                  mask=col_mask[:, None] & k_mask[None, :])
        if BIAS_GRAD:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, 0), mask=col_mask)
        if LORA_H_GRAD or LORA_B_GRAD:
            rs = tl.arange(0, R_PAD)
            r_mask = rs < rank
            if LORA_H_GRAD:  # g B, [BLOCK_N, r]
                lora_b = tl.load(lora_b_ptr + cols[:, None] * stride_lb + rs[None, :],
                                 mask=col_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
                part = tl.dot(grad, lora_b, input_precision="ieee")
                tl.atomic_add(grad_lora_h_ptr + rows[:, None] * rank + rs[None, :], part,
                              mask=row_mask[:, None] & r_mask[None, :])
            if LORA_B_GRAD:  # s g^T (h A^T), [BLOCK_V, r]
                lora_h = tl.load(lora_h_ptr + rows[:, None] * stride_lh + rs[None, :],
                                 mask=row_mask[:, None] & r_mask[None, :], other=0.0)
                part = scaling * tl.dot(tl.trans(grad), lora_h, input_precision="ieee")
                tl.atomic_add(grad_lora_b_ptr + cols[:, None] * rank + rs[None, :], part,
                              mask=col_mask[:, None] & r_mask[None, :])


# GPU tiles (BLOCK_N, BLOCK_V, BLOCK_H), 8 warps: the smallest stack frames (spills) in compile-check
# among the shapes tried (64x128x64 and 32x128x64 spill hundreds of bytes to kilobytes).
GPU_TILES = (64, 64, 32)


def _config(n_rows, n_cols, n_hidden, rank):
    """(BLOCK_N, BLOCK_V, BLOCK_H, R_PAD, num_warps). The interpreter's cost grows with tile
    iterations, so it takes large tiles."""
    r_pad = max(16, triton.next_power_of_2(max(rank, 1)))
    if interpreting():
        return (min(64, max(16, triton.next_power_of_2(n_rows))), min(1024, max(16, triton.next_power_of_2(n_cols))),
                min(256, max(16, triton.next_power_of_2(n_hidden))), r_pad, 1)
    return (*GPU_TILES, r_pad, 8)


def _dtype_flags(dtype):
    return dict(UPCAST=interpreting(), PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _dummy(device):
    return torch.empty(1, dtype=torch.float32, device=device)


def linear_mtt_forward_triton(hidden, base_hidden, weight, bias, lora_hidden, lora_B, labels, *, scaling, softcap,
                              lam, temperature, reverse, ignore_index, need_kl):
    """Per-row CE [N] and statistics [4, N] (LSE(z), Z', B', KL; fp32). hidden, base_hidden [N, H]
    and weight [V, H] with unit inner stride; lora_hidden = h A^T [N, r] fp32; lora_B [V, r]."""
    n_rows, n_hidden = hidden.shape
    n_cols = weight.shape[0]
    device = hidden.device
    ce = torch.empty(n_rows, dtype=torch.float32, device=device)
    stats = torch.empty(4, n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return ce, stats
    lora = lora_hidden is not None
    rank = lora_hidden.shape[1] if lora else 1
    block_n, block_v, block_h, r_pad, num_warps = _config(n_rows, n_cols, n_hidden, rank)
    dummy = _dummy(device)
    lora_b = lora_B if lora else dummy
    lora_h = lora_hidden if lora else dummy
    _linear_mtt_fwd_kernel[(triton.cdiv(n_rows, block_n),)](
        hidden, base_hidden, weight, dummy if bias is None else bias, lora_h, lora_b, labels,
        ce, stats,
        hidden.stride(0), base_hidden.stride(0), weight.stride(0), lora_h.stride(0), lora_b.stride(0),
        n_rows, n_cols, n_hidden, rank, ignore_index,
        float(scaling), float(softcap or 1.0), float(1.0 / temperature),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, R_PAD=r_pad,
        HAS_KL=need_kl or lam > 0, REVERSE=reverse, UNIT_TEMPERATURE=temperature == 1.0,
        HAS_BIAS=bias is not None, LORA=lora, SOFTCAP=softcap is not None,
        **_dtype_flags(hidden.dtype), num_warps=num_warps,
    )
    return ce, stats


def linear_mtt_backward_triton(hidden, base_hidden, weight, bias, lora_hidden, lora_B, labels, stats, coef, *,
                               scaling, softcap, lam, temperature, reverse, ignore_index, threshold, needs):
    """fp32 gradients of sum_i coef_i * loss_i: (dh [N, H], dW [V, H], dbias [V], g B [N, r], dB [V, r]),
    None where `needs` (same order) is False. Tiles whose |dL/dz| is everywhere below `threshold`
    are skipped (0: exact)."""
    n_rows, n_hidden = hidden.shape
    n_cols = weight.shape[0]
    device = hidden.device
    lora = lora_hidden is not None
    rank = lora_hidden.shape[1] if lora else 1
    shapes = ((n_rows, n_hidden), (n_cols, n_hidden), (n_cols,), (n_rows, rank), (n_cols, rank))
    grads = [torch.zeros(shape, dtype=torch.float32, device=device) if need else None
             for shape, need in zip(shapes, needs)]
    if n_rows == 0 or not any(needs):
        return tuple(grads)
    block_n, block_v, block_h, r_pad, num_warps = _config(n_rows, n_cols, n_hidden, rank)
    dummy = _dummy(device)
    lora_b = lora_B if lora else dummy
    lora_h = lora_hidden if lora else dummy
    _linear_mtt_bwd_kernel[(triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_v))](
        hidden, base_hidden, weight, dummy if bias is None else bias, lora_h, lora_b, labels,
        stats, coef,
        *(dummy if g is None else g for g in grads),
        hidden.stride(0), base_hidden.stride(0), weight.stride(0), lora_h.stride(0), lora_b.stride(0),
        n_rows, n_cols, n_hidden, rank, ignore_index,
        float(scaling), float(softcap or 1.0), float(1.0 / temperature), float(lam * temperature * temperature),
        float(threshold),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, R_PAD=r_pad,
        KL_GRAD=lam > 0, REVERSE=reverse, UNIT_TEMPERATURE=temperature == 1.0,
        HAS_BIAS=bias is not None, LORA=lora, SOFTCAP=softcap is not None,
        HIDDEN_GRAD=needs[0], WEIGHT_GRAD=needs[1], BIAS_GRAD=needs[2], LORA_H_GRAD=needs[3],
        LORA_B_GRAD=needs[4], FILTER=threshold > 0,
        **_dtype_flags(hidden.dtype), num_warps=num_warps,
    )
    return tuple(grads)


def compile_specs():
    """Forward and backward for every input dtype with every feature on, and flag variations on bf16."""
    from fastmtt.apps.compile_check import KernelSpec

    common = {"stride_h": "i64", "stride_b": "i64", "stride_w": "i64", "stride_lh": "i64", "stride_lb": "i64",
              "n_rows": "i32", "n_cols": "i32", "n_hidden": "i32", "rank": "i32", "ignore_index": "i32",
              "scaling": "fp32", "softcap": "fp32", "inv_t": "fp32"}

    def inputs(dtype):
        return {"hidden_ptr": f"*{dtype}", "base_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}",
                "bias_ptr": f"*{dtype}", "lora_h_ptr": "*fp32", "lora_b_ptr": f"*{dtype}", "labels_ptr": "*i64"}

    def flags(dtype, **features):
        block_n, block_v, block_h = GPU_TILES
        return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, R_PAD=16, UPCAST=False,
                    PRECISION="ieee" if dtype == "fp32" else "tf32", **features)

    def forward(dtype, reverse, unit_t, has_kl, bias, lora, softcap):
        signature = {**inputs(dtype), "ce_ptr": "*fp32", "stats_ptr": "*fp32", **common}
        constexprs = flags(dtype, HAS_KL=has_kl, REVERSE=reverse, UNIT_TEMPERATURE=unit_t, HAS_BIAS=bias,
                           LORA=lora, SOFTCAP=softcap)
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        label = (f"linear_mtt_fwd[{dtype},{'reverse' if reverse else 'forward'},T{'=1' if unit_t else '!=1'},"
                 f"kl={int(has_kl)},bias={int(bias)},lora={int(lora)},softcap={int(softcap)}]")
        return KernelSpec(label, _linear_mtt_fwd_kernel, signature, constexprs, num_warps=8)

    def backward(dtype, reverse, unit_t, kl_grad, bias, lora, softcap, needs, filt):
        signature = {**inputs(dtype), "stats_ptr": "*fp32", "coef_ptr": "*fp32",
                     "grad_hidden_ptr": "*fp32", "grad_weight_ptr": "*fp32", "grad_bias_ptr": "*fp32",
                     "grad_lora_h_ptr": "*fp32", "grad_lora_b_ptr": "*fp32", **common,
                     "lam_t2": "fp32", "threshold": "fp32"}
        constexprs = flags(dtype, KL_GRAD=kl_grad, REVERSE=reverse, UNIT_TEMPERATURE=unit_t, HAS_BIAS=bias,
                           LORA=lora, SOFTCAP=softcap, HIDDEN_GRAD=needs[0], WEIGHT_GRAD=needs[1],
                           BIAS_GRAD=needs[2], LORA_H_GRAD=needs[3], LORA_B_GRAD=needs[4], FILTER=filt)
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        label = (f"linear_mtt_bwd[{dtype},{'reverse' if reverse else 'forward'},T{'=1' if unit_t else '!=1'},"
                 f"kl_grad={int(kl_grad)},bias={int(bias)},lora={int(lora)},softcap={int(softcap)},"
                 f"grads={''.join(str(int(n)) for n in needs)},filter={int(filt)}]")
        return KernelSpec(label, _linear_mtt_bwd_kernel, signature, constexprs, num_warps=8)

    every_grad = (True,) * 5
    for dtype, reverse in itertools.product(("fp32", "fp16", "bf16"), (False, True)):
        yield forward(dtype, reverse, False, True, True, True, True)
        yield backward(dtype, reverse, False, True, True, True, True, every_grad, True)
    for unit_t, has_kl in itertools.product((True, False), (True, False)):
        yield forward("bf16", False, unit_t, has_kl, False, False, False)
        yield backward("bf16", False, unit_t, has_kl, False, False, False, (True, False, False, False, False), False)
    yield backward("bf16", False, True, True, False, True, False, (True, False, False, True, True), True)
