"""MTT row kernel: per row CE, target-masked KL and, in the same launch, dL/dlogits.

One program per row. Pass 1 streams the row in blocks and keeps fp32 online statistics (max and
rescaled sum of exp) for the masked adapted and base distributions at temperature T, the KL
accumulator and, when T != 1, the raw-logit LSE for CE. Pass 2 rereads the row and writes the
gradient. See docs/mtt-math ("One streaming pass over the vocabulary").
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastmtt._dispatch import interpreting

NEG_INF = float("-inf")


@triton.jit
def _online_update(m, s, x):
    """Merge block `x` into the running (max m, sum of exp(. - m) s); -inf entries count for 0."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(x - m_safe)
    alpha = tl.exp(m - m_safe)
    return m_new, s * alpha + tl.sum(e, 0), e, alpha


@triton.jit
def log_normalizer(m, s):
    """m + log(s), -inf for an empty (all -inf) row."""
    return tl.where(s == 0.0, float("-inf"), m + tl.log(s))


@triton.jit
def lse_with_label(masked_lse, z_label):
    """LSE over all columns at T = 1 from Z' (target masked) and the target logit: logaddexp."""
    hi = tl.maximum(masked_lse, z_label)
    return hi + tl.log(tl.exp(masked_lse - hi) + tl.exp(z_label - hi))


@triton.jit
def kl_summands(e_z, e_b, zt, bt, REVERSE: tl.constexpr):
    """Terms of the KL accumulator w: exp(. - m) of the weighting side times the log-ratio
    (b - z)/T (forward) or (z - b)/T (reverse); a term of weight 0 is 0, never 0 * inf."""
    if REVERSE:
        terms = tl.where(e_z == 0.0, 0.0, e_z * (zt - bt))
    else:
        terms = tl.where(e_b == 0.0, 0.0, e_b * (bt - zt))
    return terms


@triton.jit
def masked_kl(w, s_z, s_b, z_lse, b_lse, b_label, REVERSE: tl.constexpr):
    """KL from the online statistics (docs: mtt-math): 0 when the base (or, reverse, the adapted side)
    has no mass outside the target, +inf (forward) when only the adapted side has none; NaN at the
    base's target logit poisons the row."""
    if REVERSE:
        kl = tl.where((s_b == 0.0) | (s_z == 0.0), 0.0, w / s_z - z_lse + b_lse)
    else:
        kl = tl.where(s_b == 0.0, 0.0, tl.where(s_z == 0.0, float("inf"), w / s_b - b_lse + z_lse))
    return tl.where(b_label != b_label, float("nan"), kl)


@triton.jit
def kl_gradient(log_q, log_p, kl, constant, REVERSE: tl.constexpr):
    """T * dKL/dz off the target: q - p (forward) or q (log q - log p - KL) (reverse); 0 where
    `constant` (a side without mass outside the target, or KL = +inf: KL is constant there)."""
    q = tl.exp(log_q)
    if REVERSE:
        grad = tl.where(q == 0.0, 0.0, q * (log_q - log_p - kl))
    else:
        grad = q - tl.exp(log_p)
    return tl.where(constant, 0.0, grad)


@triton.jit
def _mtt_loss_kernel(
    logits_ptr, logits_stride,
    base_ptr, base_stride,
    labels_ptr,
    grad_ptr, grad_stride,
    ce_ptr, kl_ptr,
    scale_ptr,
    n_cols, ignore_index,
    lam_t2, inv_t,
    BLOCK_V: tl.constexpr,
    REVERSE: tl.constexpr,
    UNIT_TEMPERATURE: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_GRAD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    base_row = base_ptr + row * base_stride
    grad_row = grad_ptr + row * grad_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    offsets = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        tl.store(ce_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offsets
                tl.store(grad_row + cols, tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty),
                         mask=cols < n_cols)
        return

    # An out-of-range label is never used as an address: its row's loss becomes NaN.
    label_ok = (label >= 0) & (label < n_cols)
    z_label = tl.load(logits_row + label, mask=label_ok, other=float("nan")).to(tl.float32)

    m_z = float("-inf")  # masked adapted z/T
    s_z = 0.0
    m_r = float("-inf")  # raw z over all columns (CE at T != 1)
    s_r = 0.0
    m_b = float("-inf")  # masked base b/T
    s_b = 0.0
    w = 0.0  # sum over the weighting side of exp(. - m) * log-ratio
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        in_row = cols < n_cols
        keep = in_row & (cols != label)
        z = tl.load(logits_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        if UNIT_TEMPERATURE:
            zt = tl.where(keep, z, float("-inf"))
        else:
            zt = tl.where(keep, z * inv_t, float("-inf"))
            m_r, s_r, _e, _a = _online_update(m_r, s_r, z)
        m_z, s_z, e_z, alpha_z = _online_update(m_z, s_z, zt)
        if HAS_KL:
            b = tl.load(base_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            bt = tl.where(keep, b * inv_t, float("-inf"))
            m_b, s_b, e_b, alpha_b = _online_update(m_b, s_b, bt)
            w = w * (alpha_z if REVERSE else alpha_b) + tl.sum(kl_summands(e_z, e_b, zt, bt, REVERSE), 0)

    lse_masked = log_normalizer(m_z, s_z)  # Z'
    if UNIT_TEMPERATURE:
        lse = lse_with_label(lse_masked, z_label)
    else:
        lse = log_normalizer(m_r, s_r)
    lse = tl.where(label_ok, lse, float("nan"))
    tl.store(ce_ptr + row, lse - z_label)

    kl = 0.0
    base_lse = float("-inf")  # B'
    if HAS_KL:
        base_lse = log_normalizer(m_b, s_b)
        b_label = tl.load(base_row + label, mask=label_ok, other=0.0).to(tl.float32)
        kl = masked_kl(w, s_z, s_b, lse_masked, base_lse, b_label, REVERSE)
    tl.store(kl_ptr + row, kl)

    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr).to(tl.float32)
        lse_masked_safe = tl.where(s_z == 0.0, 0.0, lse_masked)
        base_lse_safe = tl.where(s_b == 0.0, 0.0, base_lse)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offsets
            in_row = cols < n_cols
            keep = in_row & (cols != label)
            z = tl.load(logits_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            if KL_GRAD:
                b = tl.load(base_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
                if UNIT_TEMPERATURE:
                    zt = tl.where(keep, z, float("-inf"))
                else:
                    zt = tl.where(keep, z * inv_t, float("-inf"))
                bt = tl.where(keep, b * inv_t, float("-inf"))
                constant = (s_b == 0.0) | (s_z == 0.0) | (kl == float("inf"))
                grad += lam_t2 * inv_t * kl_gradient(zt - lse_masked_safe, bt - base_lse_safe, kl, constant, REVERSE)
            tl.store(grad_row + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=in_row)


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). The interpreter's cost grows with block iterations, so it takes whole rows."""
    if interpreting():
        return triton.next_power_of_2(max(n_cols, 1)), 1
    block = min(4096, triton.next_power_of_2(max(n_cols, 16)))
    return block, 8 if block >= 2048 else 4


def mtt_rows_triton(logits, base_logits, labels, *, lam, temperature, reverse, ignore_index,
                    need_kl, grad_scale=None, grad_out=None):
    """Per-row (ce, kl) in fp32 for [N, V] logits; writes scale * dL_i/dlogits into `grad_out` if given.

    `grad_scale` is a 1-element tensor on the logits' device (1/divisor for mean). `grad_out` may be
    `logits` itself (in place). Rows must have unit column stride.
    """
    n_rows, n_cols = logits.shape
    ce = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    kl = torch.empty_like(ce)
    if n_rows == 0:
        return ce, kl
    compute_grad = grad_out is not None
    if not compute_grad:
        grad_out = ce.view(1, n_rows)  # never written; gives the kernel a valid pointer and dtype
    if grad_scale is None:
        grad_scale = torch.ones(1, dtype=torch.float32, device=logits.device)
    block, num_warps = _launch_config(n_cols)
    has_kl = need_kl or lam > 0
    _mtt_loss_kernel[(n_rows,)](
        logits, logits.stride(0),
        base_logits, base_logits.stride(0),
        labels,
        grad_out, grad_out.stride(0),
        ce, kl,
        grad_scale,
        n_cols, ignore_index,
        float(lam * temperature * temperature), float(1.0 / temperature),
        BLOCK_V=block,
        REVERSE=reverse,
        UNIT_TEMPERATURE=temperature == 1.0,
        HAS_KL=has_kl,
        KL_GRAD=lam > 0,
        COMPUTE_GRAD=compute_grad,
        num_warps=num_warps,
    )
    return ce, kl


def compile_specs():
    """Every specialization the dispatch can launch: all dtype pairs with every feature on, and every
    flag combination on fp32."""
    from fastmtt.apps.compile_check import KernelSpec

    dtypes = ("fp32", "fp16", "bf16")

    def spec(z_dtype, b_dtype, reverse, unit_t, has_kl, kl_grad, compute_grad):
        signature = {
            "logits_ptr": f"*{z_dtype}", "logits_stride": "i64",
            "base_ptr": f"*{b_dtype}", "base_stride": "i64",
            "labels_ptr": "*i64",
            "grad_ptr": f"*{z_dtype}", "grad_stride": "i64",
            "ce_ptr": "*fp32", "kl_ptr": "*fp32", "scale_ptr": "*fp32",
            "n_cols": "i32", "ignore_index": "i32", "lam_t2": "fp32", "inv_t": "fp32",
            "BLOCK_V": "constexpr", "REVERSE": "constexpr", "UNIT_TEMPERATURE": "constexpr",
            "HAS_KL": "constexpr", "KL_GRAD": "constexpr", "COMPUTE_GRAD": "constexpr",
        }
        constexprs = {"BLOCK_V": 4096, "REVERSE": reverse, "UNIT_TEMPERATURE": unit_t, "HAS_KL": has_kl,
                      "KL_GRAD": kl_grad, "COMPUTE_GRAD": compute_grad}
        label = (f"mtt_loss[logits={z_dtype},base={b_dtype},{'reverse' if reverse else 'forward'},"
                 f"T{'=1' if unit_t else '!=1'},kl={int(has_kl)},kl_grad={int(kl_grad)},grad={int(compute_grad)}]")
        return KernelSpec(label, _mtt_loss_kernel, signature, constexprs, num_warps=8)

    for z_dtype, b_dtype in itertools.product(dtypes, dtypes):
        for reverse in (False, True):
            yield spec(z_dtype, b_dtype, reverse, False, True, True, True)
    kl_modes = ((False, False), (True, False), (True, True))
    for unit_t, (has_kl, kl_grad), compute_grad in itertools.product((True, False), kl_modes, (True, False)):
        if kl_grad and not compute_grad:
            continue
        yield spec("fp32", "fp32", False, unit_t, has_kl, kl_grad, compute_grad)
