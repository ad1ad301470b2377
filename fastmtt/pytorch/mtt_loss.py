"""Pure-PyTorch MTT rows: the same function as the Triton row kernel, vectorized over row chunks.

Memory beyond inputs and the gradient stays bounded by the chunk: a few temporaries of about
CHUNK_ELEMENTS each (large chunks: per-op overhead dominates small ones on CPU). The gradient is assembled from the masked distributions q, p with per-row coefficients, so each
[rows, V] temporary is touched only a few times.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22
NEG_INF = float("-inf")


def accumulator_dtype(*tensors):
    """float64 when any input is float64, float32 otherwise: the dtype of the row math."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _masked_log_probs(x, index, temperature):
    """log_softmax over k != target of x / T (x is overwritten) and LSE' [rows]. An all -inf row
    gets -inf log-probs (q = 0) and LSE' = -inf."""
    x.scatter_(1, index, NEG_INF)
    if temperature != 1.0:
        x.div_(temperature)
    top, argmax = x.max(dim=1)
    log_probs = torch.log_softmax(x, dim=1)
    lse = top - log_probs.gather(1, argmax[:, None]).squeeze(1)
    empty = top == NEG_INF
    if empty.any():
        log_probs[empty] = NEG_INF
        lse[empty] = NEG_INF
    return log_probs, lse


def _chunk_rows(z_in, b_in, labels, *, lam, temperature, reverse, ignore_index, need_kl, grad_scale, grad_out):
    acc = accumulator_dtype(z_in, b_in)
    valid = labels != ignore_index
    label_ok = valid & (labels >= 0) & (labels < z_in.shape[1])
    index = torch.where(label_ok, labels, 0)[:, None]
    unit_t = temperature == 1.0

    z = z_in.to(acc, copy=True)
    z_label = z.gather(1, index).squeeze(1)
    lse = None if unit_t else torch.logsumexp(z, dim=1)
    log_q, z_lse = _masked_log_probs(z, index, temperature)
    if unit_t:
        lse = torch.logaddexp(z_lse, z_label)
    lse = torch.where(label_ok, lse, float("nan"))
    ce = torch.where(valid, lse - z_label, 0.0)
    q = log_q.exp()

    kl = torch.zeros_like(ce)
    constant_kl = torch.ones_like(valid)
    if need_kl or lam > 0:
        b = b_in.to(acc, copy=True)
        b_label = b.gather(1, index).squeeze(1)
        log_p, b_lse = _masked_log_probs(b, index, temperature)
        p = log_p.exp()
        weight = q if reverse else p
        log_ratio = (log_q - log_p) if reverse else log_p.sub_(log_q)  # log_p is not needed after this
        log_ratio.scatter_(1, index, 0.0)  # the target column: -inf - -inf
        kl = torch.linalg.vecdot(weight, log_ratio)
        # A term of weight 0 contributes 0, never 0 * inf = NaN. Only rows with -inf logits (or NaN
        # inputs) can hold such terms, and their KL is NaN: mask those rows and sum again.
        suspect = kl.isnan().nonzero().squeeze(1)
        if suspect.numel():
            log_ratio[suspect] = log_ratio[suspect].masked_fill_(weight[suspect] == 0, 0.0)
            kl[suspect] = torch.linalg.vecdot(weight[suspect], log_ratio[suspect])
        base_empty, adapted_empty = b_lse == NEG_INF, z_lse == NEG_INF
        constant_kl = base_empty | adapted_empty
        if reverse:
            kl = torch.where(constant_kl, 0.0, kl)
        else:
            kl = torch.where(base_empty, 0.0, torch.where(adapted_empty, float("inf"), kl))
        kl = torch.where(b_label.isnan(), float("nan"), kl)
        kl = torch.where(valid, kl, 0.0)
        constant_kl |= kl == float("inf")

    if grad_out is not None:
        # grad = softmax(z) - onehot(y) + lam T (q - p)  [forward]  or  + lam T q (log q - log p - KL)  [reverse],
        # times the scale; the q terms share one coefficient.
        scale = grad_scale.to(acc).reshape(())
        q_coef = torch.where(constant_kl | ~valid, 0.0, lam * temperature * scale)[:, None]
        p_coef = q_coef if lam > 0 and not reverse else None
        if lam > 0 and reverse:
            log_ratio[constant_kl] = 0.0
            q_coef = log_ratio.sub_(torch.where(constant_kl, 0.0, kl)[:, None]).mul_(q_coef)
        grad = grad_out if grad_out.dtype == acc else torch.empty_like(q)
        if unit_t:  # softmax(z)_k = q_k exp(Z' - LSE) off the target
            torch.mul(q, q_coef + ((z_lse - lse).exp() * scale)[:, None], out=grad)
        else:
            torch.sub(z_in.to(acc), lse[:, None], out=grad).exp_().mul_(scale)
            if lam > 0:
                grad.addcmul_(q, q_coef)
        if p_coef is not None:
            grad.addcmul_(p, p_coef, value=-1.0)
        grad.scatter_(1, index, (((z_label - lse).exp() - 1.0) * scale)[:, None])
        grad[~valid] = 0.0
        if grad is not grad_out:
            grad_out.copy_(grad)
    return ce, kl


def mtt_rows_torch(logits, base_logits, labels, *, lam, temperature, reverse, ignore_index,
                   need_kl, grad_scale=None, grad_out=None):
    """Per-row (ce, kl) for [N, V] logits; writes grad_scale * dL_i/dlogits into `grad_out` if given.

    Same contract as the Triton row kernel; float32 math (float64 when an input is float64).
    `grad_out` may be `logits` itself.
    """
    n_rows, n_cols = logits.shape
    acc = accumulator_dtype(logits, base_logits)
    ce = torch.empty(n_rows, dtype=acc, device=logits.device)
    kl = torch.empty_like(ce)
    if grad_scale is None:
        grad_scale = torch.ones(1, dtype=acc, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        if not bool((labels[rows] != ignore_index).any()):  # nothing to compute: padding only
            ce[rows], kl[rows] = 0.0, 0.0
            if grad_out is not None:
                grad_out[rows] = 0.0
            continue
        ce[rows], kl[rows] = _chunk_rows(
            logits[rows], base_logits[rows], labels[rows], lam=lam, temperature=temperature, reverse=reverse,
            ignore_index=ignore_index, need_kl=need_kl, grad_scale=grad_scale,
            grad_out=None if grad_out is None else grad_out[rows])
    return ce, kl
