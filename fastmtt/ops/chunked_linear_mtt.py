"""The chunked fused-linear MTT walk of `fused_linear_mtt_loss`, the same on every backend: per chunk of rows,
both logit slabs from one product, the MTT rows (`fastmtt.rows.mtt_rows`: the Triton row kernel or
PyTorch, across a vocabulary split too) writing the slab gradient, and the hidden, weight, bias and LoRA
gradients formed at once (docs: mtt-math, "From hidden states"). Only gradients outlive a chunk.

The slabs are fp32 (fp64 for fp64 inputs) whatever the inputs' dtype: logits of size ~20 in bf16 have a
resolution of 0.125 nats, far coarser than the difference between the base and the adapted model.
"""
from __future__ import annotations

import torch

from fastmtt.head import LinearGrads, LinearHead, accumulate_matmul
from fastmtt.partials import N_STATS
from fastmtt.reduction import accumulator_dtype
from fastmtt.rows import mtt_rows

MIN_CHUNK_ROWS_CPU = 256
MIN_CHUNK_ROWS_GPU = 1024  # the dh product [rows, V] x [V, H] stays large enough to fill the GPU
GPU_CHUNK_ROWS_MULTIPLE = 128  # a GEMM tile's rows
GPU_SLAB_BYTES_CAP = 1 << 32  # 4 GiB for both fp32 slabs and the 16-bit gradient of a chunk
SLAB_BYTES_PER_ENTRY = 10  # fp32 adapted + fp32 base logits + 16-bit gradient (`slab_bytes_per_entry`)


def slab_bytes_per_entry(dtype: torch.dtype, softcap) -> int:
    """Bytes per [rows, V] entry of a chunk: the two slabs in the accumulator dtype and, unless the gradient
    overwrites the adapted slab (inputs of that dtype, no softcap), a gradient in the inputs' dtype: 10 for
    16-bit inputs, 8 for fp32 (12 with softcap)."""
    acc = accumulator_dtype(torch.empty(0, dtype=dtype))
    in_place = softcap is None and dtype == acc
    return 2 * acc.itemsize + (0 if in_place else dtype.itemsize)


def default_chunk_size(n_rows: int, hidden_size: int, vocab_size: int, device: torch.device,
                       free_bytes: int | None = None, bytes_per_entry: int = SLAB_BYTES_PER_ENTRY) -> int:
    """Rows per chunk of the chunked path.

    GPU: equal chunks in multiples of 128 rows, as few as fit a slab budget of half the free memory
    (`free_bytes`, default: free in the driver plus free in torch's cache), capped at GPU_SLAB_BYTES_CAP
    (`bytes_per_entry` per entry), and at least MIN_CHUNK_ROWS_GPU rows, which overrides the cap above
    V = GPU_SLAB_BYTES_CAP / (bytes_per_entry * MIN_CHUNK_ROWS_GPU) (about 419k at 10 bytes). CPU: a
    multiple of 16 near a [rows, V] slab the size of the hidden states [N, H], at least MIN_CHUNK_ROWS_CPU
    rows.
    """
    vocab_size = max(vocab_size, 1)
    if device.type != "cuda":
        rows = max(MIN_CHUNK_ROWS_CPU, -(-n_rows * hidden_size // vocab_size))
        return -(-rows // 16) * 16
    if free_bytes is None:
        driver_free, _ = torch.cuda.mem_get_info(device)
        free_bytes = driver_free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = min(GPU_SLAB_BYTES_CAP, free_bytes // 2)
    multiple = GPU_CHUNK_ROWS_MULTIPLE
    max_rows = max(MIN_CHUNK_ROWS_GPU, budget // (bytes_per_entry * vocab_size) // multiple * multiple)
    n_rows = max(n_rows, 1)
    n_chunks = -(-n_rows // max_rows)
    rows_per_chunk = -(-n_rows // n_chunks)
    return -(-rows_per_chunk // multiple) * multiple


def chunked_linear_mtt(hidden, base_hidden, labels, head: LinearHead, options, *, backend, vocab_parallel, ce_rows,
                       need_kl, scale, chunk_size, needs, row_weights=None):
    """Per-row statistics [N_STATS, N] and the gradients flagged in `needs` (a LinearGrads of bools) of
    sum_i w_i * scale * loss_i, w = row_weights (else 1), as a LinearGrads (None where not flagged); the rows
    are `fastmtt.rows.mtt_rows` on `backend` and `vocab_parallel` (CE on the rows `ce_rows` marks). Parameter
    gradients accumulate in fp32 (fp64 for fp64 inputs) from products of the inputs' dtype (16-bit GEMMs on a
    GPU; the slab gradient is stored in the inputs' dtype)."""
    n_rows, hidden_size = hidden.shape
    vocab_size = head.weight.shape[0]
    acc = accumulator_dtype(hidden)
    device = hidden.device
    stats = []
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if needs.hidden else None
    d_weight = torch.zeros(vocab_size, hidden_size, dtype=acc, device=device) if needs.weight else None
    d_bias = torch.zeros(vocab_size, dtype=acc, device=device) if needs.bias else None
    d_lora_A = torch.zeros(head.lora_A.shape, dtype=acc, device=device) if needs.lora_A else None
    d_lora_B = torch.zeros(head.lora_B.shape, dtype=acc, device=device) if needs.lora_B else None
    any_grad = any(needs)
    has_kl = options.lam > 0 or need_kl

    for start in range(0, n_rows, chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows]
        lora_h = h @ head.lora_A.T if head.has_lora else None
        z, b = head.logits(h, base_hidden[rows] if has_kl else None, lora_h, dtype=acc)
        b = z if b is None else b  # not read without the KL term
        grad = None
        if any_grad:  # written over a slab already read, unless z is needed afterwards (softcap)
            in_place = head.softcap is None and hidden.dtype == acc
            grad = z if in_place else torch.empty(z.shape, dtype=hidden.dtype, device=device)
        stats.append(mtt_rows(z, b, labels[rows], options, backend=backend, need_kl=need_kl, grad_scale=scale,
                              grad_out=grad, ce_rows=None if ce_rows is None else ce_rows[rows],
                              vocab_parallel=vocab_parallel))
        if grad is None:
            continue
        if head.softcap is not None:  # dz_pre = dz * (1 - tanh^2(pre / c)), tanh(pre / c) = z / c
            grad.mul_(z.div_(head.softcap).square_().neg_().add_(1.0))
        if row_weights is not None:
            grad.mul_(row_weights[rows, None].to(grad.dtype))
        grad_mm = grad.to(head.weight.dtype)
        if needs.hidden:
            torch.mm(grad_mm, head.weight, out=d_hidden[rows])
        if head.has_lora and (needs.hidden or needs.lora_A):
            grad_B = grad_mm @ head.lora_B.to(grad_mm.dtype)  # the gradient times B: [n, r]
            if needs.hidden:
                d_hidden[rows].addmm_(grad_B.to(d_hidden.dtype), head.lora_A.to(d_hidden.dtype), alpha=head.scaling)
            if needs.lora_A:
                accumulate_matmul(d_lora_A, grad_B.T, h, alpha=head.scaling)
        if needs.weight:
            accumulate_matmul(d_weight, grad_mm.T, h)
        if needs.bias:
            d_bias.add_(grad.sum(0, dtype=acc))
        if needs.lora_B:
            accumulate_matmul(d_lora_B, grad_mm.T, lora_h, alpha=head.scaling)

    stats = torch.cat(stats, dim=1) if stats else torch.zeros(N_STATS, 0, dtype=acc, device=device)
    accumulated = (d_weight, d_bias, d_lora_A, d_lora_B)
    grads = (None if g is None else g.to(t.dtype) for g, t in zip(accumulated, head.tensors()))
    return stats, LinearGrads(d_hidden, *grads)
