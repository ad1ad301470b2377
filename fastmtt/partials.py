"""The layout of the mergeable per-row statistics that the Triton kernels and the PyTorch implementations
share: what a vocabulary range contributes (partials) and the finalized statistics of a whole row. Merging
ranges and finalizing them: fastmtt/pytorch/partials.py.

Every sum is relative to a reference, the row's maximum of the raw logits it covers (0 for an empty
range: `reference` in fastmtt/pytorch/partials.py), so that no statistic is formed from absolute logits:
logits offset by -100 lose nothing (docs: mtt-math, "Relative to the row maxima"). Plain integers: no
torch is imported here.

Layout (rows of a [N_PARTIALS, N] block; the Triton kernels write the same layout):
    M_Z, S_Z   max of the adapted z over kept columns and sum of exp((z - M_Z) / T)
    M_R, S_R   the same for all raw z at T = 1 (CE at T != 1)
    M_B, S_B   the same for the base b
    W          divergence accumulator: sum over kept columns of the weighting side's exp(. / T) terms times
               (w - M_w) - (o - M_o), w the weighting side's logit and o the other's (raw units)
    S_DIFF     S_o - S_w as one sum of per-column differences (forward: S_Z - S_B), so that ln(S_o / S_w) =
               log1p(S_DIFF / S_w) keeps its digits when the two sides are close
    Z_LABEL, B_LABEL, LABEL_FOUND   the label's logits and 1 where the label lies in the range, else 0
Kept columns: all but the target when the target is masked, all otherwise. Finalized statistics (rows
of a [N_STATS, N] block): REF and LSE (all columns at T = 1: LSE = ln sum exp(z - REF)), Z_REF and Z_LSE,
B_REF and B_LSE (kept columns at T: Z_LSE = ln sum exp((z - Z_REF) / T), -inf when empty), the
divergence D and CE. Ranges of one row may come from one kernel split, several launches or several
ranks: merging moves every sum to the largest reference.
"""
from __future__ import annotations

M_Z, S_Z, M_R, S_R, M_B, S_B, W, S_DIFF, Z_LABEL, B_LABEL, LABEL_FOUND = range(11)
N_PARTIALS = 11
REF, LSE, Z_REF, Z_LSE, B_REF, B_LSE, KL, CE = range(8)
N_STATS = 8
SUMS = ((M_Z, S_Z), (M_R, S_R), (M_B, S_B))  # (the max, the sum relative to it) of each side

