"""Pure-PyTorch MTT rows: the same function as the Triton row kernel, vectorized over chunks of rows.

Per chunk: the range's partial statistics (fastmtt/partials.py), finalized, then the gradient, so
memory beyond the inputs and the gradient stays at a few [rows, V] temporaries of about CHUNK_ELEMENTS
each. float32 math (float64 when an input is float64).
"""
from __future__ import annotations

import torch

from fastmtt import partials as P
from fastmtt import reduction
from fastmtt.pytorch.divergences import DIVERGENCES
from fastmtt.pytorch.partials import finalize, reference

# Temporaries of 512 KiB (fp32) stay near the core: faster on a CPU than 16 MiB ones, whose elementwise passes
# (about 20 per chunk with the forward KL at T = 1) each go to memory.
CHUNK_ELEMENTS = 1 << 17


class _Rows:
    """One chunk of rows [r, n] holding columns [vocab_start, vocab_start + n): labels located, logits in the
    accumulator dtype. `_chunk_partials` leaves the kept logits relative to their reference (zr, br) and
    their exponentials at T (e_z, e_b) for `_chunk_gradient`, which then forms no exponential of its own."""

    def __init__(self, z, b, labels, options, vocab_start, need_base):
        acc = reduction.accumulator_dtype(z, b)
        self.options = options
        self.inv_t = 1.0 / options.temperature
        self.valid = labels != options.ignore_index
        local = labels - vocab_start
        self.found = self.valid & (local >= 0) & (local < z.shape[1])
        self.index = torch.where(self.found, local, 0)[:, None]
        # Row-major copies where needed: reductions then add in the same order for every input layout.
        self.z = z.to(acc).contiguous()
        self.b = b.to(acc).contiguous() if need_base else None
        self.zr = self.br = self.e_z = self.e_b = None

    def label_logit(self, x):
        return torch.where(self.found, x.gather(1, self.index).squeeze(1), 0.0)

    def kept(self, x):
        """A copy of x with the target column (where it lies in this range and is masked) at -inf."""
        xk = x.clone()
        if self.options.mask_target:
            target = torch.where(self.found, float("-inf"), xk.gather(1, self.index).squeeze(1))
            xk.scatter_(1, self.index, target[:, None])
        return xk

    def relative(self, xk, reference):
        """In place xk -> xk - reference [r, n] (kept columns; -inf elsewhere), and exp((xk - reference) / T)."""
        xk.sub_(reference[:, None])
        return xk, (xk.exp() if self.inv_t == 1.0 else torch.mul(xk, self.inv_t).exp_())

    def relative_to_max(self, x):
        """(M, kept(x) - R, exp((kept(x) - R) / T), the row sums of the latter): M the kept max, R = reference(M)."""
        xk = self.kept(x)
        m = xk.amax(1)
        xr, e = self.relative(xk, reference(m))
        return m, xr, e, e.sum(1)


def _chunk_partials(rows: _Rows, need_kl):
    options = rows.options
    parts = torch.zeros(P.N_PARTIALS, rows.z.shape[0], dtype=rows.z.dtype, device=rows.z.device)
    parts[P.M_Z], rows.zr, rows.e_z, parts[P.S_Z] = rows.relative_to_max(rows.z)
    parts[P.M_R] = float("-inf")
    if options.temperature != 1.0:  # CE over all columns at T = 1
        parts[P.M_R] = rows.z.amax(1)
        parts[P.S_R] = torch.sub(rows.z, reference(parts[P.M_R])[:, None]).exp_().sum(1)
    parts[P.Z_LABEL] = rows.label_logit(rows.z)
    parts[P.LABEL_FOUND] = rows.found.to(parts.dtype)
    if need_kl:
        parts[P.M_B], rows.br, rows.e_b, parts[P.S_B] = rows.relative_to_max(rows.b)
        parts[P.W], parts[P.S_DIFF] = DIVERGENCES[options.direction].sums(rows.e_z, rows.e_b, rows.zr, rows.br)
        parts[P.B_LABEL] = rows.label_logit(rows.b)
    else:
        parts[P.M_B] = float("-inf")
    ignored = ~rows.valid
    parts[:, ignored] = 0.0
    parts[P.M_Z, ignored] = parts[P.M_R, ignored] = parts[P.M_B, ignored] = float("-inf")
    return parts


def _inverse_sum(lse):
    """1 / sum = exp(-lse), 0 for an empty side (lse -inf)."""
    return torch.where(lse == float("-inf"), 0.0, (-lse).exp())


def _chunk_gradient(rows: _Rows, stats, grad_scale, out, ce_rows):
    """out <- grad_scale * dL/dz of the chunk, from its finalized statistics [N_STATS, r] (CE's part only on
    the rows ce_rows [r] marks, where it is given).

    dL/dz = ce_weight (softmax(z) - onehot(t)) + kl_weight / T * dD/d(z / T), from the kept exponentials e_z,
    e_b of `_chunk_partials` (or, for a vocabulary range, formed here against the merged references): at
    T = 1, softmax(z) = e_z exp(Z_REF - REF - LSE) on kept columns (the target's entry exp(-CE)); the
    forward KL's dD/d(z / T) = q - p with q = e_z / S_Z, p = e_b / S_B. At T = 1 with the forward KL that
    is two passes over the chunk, each term's row factor carrying grad_scale and the weights."""
    options = rows.options
    inv_t, lam = rows.inv_t, options.lam
    forward_kl = lam > 0 and options.direction == "forward"
    if rows.e_z is None:  # a vocabulary range: the references are the merged statistics'
        rows.zr, rows.e_z = rows.relative(rows.kept(rows.z), stats[P.Z_REF])
        if lam > 0:
            rows.br, rows.e_b = rows.relative(rows.kept(rows.b), stats[P.B_REF])
    row_scale = torch.where(rows.valid, grad_scale.to(rows.z.dtype).reshape(()), 0.0)
    ce_scale = options.ce_weight * row_scale
    if ce_rows is not None:
        ce_scale = torch.where(ce_rows, ce_scale, 0.0)
    grad = out if out.dtype == rows.z.dtype else torch.empty_like(rows.z)
    if inv_t == 1.0:  # softmax(z) from e_z, a row factor (the target's entry set below)
        e_z_scale = ce_scale * torch.where(stats[P.Z_LSE] == float("-inf"), 0.0,
                                           (stats[P.Z_REF] - stats[P.REF] - stats[P.LSE]).exp())
    else:  # softmax(z) at T = 1 over all columns: its own pass
        torch.sub(rows.z, stats[P.REF][:, None], out=grad).sub_(stats[P.LSE][:, None]).exp_()
        grad.mul_(ce_scale[:, None])
        e_z_scale = torch.zeros_like(ce_scale)
    if lam > 0:
        z_lse, b_lse, value = stats[P.Z_LSE], stats[P.B_LSE], stats[P.KL]
        constant = (z_lse == float("-inf")) | (b_lse == float("-inf")) | (value == float("inf"))
        kl_scale = torch.where(constant, 0.0, options.kl_weight * inv_t * row_scale)  # D does not vary there
    if forward_kl:
        e_z_scale = e_z_scale + kl_scale * _inverse_sum(z_lse)
    if inv_t == 1.0:
        torch.mul(rows.e_z, e_z_scale[:, None], out=grad)
    elif forward_kl:
        grad.addcmul_(rows.e_z, e_z_scale[:, None])
    if forward_kl:
        grad.addcmul_(rows.e_b, (-kl_scale * _inverse_sum(b_lse))[:, None])
    elif lam > 0:
        # The last use of zr and br: in place (an empty side's lse -inf: 0, as its rows are constant).
        log_q = rows.zr.mul_(inv_t).sub_(torch.where(z_lse == float("-inf"), 0.0, z_lse)[:, None])
        log_p = rows.br.mul_(inv_t).sub_(torch.where(b_lse == float("-inf"), 0.0, b_lse)[:, None])
        kl_grad = DIVERGENCES[options.direction].gradient(log_q, log_p, value)
        kl_grad[constant] = 0.0  # inf - inf would be NaN there
        grad.addcmul_(kl_grad, kl_scale[:, None])
    if inv_t == 1.0 and options.mask_target:  # e_z is 0 at the target: its entry is softmax(z)_t - 1
        current = grad.gather(1, rows.index).squeeze(1)
        target = ce_scale * ((-stats[P.CE]).exp() - 1.0)
        grad.scatter_(1, rows.index, torch.where(rows.found, target, current)[:, None])
    else:
        grad.scatter_add_(1, rows.index, torch.where(rows.found, -ce_scale, 0.0)[:, None])
    grad[~rows.valid] = 0.0  # NaN or inf * 0 is not 0
    if grad is not out:
        out.copy_(grad)


def _chunks(n_rows, n_cols):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    return (slice(start, start + step) for start in range(0, n_rows, step))


def _has_kl(options, need_kl):
    return need_kl or options.lam > 0


def mtt_rows(logits, base_logits, labels, options, *, need_kl, grad_scale=None, grad_out=None, ce_rows=None):
    """Row statistics [N_STATS, N] (fastmtt/partials.py) of [N, V] logits; writes
    grad_scale * dL_i/dlogits into `grad_out` if given (it may be `logits` itself), CE's part only on the rows
    ce_rows [N] (bool) marks where it is given."""
    acc = reduction.accumulator_dtype(logits, base_logits)
    stats = torch.zeros(P.N_STATS, logits.shape[0], dtype=acc, device=logits.device)
    has_kl = _has_kl(options, need_kl)
    scale = _scale(grad_scale, acc, logits.device)
    for rows in _chunks(*logits.shape):
        if not bool((labels[rows] != options.ignore_index).any()):  # padding only
            if grad_out is not None:
                grad_out[rows] = 0.0
            continue
        chunk = _Rows(logits[rows], base_logits[rows], labels[rows], options, 0, has_kl)
        stats[:, rows] = finalize(_chunk_partials(chunk, has_kl), labels[rows], options, need_kl=need_kl)
        if grad_out is not None:
            _chunk_gradient(chunk, stats[:, rows], scale, grad_out[rows], None if ce_rows is None else ce_rows[rows])
    return stats


def mtt_partials(logits, base_logits, labels, options, *, vocab_start, need_kl):
    """Partial statistics [N_PARTIALS, N] of a vocabulary range: logits [N, n] hold columns
    [vocab_start, vocab_start + n) of the rows; labels are global ids."""
    has_kl = _has_kl(options, need_kl)
    parts = torch.empty(P.N_PARTIALS, logits.shape[0], dtype=reduction.accumulator_dtype(logits, base_logits),
                        device=logits.device)
    for rows in _chunks(*logits.shape):
        chunk = _Rows(logits[rows], base_logits[rows], labels[rows], options, vocab_start, has_kl)
        parts[:, rows] = _chunk_partials(chunk, has_kl)
    return parts


def mtt_gradient(logits, base_logits, labels, stats, options, *, vocab_start, grad_scale, grad_out, ce_rows=None):
    """grad_scale * dL_i/dlogits of a vocabulary range into grad_out, from merged statistics [N_STATS, N]
    (CE's part only on the rows ce_rows marks, as in `mtt_rows`)."""
    acc = reduction.accumulator_dtype(logits, base_logits)
    scale = _scale(grad_scale, acc, logits.device)
    for rows in _chunks(*logits.shape):
        chunk = _Rows(logits[rows], base_logits[rows], labels[rows], options, vocab_start, options.lam > 0)
        _chunk_gradient(chunk, stats[:, rows].to(acc), scale, grad_out[rows],
                        None if ce_rows is None else ce_rows[rows])
    return grad_out


def _scale(grad_scale, acc, device):
    return torch.ones(1, dtype=acc, device=device) if grad_scale is None else grad_scale
