"""The MTT rows on a backend, whole or across a vocabulary split: the one place that picks an implementation.

`mtt_rows`, `mtt_partials` and `mtt_gradient` call the Triton row kernel (fastmtt/kernels/mtt_loss.py) for
backend "triton" and the PyTorch rows (fastmtt/pytorch/mtt_loss.py) for "torch", imported inside the call
(Triton loads only when a kernel runs); both define the three with these signatures, less `backend`.
Across a vocabulary split (`VocabParallel`) `mtt_rows` forms this rank's partials, exchanges and merges them
(`merged_statistics`), then writes the gradient of this rank's columns.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmtt.parallel import VocabParallel
from fastmtt.pytorch.partials import finalize, merge_partials


def mtt_rows(logits, base_logits, labels, options, *, backend: str, need_kl: bool, grad_scale=None, grad_out=None,
             ce_rows=None, vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """Row statistics [N_STATS, N] (fastmtt/partials.py) of [N, V] logits; writes grad_scale * dL_i/dlogits
    into `grad_out` when given (it may be `logits` itself).

    Args:
        logits, base_logits: [N, V] (unit column stride for "triton"); with vocab_parallel, [N, stop - start],
            this rank's columns.
        labels: [N] int64, global ids. options: an MTTOptions. backend: "triton" or "torch".
        need_kl: form the divergence even when options.lam == 0. grad_scale: [1], the gradient's factor
            (default 1). grad_out: [N, V] or None.
        ce_rows: [N] bool, or None (every row): the rows whose CE enters the gradient; the others' label is only
            the target to mask (the statistics hold every row's CE all the same).
        vocab_parallel: None, or this rank's share of a split (statistics identical on every rank).

    Returns:
        The statistics [N_STATS, N] of the whole vocabulary.
    """
    if vocab_parallel is not None:
        vocab_parallel.check_columns("logits", logits.shape[1])
        parts = mtt_partials(logits, base_logits, labels, options, backend=backend, vocab_start=vocab_parallel.start,
                             need_kl=need_kl)
        stats = merged_statistics(parts, labels, options, need_kl, vocab_parallel)
        if grad_out is not None:
            mtt_gradient(logits, base_logits, labels, stats, options, backend=backend,
                         vocab_start=vocab_parallel.start, grad_scale=grad_scale, grad_out=grad_out, ce_rows=ce_rows)
        return stats
    if backend == "triton":
        from fastmtt.kernels.mtt_loss import mtt_rows as rows
    else:
        from fastmtt.pytorch.mtt_loss import mtt_rows as rows
    return rows(logits, base_logits, labels, options, need_kl=need_kl, grad_scale=grad_scale, grad_out=grad_out,
                ce_rows=ce_rows)


def mtt_partials(logits, base_logits, labels, options, *, backend: str, vocab_start: int,
                 need_kl: bool) -> torch.Tensor:
    """Partial statistics [N_PARTIALS, N] of a vocabulary range: logits [N, n] hold columns
    [vocab_start, vocab_start + n) of the rows; labels are global ids."""
    if backend == "triton":
        from fastmtt.kernels.mtt_loss import mtt_partials as partials
    else:
        from fastmtt.pytorch.mtt_loss import mtt_partials as partials
    return partials(logits, base_logits, labels, options, vocab_start=vocab_start, need_kl=need_kl)


def mtt_gradient(logits, base_logits, labels, stats, options, *, backend: str, vocab_start: int, grad_scale,
                 grad_out, ce_rows=None) -> torch.Tensor:
    """grad_scale * dL_i/dlogits of a vocabulary range into grad_out, from merged statistics [N_STATS, N]
    (grad_scale None: 1; ce_rows as in `mtt_rows`)."""
    if backend == "triton":
        from fastmtt.kernels.mtt_loss import mtt_gradient as gradient
    else:
        from fastmtt.pytorch.mtt_loss import mtt_gradient as gradient
    return gradient(logits, base_logits, labels, stats, options, vocab_start=vocab_start, grad_scale=grad_scale,
                    grad_out=grad_out, ce_rows=ce_rows)


def merged_statistics(parts: torch.Tensor, labels, options, need_kl: bool,
                      vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """Finalized statistics [N_STATS, N] of the whole vocabulary from partials [K, N_PARTIALS, N] (or
    [N_PARTIALS, N]) of disjoint ranges; across a split, every rank's partials are gathered first (the
    result is then identical on every rank)."""
    parts = parts if parts.dim() == 3 else parts[None]
    if vocab_parallel is not None:
        parts = vocab_parallel.all_gather(parts).flatten(0, 1)
    return finalize(merge_partials(parts, options), labels, options, need_kl=need_kl)
