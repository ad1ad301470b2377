"""The divergences between the kept (target-masked, renormalized) distributions, in PyTorch.

Each is the torch counterpart of one branch of the jit helpers in kernels/mtt_math.py: the accumulator
sums over a range (`sums`: W, the weighting side's exp times (w - M_w) - (o - M_o), and S_DIFF, the
per-column differences of S_o - S_w; `sides` names the weighting side's max first) and the value from
the merged statistics (`value`); the reverse KL also T * dD/dz on kept columns (`gradient`; the forward
KL's is q - p, which the PyTorch rows form from their exponentials). q, p: adapted and base kept
distributions at temperature T; zr = z - M_Z and br = b - M_B on kept columns (-inf elsewhere),
relative to the row maxima (fastmtt/partials.py).
"""
from __future__ import annotations

import torch

from fastmtt.partials import M_B, M_Z


def _weighted(weight, difference):
    """weight * difference, 0 where the weight is 0 (never 0 * inf or 0 * NaN)."""
    return torch.where(weight == 0, 0.0, weight * difference)


def _weighted_sum(weight, difference):
    """Row sums of weight * difference, 0 where the weight is 0, in place on `difference` (a temporary). A
    product is NaN only for a zero weight times an infinite difference (its side's logit is -inf) or for a
    NaN input, whose row maxima, hence statistics, are NaN anyway: NaN -> 0 is the same as _weighted."""
    return difference.mul_(weight).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf")).sum(1)


class ForwardKL:
    """KL(base || adapted) = sum_k p_k (log p_k - log q_k) = W / (T S_B) + log1p(S_DIFF / S_B)."""

    sides = (M_B, M_Z)

    @staticmethod
    def sums(e_z, e_b, zr, br):
        return _weighted_sum(e_b, br - zr), (e_z - e_b).sum(1)

    @staticmethod
    def value(w, s_diff, s_z, s_b, inv_t):
        """0 when the base has no kept mass, +inf when only the adapted side has none."""
        kl = w * inv_t / s_b + (s_diff / s_b).clamp(min=-1.0).log1p()
        return torch.where(s_b == 0, 0.0, torch.where(s_z == 0, float("inf"), kl.clamp(min=0.0)))


class ReverseKL:
    """KL(adapted || base) = sum_k q_k (log q_k - log p_k) = W / (T S_Z) + log1p(S_DIFF / S_Z)."""

    sides = (M_Z, M_B)

    @staticmethod
    def sums(e_z, e_b, zr, br):
        return _weighted_sum(e_z, zr - br), (e_b - e_z).sum(1)

    @staticmethod
    def value(w, s_diff, s_z, s_b, inv_t):
        """0 when either side has no kept mass."""
        kl = w * inv_t / s_z + (s_diff / s_z).clamp(min=-1.0).log1p()
        return torch.where((s_b == 0) | (s_z == 0), 0.0, kl.clamp(min=0.0))

    @staticmethod
    def gradient(log_q, log_p, value):
        q = log_q.exp()
        return _weighted(q, log_q - log_p - value[:, None])


DIVERGENCES = {"forward": ForwardKL, "reverse": ReverseKL}
