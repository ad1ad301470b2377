"""Mergeable per-row statistics: what a vocabulary range contributes, and how ranges combine.

Layout (rows of a [N_PARTIALS, N] block, nats; the Triton kernels write the same layout):
    M_Z, S_Z   max of the adapted z/T over kept columns and sum of exp(z/T - M_Z)
    M_R, S_R   the same for raw z over all columns (CE at T != 1)
    M_B, S_B   the same for the base b/T
    W          divergence accumulator, relative to the max of its weighting side
    Z_LABEL, B_LABEL, LABEL_FOUND   the label's logits and 1 where the label lies in the range, else 0
Kept columns: all but the target when the target is masked, all otherwise. Finalized statistics (rows
of a [N_STATS, N] block): LSE (all columns, T = 1), Z' and B' (kept columns at T), the divergence D, CE.
Ranges of one row may come from one kernel split, several launches or several ranks: merging rescales
each sum to the largest max.
"""
from __future__ import annotations

import torch

M_Z, S_Z, M_R, S_R, M_B, S_B, W, Z_LABEL, B_LABEL, LABEL_FOUND = range(10)
N_PARTIALS = 10
LSE, Z_LSE, B_LSE, KL, CE = range(5)
N_STATS = 5
_SUMS = ((M_Z, S_Z), (M_R, S_R), (M_B, S_B))


def _rescale(maxima: torch.Tensor, merged_max: torch.Tensor) -> torch.Tensor:
    """exp(maxima - merged_max), 0 for an empty range (max -inf)."""
    safe = torch.where(merged_max == float("-inf"), 0.0, merged_max)
    return torch.where(maxima == float("-inf"), 0.0, (maxima - safe).exp())


def merge_partials(parts: torch.Tensor, direction: str) -> torch.Tensor:
    """[K, N_PARTIALS, N] partials of K disjoint ranges of the same rows -> [N_PARTIALS, N]."""
    from fastmtt.pytorch.divergences import DIVERGENCES

    merged = parts.sum(0)  # Z_LABEL, B_LABEL, LABEL_FOUND: the range holding the label contributes
    for m, s in _SUMS:
        merged[m] = parts[:, m].amax(0)
        merged[s] = (parts[:, s] * _rescale(parts[:, m], merged[m])).sum(0)
    weighting = DIVERGENCES[direction].weighting_max
    merged[W] = (parts[:, W] * _rescale(parts[:, weighting], merged[weighting])).sum(0)
    return merged


def log_normalizer(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """m + log s, -inf for an empty row (s == 0)."""
    return torch.where(s == 0, float("-inf"), m + s.log())


def finalize(parts: torch.Tensor, labels: torch.Tensor, options, *, need_kl: bool) -> torch.Tensor:
    """[N_PARTIALS, N] partials of the whole vocabulary -> [N_STATS, N] statistics (LSE, Z', B', D, CE).
    Ignored rows get 0 everywhere; a valid label found in no range makes its row NaN."""
    from fastmtt.pytorch.divergences import DIVERGENCES

    valid = labels != options.ignore_index
    z_lse = log_normalizer(parts[M_Z], parts[S_Z])
    if options.temperature != 1.0:
        lse = log_normalizer(parts[M_R], parts[S_R])
    elif options.mask_target:
        lse = torch.logaddexp(z_lse, parts[Z_LABEL])
    else:
        lse = z_lse
    lse = torch.where(parts[LABEL_FOUND] > 0, lse, float("nan"))
    stats = torch.empty(N_STATS, labels.shape[0], dtype=parts.dtype, device=parts.device)
    stats[LSE], stats[Z_LSE] = lse, z_lse
    stats[CE] = torch.where(valid, lse - parts[Z_LABEL], 0.0)
    if need_kl or options.lam > 0:
        b_lse = log_normalizer(parts[M_B], parts[S_B])
        value = DIVERGENCES[options.direction].value(parts[W], parts[S_Z], parts[S_B], z_lse, b_lse)
        stats[B_LSE] = b_lse
        stats[KL] = torch.where(valid, torch.where(parts[B_LABEL].isnan(), float("nan"), value), 0.0)
    else:
        stats[B_LSE], stats[KL] = float("-inf"), 0.0
    stats[:, ~valid] = 0.0
    return stats
