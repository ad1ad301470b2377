"""Fused LoRA linear kernels: y = x W^T + bias + s * (drop(x) A^T) B^T and its gradients.

One GEMM kernel serves forward and input gradient. It computes

    out[M, C] = P[M, L] Wm[L, C] + bias[C] + s * D_out ((D_in P) Am[L, R]) Bm[R, C]

with the rank-r product (D_in P) Am carried in the same reduction loop as P Wm, so it never
takes a trip through memory before it is used; the programs of the first column tile also store
it (`side`, [M, r]) because backward needs it.
    forward:  P = x,  Wm = W^T, Am = A^T, Bm = B^T, dropout on the input  -> side = drop(x) A^T
    dx:       P = dy, Wm = W,   Am = B,   Bm = A,   dropout on the output -> side = dy B
Each column tile recomputes its rows' rank-r product: r / BLOCK_C extra work on the reduction,
traded for no extra launch and no [M, r] round trip between launches.

A second kernel computes the adapter gradients, partial sums over row splits:
    out[R, C] = s * G[M, R]^T (D P)[M, C]      dA = s (dy B)^T drop(x),  dB^T = s (x A^T)^T dy
Backward is three launches: dx (+ g = dy B), dA, dB. dA and dB reduce over rows while the dx GEMM
reduces over columns; folding them into dx's programs would need per-row-tile partial sums and would
save one read of x and one of dy, against the many reads of dy the dx GEMM makes anyway.

Dropout mask: generated in-kernel from a seed, keep(m, k) = rand(seed, m * K + k) >= p (Philox).
Forward and backward regenerate the identical mask from the same (seed, m, k), so no [M, K] mask
or dropped copy of x is ever stored (PEFT keeps dropout(x) alive for backward). `dropout_mask_triton`
materializes the mask for tests.

Precision: the base product runs in the input dtype, the LoRA products in the adapters' dtype
(as PEFT casts x to lora_A's dtype), all accumulated in fp32. fp32 dots run as tf32 when torch
allows tf32 matmuls (torch.backends.cuda.matmul.allow_tf32), otherwise as tf32x3 (about fp32 accuracy).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from fastmtt.kernels.registry import Launch, compile_specs, meta_tensor

from fastmtt._dispatch import allows_tf32, interpreting

MAX_RANK = 128
DROPOUT_NONE, DROPOUT_INPUT, DROPOUT_OUTPUT = 0, 1, 2


@triton.jit
def _keep_mask(seed, rows, cols, mask_cols, dropout_p):
    """Dropout keep mask for a [rows, cols] tile of an [M, mask_cols] tensor: rand >= p."""
    offsets = rows[:, None].to(tl.int64) * mask_cols + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _lora_gemm_kernel(
    p_ptr, stride_pm, stride_pl,
    w_ptr, stride_wl, stride_wc,
    a_ptr, stride_al, stride_ar,
    b_ptr, stride_br, stride_bc,
    bias_ptr,
    out_ptr, stride_om, stride_oc,
    side_ptr,
    M, C, L, RANK, mask_cols,
    side_scale, lora_scale, dropout_p, seed,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, GROUP_M: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
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
    a_cols = a_ptr + offs_r[None, :] * stride_ar

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    side = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        p = tl.load(p_rows + offs_l.to(tl.int64)[None, :] * stride_pl, mask=row_ok[:, None] & l_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_l.to(tl.int64)[:, None] * stride_wl, mask=l_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_cols + offs_l.to(tl.int64)[:, None] * stride_al, mask=l_ok[:, None] & rank_ok[None, :], other=0.0)
        if UPCAST:
            p, w, a = p.to(tl.float32), w.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(p, w, acc, input_precision=FP32_PRECISION)
        p_lora = p.to(a.dtype)
        if DROPOUT == 1:
            keep = _keep_mask(seed, offs_m, offs_l, mask_cols, dropout_p)
            p_lora = tl.where(keep, p_lora, 0.0)
        side = tl.dot(p_lora, a, side, input_precision=FP32_PRECISION)

    side = side * side_scale
    b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_c.to(tl.int64)[None, :] * stride_bc,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    side_rounded = side.to(side_ptr.dtype.element_ty)
    if pid_c == 0:
        tl.store(side_ptr + offs_m.to(tl.int64)[:, None] * RANK + offs_r[None, :], side_rounded,
                     mask=row_ok[:, None] & rank_ok[None, :])
    if UPCAST:
        side_rounded = side_rounded.to(tl.float32)
    lora = tl.dot(side_rounded.to(b.dtype), b, input_precision=FP32_PRECISION) * lora_scale
    if DROPOUT == 2:
        keep = _keep_mask(seed, offs_m, offs_c, mask_cols, dropout_p)
        lora = tl.where(keep, lora, 0.0)
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
    M, C, RANK, rows_per_split, mask_cols,
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
            p = tl.where(_keep_mask(seed, offs_m, offs_c, mask_cols, dropout_p), p, 0.0)
        acc = tl.dot(tl.trans(g), p, acc, input_precision=FP32_PRECISION)
    out = out_ptr + split.to(tl.int64) * RANK * C + offs_r[:, None] * C + offs_c[None, :]
    tl.store(out, acc * scale, mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, offs_m, offs_k, K, dropout_p)
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


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gemm_blocks(M: int, C: int, L: int, R: int, dtype: torch.dtype, lora_dtype: torch.dtype, dropout: int):
    """(BLOCK_M, BLOCK_C, BLOCK_L, num_warps, num_stages). The interpreter takes whole (small) matrices.
    On a GPU the tiles leave room for the [BLOCK_M, R] side accumulator and the in-register dropout
    mask (a [BLOCK_M, BLOCK_L] tile on the input, [BLOCK_M, BLOCK_C] on the output)."""
    if interpreting():
        return (min(128, triton.next_power_of_2(max(M, 16))), triton.next_power_of_2(max(C, 16)),
                triton.next_power_of_2(max(L, 16)), 1, 1)
    if torch.float32 in (dtype, lora_dtype):  # tf32x3 dots hold more registers: 32-row tiles
        return 32, (128 if R <= 64 else 64), 32, 8, 3
    block_c = 64 if R > 64 or dropout == DROPOUT_OUTPUT else 128
    block_l = 32 if dropout == DROPOUT_INPUT else 64
    return 64, block_c, block_l, 8, 3


def _weight_grad_tiles(R: int, lora_dtype: torch.dtype):
    """(BLOCK_M, BLOCK_C, num_warps) of the weight-gradient kernel on a GPU."""
    return 32, (128 if R <= 64 and lora_dtype != torch.float32 else 64), 8


def _weight_grad_blocks(M: int, C: int, R: int, lora_dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_C, num_warps, row splits): about two programs per SM on a GPU."""
    if interpreting():
        return triton.next_power_of_2(max(M, 16)), triton.next_power_of_2(max(C, 16)), 1, 1
    block_m, block_c, num_warps = _weight_grad_tiles(R, lora_dtype)
    tiles_c = triton.cdiv(C, block_c)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(2 * _sm_count(device.index or 0), tiles_c)))
    return block_m, block_c, num_warps, splits


def _gemm_launch(p, w_mat, a_mat, b_mat, bias, out, side, *, side_scale, lora_scale, dropout, dropout_p, seed,
                 mask_cols, fp32_precision=None) -> Launch:
    """The fused GEMM: out = p w_mat + bias + lora_scale * D_out (side_scale * (D_in p) a_mat) b_mat."""
    M, L = p.shape
    C = w_mat.shape[1]
    rank = a_mat.shape[1]
    R = _padded_rank(rank)
    block_m, block_c, block_l, num_warps, num_stages = _gemm_blocks(M, C, L, R, p.dtype, a_mat.dtype, dropout)
    args = dict(p_ptr=p, stride_pm=p.stride(0), stride_pl=p.stride(1),
                w_ptr=w_mat, stride_wl=w_mat.stride(0), stride_wc=w_mat.stride(1),
                a_ptr=a_mat, stride_al=a_mat.stride(0), stride_ar=a_mat.stride(1),
                b_ptr=b_mat, stride_br=b_mat.stride(0), stride_bc=b_mat.stride(1),
                bias_ptr=bias if bias is not None else out,
                out_ptr=out, stride_om=out.stride(0), stride_oc=out.stride(1),
                side_ptr=side, M=M, C=C, L=L, RANK=rank, mask_cols=mask_cols,
                side_scale=float(side_scale), lora_scale=float(lora_scale), dropout_p=float(dropout_p), seed=seed)
    constexprs = dict(R=R, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_L=block_l, GROUP_M=8, DROPOUT=dropout,
                      HAS_BIAS=bias is not None, UPCAST=interpreting(),
                      FP32_PRECISION=fp32_precision or _fp32_precision())
    return Launch(_lora_gemm_kernel, (triton.cdiv(M, block_m) * triton.cdiv(C, block_c),), args, constexprs,
                  num_warps, num_stages)


def _gemm(*args, **kwargs):
    _gemm_launch(*args, **kwargs).run()


def _weight_grad_launch(g, p, partial, rows_per_split, block_m, block_c, num_warps, *, scale, dropout, dropout_p,
                        seed) -> Launch:
    M, C = p.shape
    rank = g.shape[1]
    args = dict(g_ptr=g, p_ptr=p, stride_pm=p.stride(0), stride_pc=p.stride(1), out_ptr=partial, M=M, C=C,
                RANK=rank, rows_per_split=rows_per_split, mask_cols=C, scale=float(scale),
                dropout_p=float(dropout_p), seed=seed)
    constexprs = dict(R=_padded_rank(rank), BLOCK_M=block_m, BLOCK_C=block_c, DROPOUT=dropout,
                      UPCAST=interpreting(), FP32_PRECISION=_fp32_precision())
    return Launch(_lora_weight_grad_kernel, (triton.cdiv(C, block_c), partial.shape[0]), args, constexprs,
                  num_warps)


def _weight_grad(g, p, *, scale, dropout, dropout_p, seed):
    """s * g^T (D p): g [M, r] (adapter dtype), p [M, C] -> [r, C] fp32, summed over row splits."""
    M, C = p.shape
    block_m, block_c, num_warps, splits = _weight_grad_blocks(M, C, _padded_rank(g.shape[1]), g.dtype, p.device)
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty(splits, g.shape[1], C, dtype=torch.float32, device=p.device)
    _weight_grad_launch(g, p, partial, rows_per_split, block_m, block_c, num_warps, scale=scale, dropout=dropout,
                        dropout_p=dropout_p, seed=seed).run()
    return partial[0] if splits == 1 else partial.sum(0)


def draw_dropout_seed() -> int:
    """Seed for the in-kernel dropout mask, drawn from torch's default CPU generator (so
    torch.manual_seed makes runs reproducible)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def lora_forward_triton(x, weight, lora_A, lora_B, bias, scaling, dropout_p):
    """x [M, K], weight [N, K] (x's dtype), lora_A [r, K], lora_B [N, r] -> (y [M, N] in x's dtype,
    saved tensors (x, xa = drop(x) A^T [M, r] in the adapters' dtype), the dropout seed)."""
    seed = draw_dropout_seed() if dropout_p > 0 else 0
    M, K = x.shape
    y = torch.empty(M, weight.shape[0], dtype=x.dtype, device=x.device)
    xa = torch.empty(M, lora_A.shape[0], dtype=lora_A.dtype, device=x.device)
    _gemm(x, weight.t(), lora_A.t(), lora_B.t(), bias, y, xa,
          side_scale=1.0 / (1.0 - dropout_p), lora_scale=scaling,
          dropout=DROPOUT_INPUT if dropout_p > 0 else DROPOUT_NONE, dropout_p=dropout_p, seed=seed, mask_cols=K)
    return y, (x, xa), seed


def lora_backward_triton(dy, saved, seed, weight, lora_A, lora_B, scaling, dropout_p, needs):
    """Gradients (dx, dA, dB) for the outputs flagged in `needs` = (x, lora_A, lora_B); None elsewhere.
    saved, seed: what lora_forward_triton returned (the mask is regenerated from the seed).

    dx = dy W + s D (dy B) A / (1 - p)   (one fused launch, which also yields g = dy B)
    dA = s g^T D x / (1 - p),  dB = s dy^T xa   (one launch each, over row splits).
    """
    need_dx, need_dA, need_dB = needs
    x, xa = saved
    M, K = x.shape
    keep_scale = 1.0 / (1.0 - dropout_p)
    dropout = dropout_p > 0
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = g = dA = dB = None
    if need_dx or need_dA:
        g = torch.empty(M, lora_A.shape[0], dtype=lora_A.dtype, device=x.device)
        if need_dx:
            dx = torch.empty(M, K, dtype=x.dtype, device=x.device)
            _gemm(dy, weight, lora_B, lora_A, None, dx, g, side_scale=1.0, lora_scale=scaling * keep_scale,
                  dropout=DROPOUT_OUTPUT if dropout else DROPOUT_NONE, dropout_p=dropout_p, seed=seed, mask_cols=K)
        else:
            torch.matmul(dy.to(lora_B.dtype), lora_B, out=g)
    if need_dA:
        dA = _weight_grad(g, x, scale=scaling * keep_scale, dropout=dropout, dropout_p=dropout_p, seed=seed)
        dA = dA.to(lora_A.dtype)
    if need_dB:
        dB = _weight_grad(xa, dy, scale=scaling, dropout=False, dropout_p=0.0, seed=0).t().contiguous()
        dB = dB.to(lora_B.dtype)
    return dx, dA, dB


def dropout_mask_triton(shape, dropout_p, seed, device):
    """The keep mask (bool [M, K]) that the kernels use for (seed, dropout_p); for tests and inspection."""
    M, K = shape
    out = torch.empty(M, K, dtype=torch.int8, device=device)
    block = 64 if not interpreting() else triton.next_power_of_2(max(M, K, 16))
    _dropout_mask_kernel[(triton.cdiv(M, block), triton.cdiv(K, block))](
        out, M, K, float(dropout_p), seed, BLOCK_M=block, BLOCK_K=block)
    return out.bool()


@compile_specs
def _specs():
    """The GEMM's forward and dx roles with dropout over the dtype pairs (input, adapters), flag and
    rank variants on bf16, tf32, the weight-gradient kernel per adapter dtype, and the mask kernel, at
    M = K = N = 4096 (tiles as chosen at launch)."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    size = 4096

    def gemm(x_dt, a_dt, role, dropout, has_bias, rank=64, fp32_precision="tf32x3"):
        x_dtype, a_dtype = dtypes[x_dt], dtypes[a_dt]
        p, w_mat = meta_tensor(size, size, dtype=x_dtype), meta_tensor(size, size, dtype=x_dtype)
        a_mat, b_mat = meta_tensor(size, rank, dtype=a_dtype), meta_tensor(rank, size, dtype=a_dtype)
        out, side = meta_tensor(size, size, dtype=x_dtype), meta_tensor(size, rank, dtype=a_dtype)
        mode = (DROPOUT_INPUT if role == "forward" else DROPOUT_OUTPUT) if dropout else DROPOUT_NONE
        launch = _gemm_launch(p, w_mat, a_mat, b_mat, out[0] if has_bias else None, out, side, side_scale=1.1,
                              lora_scale=2.0, dropout=mode, dropout_p=0.1, seed=1234, mask_cols=size,
                              fp32_precision=fp32_precision)
        return launch.spec(f"lora_gemm[{role},x={x_dt},adapter={a_dt},R={launch.constexprs['R']},"
                           f"dropout={int(dropout)},bias={int(has_bias)},fp32={fp32_precision}]")

    def weight_grad(x_dt, a_dt, dropout):
        g, p = meta_tensor(size, 64, dtype=dtypes[a_dt]), meta_tensor(size, size, dtype=dtypes[x_dt])
        block_m, block_c, num_warps = _weight_grad_tiles(64, dtypes[a_dt])
        partial = meta_tensor(4, 64, size, dtype=torch.float32)
        launch = _weight_grad_launch(g, p, partial, size // 4, block_m, block_c, num_warps, scale=2.0,
                                     dropout=dropout, dropout_p=0.1, seed=1234)
        return launch.spec(f"lora_weight_grad[x={x_dt},adapter={a_dt},dropout={int(dropout)}]")

    for x_dt, a_dt in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32")):
        yield gemm(x_dt, a_dt, "forward", True, True)
    for x_dt, a_dt in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")):
        yield gemm(x_dt, a_dt, "dx", True, False)
    yield gemm("bf16", "bf16", "forward", False, False, rank=16)
    yield gemm("fp16", "fp16", "dx", False, False, rank=128)
    yield gemm("bf16", "fp32", "forward", True, True, rank=128)
    yield gemm("fp32", "fp32", "forward", False, True, fp32_precision="tf32")
    yield weight_grad("bf16", "bf16", True)
    yield weight_grad("fp16", "fp16", False)
    yield weight_grad("bf16", "fp32", True)
    mask = Launch(_dropout_mask_kernel, (64, 64), dict(out_ptr=meta_tensor(size, size, dtype=torch.int8), M=size,
                                                         K=size, dropout_p=0.1, seed=1234),
                  dict(BLOCK_M=64, BLOCK_K=64))
    yield mask.spec("lora_dropout_mask")
