"""Fused LoRA linear kernels: y = x W^T + bias + s * (drop(x) A^T) B^T and its gradients.

Two passes per product. A small one computes the rank-r side product

    side[M, r] = side_scale * (D P)[M, L] Am[L, r]          (`_lora_project_kernel`)

with the dropout mask D drawn once per entry of P, and stores it in the adapters' dtype (rounded as
PEFT rounds lora_A's output). The GEMM then takes it as an epilogue input:

    out[M, C] = P[M, L] Wm[L, C] + bias[C] + s * D_out (side Bm[r, C])      (`_lora_gemm_kernel`)

    forward:  P = x,  Wm = W^T, Am = A^T, Bm = B^T, dropout on P       -> side = drop(x) A^T / (1 - p)
    dx:       P = dy, Wm = W,   Am = B,   Bm = A,   dropout on the output -> side = g = dy B
Carrying the rank-r product inside the GEMM's reduction loop instead would redo it (and, with dropout,
the mask) for every column tile: C / BLOCK_C times over.

A third kernel computes the adapter gradients, partial sums over row splits:
    out[R, C] = s * G[M, R]^T (D P)[M, C]      dA = s (dy B)^T drop(x),  dB^T = s (x A^T)^T dy
Backward is four launches: g = dy B, dx, dA, dB.

Dropout mask: generated in-kernel from a seed (Philox). Entry (m, k) of an [M, K] tensor keeps where the
uniform draw k % 4 of the Philox call at (seed, m * ceil(K / 4) + k // 4) is >= p: one `tl.randint4x`
call serves four entries. Forward (on x), dx (on its output) and dA (on x) regenerate the identical mask,
each entry once per pass, so no [M, K] mask or dropped copy of x is ever stored (PEFT keeps dropout(x)
alive for backward). `dropout_mask_triton` materializes the mask for tests.

Precision: the base product runs in the input dtype, the LoRA products in the adapters' dtype
(as PEFT casts x to lora_A's dtype), all accumulated in fp32. fp32 dots run as tf32 when torch
allows tf32 matmuls (torch.backends.cuda.matmul.fp32_precision, or the legacy allow_tf32 flag),
otherwise as tf32x3 (about fp32 accuracy).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from fastmtt.kernels.registry import Launch, compile_specs, meta_tensor, planning_for_gpu, sm_count

from fastmtt._dispatch import allows_tf32, interpreting

MAX_RANK = 128


@triton.jit
def _keep_mask(seed, rows, col_start, n_cols, dropout_p, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Dropout keep mask (uniform draw >= p) of the tile rows x [col_start, col_start + BLOCK_COLS) of an
    [M, n_cols] tensor; col_start a multiple of 4. One Philox call per four entries of a row."""
    groups = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    offsets = rows.to(tl.int64)[:, None] * ((n_cols + 3) // 4) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offsets)
    draws = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_ROWS, BLOCK_COLS))
    return tl.random.uint_to_uniform_float(draws) >= dropout_p


@triton.jit
def _lora_project_kernel(
    p_ptr, stride_pm, stride_pl,
    a_ptr, stride_al, stride_ar,
    side_ptr,
    M, L, RANK,
    side_scale, dropout_p, seed,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    """side[M, RANK] = side_scale * (D P)[M, L] Am[L, RANK] in side's dtype (unit row stride RANK); P cast
    to Am's dtype, D the dropout keep mask over P when DROPOUT."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    row_ok = offs_m < M
    rank_ok = offs_r < RANK
    p_rows = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm
    a_cols = a_ptr + offs_r[None, :] * stride_ar
    side = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        p = tl.load(p_rows + offs_l.to(tl.int64)[None, :] * stride_pl, mask=row_ok[:, None] & l_ok[None, :], other=0.0)
        a = tl.load(a_cols + offs_l.to(tl.int64)[:, None] * stride_al, mask=l_ok[:, None] & rank_ok[None, :], other=0.0)
        if UPCAST:
            p, a = p.to(tl.float32), a.to(tl.float32)
        p = p.to(a.dtype)
        if DROPOUT:
            p = tl.where(_keep_mask(seed, offs_m, start, L, dropout_p, BLOCK_M, BLOCK_L), p, 0.0)
        side = tl.dot(p, a, side, input_precision=FP32_PRECISION)
    tl.store(side_ptr + offs_m.to(tl.int64)[:, None] * RANK + offs_r[None, :],
             (side * side_scale).to(side_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _lora_gemm_kernel(
    p_ptr, stride_pm, stride_pl,
    w_ptr, stride_wl, stride_wc,
    side_ptr,
    b_ptr, stride_br, stride_bc,
    bias_ptr,
    out_ptr, stride_om, stride_oc,
    M, C, L, RANK,
    lora_scale, dropout_p, seed,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, GROUP_M: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    """out = P Wm + bias + lora_scale * D (side Bm); side [M, RANK] (unit row stride RANK), D the dropout
    keep mask over out when DROPOUT."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_c = tl.cdiv(C, BLOCK_C)
    group = GROUP_M * tiles_c
    first_m = (pid // group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_c = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, R)
    row_ok = offs_m < M
    col_ok = offs_c < C
    rank_ok = offs_r < RANK
    p_rows = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm
    w_cols = w_ptr + offs_c.to(tl.int64)[None, :] * stride_wc

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        p = tl.load(p_rows + offs_l.to(tl.int64)[None, :] * stride_pl, mask=row_ok[:, None] & l_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_l.to(tl.int64)[:, None] * stride_wl, mask=l_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            p, w = p.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(p, w, acc, input_precision=FP32_PRECISION)

    side = tl.load(side_ptr + offs_m.to(tl.int64)[:, None] * RANK + offs_r[None, :],
                   mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_c.to(tl.int64)[None, :] * stride_bc,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        side, b = side.to(tl.float32), b.to(tl.float32)
    lora = tl.dot(side, b, input_precision=FP32_PRECISION) * lora_scale
    if DROPOUT:
        lora = tl.where(_keep_mask(seed, offs_m, pid_c * BLOCK_C, C, dropout_p, BLOCK_M, BLOCK_C), lora, 0.0)
    acc += lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_c.to(tl.int64)[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_weight_grad_kernel(
    g_ptr,
    p_ptr, stride_pm, stride_pc,
    out_ptr,
    M, C, RANK, rows_per_split,
    scale, dropout_p, seed,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    """out[split, R, C] = scale * G[rows, R]^T (keep * P)[rows, C] over this split's rows (G: [M, RANK])."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, R)
    col_ok = offs_c < C
    rank_ok = offs_r < RANK
    row_start = split * rows_per_split
    row_end = min(row_start + rows_per_split, M)
    acc = tl.zeros([R, BLOCK_C], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < row_end
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * RANK + offs_r[None, :],
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        p = tl.load(p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_c.to(tl.int64)[None, :] * stride_pc,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            g, p = g.to(tl.float32), p.to(tl.float32)
        p = p.to(g.dtype)
        if DROPOUT:
            p = tl.where(_keep_mask(seed, offs_m, pid_c * BLOCK_C, C, dropout_p, BLOCK_M, BLOCK_C), p, 0.0)
        acc = tl.dot(tl.trans(g), p, acc, input_precision=FP32_PRECISION)
    out = out_ptr + split.to(tl.int64) * RANK * C + offs_r[:, None] * C + offs_c[None, :]
    tl.store(out, acc * scale, mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, offs_m, tl.program_id(1) * BLOCK_K, K, dropout_p, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


def _padded_rank(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _fp32_precision() -> str:
    """fp32 dots: tf32 when torch allows it for matmuls, else tf32x3 (three tf32 products, about fp32
    accuracy on tensor cores; the FMA "ieee" lowering spills registers at these tile sizes)."""
    if interpreting():
        return "ieee"
    return "tf32" if allows_tf32() else "tf32x3"


def _project_blocks(M: int, L: int, R: int, lora_dtype: torch.dtype):
    """(BLOCK_M, BLOCK_L, num_warps) of the side product. The interpreter takes whole (small) matrices.
    On a GPU the pass streams P once: 32-row programs (128 of them at M = 4096), reduction steps as long
    as the [BLOCK_L, R] adapter tile allows without spilling (compile-check)."""
    if interpreting():
        return min(128, triton.next_power_of_2(max(M, 16))), triton.next_power_of_2(max(L, 16)), 1
    if lora_dtype == torch.float32:  # [64, 64] fp32 adapter tiles at R = 64 with dropout spill (80 bytes, sm_90)
        return 32, (64 if R < 64 else 32), 4
    return 32, (128 if R <= 64 else 64), 4


def _gemm_blocks(M: int, C: int, L: int, R: int, dtype: torch.dtype, lora_dtype: torch.dtype, dropout: bool):
    """(BLOCK_M, BLOCK_C, BLOCK_L, num_warps, num_stages). The interpreter takes whole (small) matrices.
    On a GPU the loop is a plain GEMM; the epilogue holds a second [BLOCK_M, BLOCK_C] accumulator for
    the rank-r term (and with dropout, its mask)."""
    if interpreting():
        return (min(128, triton.next_power_of_2(max(M, 16))), triton.next_power_of_2(max(C, 16)),
                triton.next_power_of_2(max(L, 16)), 1, 1)
    if dtype == torch.float32 or (lora_dtype == torch.float32 and R > 64):  # tf32x3 dots: 32-row tiles
        return 32, (128 if R <= 64 else 64), 32, 8, 3
    if lora_dtype == torch.float32:  # a 16-bit GEMM (64 rows: wgmma on sm_90), a tf32x3 epilogue
        return 64, 64, 64, 8, 3
    return 128, (64 if dropout or R > 64 else 128), 64, 8, 3


def _weight_grad_tiles(R: int, lora_dtype: torch.dtype):
    """(BLOCK_M, BLOCK_C, num_warps) of the weight-gradient kernel on a GPU."""
    return 32, (128 if R <= 64 and lora_dtype != torch.float32 else 64), 8


def _weight_grad_blocks(M: int, C: int, R: int, lora_dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_C, num_warps, row splits): about two programs per SM on a GPU."""
    if interpreting():
        return triton.next_power_of_2(max(M, 16)), triton.next_power_of_2(max(C, 16)), 1, 1
    block_m, block_c, num_warps = _weight_grad_tiles(R, lora_dtype)
    tiles_c = triton.cdiv(C, block_c)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(2 * sm_count(device), tiles_c)))
    return block_m, block_c, num_warps, splits


def _project_launch(p, a_mat, side, *, side_scale, dropout_p, seed, fp32_precision=None) -> Launch:
    """The side product: side = side_scale * (D p) a_mat, D the dropout mask over p when dropout_p > 0."""
    M, L = p.shape
    rank = a_mat.shape[1]
    R = _padded_rank(rank)
    block_m, block_l, num_warps = _project_blocks(M, L, R, a_mat.dtype)
    args = dict(p_ptr=p, stride_pm=p.stride(0), stride_pl=p.stride(1),
                a_ptr=a_mat, stride_al=a_mat.stride(0), stride_ar=a_mat.stride(1), side_ptr=side,
                M=M, L=L, RANK=rank, side_scale=float(side_scale), dropout_p=float(dropout_p), seed=seed)
    constexprs = dict(R=R, BLOCK_M=block_m, BLOCK_L=block_l, DROPOUT=dropout_p > 0, UPCAST=interpreting(),
                      FP32_PRECISION=fp32_precision or _fp32_precision())
    return Launch(_lora_project_kernel, (triton.cdiv(M, block_m),), args, constexprs, num_warps)


def _project(p, a_mat, *, side_scale, dropout_p, seed):
    """side_scale * (D p) a_mat: p [M, L], a_mat [L, r] -> [M, r] in a_mat's dtype."""
    side = torch.empty(p.shape[0], a_mat.shape[1], dtype=a_mat.dtype, device=p.device)
    _project_launch(p, a_mat, side, side_scale=side_scale, dropout_p=dropout_p, seed=seed).run()
    return side


def _gemm_launch(p, w_mat, side, b_mat, bias, out, *, lora_scale, dropout_p, seed, fp32_precision=None) -> Launch:
    """The GEMM: out = p w_mat + bias + lora_scale * D (side b_mat), D the dropout mask over out when
    dropout_p > 0."""
    M, L = p.shape
    C = w_mat.shape[1]
    rank = side.shape[1]
    R = _padded_rank(rank)
    dropout = dropout_p > 0
    block_m, block_c, block_l, num_warps, num_stages = _gemm_blocks(M, C, L, R, p.dtype, side.dtype, dropout)
    args = dict(p_ptr=p, stride_pm=p.stride(0), stride_pl=p.stride(1),
                w_ptr=w_mat, stride_wl=w_mat.stride(0), stride_wc=w_mat.stride(1), side_ptr=side,
                b_ptr=b_mat, stride_br=b_mat.stride(0), stride_bc=b_mat.stride(1),
                bias_ptr=bias if bias is not None else out,
                out_ptr=out, stride_om=out.stride(0), stride_oc=out.stride(1),
                M=M, C=C, L=L, RANK=rank, lora_scale=float(lora_scale), dropout_p=float(dropout_p), seed=seed)
    constexprs = dict(R=R, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_L=block_l, GROUP_M=8, DROPOUT=dropout,
                      HAS_BIAS=bias is not None, UPCAST=interpreting(),
                      FP32_PRECISION=fp32_precision or _fp32_precision())
    return Launch(_lora_gemm_kernel, (triton.cdiv(M, block_m) * triton.cdiv(C, block_c),), args, constexprs,
                  num_warps, num_stages)


def _gemm(*args, **kwargs):
    _gemm_launch(*args, **kwargs).run()


def _weight_grad_launch(g, p, partial, rows_per_split, block_m, block_c, num_warps, *, scale, dropout_p,
                        seed) -> Launch:
    M, C = p.shape
    rank = g.shape[1]
    args = dict(g_ptr=g, p_ptr=p, stride_pm=p.stride(0), stride_pc=p.stride(1), out_ptr=partial, M=M, C=C,
                RANK=rank, rows_per_split=rows_per_split, scale=float(scale), dropout_p=float(dropout_p), seed=seed)
    constexprs = dict(R=_padded_rank(rank), BLOCK_M=block_m, BLOCK_C=block_c, DROPOUT=dropout_p > 0,
                      UPCAST=interpreting(), FP32_PRECISION=_fp32_precision())
    return Launch(_lora_weight_grad_kernel, (triton.cdiv(C, block_c), partial.shape[0]), args, constexprs,
                  num_warps)


def _weight_grad(g, p, *, scale, dropout_p, seed):
    """s * g^T (D p): g [M, r] (adapter dtype), p [M, C] -> [r, C] fp32, summed over row splits."""
    M, C = p.shape
    block_m, block_c, num_warps, splits = _weight_grad_blocks(M, C, _padded_rank(g.shape[1]), g.dtype, p.device)
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty(splits, g.shape[1], C, dtype=torch.float32, device=p.device)
    _weight_grad_launch(g, p, partial, rows_per_split, block_m, block_c, num_warps, scale=scale,
                        dropout_p=dropout_p, seed=seed).run()
    return partial[0] if splits == 1 else partial.sum(0)


def draw_dropout_seed() -> int:
    """Seed for the in-kernel dropout mask, drawn from torch's default CPU generator (so
    torch.manual_seed makes runs reproducible)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def lora_forward_triton(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """x [M, K], weight [N, K] (x's dtype), lora_A [r, K], lora_B [N, r], seed of the dropout mask ->
    (y [M, N] in x's dtype, xa = drop(x) A^T [M, r] in the adapters' dtype).
    Two launches: xa (the mask drawn once per entry of x), then the GEMM with xa B^T in its epilogue."""
    xa = _project(x, lora_A.t(), side_scale=1.0 / (1.0 - dropout_p), dropout_p=dropout_p, seed=seed)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _gemm(x, weight.t(), xa, lora_B.t(), bias, y, lora_scale=scaling, dropout_p=0.0, seed=0)
    return y, xa


def lora_backward_triton(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, needs):
    """Gradients (dx, dA, dB) for the outputs flagged in `needs` = (x, lora_A, lora_B); None elsewhere.
    x, xa, seed: the forward's input, side product and dropout seed (the mask is regenerated from it).

    g = dy B (one launch),  dx = dy W + s D (g A) / (1 - p)  (one launch, the mask drawn once per entry
    of dx),  dA = s g^T D x / (1 - p),  dB = s dy^T xa  (one launch each, over row splits).
    """
    need_dx, need_dA, need_dB = needs
    keep_scale = 1.0 / (1.0 - dropout_p)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = dA = dB = None
    if need_dx or need_dA:
        g = _project(dy, lora_B, side_scale=1.0, dropout_p=0.0, seed=0)
        if need_dx:
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _gemm(dy, weight, g, lora_A, None, dx, lora_scale=scaling * keep_scale, dropout_p=dropout_p, seed=seed)
        if need_dA:
            dA = _weight_grad(g, x, scale=scaling * keep_scale, dropout_p=dropout_p, seed=seed).to(lora_A.dtype)
    if need_dB:
        dB = _weight_grad(xa, dy, scale=scaling, dropout_p=0.0, seed=0).t().contiguous().to(lora_B.dtype)
    return dx, dA, dB


def dropout_mask_triton(shape, dropout_p, seed, device):
    """The keep mask (bool [M, K]) that the kernels use for (seed, dropout_p); for tests and inspection."""
    M, K = shape
    out = torch.empty(M, K, dtype=torch.int8, device=device)
    block = 64 if not interpreting() else triton.next_power_of_2(max(M, K, 16))
    Launch(_dropout_mask_kernel, (triton.cdiv(M, block), triton.cdiv(K, block)),
           dict(out_ptr=out, M=M, K=K, dropout_p=float(dropout_p), seed=seed), dict(BLOCK_M=block, BLOCK_K=block)).run()
    return out.bool()


@compile_specs
def _specs():
    """The launches of lora_forward_triton and lora_backward_triton for an 8192 x 4096 -> 14336 layer as
    lora_linear makes them, over PEFT's dtype pairs (input, adapters): r=16 with and without dropout and
    bias, and on transposed (Conv1D-style) weights; on bf16 also transposed weights with dropout and ranks
    64 and 128; fp32 with tf32 allowed; and the dropout-mask kernel."""
    n_rows, n_in, n_out = 8192, 4096, 14336

    def layer(dtype, adapter_dtype, *, rank=16, dropout_p=0.0, bias=False, transposed=False):
        x = meta_tensor(n_rows, n_in, dtype=dtype)
        weight = meta_tensor(n_in, n_out, dtype=dtype).t() if transposed else meta_tensor(n_out, n_in, dtype=dtype)
        lora_A, lora_B = meta_tensor(rank, n_in, dtype=adapter_dtype), meta_tensor(n_out, rank, dtype=adapter_dtype)
        bias = meta_tensor(n_out, dtype=dtype) if bias else None
        seed = draw_dropout_seed() if dropout_p > 0 else 0
        y, xa = lora_forward_triton(x, weight, lora_A, lora_B, bias, 2.0, dropout_p, seed)
        lora_backward_triton(torch.empty_like(y), x, xa, seed, weight, lora_A, lora_B, 2.0, dropout_p, (True,) * 3)

    pairs = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.float32))
    with planning_for_gpu() as specs:
        for dtype, adapter_dtype in pairs:
            layer(dtype, adapter_dtype)
            layer(dtype, adapter_dtype, dropout_p=0.1, bias=True)
            layer(dtype, adapter_dtype, transposed=True)
        for adapter_dtype in (torch.bfloat16, torch.float32):
            layer(torch.bfloat16, adapter_dtype, dropout_p=0.1, transposed=True)
            for rank in (64, 128):
                layer(torch.bfloat16, adapter_dtype, rank=rank, dropout_p=0.1)
        with _tf32_allowed():
            layer(torch.float32, torch.float32, bias=True)
        dropout_mask_triton((n_rows, n_in), 0.1, 1234, torch.device("meta"))
    yield from specs


@contextlib.contextmanager
def _tf32_allowed():
    """torch's legacy flag that lets fp32 CUDA matmuls use tf32 (allows_tf32), set for the block."""
    matmul = torch.backends.cuda.matmul
    allowed = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = allowed
