"""The specification checked against independent formulations."""
import pytest
import torch
import torch.nn.functional as F

from fastmtt import reference
from tests.utils import mtt_inputs


def _nckd(logits, base_logits, labels, temperature):
    """Decoupled KD's non-target term (NCKD), written independently: the same masked forward KL."""
    mask = F.one_hot(labels, logits.shape[1]).bool()
    student = F.log_softmax(logits / temperature - 1000.0 * mask, dim=1)
    teacher = F.softmax(base_logits / temperature - 1000.0 * mask, dim=1)
    return F.kl_div(student, teacher, reduction="none").sum(dim=1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_kl_equals_dkd_non_target_term(temperature):
    logits, base, labels = mtt_inputs(64, 50, torch.float64, seed=1, ignore_fraction=0.0)
    kl = reference.masked_kl_rows(logits, base, labels, temperature=temperature)
    torch.testing.assert_close(kl, _nckd(logits, base, labels, temperature), rtol=1e-9, atol=1e-12)


def test_reverse_kl_swaps_the_sides():
    logits, base, labels = mtt_inputs(16, 33, torch.float64, seed=2, ignore_fraction=0.0, spread=1.0)
    reverse = reference.masked_kl_rows(logits, base, labels, temperature=1.5, direction="reverse")
    torch.testing.assert_close(reverse, _nckd(base, logits, labels, 1.5), rtol=1e-9, atol=1e-12)


def test_lam_zero_is_cross_entropy_and_masked_kl_ignores_the_target_logit():
    logits, base, labels = mtt_inputs(20, 11, torch.float64, seed=3, spread=1.0)
    labels[3] = -100
    out = reference.mtt_loss(logits, base, labels, lam=0.0)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels))
    bumped = logits.clone()
    bumped[torch.arange(20), labels.clamp(min=0)] += 5.0
    torch.testing.assert_close(reference.masked_kl_rows(bumped, base, labels),
                               reference.masked_kl_rows(logits, base, labels))


def test_num_items_in_batch_makes_micro_batches_add_up():
    logits, base, labels = mtt_inputs(30, 9, torch.float64, seed=4, ignore_fraction=0.0, spread=1.0)
    labels[:7] = -100
    total = int((labels != -100).sum())
    whole = reference.mtt_loss(logits, base, labels, lam=0.7).loss
    parts = sum(reference.mtt_loss(logits[s], base[s], labels[s], lam=0.7, num_items_in_batch=total).loss
                for s in (slice(0, 13), slice(13, 30)))
    torch.testing.assert_close(parts, whole)
