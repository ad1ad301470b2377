"""The MTT math shared by every kernel: online statistics, the divergences, the partials layout.

Tiles are [BLOCK_N rows, BLOCK_V columns]. Running maxima are raw logits and every sum is relative to
one (`reference`): exponentials run in base 2 on (x - R) * scale2, scale2 = log2(e) / T, and no
statistic is formed from absolute logits, so rows offset by -100 keep their digits (docs: mtt-math,
"One streaming pass"). The divergence accumulates its log-ratio terms and S_o - S_w directly, so a KL of
1e-7 between close distributions is not the difference of two O(1) numbers.

Two kinds of tiles: a tile holding a label or columns past the range goes through the masked helpers
(`accumulate_tile`, `tile_gradient`); every other tile skips all masks and label tests
(`accumulate_logits`, `logit_gradient`, with the tile itself as its kept columns).

Partial statistics over a vocabulary range and the finalized row statistics are laid out as
fastmtt/partials.py defines; fastmtt/pytorch/partials.py merges ranges and finalizes them.

A divergence is one id (FORWARD_KL, REVERSE_KL) with branches in `accumulate_logits` (which side weights
`divergence_update`), `divergence_value` (finalize), `gradient_constants` and `logit_gradient`. A new
divergence adds a branch to each, its torch counterpart in fastmtt/pytorch/divergences.py and its
definition in fastmtt/reference.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastmtt import partials as P

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

FORWARD_KL, REVERSE_KL = tl.constexpr(0), tl.constexpr(1)
DIVERGENCE_IDS = {"forward": FORWARD_KL.value, "reverse": REVERSE_KL.value}

# Rows of the partials block (P_) and of the finalized statistics block (STAT_), constexpr so kernels index
# with them; STAT_, not S_, which fastmtt/partials.py uses for sums (S_Z, S_B).
P_M_Z, P_S_Z, P_M_R, P_S_R, P_M_B, P_S_B, P_W, P_S_DIFF, P_Z_LABEL, P_B_LABEL, P_LABEL_FOUND = (
    tl.constexpr(i) for i in (P.M_Z, P.S_Z, P.M_R, P.S_R, P.M_B, P.S_B, P.W, P.S_DIFF, P.Z_LABEL, P.B_LABEL,
                              P.LABEL_FOUND))
STAT_REF, STAT_LSE, STAT_Z_REF, STAT_Z_LSE, STAT_B_REF, STAT_B_LSE, STAT_KL, STAT_CE = (
    tl.constexpr(i) for i in (P.REF, P.LSE, P.Z_REF, P.Z_LSE, P.B_REF, P.B_LSE, P.KL, P.CE))
N_PARTIALS, N_STATS = tl.constexpr(P.N_PARTIALS), tl.constexpr(P.N_STATS)


@triton.jit
def reference(m):
    """The reference of a running sum: its max, 0 while the row is empty (max -inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_update(m, s, x, scale2):
    """Merge the tile x ([BLOCK_N, BLOCK_V], raw logits) into per-row running (max m, sum of
    exp2((x - R) * scale2) s) with the reference R = `reference`(m); -inf entries count for 0. Returns
    (m, s, the tile's exp2((x - R) * scale2), its x - R, the factor alpha that moved the old sum)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    ref = reference(m_new)
    relative = x - ref[:, None]
    e = tl.exp2(relative * scale2)
    alpha = tl.exp2((m - ref) * scale2)
    return m_new, s * alpha + tl.sum(e, 1), e, relative, alpha


@triton.jit
def log_sum(s):
    """ln s of a running sum; -inf for an empty row."""
    return tl.where(s == 0.0, float("-inf"), tl.log2(s) * LN2)


@triton.jit
def expm1_small(t):
    """exp(t) - 1 for |t| <= 1/2 without cancellation (Taylor to t^9: relative error < 3e-10)."""
    r = 1.0 + t / 9.0
    r = 1.0 + t / 8.0 * r
    r = 1.0 + t / 7.0 * r
    r = 1.0 + t / 6.0 * r
    r = 1.0 + t / 5.0 * r
    r = 1.0 + t / 4.0 * r
    r = 1.0 + t / 3.0 * r
    r = 1.0 + t / 2.0 * r
    return t * r


@triton.jit
def log1p(y):
    """ln(1 + y) without cancellation: Taylor to y^13 for |y| < 1/4 (relative error < 6e-10), else ln."""
    small = tl.abs(y) < 0.25
    t = tl.where(small, y, 0.0)
    r = 1.0 / 13.0
    for k in tl.static_range(12, 0, -1):
        r = 1.0 / k - t * r
    return tl.where(small, t * r, tl.log(1.0 + y))


@triton.jit
def exp_difference(a_o, a_w, log_ratio):
    """a_o - a_w of two factors given also t = ln(a_o / a_w): a_w expm1(t) for |t| < 1/2, else the
    plain difference (no cancellation there)."""
    small = tl.abs(log_ratio) < 0.5
    return tl.where(small, a_w * expm1_small(tl.where(small, log_ratio, 0.0)), a_o - a_w)


@triton.jit
def divergence_update(w, d, mw_old, mw, sw_old, aw, ew, wr, mo_old, mo, ao, eo, orr, scale2):
    """Merge a tile into the divergence accumulators (fastmtt/partials.py): w = sum of the weighting side's
    e times (w - M_w) - (o - M_o), d = S_o - S_w, both first moved to the new references (the old terms
    gain move_o - move_w; S_o a_o - S_w a_w, the difference formed without cancellation). mw_old, mo_old,
    sw_old: the running statistics before the tile; aw, ao: their rescale factors; ew, eo, wr, orr: the
    tile's exponentials and logits relative to the new references."""
    move_w = reference(mw) - reference(mw_old)
    move_o = reference(mo) - reference(mo_old)
    w = (w + sw_old * (move_o - move_w)) * aw + tl.sum(tl.where(ew == 0.0, 0.0, ew * (wr - orr)), 1)
    moved = tl.where(sw_old == 0.0, 0.0, sw_old * exp_difference(ao, aw, (move_w - move_o) * scale2 * LN2))
    d = tl.where(mo_old == float("-inf"), -sw_old * aw, d * ao + moved) + tl.sum(eo - ew, 1)
    return w, d


@triton.jit
def _at_least_minus_one(y):
    """max(y, -1) with NaN kept (an explicit where: max's NaN semantics differ between GPU and interpreter)."""
    return tl.where(y < -1.0, -1.0, y)


@triton.jit
def divergence_value(w, d, s_z, s_b, inv_t, b_label, DIVERGENCE: tl.constexpr):
    """The divergence (nats), W / (T S_w) + log1p(D / S_w) with w the weighting side, clamped at 0 (a
    rounding below 0): 0 when the base (reverse: either side) has no mass outside the target, +inf
    (forward) when only the adapted side has none; NaN at the base's target logit poisons the row."""
    if DIVERGENCE == REVERSE_KL:
        s_w = tl.where(s_z == 0.0, 1.0, s_z)
        value = w * inv_t / s_w + log1p(_at_least_minus_one(d / s_w))
        value = tl.where((s_b == 0.0) | (s_z == 0.0), 0.0, tl.where(value < 0.0, 0.0, value))
    else:
        s_w = tl.where(s_b == 0.0, 1.0, s_b)
        value = w * inv_t / s_w + log1p(_at_least_minus_one(d / s_w))
        value = tl.where(s_b == 0.0, 0.0, tl.where(s_z == 0.0, float("inf"), tl.where(value < 0.0, 0.0, value)))
    return tl.where(b_label != b_label, float("nan"), value)


@triton.jit
def row_statistics(m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label, b_label, label_found, inv_t,
                   HAS_KL: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
                   MASK_TARGET: tl.constexpr):
    """(REF, LSE, Z_REF, Z_LSE, B_REF, B_LSE, D, CE) per row (fastmtt/partials.py) from the statistics of
    the whole vocabulary (one range). LSE: all columns at T = 1; Z_LSE, B_LSE: kept columns at T, each
    relative to its reference. A label found nowhere makes the row NaN."""
    z_ref = reference(m_z)
    z_lse = log_sum(s_z)
    if UNIT_TEMPERATURE:
        if MASK_TARGET:  # all columns: the kept ones and the label
            ref = reference(tl.maximum(m_z, z_label))
            kept = tl.where(s_z == 0.0, 0.0, s_z * tl.exp2((z_ref - ref) * LOG2E))
            lse = log_sum(kept + tl.exp2((z_label - ref) * LOG2E))
        else:
            ref = z_ref
            lse = z_lse
    else:
        ref = reference(m_r)
        lse = log_sum(s_r)
    lse = tl.where(label_found > 0, lse, float("nan"))
    b_ref = tl.zeros(lse.shape, tl.float32)
    b_lse = tl.full(lse.shape, float("-inf"), tl.float32)
    value = tl.zeros(lse.shape, tl.float32)
    if HAS_KL:
        b_ref = reference(m_b)
        b_lse = log_sum(s_b)
        value = divergence_value(w, d, s_z, s_b, inv_t, b_label, DIVERGENCE)
    return ref, lse, z_ref, z_lse, b_ref, b_lse, value, (ref - z_label) + lse


@triton.jit
def accumulate_logits(z, zk, bk, scale2, m_z, s_z, m_r, s_r, m_b, s_b, w, d, HAS_KL: tl.constexpr,
                      DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr):
    """Merge logit tiles [BLOCK_N, BLOCK_V] (fp32, raw) into the running statistics: z every column of
    the range (CE at T != 1), zk and bk the kept columns; -inf elsewhere. A tile without labels or columns
    past the range passes its z, z, b as they are."""
    if not UNIT_TEMPERATURE:
        m_r, s_r, _e, _x, _a = online_update(m_r, s_r, z, LOG2E)
    m_z_old, s_z_old, m_b_old, s_b_old = m_z, s_z, m_b, s_b
    m_z, s_z, e_z, zr, alpha_z = online_update(m_z, s_z, zk, scale2)
    if HAS_KL:
        m_b, s_b, e_b, br, alpha_b = online_update(m_b, s_b, bk, scale2)
        if DIVERGENCE == REVERSE_KL:
            w, d = divergence_update(w, d, m_z_old, m_z, s_z_old, alpha_z, e_z, zr, m_b_old, m_b, alpha_b, e_b, br,
                                     scale2)
        else:
            w, d = divergence_update(w, d, m_b_old, m_b, s_b_old, alpha_b, e_b, br, m_z_old, m_z, alpha_z, e_z, zr,
                                     scale2)
    return m_z, s_z, m_r, s_r, m_b, s_b, w, d


@triton.jit
def accumulate_tile(z, b, col_mask, is_label, scale2, m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label, b_label,
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
    m_z, s_z, m_r, s_r, m_b, s_b, w, d = accumulate_logits(
        tl.where(col_mask[None, :], z, float("-inf")), tl.where(kept, z, float("-inf")),
        tl.where(kept, b, float("-inf")), scale2, m_z, s_z, m_r, s_r, m_b, s_b, w, d, HAS_KL, DIVERGENCE,
        UNIT_TEMPERATURE)
    return m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label, b_label


@triton.jit
def row_ce_weight(ce_rows_ptr, rows, row_mask, ce_weight, BLOCK_N: tl.constexpr, CE_ROWS: tl.constexpr):
    """[BLOCK_N] CE weights: ce_weight, and with CE_ROWS 0 on the rows whose entry of ce_rows_ptr (int8 [N])
    is 0 (the divergence alone there)."""
    weight = tl.full([BLOCK_N], 1.0, tl.float32) * ce_weight
    if CE_ROWS:
        weight = tl.where(tl.load(ce_rows_ptr + rows, mask=row_mask, other=0) != 0, weight, 0.0)
    return weight


@triton.jit
def gradient_constants(ref, lse, z_ref, z_lse, b_lse, value, scale, inv_t, kl_weight, ce_weight,
                       DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr):
    """Per-row constants of `logit_gradient` from the row statistics (nats) and scale [BLOCK_N], the
    gradient's factor: LSE, Z_LSE, B_LSE in base 2 (lse2, zc2, bc2; an empty side's -inf as 0); soft =
    scale * ce_weight * exp(Z_REF + Z_LSE - REF - LSE) at T = 1 (on kept columns softmax = q times that,
    so one exponential serves both), scale * ce_weight otherwise; kl_coef = scale * lam T^2 / T, 0 where D
    does not vary (a side without mass, or D = +inf); shift = B_LSE - Z_LSE - D (reverse KL)."""
    z_empty = z_lse == float("-inf")
    b_empty = b_lse == float("-inf")
    constant = z_empty | b_empty | (value == float("inf"))
    lse2 = lse * LOG2E
    zc2 = tl.where(z_empty, 0.0, z_lse * LOG2E)
    bc2 = tl.where(b_empty, 0.0, b_lse * LOG2E)
    soft = scale * ce_weight
    if UNIT_TEMPERATURE:
        soft = soft * tl.exp2(((z_ref - ref) + (z_lse - lse)) * LOG2E)
    kl_coef = tl.where(constant, 0.0, scale * (kl_weight * inv_t))
    shift = tl.zeros_like(kl_coef)
    if DIVERGENCE == REVERSE_KL:
        shift = tl.where(constant, 0.0, b_lse - z_lse - value)
    return lse2, zc2, bc2, soft, kl_coef, shift


@triton.jit
def logit_gradient(z, zk, bk, scale2, inv_t, ref, z_ref, b_ref, lse2, zc2, bc2, soft, kl_coef, shift,
                   KL_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr):
    """scale * (softmax(z) + lam T^2 dD/dz) on a tile, without the label's one-hot (fp32, natural units;
    per-row references REF, Z_REF, B_REF and the constants of `gradient_constants`): z every column, zk
    and bk the kept columns, -inf elsewhere. With q = exp((z - Z_REF)/T - Z_LSE) and p likewise:
    T dD/dz = q - p (forward KL), q (log q - log p - D) (reverse). At T = 1 q also gives the softmax:
    two exponentials (forward), one (reverse)."""
    zr = zk - z_ref[:, None]
    q = tl.exp2(zr * scale2 - zc2[:, None])
    if UNIT_TEMPERATURE:
        softmax = q * soft[:, None]
    else:
        softmax = tl.exp2((z - ref[:, None]) * LOG2E - lse2[:, None]) * soft[:, None]
    br = bk - b_ref[:, None]
    if KL_GRAD and DIVERGENCE == REVERSE_KL:
        qk = q * kl_coef[:, None]
        grad = tl.where(qk == 0.0, softmax, softmax + qk * ((zr - br) * inv_t + shift[:, None]))
    elif KL_GRAD:
        p = tl.exp2(br * scale2 - bc2[:, None])
        if UNIT_TEMPERATURE:  # q (soft + kl_coef) - p kl_coef: no separate softmax term
            grad = q * (soft + kl_coef)[:, None] - p * kl_coef[:, None]
        else:
            grad = softmax + (q - p) * kl_coef[:, None]
    else:
        grad = softmax
    return grad


@triton.jit
def tile_gradient(z, b, col_mask, is_label, ce_scale, scale2, inv_t, ref, z_ref, b_ref, lse2, zc2, bc2, soft, kl_coef,
                  shift, KL_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, UNIT_TEMPERATURE: tl.constexpr,
                  MASK_TARGET: tl.constexpr):
    """`logit_gradient` with the label's one-hot times ce_scale (scale * ce_weight), on a tile that may hold
    labels or columns past the range (their values are junk). At T = 1 a masked label is no kept column:
    its softmax takes an exponential of its own."""
    is_label = is_label & col_mask[None, :]
    kept = kept_columns(col_mask, is_label, MASK_TARGET)
    grad = logit_gradient(z, tl.where(kept, z, float("-inf")), tl.where(kept, b, float("-inf")), scale2, inv_t,
                          ref, z_ref, b_ref, lse2, zc2, bc2, soft, kl_coef, shift, KL_GRAD, DIVERGENCE,
                          UNIT_TEMPERATURE)
    if UNIT_TEMPERATURE and MASK_TARGET:
        label_term = ce_scale[:, None] * (tl.exp2((z - ref[:, None]) * LOG2E - lse2[:, None]) - 1.0)
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
def store_partials(ptr, n_rows, rows, mask, m_z, s_z, m_r, s_r, m_b, s_b, w, d, z_label, b_label, found):
    """Write a range's partials ([N_PARTIALS, n_rows] at ptr) from the running statistics."""
    tl.store(ptr + P_M_Z * n_rows + rows, m_z, mask=mask)
    tl.store(ptr + P_S_Z * n_rows + rows, s_z, mask=mask)
    tl.store(ptr + P_M_R * n_rows + rows, m_r, mask=mask)
    tl.store(ptr + P_S_R * n_rows + rows, s_r, mask=mask)
    tl.store(ptr + P_M_B * n_rows + rows, m_b, mask=mask)
    tl.store(ptr + P_S_B * n_rows + rows, s_b, mask=mask)
    tl.store(ptr + P_W * n_rows + rows, w, mask=mask)
    tl.store(ptr + P_S_DIFF * n_rows + rows, d, mask=mask)
    tl.store(ptr + P_Z_LABEL * n_rows + rows, z_label, mask=mask)
    tl.store(ptr + P_B_LABEL * n_rows + rows, b_label, mask=mask)
    tl.store(ptr + P_LABEL_FOUND * n_rows + rows, found.to(tl.float32), mask=mask)


@triton.jit
def store_statistics(ptr, n_rows, rows, mask, valid, ref, lse, z_ref, z_lse, b_ref, b_lse, value, ce):
    """Write the row statistics ([N_STATS, n_rows] at ptr); ignored rows get 0 everywhere."""
    tl.store(ptr + STAT_REF * n_rows + rows, tl.where(valid, ref, 0.0), mask=mask)
    tl.store(ptr + STAT_LSE * n_rows + rows, tl.where(valid, lse, 0.0), mask=mask)
    tl.store(ptr + STAT_Z_REF * n_rows + rows, tl.where(valid, z_ref, 0.0), mask=mask)
    tl.store(ptr + STAT_Z_LSE * n_rows + rows, tl.where(valid, z_lse, 0.0), mask=mask)
    tl.store(ptr + STAT_B_REF * n_rows + rows, tl.where(valid, b_ref, 0.0), mask=mask)
    tl.store(ptr + STAT_B_LSE * n_rows + rows, tl.where(valid, b_lse, 0.0), mask=mask)
    tl.store(ptr + STAT_KL * n_rows + rows, tl.where(valid, value, 0.0), mask=mask)
    tl.store(ptr + STAT_CE * n_rows + rows, tl.where(valid, ce, 0.0), mask=mask)


@triton.jit
def load_statistics(ptr, n_rows, rows, mask):
    """(REF, LSE, Z_REF, Z_LSE, B_REF, B_LSE, D) of the rows from a statistics block."""
    ref = tl.load(ptr + STAT_REF * n_rows + rows, mask=mask, other=0.0)
    lse = tl.load(ptr + STAT_LSE * n_rows + rows, mask=mask, other=0.0)
    z_ref = tl.load(ptr + STAT_Z_REF * n_rows + rows, mask=mask, other=0.0)
    z_lse = tl.load(ptr + STAT_Z_LSE * n_rows + rows, mask=mask, other=0.0)
    b_ref = tl.load(ptr + STAT_B_REF * n_rows + rows, mask=mask, other=0.0)
    b_lse = tl.load(ptr + STAT_B_LSE * n_rows + rows, mask=mask, other=0.0)
    value = tl.load(ptr + STAT_KL * n_rows + rows, mask=mask, other=0.0)
    return ref, lse, z_ref, z_lse, b_ref, b_lse, value
