"""Vocabulary-parallel MTT on 2 CPU processes (gloo): each rank holds an uneven part of the vocabulary, and
loss, CE, KL and every gradient equal the whole-vocabulary result."""
import itertools
import os
import traceback

import pytest
import torch

import fastmtt
from tests.utils import close_gloo, init_gloo, launch_gloo

VOCAB, CUT = 97, 40  # rank 0 holds [0, 40), rank 1 holds [40, 97)
N_ROWS, HIDDEN, RANK = 13, 16, 3


def _inputs():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N_ROWS, HIDDEN, generator=g)
    base_hidden = hidden + 0.3 * torch.randn(N_ROWS, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.5
    bias = torch.randn(VOCAB, generator=g)
    lora_a = torch.randn(RANK, HIDDEN, generator=g) * 0.3
    lora_b = torch.randn(VOCAB, RANK, generator=g) * 0.3
    labels = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    labels[:4] = torch.tensor([0, CUT - 1, CUT, VOCAB - 1])  # targets on both shards and at both ends
    labels[5] = labels[9] = -100
    upstream = torch.rand(N_ROWS, generator=g) + 0.5
    return hidden, base_hidden, weight, bias, lora_a, lora_b, labels, upstream


CE_WEIGHT = {"mean": 1.0, "sum": 0.0, "none": 0.5}  # 0: the divergence alone, whose statistics cross ranks


def _close(what, got, want, failures, tol=2e-5):
    if not torch.allclose(got, want, rtol=tol, atol=tol):
        failures.append(f"{what}: max error {(got - want).abs().max().item():.3g}")


def _backward(loss, reduction, upstream):
    (loss * upstream if reduction == "none" else loss).sum().backward()


def _check_logits(rank, vp, backend, direction, reduction, failures):
    hidden, base_hidden, weight, bias, _, _, labels, upstream = _inputs()
    logits, base = hidden @ weight.T + bias, base_hidden @ weight.T + bias
    options = dict(lam=0.7, direction=direction, reduction=reduction, return_components=True, backend=backend,
                   ce_weight=CE_WEIGHT[reduction])
    whole = logits.clone().requires_grad_(True)
    want = fastmtt.mtt_loss(whole, base, labels, **options)
    _backward(want.loss, reduction, upstream)
    cols = slice(vp.start, vp.stop)
    part = logits[:, cols].contiguous().requires_grad_(True)
    got = fastmtt.mtt_loss(part, base[:, cols].contiguous(), labels, vocab_parallel=vp, **options)
    _backward(got.loss, reduction, upstream)
    tag = f"mtt_loss[{backend},{direction},{reduction}] rank {rank}"
    for name in ("loss", "ce", "kl"):
        _close(f"{tag} {name}", getattr(got, name), getattr(want, name).detach(), failures)
    _close(f"{tag} grad", part.grad, whole.grad[:, cols], failures)


def _check_fused_linear(rank, vp, backend, tiled, direction, reduction, failures, ce_rows=None):
    """ce_rows given: through fused_linear_mtt_loss_with_options, CE on those rows only (MTTObjective's call)."""
    from fastmtt.head import LinearHead
    from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss_with_options

    hidden, base_hidden, weight, bias, lora_a, lora_b, labels, upstream = _inputs()
    options = dict(lam=0.7, direction=direction, reduction=reduction, return_components=True, backend=backend,
                   ce_weight=CE_WEIGHT[reduction], tiled=tiled, chunk_size=8, softcap=5.0, lora_scaling=2.0)

    def run(rows, vocab_parallel):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight[rows], bias[rows], lora_a, lora_b[rows])]
        if ce_rows is None:
            out = fastmtt.fused_linear_mtt_loss(leaves[0], base_hidden, leaves[1], labels, bias=leaves[2],
                                                lora_A=leaves[3], lora_B=leaves[4], vocab_parallel=vocab_parallel,
                                                **options)
        else:
            head = LinearHead(leaves[1], leaves[2], leaves[3], leaves[4], 2.0, 5.0)
            out = fused_linear_mtt_loss_with_options(
                leaves[0], base_hidden, head, labels, fastmtt.MTTOptions(lam=0.7, direction=direction),
                return_components=True, backend=backend, tiled=tiled, chunk_size=8, vocab_parallel=vocab_parallel,
                ce_rows=ce_rows)
        _backward(out.loss, reduction, upstream)
        return out, [leaf.grad for leaf in leaves]

    want, want_grads = run(slice(None), None)
    got, got_grads = run(slice(vp.start, vp.stop), vp)
    tag = f"fused_linear[{backend},tiled={tiled},{direction},{reduction},ce_rows={ce_rows is not None}] rank {rank}"
    for name in ("loss", "ce", "kl"):
        _close(f"{tag} {name}", getattr(got, name), getattr(want, name).detach(), failures)
    rows = slice(vp.start, vp.stop)
    expected = (want_grads[0], want_grads[1][rows], want_grads[2][rows], want_grads[3], want_grads[4][rows])
    for name, g, w in zip(("hidden", "weight", "bias", "lora_A", "lora_B"), got_grads, expected):
        _close(f"{tag} d{name}", g, w, failures)


def _worker(rank, rendezvous, out_dir):
    failures = []
    init_gloo(rank, rendezvous)
    try:
        vp = fastmtt.VocabParallel(0, CUT) if rank == 0 else fastmtt.VocabParallel(CUT, VOCAB)
        for backend, direction, reduction in itertools.product(("torch", "triton"), ("forward", "reverse"),
                                                                ("mean", "sum", "none")):
            _check_logits(rank, vp, backend, direction, reduction, failures)
        for (backend, tiled), direction, reduction in itertools.product(
                (("torch", False), ("triton", False), ("triton", True)), ("forward", "reverse"),
                ("mean", "none")):
            _check_fused_linear(rank, vp, backend, tiled, direction, reduction, failures)
        for backend, tiled in (("torch", False), ("triton", False), ("triton", True)):
            _check_fused_linear(rank, vp, backend, tiled, "forward", "mean", failures,
                                ce_rows=torch.arange(N_ROWS) % 3 != 1)
    except Exception:  # report it as this rank's failure
        failures.append(traceback.format_exc())
    torch.save(failures, os.path.join(out_dir, f"rank{rank}.pt"))
    close_gloo()


@pytest.mark.slow
def test_vocabulary_parallel_loss_and_gradients_equal_the_whole_vocabulary(tmp_path):
    failures = [line for rank_failures in launch_gloo(_worker, tmp_path) for line in rank_failures]
    assert not failures, "\n".join(failures)


def test_vocab_parallel_arguments_are_checked():
    with pytest.raises(ValueError, match="start < stop"):
        fastmtt.VocabParallel(5, 5)
    with pytest.raises(ValueError, match="start"):
        fastmtt.VocabParallel(-1, 5)
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="vocab_parallel covers"):
        fastmtt.mtt_loss(logits, logits, torch.tensor([0, 1, 2]), vocab_parallel=fastmtt.VocabParallel(0, 12))
    with pytest.raises(TypeError, match="VocabParallel"):
        fastmtt.mtt_loss(logits, logits, torch.tensor([0, 1, 2]), vocab_parallel=(0, 10))
