"""The MTT math shared by every kernel: online statistics, the divergences, the partials layout.

Tiles are [BLOCK_N rows, BLOCK_V columns]. Exponentials run in base 2: a kernel scales its logits by
log2(e) / T once (`x2 = z * scale2`), keeps running maxima and sums in those units and converts the
log-normalizers back to nats (docs: mtt-math, "One streaming pass").

Partial statistics over a vocabulary range and the finalized row statistics are laid out as
fastmtt/partials.py defines (in nats), which also merges ranges and finalizes them.

A divergence is one id (FORWARD_KL, REVERSE_KL) with three helpers: `divergence_terms` (accumulate),
`divergence_value` (finalize) and `divergence_gradient`. A new divergence adds a branch to each, its
torch counterpart in fastmtt/pytorch/divergences.py and its definition in fastmtt/reference.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastmtt import partials as P

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

FORWARD_KL, REVERSE_KL = tl.constexpr(0), tl.constexpr(1)
DIVERGENCE_IDS = {"forward": FORWARD_KL.value, "reverse": REVERSE_KL.value}

# Rows of the partials block and of the finalized statistics block (constexpr so kernels index with them).
P_M_Z, P_S_Z, P_M_R, P_S_R, P_M_B, P_S_B, P_W, P_Z_LABEL, P_B_LABEL, P_LABEL_FOUND = (
    tl.constexpr(i) for i in (P.M_Z, P.S_Z, P.M_R, P.S_R, P.M_B, P.S_B, P.W, P.Z_LABEL, P.B_LABEL, P.LABEL_FOUND))
S_LSE, S_Z, S_B, S_KL, S_CE = (tl.constexpr(i) for i in (P.LSE, P.Z_LSE, P.B_LSE, P.KL, P.CE))
N_PARTIALS, N_STATS = tl.constexpr(P.N_PARTIALS), tl.constexpr(P.N_STATS)


@triton.jit
def online_update(m, s, x2):
    """Merge tile x2 [BLOCK_N, BLOCK_V] (base-2 units) into per-row running (max m, sum of exp2(. - m) s);
    -inf entries count for 0. Returns (m, s, exp2(x2 - m) of the tile, rescale factor of the old sum)."""
    m_new = tl.maximum(m, tl.max(x2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2(x2 - m_safe[:, None])
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
def divergence_terms(e_z, e_b, z2, b2, DIVERGENCE: tl.constexpr):
    """Accumulator terms per entry (base-2 log-ratio units): exp of the weighting side times the log-ratio,
    (b - z) for forward KL (weighted by the base), (z - b) for reverse KL (weighted by the adapted side).
    A term of weight 0 is 0, never 0 * inf."""
    if DIVERGENCE == REVERSE_KL:
        terms = tl.where(e_z == 0.0, 0.0, e_z * (z2 - b2))
    else:
        terms = tl.where(e_b == 0.0, 0.0, e_b * (b2 - z2))
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
def divergence_gradient(log_q, log_p, value, constant, DIVERGENCE: tl.constexpr):
    """T * dD/dz on kept columns: q - p (forward KL) or q (log q - log p - KL) (reverse KL); 0 where
    `constant` (a side without mass, or D = +inf: D does not vary there)."""
    q = tl.exp(log_q)
    if DIVERGENCE == REVERSE_KL:
        grad = tl.where(q == 0.0, 0.0, q * (log_q - log_p - value))
    else:
        grad = q - tl.exp(log_p)
    return tl.where(constant, 0.0, grad)


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
def logit_gradient(z, b, kept, is_label, lse, z_lse, b_lse, value, inv_t, kl_weight,
                   KL_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr):
    """dL/dz on a tile (fp32, natural units): softmax(z) - onehot(label) + lam T^2 dD/dz. z, b [BN, BV];
    lse, z_lse, b_lse, value [BN] row statistics; kept: columns in the divergence."""
    grad = tl.exp(z - lse[:, None]) - tl.where(is_label, 1.0, 0.0)
    if KL_GRAD:
        z_empty = z_lse == float("-inf")
        b_empty = b_lse == float("-inf")
        constant = z_empty | b_empty | (value == float("inf"))
        log_q = tl.where(kept, z * inv_t, float("-inf")) - tl.where(z_empty, 0.0, z_lse)[:, None]
        log_p = tl.where(kept, b * inv_t, float("-inf")) - tl.where(b_empty, 0.0, b_lse)[:, None]
        grad += (kl_weight * inv_t) * divergence_gradient(log_q, log_p, value[:, None], constant[:, None],
                                                          DIVERGENCE)
    return grad


@triton.jit
def accumulate_tile(z, b, col_mask, is_label, scale2, m_z, s_z, m_r, s_r, m_b, s_b, w2, z_label, b_label,
                    HAS_KL: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
                    MASK_TARGET: tl.constexpr):
    """Merge the logit tiles z, b [BLOCK_N, BLOCK_V] (fp32, nats) into the running statistics. col_mask
    [BLOCK_V]: columns inside the range; is_label [BLOCK_N, BLOCK_V]: the label's column; scale2 =
    log2(e) / T."""
    is_label = is_label & col_mask[None, :]  # a label beyond the range may still fall inside the last tile
    z_label += tl.sum(tl.where(is_label, z, 0.0), 1)
    kept = kept_columns(col_mask, is_label, MASK_TARGET)
    if not UNIT_TEMPERATURE:
        m_r, s_r, _e, _a = online_update(m_r, s_r, tl.where(col_mask[None, :], z * LOG2E, float("-inf")))
    z2 = tl.where(kept, z * scale2, float("-inf"))
    m_z, s_z, e_z, alpha_z = online_update(m_z, s_z, z2)
    if HAS_KL:
        b_label += tl.sum(tl.where(is_label, b, 0.0), 1)
        b2 = tl.where(kept, b * scale2, float("-inf"))
        m_b, s_b, e_b, alpha_b = online_update(m_b, s_b, b2)
        w2 = w2 * divergence_rescale(alpha_z, alpha_b, DIVERGENCE) + tl.sum(
            divergence_terms(e_z, e_b, z2, b2, DIVERGENCE), 1)
    return m_z, s_z, m_r, s_r, m_b, s_b, w2, z_label, b_label


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
    """Write the row statistics ([N_STATS, n_rows] at ptr); ignored rows get loss terms 0."""
    tl.store(ptr + S_LSE * n_rows + rows, lse, mask=mask)
    tl.store(ptr + S_Z * n_rows + rows, z_lse, mask=mask)
    tl.store(ptr + S_B * n_rows + rows, b_lse, mask=mask)
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
