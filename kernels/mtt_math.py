"""The MTT math shared by every kernel: online statistics, the divergences, the partials layout.

Tiles are [BLOCK_N rows, BLOCK_V columns]. Exponentials run in base 2 on logits scaled by scale2 =
log2(e) / T (one fused multiply-add per exponent); running maxima and sums are kept in those units and
the log-normalizers converted back to nats (docs: mtt-math, "One streaming pass").

Two kinds of tiles: a tile holding a label or columns past the range goes through the masked helpers
(`accumulate_tile`, `tile_gradient`); every other tile skips all masks and label tests
(`accumulate_logits`, `logit_gradient`, with the tile itself as its kept columns).

Partial statistics over a vocabulary range and the finalized row statistics are laid out as
fastmtt/partials.py defines (in nats), which also merges ranges and finalizes them.

A divergence is one id (FORWARD_KL, REVERSE_KL) with branches in `divergence_terms` (accumulate),
`divergence_rescale`, `divergence_value` (finalize), `gradient_constants` and `logit_gradient`. A new
divergence adds a branch to each, its torch counterpart in fastmtt/pytorch/divergences.py and its
definition in fastmtt/reference.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastmtt import partials as P

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLT_MAX = tl.constexpr(3.4028234663852886e38)

FORWARD_KL, REVERSE_KL = tl.constexpr(0), tl.constexpr(1)
DIVERGENCE_IDS = {"forward": FORWARD_KL.value, "reverse": REVERSE_KL.value}

# Rows of the partials block and of the finalized statistics block (constexpr so kernels index with them).
P_M_Z, P_S_Z, P_M_R, P_S_R, P_M_B, P_S_B, P_W, P_Z_LABEL, P_B_LABEL, P_LABEL_FOUND = (
    tl.constexpr(i) for i in (P.M_Z, P.S_Z, P.M_R, P.S_R, P.M_B, P.S_B, P.W, P.Z_LABEL, P.B_LABEL, P.LABEL_FOUND))
S_LSE, S_Z, S_B, S_KL, S_CE = (tl.constexpr(i) for i in (P.LSE, P.Z_LSE, P.B_LSE, P.KL, P.CE))
N_PARTIALS, N_STATS = tl.constexpr(P.N_PARTIALS), tl.constexpr(P.N_STATS)


@triton.jit
def online_update(m, s, x, scale2):
    """Merge the tile x * scale2 ([BLOCK_N, BLOCK_V], base-2 units) into per-row running (max m, sum of
    exp2(. - m) s); -inf entries count for 0. Returns (m, s, exp2(x * scale2 - m) of the tile, rescale
    factor of the old sum). As scale2 > 0, max(x) * scale2 is the scaled tile's max."""
    m_new = tl.maximum(m, tl.max(x, 1) * scale2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2(x * scale2 - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    return m_new, s * alpha + tl.sum(e, 1), e, alpha


@triton.jit
def log_normalizer(m2, s):
    """ln of sum exp: (m2 + log2 s) * ln 2 from base-2 running statistics; -inf for an empty row."""
    return tl.where(s == 0.0, float("-inf"), (m2 + tl.log2(s)) * LN2)


@triton.jit
def logaddexp(a, b):
    hi = tl.maximum(a, b)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return hi_safe + tl.log(tl.exp(a - hi_safe) + tl.exp(b - hi_safe))


@triton.jit
def divergence_terms(e_z, e_b, z, b, DIVERGENCE: tl.constexpr):
    """Accumulator terms per entry in logit units (the caller scales their sum to base 2): exp of the
    weighting side times the logit difference, (b - z) for forward KL (weighted by the base), (z - b) for
    reverse KL (weighted by the adapted side). A term of weight 0 is 0, never 0 * inf: its difference is
    -inf or NaN (-inf - -inf), which the NaN-ignoring max turns finite."""
    if DIVERGENCE == REVERSE_KL:
        terms = e_z * tl.maximum(z - b, -FLT_MAX)
    else:
        terms = e_b * tl.maximum(b - z, -FLT_MAX)
    return terms


@triton.jit
def divergence_rescale(alpha_z, alpha_b, DIVERGENCE: tl.constexpr):
    """The factor that rescales the accumulator when its weighting side's running max grows."""
    if DIVERGENCE == REVERSE_KL:
        alpha = alpha_z
    else:
        alpha = alpha_b
    return alpha


@triton.jit
def divergence_value(w2, s_z, s_b, z_lse, b_lse, b_label, DIVERGENCE: tl.constexpr):
    """The divergence (nats) from the accumulator w2 (base-2 units) and the sums and log-normalizers:
    0 when the base (reverse: either side) has no mass outside the target, +inf (forward) when only the
    adapted side has none; NaN at the base's target logit poisons the row."""
    if DIVERGENCE == REVERSE_KL:
        value = tl.where((s_b == 0.0) | (s_z == 0.0), 0.0, w2 / s_z * LN2 - z_lse + b_lse)
    else:
        value = tl.where(s_b == 0.0, 0.0, tl.where(s_z == 0.0, float("inf"), w2 / s_b * LN2 - b_lse + z_lse))
    return tl.where(b_label != b_label, float("nan"), value)


@triton.jit
def row_statistics(m_z, s_z, m_r, s_r, m_b, s_b, w2, z_label, b_label, label_found,
                   HAS_KL: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
                   MASK_TARGET: tl.constexpr):
    """(LSE, Z', B', D, CE) per row from the statistics of the whole vocabulary (one range). LSE: all
    columns at T = 1; Z', B': kept columns of z/T and b/T. A label found nowhere makes the row NaN."""
    z_lse = log_normalizer(m_z, s_z)
    if UNIT_TEMPERATURE:
        if MASK_TARGET:
            lse = logaddexp(z_lse, z_label)
        else:
            lse = z_lse
    else:
        lse = log_normalizer(m_r, s_r)
    lse = tl.where(label_found > 0, lse, float("nan"))
    b_lse = tl.full(lse.shape, float("-inf"), tl.float32)
    value = tl.zeros(lse.shape, tl.float32)
    if HAS_KL:
        b_lse = log_normalizer(m_b, s_b)
        value = divergence_value(w2, s_z, s_b, z_lse, b_lse, b_label, DIVERGENCE)
    return lse, z_lse, b_lse, value, lse - z_label


@triton.jit
def accumulate_logits(z, zk, bk, scale2, m_z, s_z, m_r, s_r, m_b, s_b, w2, HAS_KL: tl.constexpr,
                      DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr):
    """Merge logit tiles [BLOCK_N, BLOCK_V] (fp32, nats) into the running statistics: z every column of
    the range (CE at T != 1), zk and bk the kept columns; -inf elsewhere. A tile without labels or columns
    past the range passes its z, z, b as they are."""
    if not UNIT_TEMPERATURE:
        m_r, s_r, _e, _a = online_update(m_r, s_r, z, LOG2E)
    m_z, s_z, e_z, alpha_z = online_update(m_z, s_z, zk, scale2)
    if HAS_KL:
        m_b, s_b, e_b, alpha_b = online_update(m_b, s_b, bk, scale2)
        w2 = w2 * divergence_rescale(alpha_z, alpha_b, DIVERGENCE) + scale2 * tl.sum(
            divergence_terms(e_z, e_b, zk, bk, DIVERGENCE), 1)
    return m_z, s_z, m_r, s_r, m_b, s_b, w2


@triton.jit
def accumulate_tile(z, b, col_mask, is_label, scale2, m_z, s_z, m_r, s_r, m_b, s_b, w2, z_label, b_label,
                    HAS_KL: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
                    MASK_TARGET: tl.constexpr):
    """`accumulate_logits` on a tile that may hold labels or columns past the range (their values may be
    junk), also summing the label's logits. col_mask [BLOCK_V]: columns inside the range; is_label
    [BLOCK_N, BLOCK_V]: the label's column; scale2 = log2(e) / T."""
    is_label = is_label & col_mask[None, :]  # a label beyond the range may still fall inside the last tile
    z_label += tl.sum(tl.where(is_label, z, 0.0), 1)
    if HAS_KL:
        b_label += tl.sum(tl.where(is_label, b, 0.0), 1)
    kept = kept_columns(col_mask, is_label, MASK_TARGET)
    m_z, s_z, m_r, s_r, m_b, s_b, w2 = accumulate_logits(
        tl.where(col_mask[None, :], z, float("-inf")), tl.where(kept, z, float("-inf")),
        tl.where(kept, b, float("-inf")), scale2, m_z, s_z, m_r, s_r, m_b, s_b, w2, HAS_KL, DIVERGENCE,
        UNIT_TEMPERATURE)
    return m_z, s_z, m_r, s_r, m_b, s_b, w2, z_label, b_label


@triton.jit
def gradient_constants(lse, z_lse, b_lse, value, scale, inv_t, kl_weight, ce_weight, DIVERGENCE: tl.constexpr,
                       UNIT_TEMPERATURE: tl.constexpr):
    """Per-row constants of `logit_gradient` from the row statistics (nats) and scale [BLOCK_N], the
    gradient's factor: LSE, Z', B' in base 2 (lse2, zc2, bc2; an empty side's -inf as 0); soft = scale *
    ce_weight * exp(Z' - LSE) at T = 1 (on kept columns softmax = q * exp(Z' - LSE), so one exponential
    serves both), scale * ce_weight otherwise; kl = scale * lam T^2 / T, 0 where D does not vary (a side
    without mass, or D = +inf); shift = B' - Z' - D (reverse KL)."""
    z_empty = z_lse == float("-inf")
    b_empty = b_lse == float("-inf")
    constant = z_empty | b_empty | (value == float("inf"))
    lse2 = lse * LOG2E
    zc2 = tl.where(z_empty, 0.0, z_lse * LOG2E)
    bc2 = tl.where(b_empty, 0.0, b_lse * LOG2E)
    soft = scale * ce_weight
    if UNIT_TEMPERATURE:
        soft = soft * tl.exp2(z_lse * LOG2E - lse2)
    kl = tl.where(constant, 0.0, scale * (kl_weight * inv_t))
    shift = tl.zeros_like(kl)
    if DIVERGENCE == REVERSE_KL:
        shift = tl.where(constant, 0.0, b_lse - z_lse - value)
    return lse2, zc2, bc2, soft, kl, shift


@triton.jit
def logit_gradient(z, zk, bk, scale2, inv_t, lse2, zc2, bc2, soft, kl, shift, KL_GRAD: tl.constexpr,
                   DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr):
    """scale * (softmax(z) + lam T^2 dD/dz) on a tile, without the label's one-hot (fp32, natural units;
    per-row constants from `gradient_constants`): z every column, zk and bk the kept columns, -inf
    elsewhere. With q = exp(z/T - Z') and p = exp(b/T - B'): T dD/dz = q - p (forward KL), q (log q -
    log p - D) (reverse). At T = 1 q also gives the softmax: two exponentials (forward), one (reverse)."""
    q = tl.exp2(zk * scale2 - zc2[:, None])
    if UNIT_TEMPERATURE:
        softmax = q * soft[:, None]
    else:
        softmax = tl.exp2(z * LOG2E - lse2[:, None]) * soft[:, None]
    if KL_GRAD and DIVERGENCE == REVERSE_KL:
        qk = q * kl[:, None]
        grad = tl.where(qk == 0.0, softmax, softmax + qk * ((zk - bk) * inv_t + shift[:, None]))
    elif KL_GRAD:
        p = tl.exp2(bk * scale2 - bc2[:, None])
        if UNIT_TEMPERATURE:  # q (soft + kl) - p kl: no separate softmax term
            grad = q * (soft + kl)[:, None] - p * kl[:, None]
        else:
            grad = softmax + (q - p) * kl[:, None]
    else:
        grad = softmax
    return grad


@triton.jit
def tile_gradient(z, b, col_mask, is_label, ce_scale, scale2, inv_t, lse2, zc2, bc2, soft, kl, shift,
                  KL_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
                  MASK_TARGET: tl.constexpr):
    """`logit_gradient` with the label's one-hot times ce_scale (scale * ce_weight), on a tile that may hold
    labels or columns past the range (their values are junk). At T = 1 a masked label is no kept column:
    its softmax takes an exponential of its own."""
    is_label = is_label & col_mask[None, :]
    kept = kept_columns(col_mask, is_label, MASK_TARGET)
    grad = logit_gradient(z, tl.where(kept, z, float("-inf")), tl.where(kept, b, float("-inf")), scale2, inv_t,
                          lse2, zc2, bc2, soft, kl, shift, KL_GRAD, DIVERGENCE, UNIT_TEMPERATURE)
    if UNIT_TEMPERATURE and MASK_TARGET:
        label_term = ce_scale[:, None] * (tl.exp2(z * LOG2E - lse2[:, None]) - 1.0)
    else:
        label_term = tl.zeros_like(grad) - ce_scale[:, None]
    return tl.where(is_label, grad + label_term, grad)


@triton.jit
def kept_columns(col_mask, is_label, MASK_TARGET: tl.constexpr):
    """[BLOCK_N, BLOCK_V] mask of the columns inside the divergence."""
    if MASK_TARGET:
        kept = col_mask[None, :] & ~is_label
    else:
        kept = col_mask[None, :] & (is_label | ~is_label)
    return kept


@triton.jit
def store_partials(ptr, n_rows, rows, mask, m_z, s_z, m_r, s_r, m_b, s_b, w2, z_label, b_label, found):
    """Write a range's partials ([N_PARTIALS, n_rows] at ptr, nats) from base-2 running statistics."""
    tl.store(ptr + P_M_Z * n_rows + rows, m_z * LN2, mask=mask)
    tl.store(ptr + P_S_Z * n_rows + rows, s_z, mask=mask)
    tl.store(ptr + P_M_R * n_rows + rows, m_r * LN2, mask=mask)
    tl.store(ptr + P_S_R * n_rows + rows, s_r, mask=mask)
    tl.store(ptr + P_M_B * n_rows + rows, m_b * LN2, mask=mask)
    tl.store(ptr + P_S_B * n_rows + rows, s_b, mask=mask)
    tl.store(ptr + P_W * n_rows + rows, w2 * LN2, mask=mask)
    tl.store(ptr + P_Z_LABEL * n_rows + rows, z_label, mask=mask)
    tl.store(ptr + P_B_LABEL * n_rows + rows, b_label, mask=mask)
    tl.store(ptr + P_LABEL_FOUND * n_rows + rows, found.to(tl.float32), mask=mask)


@triton.jit
def store_statistics(ptr, n_rows, rows, mask, valid, lse, z_lse, b_lse, value, ce):
    """Write the row statistics ([N_STATS, n_rows] at ptr); ignored rows get 0 everywhere."""
    tl.store(ptr + S_LSE * n_rows + rows, tl.where(valid, lse, 0.0), mask=mask)
    tl.store(ptr + S_Z * n_rows + rows, tl.where(valid, z_lse, 0.0), mask=mask)
    tl.store(ptr + S_B * n_rows + rows, tl.where(valid, b_lse, 0.0), mask=mask)
    tl.store(ptr + S_KL * n_rows + rows, tl.where(valid, value, 0.0), mask=mask)
    tl.store(ptr + S_CE * n_rows + rows, tl.where(valid, ce, 0.0), mask=mask)


@triton.jit
def load_statistics(ptr, n_rows, rows, mask):
    """(LSE, Z', B', D) of the rows from a statistics block."""
    lse = tl.load(ptr + S_LSE * n_rows + rows, mask=mask, other=0.0)
    z_lse = tl.load(ptr + S_Z * n_rows + rows, mask=mask, other=0.0)
    b_lse = tl.load(ptr + S_B * n_rows + rows, mask=mask, other=0.0)
    value = tl.load(ptr + S_KL * n_rows + rows, mask=mask, other=0.0)
    return lse, z_lse, b_lse, value
