"""Pure-PyTorch MTT rows: the same function as the Triton row kernel, vectorized over row chunks.

Memory beyond inputs and the gradient stays bounded by the chunk (about CHUNK_ELEMENTS per temporary).
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21
NEG_INF = float("-inf")


def _masked_log_normalizer(x):
    """(LSE over dim 1, same with an empty row's -inf replaced by 0 so it can be subtracted safely)."""
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    return lse, torch.where(lse == NEG_INF, 0.0, lse)


def _chunk_rows(z_in, b_in, labels, *, lam, temperature, reverse, ignore_index, need_kl, grad_scale, grad_out):
    acc = torch.float64 if torch.float64 in (z_in.dtype, b_in.dtype) else torch.float32
    valid = labels != ignore_index
    label_ok = valid & (labels >= 0) & (labels < z_in.shape[1])
    index = torch.where(label_ok, labels, 0)[:, None]
    z = z_in.to(acc, copy=True)
    z_label = z.gather(1, index)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    lse = torch.where(label_ok[:, None], lse, float("nan"))
    ce = torch.where(valid, (lse - z_label).squeeze(1), 0.0)

    kl = torch.zeros_like(ce)
    has_kl = need_kl or lam > 0
    if has_kl:
        zt = z.div_(temperature) if temperature != 1.0 else z
        zt.scatter_(1, index, NEG_INF)
        bt = b_in.to(acc, copy=True).div_(temperature)
        b_label = bt.gather(1, index)
        bt.scatter_(1, index, NEG_INF)
        z_lse, z_lse_safe = _masked_log_normalizer(zt)
        b_lse, b_lse_safe = _masked_log_normalizer(bt)
        log_q = zt.sub_(z_lse_safe)
        log_p = bt.sub_(b_lse_safe)
        weight = (log_q if reverse else log_p).exp()
        log_ratio = log_q - log_p if reverse else log_p - log_q
        kl = torch.where(weight == 0, 0.0, weight * log_ratio).sum(dim=1, keepdim=True)
        base_empty = b_lse == NEG_INF
        adapted_empty = z_lse == NEG_INF
        if reverse:
            kl = torch.where(base_empty | adapted_empty, 0.0, kl)
        else:
            kl = torch.where(base_empty, 0.0, torch.where(adapted_empty, float("inf"), kl))
        kl = torch.where(b_label.isnan(), float("nan"), kl)
        kl = torch.where(valid[:, None], kl, 0.0).squeeze(1)

    if grad_out is not None:
        grad = (z_in.to(acc) - lse).exp_()
        grad.scatter_add_(1, index, torch.full_like(z_label, -1.0))
        if lam > 0:
            if reverse:
                kl_grad = torch.where(weight == 0, 0.0, weight * (log_ratio - kl[:, None]))
            else:
                kl_grad = log_q.exp() - weight
            # A side without mass outside the target makes KL a constant (0 or +inf): no gradient.
            grad.add_(torch.where(base_empty | adapted_empty, 0.0, kl_grad), alpha=lam * temperature)
        grad.mul_(grad_scale.to(acc)).masked_fill_(~valid[:, None], 0.0)
        grad_out.copy_(grad)
    return ce, kl


def mtt_rows_torch(logits, base_logits, labels, *, lam, temperature, reverse, ignore_index,
                   need_kl, grad_scale=None, grad_out=None):
    """Per-row (ce, kl) for [N, V] logits; writes grad_scale * dL_i/dlogits into `grad_out` if given.

    Same contract as the Triton row kernel; float32 math (float64 when an input is float64).
    """
    n_rows, n_cols = logits.shape
    acc = torch.float64 if torch.float64 in (logits.dtype, base_logits.dtype) else torch.float32
    ce = torch.empty(n_rows, dtype=acc, device=logits.device)
    kl = torch.empty_like(ce)
    if grad_scale is None:
        grad_scale = torch.ones(1, dtype=acc, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        ce[rows], kl[rows] = _chunk_rows(
            logits[rows], base_logits[rows], labels[rows], lam=lam, temperature=temperature, reverse=reverse,
            ignore_index=ignore_index, need_kl=need_kl, grad_scale=grad_scale,
            grad_out=None if grad_out is None else grad_out[rows])
    return ce, kl
