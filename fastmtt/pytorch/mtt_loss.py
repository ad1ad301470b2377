"""Pure-PyTorch MTT rows: the same function as the Triton row kernel, vectorized over chunks of rows.

Per chunk: the range's partial statistics (fastmtt/partials.py), finalized, then the gradient, so
memory beyond the inputs and the gradient stays at a few [rows, V] temporaries of about CHUNK_ELEMENTS
each. float32 math (float64 when an input is float64).
"""
from __future__ import annotations

import functools

import torch

from fastmtt.pytorch import partials as P
from fastmtt.pytorch.divergences import DIVERGENCES
from fastmtt.reduction import accumulator_dtype

# Temporaries of 512 KiB (fp32) stay in a core's L2: about 1.5x faster on a CPU than 16 MiB ones, whose ~40
# elementwise passes each go to memory (fused MTT at N=1024, H=384, V=49152, one thread).
CHUNK_ELEMENTS = 1 << 17


class _Rows:
    """One chunk of rows [r, n] holding columns [vocab_start, vocab_start + n): labels located, logits
    in the accumulator dtype, kept columns (-inf elsewhere)."""

    def __init__(self, z, b, labels, options, vocab_start, need_base):
        acc = accumulator_dtype(z, b)
        self.options = options
        self.inv_t = 1.0 / options.temperature
        self.valid = labels != options.ignore_index
        local = labels - vocab_start
        self.found = self.valid & (local >= 0) & (local < z.shape[1])
        self.index = torch.where(self.found, local, 0)[:, None]
        # Row-major copies where needed: reductions then add in the same order for every input layout.
        self.z = z.to(acc).contiguous()
        self.b = b.to(acc).contiguous() if need_base else None

    def label_logit(self, x):
        return torch.where(self.found, x.gather(1, self.index).squeeze(1), 0.0)

    @functools.cached_property
    def zk(self):
        """kept(z): formed once per chunk for the statistics and the gradient."""
        return self.kept(self.z)

    @functools.cached_property
    def bk(self):
        return self.kept(self.b)

    def kept(self, x):
        """A copy of x with the target column (where it lies in this range and is masked) at -inf."""
        xk = x.clone()
        if self.options.mask_target:
            target = torch.where(self.found, float("-inf"), xk.gather(1, self.index).squeeze(1))
            xk.scatter_(1, self.index, target[:, None])
        return xk


def _relative_sum(x, inv_t):
    """(row max m, x - R, exp((x - R) / T), sum of it) with the reference R = m (0 for an all -inf row,
    whose terms are then 0)."""
    m = x.amax(1)
    relative = x - P.reference(m)[:, None]
    e = (relative * inv_t if inv_t != 1.0 else relative).exp()
    return m, relative, e, e.sum(1)


def _chunk_partials(rows: _Rows, need_kl):
    options = rows.options
    parts = torch.zeros(P.N_PARTIALS, rows.z.shape[0], dtype=rows.z.dtype, device=rows.z.device)
    parts[P.M_Z], zr, e_z, parts[P.S_Z] = _relative_sum(rows.zk, rows.inv_t)
    parts[P.M_R] = float("-inf")
    if options.temperature != 1.0:
        parts[P.M_R], _, _, parts[P.S_R] = _relative_sum(rows.z, 1.0)
    parts[P.Z_LABEL] = rows.label_logit(rows.z)
    parts[P.LABEL_FOUND] = rows.found.to(parts.dtype)
    if need_kl:
        parts[P.M_B], br, e_b, parts[P.S_B] = _relative_sum(rows.bk, rows.inv_t)
        terms, differences = DIVERGENCES[options.direction].terms(e_z, e_b, zr, br)
        parts[P.W], parts[P.S_DIFF] = terms.sum(1), differences.sum(1)
        parts[P.B_LABEL] = rows.label_logit(rows.b)
    else:
        parts[P.M_B] = float("-inf")
    ignored = ~rows.valid
    parts[:, ignored] = 0.0
    parts[P.M_Z, ignored] = parts[P.M_R, ignored] = parts[P.M_B, ignored] = float("-inf")
    return parts


def _log_kept(xk, x_ref, x_lse, inv_t):
    """In place: xk -> (xk - ref) / T - lse, the log of the kept distribution (lse -inf: an empty side)."""
    xk.sub_(x_ref[:, None])
    if inv_t != 1.0:
        xk.mul_(inv_t)
    return xk.sub_(torch.where(x_lse == float("-inf"), 0.0, x_lse)[:, None])


def _chunk_gradient(rows: _Rows, stats, grad_scale, out):
    """out <- grad_scale * dL/dz of the chunk, from its finalized statistics [N_STATS, r]."""
    options = rows.options
    scale = grad_scale.to(rows.z.dtype).reshape(())
    grad = torch.sub(rows.z, stats[P.REF][:, None]).sub_(stats[P.LSE][:, None]).exp_()
    grad.scatter_add_(1, rows.index, torch.where(rows.found, -1.0, 0.0).to(grad.dtype)[:, None])
    if options.ce_weight != 1:
        grad.mul_(options.ce_weight)
    if options.lam > 0:
        z_lse, b_lse, value = stats[P.Z_LSE], stats[P.B_LSE], stats[P.KL]
        constant = (z_lse == float("-inf")) | (b_lse == float("-inf")) | (value == float("inf"))
        # The gradient is the chunk's last use of zk and bk: shifted in place.
        log_q = _log_kept(rows.zk, stats[P.Z_REF], z_lse, rows.inv_t)
        log_p = _log_kept(rows.bk, stats[P.B_REF], b_lse, rows.inv_t)
        kl_grad = DIVERGENCES[options.direction].gradient(log_q, log_p, value)
        kl_grad[constant] = 0.0  # D does not vary there (and inf - inf would be NaN)
        grad.add_(kl_grad, alpha=options.kl_weight * rows.inv_t)
    grad.mul_(torch.where(rows.valid, scale, 0.0)[:, None])
    grad[~rows.valid] = 0.0  # NaN or inf * 0 is not 0
    out.copy_(grad)


def _chunks(n_rows, n_cols):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    return (slice(start, start + step) for start in range(0, n_rows, step))


def _has_kl(options, need_kl):
    return need_kl or options.lam > 0


def mtt_rows(logits, base_logits, labels, options, *, need_kl, grad_scale=None, grad_out=None):
    """Row statistics [N_STATS, N] (fastmtt/partials.py) of [N, V] logits; writes
    grad_scale * dL_i/dlogits into `grad_out` if given (it may be `logits` itself)."""
    acc = accumulator_dtype(logits, base_logits)
    stats = torch.zeros(P.N_STATS, logits.shape[0], dtype=acc, device=logits.device)
    has_kl = _has_kl(options, need_kl)
    scale = _scale(grad_scale, acc, logits.device)
    for rows in _chunks(*logits.shape):
        if not bool((labels[rows] != options.ignore_index).any()):  # padding only
            if grad_out is not None:
                grad_out[rows] = 0.0
            continue
        chunk = _Rows(logits[rows], base_logits[rows], labels[rows], options, 0, has_kl)
        stats[:, rows] = P.finalize(_chunk_partials(chunk, has_kl), labels[rows], options, need_kl=need_kl)
        if grad_out is not None:
            _chunk_gradient(chunk, stats[:, rows], scale, grad_out[rows])
    return stats


def mtt_partials(logits, base_logits, labels, options, *, vocab_start, need_kl):
    """Partial statistics [N_PARTIALS, N] of a vocabulary range: logits [N, n] hold columns
    [vocab_start, vocab_start + n) of the rows; labels are global ids."""
    has_kl = _has_kl(options, need_kl)
    parts = torch.empty(P.N_PARTIALS, logits.shape[0], dtype=accumulator_dtype(logits, base_logits),
                        device=logits.device)
    for rows in _chunks(*logits.shape):
        chunk = _Rows(logits[rows], base_logits[rows], labels[rows], options, vocab_start, has_kl)
        parts[:, rows] = _chunk_partials(chunk, has_kl)
    return parts


def mtt_gradient(logits, base_logits, labels, stats, options, *, vocab_start, grad_scale, grad_out):
    """grad_scale * dL_i/dlogits of a vocabulary range into grad_out, from merged statistics [N_STATS, N]."""
    acc = accumulator_dtype(logits, base_logits)
    scale = _scale(grad_scale, acc, logits.device)
    for rows in _chunks(*logits.shape):
        chunk = _Rows(logits[rows], base_logits[rows], labels[rows], options, vocab_start, options.lam > 0)
        _chunk_gradient(chunk, stats[:, rows].to(acc), scale, grad_out[rows])
    return grad_out


def _scale(grad_scale, acc, device):
    return torch.ones(1, dtype=acc, device=device) if grad_scale is None else grad_scale
