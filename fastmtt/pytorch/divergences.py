"""The divergences between the kept (target-masked, renormalized) distributions, in PyTorch.

Each is the torch counterpart of one branch of the jit helpers in kernels/mtt_math.py: the accumulator
terms over a range (`terms`, relative to the max of its weighting side `weighting_max`), the value from
the merged statistics (`value`) and T * dD/dz on kept columns (`gradient`). q, p: adapted and base kept
distributions at temperature T; zt = z/T, bt = b/T on kept columns (-inf elsewhere).
"""
from __future__ import annotations

import torch

from fastmtt.partials import M_B, M_Z


def _weighted(weight, log_ratio):
    """weight * log_ratio, 0 where the weight is 0 (never 0 * inf)."""
    return torch.where(weight == 0, 0.0, weight * log_ratio)


class ForwardKL:
    """KL(base || adapted) = sum_k p_k (log p_k - log q_k)."""

    weighting_max = M_B

    @staticmethod
    def terms(e_z, e_b, zt, bt):
        return _weighted(e_b, bt - zt)

    @staticmethod
    def value(w, s_z, s_b, z_lse, b_lse):
        """0 when the base has no kept mass, +inf when only the adapted side has none."""
        return torch.where(s_b == 0, 0.0, torch.where(s_z == 0, float("inf"), w / s_b - b_lse + z_lse))

    @staticmethod
    def gradient(log_q, log_p, value):
        return log_q.exp() - log_p.exp()


class ReverseKL:
    """KL(adapted || base) = sum_k q_k (log q_k - log p_k)."""

    weighting_max = M_Z

    @staticmethod
    def terms(e_z, e_b, zt, bt):
        return _weighted(e_z, zt - bt)

    @staticmethod
    def value(w, s_z, s_b, z_lse, b_lse):
        """0 when either side has no kept mass."""
        return torch.where((s_b == 0) | (s_z == 0), 0.0, w / s_z - z_lse + b_lse)

    @staticmethod
    def gradient(log_q, log_p, value):
        q = log_q.exp()
        return _weighted(q, log_q - log_p - value[:, None])


DIVERGENCES = {"forward": ForwardKL, "reverse": ReverseKL}
