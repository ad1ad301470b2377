"""Vocabulary-parallel MTT: each rank holds columns [start, stop) of the logits (or rows of the output head).

`VocabParallel` only describes the split and communicates: the ranks exchange only per-row partial
statistics (fastmtt/partials.py: N_PARTIALS floats per row and rank, through one all_gather), which
fastmtt/rows.py merges and finalizes identically on every rank; each rank writes the gradient of its own
columns. The loss, CE and KL are the same on every rank. Gradients that sum over the vocabulary
(hidden states, a replicated LoRA A of the head) are all-reduced unless the caller does it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch


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
