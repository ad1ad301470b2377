"""Vocabulary-parallel MTT: each rank holds columns [start, stop) of the logits (or rows of the output head).

The ranks exchange only per-row partial statistics (fastmtt/partials.py: N_PARTIALS floats per row and
rank, through one all_gather), merge and finalize them identically, and each writes the gradient of its
own columns. The loss, CE and KL are the same on every rank. Gradients that sum over the vocabulary
(hidden states, a replicated LoRA A of the head) are all-reduced unless the caller does it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from fastmtt.pytorch.partials import finalize, merge_partials


@dataclasses.dataclass(frozen=True)
class VocabParallel:
    """This rank's vocabulary columns [start, stop) of a split across `group` (default: the world).

    sum_hidden_grad: all-reduce (sum) the gradients that add up over the vocabulary (hidden states and
    the head's LoRA A) across the group; False leaves that to the caller (e.g. a sequence-parallel layout).

    Args:
        start: the first vocabulary column (or head row) this rank holds, >= 0.
        stop: one past the last, > start; every rank holds stop - start columns of its own.
        group: the torch.distributed process group of the split (default None: the world).
        sum_hidden_grad: see above (default True).

    Pass it as `vocab_parallel=` to `mtt_loss` (logits [..., stop - start]) or `fused_linear_mtt_loss`
    (weight [stop - start, H]); labels stay global ids. The loss, ce and kl are the same on every rank.

    Example:
        >>> from fastmtt import VocabParallel
        >>> split = VocabParallel(start=0, stop=32000)  # rank 0 of two ranks splitting a 64000-token vocabulary
        >>> split.size
        32000
    """

    start: int
    stop: int
    group: Optional[Any] = None
    sum_hidden_grad: bool = True

    def __post_init__(self):
        for name in ("start", "stop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"VocabParallel.{name} must be a non-negative int, got {value!r}")
        if self.stop <= self.start:
            raise ValueError(f"VocabParallel needs start < stop, got [{self.start}, {self.stop})")

    @property
    def size(self) -> int:
        return self.stop - self.start

    def check_columns(self, name: str, n_cols: int):
        if n_cols != self.size:
            raise ValueError(f"{name} holds {n_cols} vocabulary columns but vocab_parallel covers "
                             f"[{self.start}, {self.stop}) ({self.size} columns)")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world, *tensor.shape]: every rank's tensor, in rank order."""
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def sum_across_ranks(self, *tensors):
        """All-reduce (sum) each tensor in place when sum_hidden_grad; None entries are skipped."""
        if not self.sum_hidden_grad:
            return
        import torch.distributed as dist

        for tensor in tensors:
            if tensor is not None:
                dist.all_reduce(tensor, group=self.group)

    def merged_statistics(self, parts: torch.Tensor, labels, options, need_kl) -> torch.Tensor:
        """Finalized statistics [N_STATS, N] of the whole vocabulary from this rank's partials ([K, N_PARTIALS,
        N] or [N_PARTIALS, N]), identical on every rank."""
        parts = parts if parts.dim() == 3 else parts[None]
        gathered = self.all_gather(parts).flatten(0, 1)
        return finalize(merge_partials(gathered, options), labels, options, need_kl=need_kl)

    def row_function(self, implementations):
        """An MTT row function with the signature of `mtt_rows` for this rank's columns: partials, exchanged
        and merged, then the gradient of its columns.

        Args:
            implementations: a row implementation module (`fastmtt.ops.mtt_loss.row_implementations`) whose
                `mtt_partials` and `mtt_gradient` run on this rank's columns.

        Returns:
            rows(logits, base_logits, labels, options, *, need_kl, grad_scale=None, grad_out=None) -> the
            finalized statistics [N_STATS, N] of the whole vocabulary, identical on every rank; the gradient
            of this rank's columns [N, stop - start] is written into grad_out when given.
        """
        partials_fn, gradient_fn = implementations.mtt_partials, implementations.mtt_gradient

        def rows(logits, base_logits, labels, options, *, need_kl, grad_scale=None, grad_out=None):
            self.check_columns("logits", logits.shape[1])
            parts = partials_fn(logits, base_logits, labels, options, vocab_start=self.start, need_kl=need_kl)
            stats = self.merged_statistics(parts, labels, options, need_kl)
            if grad_out is not None:
                if grad_scale is None:
                    grad_scale = torch.ones(1, dtype=stats.dtype, device=logits.device)
                gradient_fn(logits, base_logits, labels, stats, options, vocab_start=self.start, grad_scale=grad_scale,
                            grad_out=grad_out)
            return stats

        return rows

    def rows_fn(self, backend: str):
        """`row_function` of the implementations on `backend` ("torch" or "triton"): the earlier spelling."""
        from fastmtt.ops.mtt_loss import row_implementations

        return self.row_function(row_implementations(backend))
