"""The parity rule itself: it must fail where ours is worse than torch at any one entry."""
import pytest
import torch

from tests.utils import assert_parity


def test_parity_is_checked_entry_by_entry():
    """Torch errs by 0.1 at entry 0; ours errs by 0.05 at entry 1, where torch is exact. Worst against worst
    (0.05 <= 0.1) would pass; entry by entry it must not."""
    truth = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch_result, ours = truth.clone(), truth.clone()
    torch_result[0] += 0.1
    ours[1] += 0.05
    with pytest.raises(AssertionError, match="1 of 8 entries"):
        assert_parity("x", ours, torch_result, truth, torch.float32)
    ours[1] = truth[1] + 1e-6  # within fp32 tolerance
    assert_parity("x", ours, torch_result, truth, torch.float32)


def test_non_finite_entries_must_match_the_truth():
    truth = torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float64)
    assert_parity("x", truth.float(), truth.float(), truth, torch.float32)
    for wrong in ([1.0, 5.0, float("nan")], [1.0, float("-inf"), float("nan")], [1.0, float("inf"), 0.0]):
        with pytest.raises(AssertionError, match="non-finite"):
            assert_parity("x", torch.tensor(wrong), truth.float(), truth, torch.float32)
