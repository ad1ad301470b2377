"""mtt_loss: PyTorch path and Triton kernel (interpreted) against the fp64 reference, edge semantics, bad input,
layouts, 64-bit offsets, gradcheck, determinism, torch.compile and property tests."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmtt
from fastmtt import reference
from fastmtt.options import DIRECTIONS
from tests.utils import (
    DTYPES,
    ROW_IMPLEMENTATIONS,
    HostReads,
    assert_kl_at_least_as_accurate,
    assert_parity,
    assert_parity_relative_to_scale,
    implementation,
    kl_part_of_gradient,
    mtt_inputs,
    mtt_rows,
    offset_close_rows,
    spy_on_row_gradients,
)

BACKENDS = ["torch", "triton"]

# (N, V, lam, temperature, reduction, num_items_in_batch): every value of each axis appears.
CASES = [
    (1, 1, 0.5, 1.0, "mean", None),
    (37, 2, 3.0, 2.0, "sum", None),
    (37, 127, 0.5, 2.0, "none", None),
    (256, 127, 3.0, 1.0, "mean", 500),
    (37, 4096, 0.0, 1.0, "mean", None),
    (256, 4096, 0.5, 1.0, "none", None),
    (1, 32017, 3.0, 2.0, "mean", None),
    (37, 32017, 0.5, 1.0, "sum", None),
]


def run(fn, logits, base, labels, upstream=None, **kw):
    """(loss, ce, kl, grad) of fn with gradient from `upstream` (default ones)."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, base, labels, **kw)
    loss = out.loss
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), out.ce, out.kl, x.grad


def fastmtt_fn(backend):
    def fn(x, base, labels, **kw):
        return fastmtt.mtt_loss(x, base, labels, return_components=True, backend=backend, **kw)
    return fn


def check_against_reference(backend, logits, base, labels, upstream=None, **kw):
    dtype = logits.dtype
    got = run(fastmtt_fn(backend), logits, base, labels, upstream, **kw)
    truth = run(reference.mtt_loss, logits.double(), base.double(), labels,
                None if upstream is None else upstream.double(), **kw)
    same = run(reference.mtt_loss, logits, base.to(dtype), labels,
               None if upstream is None else upstream.to(dtype), **kw)
    for name, g, s, t in zip(("loss", "ce", "kl"), got, same, truth):
        assert_parity(name, g, s, t, dtype)
    # An infinite row loss has no meaningful gradient; compare the rest.
    rows = truth[0].isfinite() if truth[0].dim() else slice(None)
    assert_parity("grad", got[3][rows], same[3][rows], truth[3][rows], dtype)
    return got, truth


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-V{}-lam{}-T{}-{}-{}".format(*c))
def test_parity(backend, dtype, direction, case):
    n, v, lam, temperature, reduction, num_items = case
    logits, base, labels = mtt_inputs(n, v, DTYPES[dtype], seed=n * v)
    check_against_reference(backend, logits, base, labels, lam=lam, temperature=temperature,
                            direction=direction, reduction=reduction, num_items_in_batch=num_items)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("direction,temperature,reduction,ce_weight", [
    ("forward", 1.0, "mean", 0.0), ("reverse", 1.0, "none", 0.0), ("forward", 2.0, "sum", 0.0),
    ("reverse", 0.5, "mean", 0.3)])
def test_ce_weight_scales_only_the_cross_entropy(backend, dtype, direction, temperature, reduction, ce_weight):
    """ce_weight = 0 leaves the divergence alone: its gradient, many small entries, must survive intact."""
    logits, base, labels = mtt_inputs(64, 3001, DTYPES[dtype], seed=31, confident_rows=8)
    upstream = torch.rand(64, generator=torch.Generator().manual_seed(33)) + 0.5 if reduction == "none" else None
    got, truth = check_against_reference(backend, logits, base, labels, upstream, lam=0.7, temperature=temperature,
                                         direction=direction, reduction=reduction, ce_weight=ce_weight)
    full = run(reference.mtt_loss, logits.double(), base.double(), labels,
               None if upstream is None else upstream.double(), lam=0.7, temperature=temperature,
               direction=direction, reduction=reduction)
    torch.testing.assert_close(truth[1], ce_weight * full[1])  # ce reports the weighted term
    assert (truth[3] - full[3]).abs().max() > 0.3 * full[3].abs().max()  # the CE part of the gradient is gone


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_weight_zero_leaves_out_an_infinite_cross_entropy(backend):
    """A target at -inf has CE = inf; with ce_weight = 0 its row is the (finite) masked KL alone."""
    logits, base, labels = mtt_inputs(5, 40, torch.float32, seed=34, ignore_fraction=0.0)
    logits[1, labels[1]] = float("-inf")
    got, truth = check_against_reference(backend, logits, base, labels, lam=0.9, reduction="none", ce_weight=0.0)
    assert got[0].isfinite().all() and got[3].isfinite().all() and truth[2][1] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logits_dtype,base_dtype", [("bf16", "fp32"), ("fp32", "fp16"), ("fp16", "bf16")])
def test_mixed_dtypes(backend, logits_dtype, base_dtype):
    logits, base, labels = mtt_inputs(37, 1000, DTYPES[logits_dtype], base_dtype=DTYPES[base_dtype], seed=5)
    check_against_reference(backend, logits, base, labels, lam=1.0, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam_zero_equals_torch_cross_entropy(backend):
    logits, base, labels = mtt_inputs(64, 333, torch.float32, seed=6)
    x = logits.clone().requires_grad_(True)
    loss = fastmtt.mtt_loss(x, base, labels, lam=0.0, backend=backend)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(y, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradient(backend, reduction):
    logits, base, labels = mtt_inputs(9, 50, torch.float32, seed=7)
    labels[:] = -100
    loss, ce, kl, grad = run(fastmtt_fn(backend), logits, base, labels, lam=1.0, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss)) and not loss.isnan().any()
    assert torch.equal(ce, torch.zeros_like(ce)) and torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_edge_rows(backend, direction):
    """Confident rows, padded vocabulary (-inf in both), base without mass outside the target."""
    n, v = 8, 67
    logits, base, labels = mtt_inputs(n, v, torch.float32, seed=8, ignore_fraction=0.0, padded_columns=7,
                                      confident_rows=1)  # columns 60.. padded; row 2 confident, p_y -> 1
    labels[3:] = torch.tensor([4, 5, 6, 7, 8])
    base[3, 4] += 40.0  # confident base row
    base[4, :] = float("-inf")  # base has no mass outside the target
    base[4, 5] = 1.0
    logits[5, :] = float("-inf")  # adapted has no mass outside the target
    logits[5, 6] = 2.0
    base[6, 10] = float("-inf")  # one term of weight 0 in the forward direction
    logits[7, 11] = float("-inf")  # one term of weight 0 in the reverse direction
    (loss, ce, kl, grad), (t_loss, t_ce, t_kl, t_grad) = check_against_reference(
        backend, logits, base, labels, lam=0.5, direction=direction, reduction="none")
    assert kl[4] == 0 and grad[4].isfinite().all()
    assert kl[5] == (float("inf") if direction == "forward" else 0.0)
    infinite_row = 7 if direction == "forward" else 6
    assert loss[infinite_row] == float("inf")
    finite_rows = [r for r in range(n) if r not in (5, infinite_row)]
    assert grad[:, 60:].eq(0).all() and grad[finite_rows].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapted_minus_inf_where_base_has_mass_is_infinite(backend):
    logits, base, labels = mtt_inputs(4, 30, torch.float32, seed=9, ignore_fraction=0.0)
    logits[1, (labels[1] + 1) % 30] = float("-inf")
    out = fastmtt.mtt_loss(logits, base, labels, lam=1.0, reduction="none", backend=backend)
    assert out[1] == float("inf") and out[[0, 2, 3]].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["logits", "base", "base_target"])
def test_nan_propagates_to_its_row_only(backend, where):
    logits, base, labels = mtt_inputs(5, 40, torch.float32, seed=10, ignore_fraction=0.0)
    tensor = logits if where == "logits" else base
    tensor[2, labels[2] if where == "base_target" else (labels[2] + 3) % 40] = float("nan")
    out = fastmtt.mtt_loss(logits, base, labels, lam=1.0, reduction="none", backend=backend)
    assert out[2].isnan() and out[[0, 1, 3, 4]].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradients_are_honored(backend, reduction):
    logits, base, labels = mtt_inputs(37, 129, torch.float32, seed=11)
    upstream = torch.randn(37) if reduction == "none" else torch.tensor(-2.5)
    check_against_reference(backend, logits, base, labels, upstream, lam=3.0, temperature=2.0,
                            direction="reverse", reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_gets_no_gradient_and_inputs_are_untouched(backend):
    logits, base, labels = mtt_inputs(16, 100, torch.float32, seed=12)
    x, b = logits.clone().requires_grad_(True), base.clone().requires_grad_(True)
    fastmtt.mtt_loss(x, b, labels, lam=1.0, backend=backend).backward()
    assert b.grad is None and x.grad is not None
    assert torch.equal(x.detach(), logits) and torch.equal(b.detach(), base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_logits_stores_the_gradient_in_place(backend):
    logits, base, labels = mtt_inputs(16, 100, torch.float32, seed=13)
    expected = run(fastmtt_fn(backend), logits, base, labels, lam=1.0)[3]
    x = logits.clone().requires_grad_(True)
    loss = fastmtt.mtt_loss(x, base, labels, lam=1.0, backend=backend, overwrite_logits=True)
    torch.testing.assert_close(x.detach(), expected)
    loss.backward()
    torch.testing.assert_close(x.grad, expected)


def test_rows_are_read_in_place_where_they_flatten_and_copied_otherwise():
    """docs/api.md, guarantees.md: [N, V] rows with any row stride are read (and with overwrite_logits written)
    in place; leading dims that do not flatten (logits[:, :-1] of [B, T, V]) are copied once."""
    logits, base, labels = mtt_inputs(12, 50, torch.float32, seed=31)
    wide = torch.cat([logits, torch.zeros(12, 7)], 1).requires_grad_(True)
    rows = wide[:, :50]  # row stride 57
    with torch.no_grad():
        before = wide.detach().clone()
    fastmtt.mtt_loss(rows, base, labels, overwrite_logits=True, backend="torch")
    assert not torch.equal(wide.detach()[:, :50], before[:, :50])  # the gradient went into the caller's rows
    full = torch.cat([logits.reshape(3, 4, 50), torch.zeros(3, 1, 50)], 1).requires_grad_(True)  # [3, 5, 50]
    kept = full.detach().clone()
    fastmtt.mtt_loss(full[:, :-1], base.reshape(3, 4, 50), labels.reshape(3, 4), overwrite_logits=True,
                     backend="torch")
    assert torch.equal(full.detach(), kept)  # written into a copy: [3, 4] rows of batch stride 250 do not flatten


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_work_without_requires_grad(backend, monkeypatch):
    seen = spy_on_row_gradients(monkeypatch)
    logits, base, labels = mtt_inputs(8, 50, torch.float32, seed=14)
    loss = fastmtt.mtt_loss(logits, base, labels, lam=1.0, backend=backend)
    assert seen == [None] and not loss.requires_grad and loss > 0


def test_backends_agree_on_leading_batch_dims_and_module():
    logits, base, labels = mtt_inputs(24, 77, torch.float32, seed=15)
    shaped = [t.reshape(4, 6, *t.shape[1:]) for t in (logits, base, labels)]
    module = fastmtt.MTTLoss(lam=0.5, temperature=2.0, direction="reverse", reduction="none")
    out = module(*shaped)
    assert out.shape == (4, 6)
    flat = fastmtt.mtt_loss(logits, base, labels, lam=0.5, temperature=2.0, direction="reverse", reduction="none")
    torch.testing.assert_close(out.reshape(-1), flat)
    for backend in BACKENDS:
        torch.testing.assert_close(
            fastmtt.mtt_loss(*shaped, lam=0.5, backend=backend, return_components=True).kl,
            reference.mtt_loss(logits.double(), base.double(), labels, lam=0.5).kl.float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_on_leaf_logits_gives_the_same_gradient_every_backward(backend, reduction):
    """The gradient formed in forward goes to the first backward, never a buffer kept here (autograd adopts
    it, or a view of it, as a leaf's .grad); later backwards recompute it from the caller's logits."""
    logits, base, labels = mtt_inputs(6, 10, torch.float32, seed=16)
    x = logits.clone().requires_grad_(True)
    loss = fastmtt.mtt_loss(x.view(2, 3, 10), base.view(2, 3, 10), labels.view(2, 3), backend=backend,
                            reduction=reduction)
    upstream = torch.ones_like(loss) if reduction == "mean" else torch.randn(2, 3)
    expected = run(fastmtt_fn(backend), logits, base, labels, upstream.reshape(-1) if upstream.dim() else None,
                   reduction=reduction)[3]
    for _ in range(3):
        loss.backward(upstream, retain_graph=True)
        torch.testing.assert_close(x.grad, expected)
        x.grad.data.zero_()  # the caller owns .grad: zeroing it changes nothing inside the loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lost", ["overwritten", "freed", "changed"])
def test_a_second_backward_without_the_logits_raises(backend, lost):
    logits, base, labels = mtt_inputs(6, 10, torch.float32, seed=17)
    x = logits.clone().requires_grad_(True)
    produced = x * 1.0
    loss = fastmtt.mtt_loss(produced, base, labels, backend=backend, overwrite_logits=lost == "overwritten")
    if lost == "freed":
        del produced
    elif lost == "changed":
        produced.data.add_(1.0)
        torch.autograd.graph.increment_version(produced)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_logits_counts_as_an_in_place_write(backend):
    """The kernel's store into logits bumps their version: a producer that saved its output refuses to
    backpropagate through overwritten values instead of using them."""
    logits, base, labels = mtt_inputs(6, 10, torch.float32, seed=18)
    x = logits.clone().requires_grad_(True)
    produced = torch.exp(x / 10)
    version = produced._version
    loss = fastmtt.mtt_loss(produced, base, labels, backend=backend, overwrite_logits=True)
    assert produced._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_logits_refuses_logits_whose_rows_share_memory(backend):
    logits, base, labels = mtt_inputs(6, 10, torch.float32, seed=19)
    shared = logits[:1].clone().requires_grad_(True).expand(6, 10)
    with pytest.raises(ValueError, match="overwrite_logits"):
        fastmtt.mtt_loss(shared, base, labels, backend=backend, overwrite_logits=True)
    loss = fastmtt.mtt_loss(shared, base, labels, backend=backend)  # without overwriting: fine
    assert loss.isfinite()


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_naming_the_op(backend):
    """A gradient penalty differentiates the gradient: the kernels' backward cannot, and says so."""
    logits, base, labels = mtt_inputs(6, 10, torch.float32, seed=20)
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fastmtt.mtt_loss(x, base, labels, backend=backend), x, create_graph=True)
    with pytest.raises(RuntimeError, match="mtt_loss: double backward"):
        grad.square().sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_of_close_rows_with_offset_logits_keeps_its_digits(backend, direction, temperature):
    """Logits 2 randn - 100, adapted = base + 1e-3 noise: the KL (~5e-7) from row-relative statistics is at
    least as accurate as naive fp32 log_softmax in every row, never negative; with ce_weight = 0 so is
    the gradient."""
    logits, base, labels = offset_close_rows(48, 2053, seed=23)
    options = dict(lam=1.0, temperature=temperature, direction=direction, reduction="none", ce_weight=0.0)
    got = run(fastmtt_fn(backend), logits, base, labels, **options)
    naive = run(reference.mtt_loss, logits, base, labels, **options)
    truth = run(reference.mtt_loss, logits.double(), base.double(), labels, **options)
    assert_kl_at_least_as_accurate(got[2], naive[2], truth[2])
    assert_parity_relative_to_scale("grad", got[3], naive[3], truth[3])


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(logits=a["logits"].long()), TypeError, "logits"),
    (lambda a: a.update(base_logits=a["base_logits"][:, :-1]), ValueError, "base_logits"),
    (lambda a: a.update(labels=a["labels"].float()), TypeError, "labels"),
    (lambda a: a.update(labels=a["labels"][:-1]), ValueError, "labels"),
    (lambda a: a.update(labels=torch.full_like(a["labels"], 11)), ValueError, "labels"),
    (lambda a: a.update(labels=torch.full_like(a["labels"], -3)), ValueError, "labels"),
    (lambda a: a.update(logits=a["logits"][0]), ValueError, "logits"),
    (lambda a: a.update(base_logits=a["base_logits"].to("meta")), ValueError, "device"),
    (lambda a: a.update(lam=-0.1), ValueError, "lam"),
    (lambda a: a.update(lam=float("nan")), ValueError, "lam"),
    (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
    (lambda a: a.update(ce_weight=-1.0), ValueError, "ce_weight"),
    (lambda a: a.update(ce_weight=float("inf")), ValueError, "ce_weight"),
    (lambda a: a.update(ce_weight=True), TypeError, "ce_weight"),
    (lambda a: a.update(direction="sideways"), ValueError, "direction"),
    (lambda a: a.update(reduction="avg"), ValueError, "reduction"),
    (lambda a: a.update(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    (lambda a: a.update(num_items_in_batch=2.5), ValueError, "num_items_in_batch"),
    (lambda a: a.update(num_items_in_batch=4, reduction="sum"), ValueError, "num_items_in_batch"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend"),
    (lambda a: a.update(return_components="y"), TypeError, "return_components must be a bool, got 'y'"),
    (lambda a: a.update(overwrite_logits=1), TypeError, "overwrite_logits must be a bool"),
])
def test_bad_arguments_name_the_argument(change, error, match):
    logits, base, labels = mtt_inputs(6, 11, torch.float32, seed=21)
    args = dict(logits=logits, base_logits=base, labels=labels, lam=1.0)
    change(args)
    with pytest.raises(error, match=match):
        fastmtt.mtt_loss(**args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(backend, reduction):
    logits = torch.randn(0, 13, requires_grad=True)
    loss = fastmtt.mtt_loss(logits, torch.randn(0, 13), torch.zeros(0, dtype=torch.long), reduction=reduction,
                            backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ()) and (reduction == "none" or loss.item() == 0.0)
    loss.sum().backward()
    assert logits.grad.shape == (0, 13)


@pytest.mark.parametrize("backend", ROW_IMPLEMENTATIONS)
def test_out_of_range_label_poisons_its_row_without_reading_out_of_bounds(backend):
    """Past validation (as under torch.compile) a bad label is never used as an address."""
    logits, base, labels = mtt_inputs(4, 9, torch.float32, seed=22, ignore_fraction=0.0)
    labels[1], labels[2] = 9, -7
    grad = torch.empty_like(logits)
    ce, kl = mtt_rows(backend, logits, base, labels, grad_out=grad)
    assert ce[1:3].isnan().all() and ce[[0, 3]].isfinite().all() and kl[[0, 3]].isfinite().all()
    assert grad[1:3].isnan().all() and grad[[0, 3]].isfinite().all()


def _strided_variants(logits):
    """Same values, other layouts: column-major, a row-strided slice of a wider tensor, an expanded row."""
    n, v = logits.shape
    wide = torch.randn(n, v + 7)
    wide[:, 3:3 + v] = logits
    return {
        "transposed": logits.t().contiguous().t(),
        "row_stride": wide[:, 3:3 + v],
        "every_other_row": torch.stack([logits, torch.randn_like(logits)], 1).reshape(2 * n, v)[::2],
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row_stride", "every_other_row"])
def test_non_contiguous_inputs_match_contiguous(backend, layout):
    logits, base, labels = mtt_inputs(12, 70, torch.float32, seed=23)
    z, b = _strided_variants(logits)[layout], _strided_variants(base)[layout]
    assert not z.is_contiguous()
    x, xc = z.requires_grad_(True), logits.clone().requires_grad_(True)
    got = fastmtt.mtt_loss(x, b, labels, lam=0.7, reduction="none", backend=backend)
    want = fastmtt.mtt_loss(xc, base, labels, lam=0.7, reduction="none", backend=backend)
    upstream = torch.randn(12)
    got.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, xc.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ROW_IMPLEMENTATIONS)
def test_rows_past_element_2_pow_31_are_indexed_with_64_bit_offsets(backend):
    """fp16 logits, base and gradient whose last rows start past element 2^31 of their storage (a row stride
    of about 2^31 / 14, so a few programs reach it); only those rows hold labels. Pages never touched cost
    no real memory."""
    n, v = 16, 65_539
    stride = 2**31 // (n - 2) + 8
    assert (n - 2) * stride > 2**31
    storage = torch.empty(n * stride + v, dtype=torch.float16)
    logits = storage.as_strided((n, v), (stride, 1))
    base = storage.as_strided((n, v), (stride, 1), stride)  # base row i is logits row i + 1
    tail = torch.randn(3, v, generator=torch.Generator().manual_seed(24)).half()
    for i, row in enumerate(tail):  # storage rows n - 2, n - 1, n: logits rows n - 2, n - 1 and base rows too
        storage[(n - 2 + i) * stride:][:v] = row
    assert torch.equal(logits[-2:], tail[:2]) and torch.equal(base[-2:], tail[1:])
    labels = torch.full((n,), -100, dtype=torch.long)
    labels[-2:] = torch.tensor([5, v - 1])
    grad = torch.empty(n * stride + v, dtype=torch.float16).as_strided((n, v), (stride, 1))
    ce, kl = mtt_rows(backend, logits, base, labels, grad_out=grad)

    x = tail[:2].double().requires_grad_(True)
    expected = reference.mtt_loss(x, tail[1:].double(), labels[-2:], lam=1.0, reduction="none")
    expected.loss.sum().backward()
    torch.testing.assert_close(ce[-2:].double(), expected.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl[-2:].double(), expected.kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[-2:].double(), x.grad, rtol=1e-2, atol=1e-5)
    assert ce[:-2].eq(0).all() and kl[:-2].eq(0).all() and grad[:-2].eq(0).all()


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction,temperature", [("mean", 1.0), ("sum", 2.0), ("none", 0.5)])
def test_gradcheck_float64(direction, reduction, temperature):
    logits, base, labels = mtt_inputs(5, 7, torch.float64, seed=25)
    labels[2] = -100
    x = logits.clone().requires_grad_(True)

    def fn(x):
        return fastmtt.mtt_loss(x, base, labels, lam=0.8, temperature=temperature, direction=direction,
                                reduction=reduction, backend="torch")

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_cpu_path_is_bitwise_reproducible():
    logits, base, labels = mtt_inputs(300, 5000, torch.float32, seed=26)

    def once():
        x = logits.clone().requires_grad_(True)
        out = fastmtt.mtt_loss(x, base, labels, lam=1.0, return_components=True)
        out.loss.backward()
        return out.loss, out.kl, x.grad

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_torch_compile_training_step_matches_eager():
    torch.manual_seed(27)
    head = torch.nn.Linear(16, 50)
    hidden, base = torch.randn(32, 16), torch.randn(32, 50)
    labels = torch.randint(0, 50, (32,))
    labels[:4] = -100

    def step(hidden, base, labels):
        out = fastmtt.mtt_loss(head(hidden), base, labels, lam=0.5, temperature=2.0, return_components=True)
        out.loss.backward()
        return out.loss.detach(), out.kl

    eager = step(hidden, base, labels)
    eager_grad, head.weight.grad = head.weight.grad.clone(), None
    compiled = torch.compile(step)(hidden, base, labels)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(head.weight.grad, eager_grad)


@st.composite
def mtt_problems(draw):
    n = draw(st.integers(1, 24))
    v = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    logits, base, labels = mtt_inputs(
        n, v, dtype, base_dtype=draw(st.sampled_from([dtype, torch.float32])), seed=draw(st.integers(0, 2**31 - 1)),
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])), spread=draw(st.sampled_from([0.1, 3.0, 20.0])),
        confident_rows=draw(st.integers(0, 2)), padded_columns=draw(st.sampled_from([0, 2])) if v > 3 else 0)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    options = dict(lam=draw(st.sampled_from([0.0, 0.3, 2.0])), temperature=draw(st.sampled_from([1.0, 0.7, 3.0])),
                   direction=draw(st.sampled_from(DIRECTIONS)), reduction=reduction,
                   num_items_in_batch=draw(st.sampled_from([None, 7])) if reduction == "mean" else None)
    return logits, base, labels, options


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=mtt_problems())
def test_property_matches_reference(backend, problem):
    logits, base, labels, options = problem
    check_against_reference(backend, logits, base, labels, **options)
# --- mask_target=False (the full-vocabulary KL baseline) and vocabulary ranges ---

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_kl_matches_reference(backend, direction, temperature):
    logits, base, labels = mtt_inputs(29, 301, torch.float32, seed=41)
    logits[3, :40] = float("-inf")
    base[3, :40] = float("-inf")
    check_against_reference(backend, logits, base, labels, lam=0.8, temperature=temperature, direction=direction,
                            mask_target=False)
    masked = fastmtt.mtt_loss(logits, base, labels, lam=0.8, return_components=True, backend=backend)
    full = fastmtt.mtt_loss(logits, base, labels, lam=0.8, mask_target=False, return_components=True,
                            backend=backend)
    assert full.kl > masked.kl  # the full KL also counts the target's own probabilities


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature,mask_target", [(1.0, True), (2.0, True), (1.0, False)])
def test_vocabulary_split_in_two_and_merged_equals_whole_vocabulary(backend, direction, temperature, mask_target):
    """Partial statistics of [0, cut) and [cut, V), merged and finalized, give the whole row's loss, and each
    range's gradient from the merged statistics is the whole gradient's slice (labels on both sides)."""
    from fastmtt.options import MTTOptions
    from fastmtt.pytorch.partials import finalize, merge_partials

    logits, base, labels = mtt_inputs(23, 130, torch.float32, seed=42)
    labels[2], labels[3] = 61, 62  # on both sides of the cut
    cut = 62
    options = MTTOptions(lam=0.9, temperature=temperature, direction=direction, mask_target=mask_target)
    scale = torch.tensor([0.3])
    whole_grad = torch.empty_like(logits)
    whole = implementation("mtt_rows", backend)(logits, base, labels, options, need_kl=True, grad_scale=scale,
                                                 grad_out=whole_grad)
    ranges = [(0, cut), (cut, logits.shape[1])]
    parts = torch.stack([implementation("mtt_partials", backend)(
        logits[:, a:b].contiguous(), base[:, a:b].contiguous(), labels, options, vocab_start=a, need_kl=True)
        for a, b in ranges]).float()
    merged = finalize(merge_partials(parts, options), labels, options, need_kl=True)
    # equal_nan: ignored rows have no label, hence LSE = NaN in both
    torch.testing.assert_close(merged.float(), whole.float(), rtol=1e-5, atol=1e-5, equal_nan=True)
    for a, b in ranges:
        grad = torch.empty(logits.shape[0], b - a)
        implementation("mtt_gradient", backend)(logits[:, a:b].contiguous(), base[:, a:b].contiguous(), labels,
                                                merged, options, vocab_start=a, grad_scale=scale, grad_out=grad)
        torch.testing.assert_close(grad, whole_grad[:, a:b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_rows_equal_ce_weight_zero_on_the_other_rows_whole_and_split(backend):
    """ce_rows: CE on the rows it marks, the divergence alone (ce_weight=0) on the others: equal to the two
    calls it replaces, to the reference, and across a vocabulary split (each range's gradient from the merged
    statistics)."""
    from fastmtt.ops.mtt_loss import mtt_loss_with_options
    from fastmtt.options import MTTOptions

    logits, base, labels = mtt_inputs(21, 130, torch.float32, seed=8)
    ce_rows = torch.arange(21) % 3 != 0
    options = MTTOptions(lam=0.9, temperature=1.5)

    def run(fn, dtype, **kwargs):
        leaf = logits.to(dtype, copy=True).requires_grad_(True)
        out = fn(leaf, base.to(dtype), **kwargs)
        (grad,) = torch.autograd.grad(out[0], leaf)
        return (*out, grad)

    def two_calls(fn, leaf, base_logits, **kwargs):
        parts = [fn(leaf[rows], base_logits[rows], labels[rows], lam=0.9, temperature=1.5, num_items_in_batch=30,
                    ce_weight=weight, **kwargs) for rows, weight in ((ce_rows, 1.0), (~ce_rows, 0.0))]
        return [a + b for a, b in zip(*parts)]

    one = run(lambda leaf, b: mtt_loss_with_options(leaf, b, labels, options, ce_rows=ce_rows, num_items_in_batch=30,
                                                    return_components=True, backend=backend), torch.float32)
    two = run(lambda leaf, b: two_calls(fastmtt.mtt_loss, leaf, b, return_components=True, backend=backend),
              torch.float32)
    same, truth = (run(lambda leaf, b: two_calls(reference.mtt_loss, leaf, b), dtype)
                   for dtype in (torch.float32, torch.float64))
    assert one[1] > 0 and one[2] > 0
    for what, got, want, s, t in zip(("loss", "ce", "kl", "grad"), one, two, same, truth):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=what)
        assert_parity(what, got, s, t, torch.float32)

    from fastmtt.rows import merged_statistics, mtt_gradient, mtt_partials

    scale = torch.tensor([1 / 30])
    ranges = [(0, 62), (62, 130)]
    parts = torch.stack([mtt_partials(logits[:, a:b].contiguous(), base[:, a:b].contiguous(), labels, options,
                                      backend=backend, vocab_start=a, need_kl=True) for a, b in ranges])
    merged = merged_statistics(parts.float(), labels, options, True)
    for a, b in ranges:
        grad = torch.empty(21, b - a)
        mtt_gradient(logits[:, a:b].contiguous(), base[:, a:b].contiguous(), labels, merged, options, backend=backend,
                     vocab_start=a, grad_scale=scale, grad_out=grad, ce_rows=ce_rows)
        torch.testing.assert_close(grad, one[3][:, a:b], rtol=1e-5, atol=1e-6)


# --- the regularizer's gradient on its own, on realistic rows ---

def confident_rows(n, v, seed):
    """Targets 20 nats above logits of std 1, drawn from a few frequent tokens (two vocabulary tiles), and a
    base model close to the adapted one: the rows where a gradient filter or 16-bit logits lose the KL part."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g)
    base = logits + 0.05 * torch.randn(n, v, generator=g)
    frequent = torch.cat([torch.arange(0, 8), torch.arange(v - 8, v)])
    labels = frequent[torch.randint(0, len(frequent), (n,), generator=g)]
    rows = torch.arange(n)
    logits[rows, labels] += 20.0
    base[rows, labels] += 20.0
    return logits, base, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kl_part_of_the_gradient_survives_bf16_on_confident_rows(backend, direction):
    logits, base, labels = confident_rows(24, 4096, seed=43)
    logits, base = logits.bfloat16(), base.bfloat16()
    ours = kl_part_of_gradient(
        lambda x, lam: fastmtt.mtt_loss(x, base, labels, lam=lam, direction=direction, backend=backend), logits)
    truth = kl_part_of_gradient(
        lambda x, lam: reference.mtt_loss(x, base.double(), labels, lam=lam, direction=direction), logits.double())
    assert truth.norm() > 0
    assert (ours - truth).norm() <= 0.05 * truth.norm()




# --- the row kernel's tiling: several tiles per row, masked and mask-free tiles, several rows per program ---

@pytest.mark.parametrize("direction,temperature,mask_target", [("forward", 1.0, True), ("reverse", 2.0, True),
                                                               ("reverse", 1.0, False)])
def test_row_kernel_tiles_with_and_without_the_label(monkeypatch, direction, temperature, mask_target):
    """32-column tiles: only the label's tile and the partial last one take the masked path. T = 1 (q and
    the softmax share one exponential) and T = 2, the full-vocabulary KL, edge rows (-inf entries in
    mask-free tiles); with 4 rows per program lam = 0 on bf16 and vocabulary ranges."""
    from fastmtt.kernels import mtt_loss as kernel

    logits, base, labels = mtt_inputs(8, 100, torch.float32, seed=44)
    options = dict(temperature=temperature, direction=direction, mask_target=mask_target, reduction="none")
    monkeypatch.setattr(kernel, "_block_sizes", lambda n_cols: (1, 32, 1))
    check_against_reference("triton", logits, base, labels, lam=0.7, **options)
    if mask_target:
        test_edge_rows("triton", direction)
    monkeypatch.setattr(kernel, "_block_sizes", lambda n_cols: (4, 32, 1))
    check_against_reference("triton", logits.bfloat16(), base.bfloat16(), labels, lam=0.0, **options)
    test_vocabulary_split_in_two_and_merged_equals_whole_vocabulary("triton", direction, temperature, mask_target)


def test_auto_on_cuda_without_triton_warns_once_and_runs_pytorch(monkeypatch):
    """No silent slow path: CUDA tensors without the triton package take the PyTorch rows, and say so once."""
    import warnings
    from types import SimpleNamespace

    from fastmtt import _dispatch

    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    _dispatch._warn_no_triton.cache_clear()
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, is_floating_point=lambda: True)
    try:
        with pytest.warns(RuntimeWarning, match="triton is not installed"):
            assert _dispatch.resolve_backend("auto", cuda_bf16) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _dispatch.resolve_backend("auto", cuda_bf16) == "torch"
    finally:
        _dispatch._warn_no_triton.cache_clear()


# --- argument checks of the options and counts (issue #19, items 6 and 7): every entry point, one rule ---------

@pytest.mark.parametrize("settings,match", [
    (dict(lam=float("inf")), "lam must be finite"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(lam=float("-inf")), "lam must be >= 0, got -inf"),
    (dict(lam=1e300), r"lam \* temperature\*\*2 must be <= 3.403e\+38 \(float32\), got lam=1e\+300"),
    (dict(lam=1.0, temperature=1e20), r"lam \* temperature\*\*2 .* temperature=1e\+20"),
    (dict(temperature=1e-39), r"temperature must be >= 5.877e-39 \(1/temperature overflows float32\)"),
])
def test_non_finite_or_overflowing_settings_are_refused_up_front(settings, match):
    logits, base, labels = mtt_inputs(6, 11, torch.float32, seed=21)
    for build in (fastmtt.MTTOptions, lambda **kw: fastmtt.mtt_loss(logits, base, labels, **kw),
                  lambda **kw: fastmtt.MTTLoss(**kw)):
        with pytest.raises(ValueError, match=match):
            build(**settings)
    assert fastmtt.MTTOptions(lam=0.0, temperature=1e20).kl_weight == 0.0  # no divergence term: nothing overflows


@pytest.mark.parametrize("build,error,match", [
    (lambda: fastmtt.MTTLoss(backend="x"), ValueError, "backend must be one of"),
    (lambda: fastmtt.MTTLoss(return_components="y"), TypeError, "return_components must be a bool"),
    (lambda: fastmtt.FusedLinearMTTLoss(tiled="y"), TypeError, "tiled must be a bool, got 'y'"),
    (lambda: fastmtt.FusedLinearMTTLoss(backend="x"), ValueError, "backend must be one of"),
    (lambda: fastmtt.FusedLinearMTTLoss(softcap=float("inf")), ValueError, "softcap must be None or a finite"),
    (lambda: fastmtt.FusedLinearMTTLoss(softcap="30"), TypeError, "softcap must be None or a finite real number"),
    (lambda: fastmtt.FusedLinearMTTLoss(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (lambda: fastmtt.FusedLinearMTTLoss(lora_scaling="2"), TypeError, "lora_scaling must be a finite real number"),
    (lambda: fastmtt.MTTObjective(backend="x"), ValueError, "backend must be one of"),
])
def test_modules_and_the_objective_check_their_settings_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_options_with_keywords_is_refused_by_every_entry_point():
    from fastmtt.head import LinearHead
    from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss_with_options
    from fastmtt.ops.mtt_loss import mtt_loss_with_options

    options = fastmtt.MTTOptions(lam=2.0)
    for module in (fastmtt.MTTLoss, fastmtt.FusedLinearMTTLoss):
        with pytest.raises(TypeError, match=r"pass options=MTTOptions\(\.\.\.\) or lam, temperature, not both"):
            module(options, lam=1.0, temperature=1.0)  # even at their default values
        with pytest.raises(TypeError, match="options must be a fastmtt.MTTOptions"):
            module(dict(lam=2.0))
    logits, base, labels = mtt_inputs(6, 11, torch.float32, seed=21)
    with pytest.raises(TypeError, match="options must be a fastmtt.MTTOptions"):
        mtt_loss_with_options(logits, base, labels, dict(lam=2.0))
    head = LinearHead(torch.randn(11, 4))
    with pytest.raises(TypeError, match="options must be a fastmtt.MTTOptions"):
        fused_linear_mtt_loss_with_options(torch.randn(6, 4), torch.randn(6, 4), head, labels, dict(lam=2.0))


def test_counts_and_ignore_index_as_numpy_integers_and_integer_tensors():
    np = pytest.importorskip("numpy")
    logits, base, labels = mtt_inputs(6, 11, torch.float32, seed=21)
    want = fastmtt.mtt_loss(logits, base, labels, num_items_in_batch=5)
    for count in (np.int64(5), torch.tensor(5), torch.tensor([5], dtype=torch.int32)):
        torch.testing.assert_close(fastmtt.mtt_loss(logits, base, labels, num_items_in_batch=count), want)
    options = fastmtt.MTTOptions(ignore_index=np.int64(-1))
    assert options.ignore_index == -1 and type(options.ignore_index) is int
    torch.testing.assert_close(fastmtt.mtt_loss(logits, base, labels.masked_fill(labels == -100, -1),
                                                ignore_index=np.int32(-1)), fastmtt.mtt_loss(logits, base, labels))
    for count, match in ((torch.tensor(-3), "num_items_in_batch must be >= 0, got tensor"),
                         (np.int64(-3), "num_items_in_batch must be >= 0"),
                         (3.0, "num_items_in_batch must be a non-negative integer, got 3.0"),
                         (torch.tensor(3.0), "num_items_in_batch must be one integer"),
                         (True, "num_items_in_batch must be a non-negative integer"),
                         (torch.tensor(True), "num_items_in_batch must be one integer")):
        with pytest.raises(ValueError, match=match):
            fastmtt.mtt_loss(logits, base, labels, num_items_in_batch=count)
    for index in (True, 2.0, np.float64(-1.0)):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            fastmtt.MTTOptions(ignore_index=index)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_host_read_per_call_on_the_gpu_path(monkeypatch, reduction):
    """The Triton path reads the device once per forward + backward (check_values: the label range and a
    num_items_in_batch tensor's sign), and not in backward, even for an upstream gradient that is not 1."""
    monkeypatch.setattr("fastmtt.reduction.reads_are_free", lambda tensor: False)
    logits, base, labels = mtt_inputs(19, 70, torch.float32, seed=5)
    logits.requires_grad_(True)
    num_items = torch.tensor(11) if reduction == "mean" else None
    with HostReads() as host:
        loss = fastmtt.mtt_loss(logits, base, labels, lam=0.5, reduction=reduction, num_items_in_batch=num_items,
                                backend="triton")
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
    assert len(host.reads) == 1, host.reads
    assert logits.grad.abs().sum() > 0
