"""Merging and finalizing the per-row partial statistics of fastmtt/partials.py, in PyTorch: the one
implementation, which the PyTorch rows, the vocabulary-parallel exchange and the tiled Triton path's host
side all call.
"""
from __future__ import annotations

import torch

from fastmtt.partials import (
    B_LABEL,
    B_LSE,
    B_REF,
    CE,
    KL,
    LABEL_FOUND,
    LSE,
    M_B,
    M_R,
    M_Z,
    N_STATS,
    REF,
    S_B,
    S_DIFF,
    S_R,
    S_Z,
    SUMS,
    Z_LABEL,
    Z_LSE,
    Z_REF,
    W,
)
from fastmtt.pytorch.divergences import DIVERGENCES

_SUM_OF = dict(SUMS)


def reference(maxima: torch.Tensor) -> torch.Tensor:
    """The reference of a sum: its max, or 0 where the range is empty (max -inf)."""
    return torch.where(maxima == float("-inf"), 0.0, maxima)


def _rescale(maxima, merged_max, inv_t):
    """exp((maxima - merged_max) / T): moves a range's sum to the merged reference; 0 for an empty range."""
    return torch.where(maxima == float("-inf"), 0.0, ((maxima - reference(merged_max)) * inv_t).exp())


def exp_difference(a_o, a_w, log_ratio):
    """a_o - a_w of two positive factors given also t = ln(a_o / a_w): a_w expm1(t) when |t| < 1/2 (no
    cancellation), a_o - a_w otherwise."""
    small = log_ratio.abs() < 0.5
    return torch.where(small, a_w * torch.where(small, log_ratio, 0.0).expm1(), a_o - a_w)


def merge_partials(parts: torch.Tensor, options) -> torch.Tensor:
    """[K, N_PARTIALS, N] partials of K disjoint ranges of the same rows -> [N_PARTIALS, N]."""
    inv_t = 1.0 / options.temperature
    merged = parts.sum(0)  # Z_LABEL, B_LABEL, LABEL_FOUND: the range holding the label contributes
    for m, s in SUMS:
        merged[m] = parts[:, m].amax(0)
        merged[s] = (parts[:, s] * _rescale(parts[:, m], merged[m], 1.0 if m == M_R else inv_t)).sum(0)
    weighting, other = DIVERGENCES[options.direction].sides
    m_w, s_w, m_o = parts[:, weighting], parts[:, _SUM_OF[weighting]], parts[:, other]
    move_w = reference(merged[weighting]) - reference(m_w)  # >= 0: how far each range's reference moves
    move_o = reference(merged[other]) - reference(m_o)
    a_w, a_o = _rescale(m_w, merged[weighting], inv_t), _rescale(m_o, merged[other], inv_t)
    # Each range's terms (w - M_w) - (o - M_o) gain move_o - move_w; its S_o - S_w becomes S_o a_o - S_w a_w.
    merged[W] = ((parts[:, W] + s_w * (move_o - move_w)) * a_w).sum(0)
    s_w_moved = torch.where(s_w == 0, 0.0, s_w * exp_difference(a_o, a_w, (move_w - move_o) * inv_t))
    merged[S_DIFF] = torch.where(m_o == float("-inf"), -s_w * a_w, parts[:, S_DIFF] * a_o + s_w_moved).sum(0)
    return merged


def log_sum(s: torch.Tensor) -> torch.Tensor:
    """ln s, -inf for an empty row (s == 0)."""
    return torch.where(s == 0, float("-inf"), s.log())


def finalize(parts: torch.Tensor, labels: torch.Tensor, options, *, need_kl: bool) -> torch.Tensor:
    """[N_PARTIALS, N] partials of the whole vocabulary -> [N_STATS, N] statistics. Ignored rows get 0
    everywhere; a valid label found in no range makes its row NaN."""
    valid = labels != options.ignore_index
    z_ref, z_lse = reference(parts[M_Z]), log_sum(parts[S_Z])
    if options.temperature != 1.0:
        ref, lse = reference(parts[M_R]), log_sum(parts[S_R])
    elif options.mask_target:  # all columns: the kept ones and the label
        ref = reference(torch.maximum(parts[M_Z], parts[Z_LABEL]))
        kept = torch.where(parts[S_Z] == 0, 0.0, parts[S_Z] * (z_ref - ref).exp())
        lse = log_sum(kept + (parts[Z_LABEL] - ref).exp())
    else:
        ref, lse = z_ref, z_lse
    lse = torch.where(parts[LABEL_FOUND] > 0, lse, float("nan"))
    stats = torch.empty(N_STATS, labels.shape[0], dtype=parts.dtype, device=parts.device)
    stats[REF], stats[LSE], stats[Z_REF], stats[Z_LSE] = ref, lse, z_ref, z_lse
    stats[CE] = (ref - parts[Z_LABEL]) + lse
    stats[B_REF], stats[B_LSE], stats[KL] = 0.0, float("-inf"), 0.0
    if need_kl or options.lam > 0:
        value = DIVERGENCES[options.direction].value(parts[W], parts[S_DIFF], parts[S_Z], parts[S_B],
                                                     1.0 / options.temperature)
        stats[B_REF], stats[B_LSE] = reference(parts[M_B]), log_sum(parts[S_B])
        stats[KL] = torch.where(parts[B_LABEL].isnan(), float("nan"), value)
    stats[:, ~valid] = 0.0
    return stats
