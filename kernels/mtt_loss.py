"""MTT row kernel: per row CE, the divergence and, in the same launch, dL/dlogits.

One program per BLOCK_N rows (1 on a GPU for all but small vocabularies). Pass 1 streams the rows in
[BLOCK_N, BLOCK_V] tiles and keeps fp32 online statistics (kernels/mtt_math.py); pass 2 rereads the rows
and writes the gradient. Only the tile holding a label and the last, partial tile take the masked path;
every other tile runs without masks or label tests. Pass 2 walks the tiles last to first, so it starts
with those pass 1 read last, the likeliest still in L2, and pass 1 asks L2 to keep its lines
(evict_last) while pass 2's reads and writes go first (evict_first).

The same kernel serves a vocabulary range [vocab_start, vocab_start + n_cols) of wider rows (labels are
global ids): MODE_PARTIALS stores the range's partial statistics, MODE_GRADIENT writes the range's
gradient from merged statistics (fastmtt/partials.py).
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from fastmtt.kernels.mtt_math import (
    DIVERGENCE_IDS,
    LOG2E,
    accumulate_logits,
    accumulate_tile,
    gradient_constants,
    load_statistics,
    logit_gradient,
    row_ce_weight,
    row_statistics,
    store_partials,
    store_statistics,
    tile_gradient,
)
from fastmtt.kernels.registry import FEATURE_COVER, Launch, compile_specs, meta_tensor, planning_for_gpu

from fastmtt import partials as P
from fastmtt._dispatch import interpreting

MODE_WHOLE, MODE_PARTIALS, MODE_GRADIENT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _masked_tile(start, n_cols, local, found, BLOCK_V: tl.constexpr):
    """Whether the tile at `start` needs the masked path: it is the last, partial tile or holds a label of
    one of the program's rows."""
    holds_label = found & (local >= start) & (local < start + BLOCK_V)
    return (start + BLOCK_V > n_cols) | (tl.max(holds_label.to(tl.int32), 0) > 0)


@triton.jit
def _load_full_tile(ptrs, valid, EVICT: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 copy of a tile inside the range; only a multi-row program masks (its ignored rows)."""
    if BLOCK_N == 1:  # a one-row program loads only when its row is valid
        x = tl.load(ptrs, eviction_policy=EVICT)
    else:
        x = tl.load(ptrs, mask=valid[:, None], other=float("-inf"), eviction_policy=EVICT)
    return x.to(tl.float32)


@triton.jit
def _load_tiles(z_ptrs, b_ptrs, valid, mask, MASKED: tl.constexpr, EVICT: tl.constexpr, WITH_BASE: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """fp32 (z, b) tiles: MASKED under `mask` (-inf outside), else a tile inside the range
    (`_load_full_tile`); b is read only WITH_BASE (otherwise z stands in, unread)."""
    if MASKED:
        z = tl.load(z_ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    else:
        z = _load_full_tile(z_ptrs, valid, EVICT, BLOCK_N)
    b = z
    if WITH_BASE:
        if MASKED:
            b = tl.load(b_ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
        else:
            b = _load_full_tile(b_ptrs, valid, EVICT, BLOCK_N)
    return z, b


@triton.jit
def _mtt_loss_kernel(
    logits_ptr, logits_stride,
    base_ptr, base_stride,
    labels_ptr, ce_rows_ptr,
    grad_ptr, grad_stride,
    out_ptr,
    scale_ptr,
    n_rows, n_cols, vocab_start, ignore_index,
    inv_t, kl_weight, ce_weight,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    MODE: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr, MASK_TARGET: tl.constexpr,
    HAS_KL: tl.constexpr, KL_GRAD: tl.constexpr, COMPUTE_GRAD: tl.constexpr, CE_ROWS: tl.constexpr,
):
    """out_ptr: statistics [N_STATS, n_rows] (written in MODE_WHOLE, read in MODE_GRADIENT) or partials
    [N_PARTIALS, n_rows] (written in MODE_PARTIALS). scale_ptr: 1 element, the gradient's factor. CE_ROWS:
    ce_rows_ptr (int8 [n_rows]) marks the rows whose CE enters the gradient (`row_ce_weight`)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (labels != ignore_index)
    local = labels - vocab_start  # the label's column in this range; outside [0, n_cols) when elsewhere
    found = valid & (local >= 0) & (local < n_cols)
    logits_rows = logits_ptr + rows[:, None] * logits_stride
    base_rows = base_ptr + rows[:, None] * base_stride
    grad_rows = grad_ptr + rows[:, None] * grad_stride
    offsets = tl.arange(0, BLOCK_V)
    any_valid = tl.max(valid.to(tl.int32), 0) > 0
    scale2 = inv_t * LOG2E

    if MODE == MODE_GRADIENT:
        ref, lse, z_ref, z_lse, b_ref, b_lse, value = load_statistics(out_ptr, n_rows, rows, valid)
    else:
        m_z = tl.full([BLOCK_N], float("-inf"), tl.float32)  # kept z
        s_z = tl.zeros([BLOCK_N], tl.float32)
        m_r = tl.full([BLOCK_N], float("-inf"), tl.float32)  # all z (CE at T != 1)
        s_r = tl.zeros([BLOCK_N], tl.float32)
        m_b = tl.full([BLOCK_N], float("-inf"), tl.float32)  # kept b
        s_b = tl.zeros([BLOCK_N], tl.float32)
        w = tl.zeros([BLOCK_N], tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        z_label = tl.zeros([BLOCK_N], tl.float32)
        b_label = tl.zeros([BLOCK_N], tl.float32)
        if any_valid:  # a block of ignored rows only stores zeros
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offsets
                if _masked_tile(start, n_cols, local, found, BLOCK_V):
                    col_mask = cols < n_cols
                    z, b = _load_tiles(logits_rows + cols[None, :], base_rows + cols[None, :], valid,
                                       valid[:, None] & col_mask[None, :], True, "evict_last", HAS_KL, BLOCK_N)
                    m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label, b_label = accumulate_tile(
                        z, b, col_mask, cols[None, :] == local[:, None], scale2, m_z, s_z, m_r, s_r, m_b, s_b, w, d,
                        z_label, b_label, HAS_KL, DIVERGENCE, UNIT_TEMPERATURE, MASK_TARGET)
                else:
                    z, b = _load_tiles(logits_rows + cols[None, :], base_rows + cols[None, :], valid, valid,
                                       False, "evict_last", HAS_KL, BLOCK_N)
                    m_z, s_z, m_r, s_r, m_b, s_b, w, d = accumulate_logits(
                        z, z, b, scale2, m_z, s_z, m_r, s_r, m_b, s_b, w, d, HAS_KL, DIVERGENCE, UNIT_TEMPERATURE)
        if MODE == MODE_PARTIALS:
            store_partials(out_ptr, n_rows, rows, row_mask, m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label, b_label,
                           found)
        else:
            ref, lse, z_ref, z_lse, b_ref, b_lse, value, ce = row_statistics(
                m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label, b_label, found, inv_t, HAS_KL, DIVERGENCE,
                UNIT_TEMPERATURE, MASK_TARGET)
            store_statistics(out_ptr, n_rows, rows, row_mask, valid, ref, lse, z_ref, z_lse, b_ref, b_lse, value, ce)

    if COMPUTE_GRAD and MODE != MODE_PARTIALS:
        n_tiles = tl.cdiv(n_cols, BLOCK_V)
        if any_valid:
            scale = tl.where(valid, tl.load(scale_ptr).to(tl.float32), 0.0)
            ce_w = row_ce_weight(ce_rows_ptr, rows, row_mask, ce_weight, BLOCK_N, CE_ROWS)
            lse2, zc2, bc2, soft, kl_coef, shift = gradient_constants(ref, lse, z_ref, z_lse, b_lse, value, scale,
                                                                      inv_t, kl_weight, ce_w, DIVERGENCE,
                                                                      UNIT_TEMPERATURE)
            ce_scale = scale * ce_w
            for index in range(0, n_tiles):
                start = (n_tiles - 1 - index) * BLOCK_V  # last tile first: pass 1 read it most recently
                cols = start + offsets
                if _masked_tile(start, n_cols, local, found, BLOCK_V):
                    col_mask = cols < n_cols
                    live = valid[:, None] & col_mask[None, :]
                    z, b = _load_tiles(logits_rows + cols[None, :], base_rows + cols[None, :], valid, live, True,
                                       "evict_first", KL_GRAD, BLOCK_N)
                    grad = tile_gradient(z, b, col_mask, cols[None, :] == local[:, None], ce_scale, scale2, inv_t,
                                         ref, z_ref, b_ref, lse2, zc2, bc2, soft, kl_coef, shift, KL_GRAD, DIVERGENCE,
                                         UNIT_TEMPERATURE, MASK_TARGET)
                    tl.store(grad_rows + cols[None, :], tl.where(live, grad, 0.0).to(grad_ptr.dtype.element_ty),
                             mask=row_mask[:, None] & col_mask[None, :], eviction_policy="evict_first")
                else:
                    z, b = _load_tiles(logits_rows + cols[None, :], base_rows + cols[None, :], valid, valid,
                                       False, "evict_first", KL_GRAD, BLOCK_N)
                    grad = logit_gradient(z, z, b, scale2, inv_t, ref, z_ref, b_ref, lse2, zc2, bc2, soft, kl_coef,
                                          shift, KL_GRAD, DIVERGENCE, UNIT_TEMPERATURE)
                    if BLOCK_N == 1:
                        tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                                 eviction_policy="evict_first")
                    else:
                        tl.store(grad_rows + cols[None, :],
                                 tl.where(valid[:, None], grad, 0.0).to(grad_ptr.dtype.element_ty),
                                 mask=row_mask[:, None], eviction_policy="evict_first")
        else:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offsets
                tl.store(grad_rows + cols[None, :], tl.zeros([BLOCK_N, BLOCK_V], grad_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & (cols < n_cols)[None, :])


# Launch configuration on a GPU (unmeasured: chosen from the compiled code, see the notes):
#   (largest vocabulary, BLOCK_V, rows per program, warps).
# Each thread holds 16 entries of a tile: two 16-byte loads per 16-bit input in flight, and the tiles
# of z, b and their exponentials (64 fp32 registers) fit without spilling. Tiles of 4096 columns
# amortize the per-tile cross-warp reductions (max and sum of both sides, the divergence sum) over 16
# entries per thread and keep the masked path to 2 of 32 tiles at V = 128256. Below 2048 columns a
# program takes several rows so that it still holds 2048 entries (a 128-column row alone would leave
# 7 of 8 warps idle); their tiles all hold labels, so small vocabularies run the masked path.
# Compiled for sm_90 (bf16 logits and base, forward KL, lam > 0, T = 1, with the gradient), a mask-free
# tile cost 24 SASS instructions per entry in pass 1 and 13 in pass 2, 4 exponentials in all, at 95
# registers, before the statistics became relative to the row maxima (a subtraction per exponent and
# the per-column difference sum of the divergence; instructions not recounted since). `fastmtt
# compile-check --arch 90` now reports 96-113 registers for the KL specializations with the gradient:
# still two programs of 8 warps per SM. The kernel before the masked/mask-free split took 83
# instructions and 5 exponentials; 8192-column tiles would take 164 registers: one program per SM.
GPU_LAUNCH = (
    (128, 128, 16, 4),
    (256, 256, 8, 4),
    (512, 512, 4, 4),
    (1024, 1024, 2, 4),
    (2048, 2048, 1, 4),
    (float("inf"), 4096, 1, 8),
)


def _block_sizes(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps). The interpreter's cost grows with tile iterations, so it takes whole
    rows and several rows per program."""
    if interpreting():
        block_v = triton.next_power_of_2(max(n_cols, 1))
        return max(1, min(16, 8192 // block_v)), block_v, 1
    _, block_v, block_n, num_warps = next(row for row in GPU_LAUNCH if n_cols <= row[0])
    return block_n, block_v, num_warps


def _plan(logits, base_logits, labels, out, grad_out, grad_scale, options, *, mode, vocab_start, need_kl,
          ce_rows=None):
    n_rows, n_cols = logits.shape
    block_n, block_v, num_warps = _block_sizes(n_cols)
    compute_grad = grad_out is not None
    ce_rows = ce_rows if compute_grad else None  # only the gradient reads it
    if not compute_grad:
        grad_out = out[:1]  # never written; gives the kernel a valid pointer and dtype
    args = dict(logits_ptr=logits, logits_stride=logits.stride(0), base_ptr=base_logits,
                base_stride=base_logits.stride(0), labels_ptr=labels,
                ce_rows_ptr=labels if ce_rows is None else ce_rows.to(torch.int8), grad_ptr=grad_out,
                grad_stride=grad_out.stride(0), out_ptr=out, scale_ptr=grad_scale, n_rows=n_rows, n_cols=n_cols,
                vocab_start=vocab_start, ignore_index=options.ignore_index, inv_t=1.0 / options.temperature,
                kl_weight=options.kl_weight, ce_weight=options.ce_weight)
    constexprs = dict(BLOCK_N=block_n, BLOCK_V=block_v, MODE=mode.value, DIVERGENCE=DIVERGENCE_IDS[options.direction],
                      UNIT_TEMPERATURE=options.temperature == 1.0, MASK_TARGET=options.mask_target,
                      HAS_KL=need_kl or options.lam > 0 or mode.value == MODE_GRADIENT.value, KL_GRAD=options.lam > 0,
                      COMPUTE_GRAD=compute_grad, CE_ROWS=ce_rows is not None)
    return Launch(_mtt_loss_kernel, (triton.cdiv(n_rows, block_n),), args, constexprs, num_warps)


def _prepare(logits, grad_scale):
    if grad_scale is None:
        grad_scale = torch.ones(1, dtype=torch.float32, device=logits.device)
    return grad_scale.float()


def mtt_rows(logits, base_logits, labels, options, *, need_kl, grad_scale=None, grad_out=None, ce_rows=None):
    """Row statistics [N_STATS, N] fp32 (LSE, Z', B', D, CE; fastmtt.kernels.mtt_math) of [N, V] logits;
    writes grad_scale * dL_i/dlogits into `grad_out` if given (it may be `logits` itself), CE's part only on
    the rows ce_rows [N] (bool) marks where it is given. Rows must have unit column stride."""
    stats = torch.empty(P.N_STATS, logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _plan(logits, base_logits, labels, stats, grad_out, _prepare(logits, grad_scale), options,
              mode=MODE_WHOLE, vocab_start=0, need_kl=need_kl, ce_rows=ce_rows).run()
    return stats


def mtt_partials(logits, base_logits, labels, options, *, vocab_start, need_kl):
    """Partial statistics [N_PARTIALS, N] of a vocabulary range: logits [N, n] hold columns
    [vocab_start, vocab_start + n) of the rows; labels are global ids."""
    parts = torch.empty(P.N_PARTIALS, logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _plan(logits, base_logits, labels, parts, None, _prepare(logits, None), options, mode=MODE_PARTIALS,
              vocab_start=vocab_start, need_kl=need_kl).run()
    return parts


def mtt_gradient(logits, base_logits, labels, stats, options, *, vocab_start, grad_scale, grad_out, ce_rows=None):
    """grad_scale * dL_i/dlogits of a vocabulary range into grad_out, from merged statistics [N_STATS, N]
    (CE's part only on the rows ce_rows marks, as in `mtt_rows`)."""
    if logits.shape[0]:
        _plan(logits, base_logits, labels, stats, grad_out, _prepare(logits, grad_scale), options,
              mode=MODE_GRADIENT, vocab_start=vocab_start, need_kl=True, ce_rows=ce_rows).run()
    return grad_out


@compile_specs
def _specs():
    """The launches of mtt_rows, mtt_partials and mtt_gradient at N=8192, V=128256 as their callers make
    them: mtt_loss on fp32, fp16 and bf16 logits and the chunked fused-linear path (fp32 slabs, the
    gradient in the model's dtype), for each FEATURE_COVER setting; with the KL value asked for, and
    without the gradient (evaluation); with CE on some rows only (MTTObjective); a vocabulary range's
    partials and gradient (vocab_parallel) on
    16-bit logits and fp32 slabs, forward and reverse."""
    from fastmtt.options import MTTOptions

    n_rows, n_cols = 8192, 128256
    labels = meta_tensor(n_rows, dtype=torch.int64)
    every = [MTTOptions(**settings) for settings in FEATURE_COVER]

    def rows(dtype, grad_dtype=None):
        return (meta_tensor(n_rows, n_cols, dtype=dtype), meta_tensor(n_rows, n_cols, dtype=dtype),
                None if grad_dtype is None else meta_tensor(n_rows, n_cols, dtype=grad_dtype))

    with planning_for_gpu() as specs:
        for dtype, grad_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float16),
                                  (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                  (torch.float32, torch.float16)):
            logits, base, grad = rows(dtype, grad_dtype)
            for options in every:
                mtt_rows(logits, base, labels, options, need_kl=False, grad_out=grad)
        for options in every:
            logits, base, grad = rows(torch.bfloat16, torch.bfloat16)
            mtt_rows(logits, base, labels, options, need_kl=True, grad_out=grad)
            mtt_rows(logits, base, labels, options, need_kl=True)
        ce_rows = meta_tensor(n_rows, dtype=torch.bool)  # MTTObjective's every-position KL: CE on some rows
        for grad_dtype, options in [*((torch.bfloat16, options) for options in every),
                                    (torch.float16, every[0]), (torch.float32, every[0])]:
            logits, base, grad = rows(torch.float32, grad_dtype)
            mtt_rows(logits, base, labels, options, need_kl=True, grad_out=grad, ce_rows=ce_rows)
        for dtype, options in itertools.product((torch.bfloat16, torch.float32), every[:3:2]):
            logits, base, grad = rows(dtype, dtype)
            mtt_partials(logits, base, labels, options, vocab_start=n_cols, need_kl=True)
            stats = meta_tensor(P.N_STATS, n_rows, dtype=torch.float32)
            mtt_gradient(logits, base, labels, stats, options, vocab_start=n_cols, grad_scale=None, grad_out=grad)
    yield from specs
