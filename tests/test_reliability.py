"""Bad input, empty and huge inputs, strides, gradcheck, determinism, torch.compile, property tests."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmtt
from fastmtt import reference
from fastmtt._dispatch import implementation
from fastmtt.options import MTTOptions
from fastmtt.partials import CE, KL
from tests.conftest import DTYPES
from tests.test_mtt_loss import check_against_reference, make_inputs

BACKENDS = ["torch", "triton"]


def _inputs(n=6, v=11):
    logits, base, labels = make_inputs(n, v, torch.float32, seed=21)
    return logits, base, labels


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
    (lambda a: a.update(direction="sideways"), ValueError, "direction"),
    (lambda a: a.update(reduction="avg"), ValueError, "reduction"),
    (lambda a: a.update(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    (lambda a: a.update(num_items_in_batch=2.5), ValueError, "num_items_in_batch"),
    (lambda a: a.update(num_items_in_batch=4, reduction="sum"), ValueError, "num_items_in_batch"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend"),
])
def test_bad_arguments_name_the_argument(change, error, match):
    logits, base, labels = _inputs()
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


def _rows(backend, logits, base, labels, grad_out=None):
    """(ce, kl) per row from the backend's MTT row implementation (lam 1, forward KL)."""
    stats = implementation("mtt_rows", backend)(logits, base, labels, MTTOptions(lam=1.0), need_kl=True,
                                                grad_out=grad_out)
    return stats[CE], stats[KL]


@pytest.mark.parametrize("rows_backend", ["torch", "triton"])
def test_out_of_range_label_poisons_its_row_without_reading_out_of_bounds(rows_backend):
    """Past validation (as under torch.compile) a bad label is never used as an address."""
    logits, base, labels = make_inputs(4, 9, torch.float32, seed=22, ignore_fraction=0.0)
    labels[1], labels[2] = 9, -7
    grad = torch.empty_like(logits)
    ce, kl = _rows(rows_backend, logits, base, labels, grad_out=grad)
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
    logits, base, labels = make_inputs(12, 70, torch.float32, seed=23)
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


@pytest.mark.parametrize("rows_backend", ["torch", "triton"])
def test_more_than_2_pow_31_elements_are_indexed_with_64_bit_offsets(rows_backend):
    """[N, V] fp16 with N*V > 2^31: only the last rows (past element 2^31) hold labels; the untouched
    pages of the big allocation are never written, so this costs little real memory."""
    n, v = 32_770, 65_539
    assert n * v > 2**31
    big = torch.empty(n + 1, v, dtype=torch.float16)
    logits, base = big[:n], big[1:]  # base row i is storage row i + 1
    labels = torch.full((n,), -100, dtype=torch.long)
    tail = torch.randn(3, v, generator=torch.Generator().manual_seed(24)).half()
    big[-3:] = tail
    labels[-2:] = torch.tensor([5, v - 1])
    ce, kl = _rows(rows_backend, logits, base, labels)
    expected = reference.mtt_loss(tail[:2].double(), tail[1:].double(), labels[-2:], lam=1.0, reduction="none")
    torch.testing.assert_close(ce[-2:].double(), expected.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl[-2:].double(), expected.kl, rtol=1e-4, atol=1e-5)
    assert ce[:-2].eq(0).all() and kl[:-2].eq(0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction,temperature", [("mean", 1.0), ("sum", 2.0), ("none", 0.5)])
def test_gradcheck_float64(direction, reduction, temperature):
    logits, base, labels = make_inputs(5, 7, torch.float64, seed=25)
    labels[2] = -100
    x = logits.clone().requires_grad_(True)

    def fn(x):
        return fastmtt.mtt_loss(x, base, labels, lam=0.8, temperature=temperature, direction=direction,
                                reduction=reduction, backend="torch")

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_cpu_path_is_bitwise_reproducible():
    logits, base, labels = make_inputs(300, 5000, torch.float32, seed=26)

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
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    spread = draw(st.sampled_from([0.1, 3.0, 20.0]))
    logits = (torch.randn(n, v, generator=g) * spread).to(dtype)
    base = (torch.randn(n, v, generator=g) * spread).to(draw(st.sampled_from([dtype, torch.float32])))
    labels = torch.randint(0, v, (n,), generator=g)
    ignore = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    labels[ignore] = -100
    if v > 3 and draw(st.booleans()):  # padded vocabulary
        logits[:, -2:] = float("-inf")
        base[:, -2:] = float("-inf")
        labels = labels.clamp(max=v - 3).masked_fill(ignore, -100)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    options = dict(lam=draw(st.sampled_from([0.0, 0.3, 2.0])), temperature=draw(st.sampled_from([1.0, 0.7, 3.0])),
                   direction=draw(st.sampled_from(["forward", "reverse"])), reduction=reduction,
                   num_items_in_batch=draw(st.sampled_from([None, 7])) if reduction == "mean" else None)
    return logits, base, labels, options


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=mtt_problems())
def test_property_matches_reference(backend, problem):
    logits, base, labels, options = problem
    check_against_reference(backend, logits, base, labels, **options)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64_lora_linear(with_bias):
    g = torch.Generator().manual_seed(28)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 6, generator=g, dtype=torch.float64)
    lora_a = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    lora_b = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True) if with_bias else None
    inputs = (x.requires_grad_(True), lora_a, lora_b) + ((bias,) if with_bias else ())

    def fn(x, a, b, *bias):
        return fastmtt.lora_linear(x, weight, a, b, 0.5, bias=bias[0] if bias else None, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_torch_compile_of_lora_linear_matches_eager():
    g = torch.Generator().manual_seed(29)
    x, weight = torch.randn(8, 12, generator=g), torch.randn(10, 12, generator=g)
    lora_a = torch.randn(4, 12, generator=g).requires_grad_(True)
    lora_b = torch.randn(10, 4, generator=g).requires_grad_(True)

    def step(x):
        y = fastmtt.lora_linear(x, weight, lora_a, lora_b, 2.0)
        y.square().sum().backward()
        return y.detach()

    eager = step(x)
    grads = [lora_a.grad.clone(), lora_b.grad.clone()]
    lora_a.grad = lora_b.grad = None
    torch.testing.assert_close(torch.compile(step)(x), eager)
    torch.testing.assert_close([lora_a.grad, lora_b.grad], grads)


def _fused_linear_problem(dtype=torch.float64, n=7, h=5, v=9, seed=30):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    base_hidden = hidden + 0.3 * torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    bias = torch.randn(v, generator=g, dtype=dtype)
    lora_a, lora_b = torch.randn(2, h, generator=g, dtype=dtype), torch.randn(v, 2, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    return hidden, base_hidden, weight, bias, lora_a, lora_b, labels


@pytest.mark.parametrize("direction,reduction,softcap", [("forward", "mean", None), ("reverse", "none", 4.0),
                                                         ("forward", "sum", 2.0)])
def test_gradcheck_float64_fused_linear(direction, reduction, softcap):
    """weight and bias also form the base logits, which are constants of the loss (the base is frozen),
    so a finite difference through them measures another function; their gradients are checked
    against the reference in tests/test_fused_linear.py."""
    hidden, base_hidden, weight, bias, lora_a, lora_b, labels = _fused_linear_problem()
    inputs = tuple(t.requires_grad_(True) for t in (hidden, lora_a, lora_b))

    def fn(hidden, lora_a, lora_b):
        return fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, bias=bias, lora_A=lora_a,
                                             lora_B=lora_b, lora_scaling=0.5, softcap=softcap, lam=0.8,
                                             temperature=1.5, direction=direction, reduction=reduction,
                                             chunk_size=3, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_torch_compile_of_fused_linear_training_step_matches_eager():
    hidden, base_hidden, weight, bias, lora_a, lora_b, labels = _fused_linear_problem(torch.float32, n=40, h=16, v=70)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)

    def step(hidden):
        out = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, bias=bias, lora_A=lora_a,
                                            lora_B=lora_b, lora_scaling=2.0, lam=0.5, return_components=True)
        out.loss.backward()
        return out.loss.detach(), out.kl

    x = hidden.clone().requires_grad_(True)
    eager = step(x)
    grads = [x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone()]
    x.grad = lora_a.grad = lora_b.grad = None
    torch.testing.assert_close(torch.compile(step)(x), eager)
    torch.testing.assert_close([x.grad, lora_a.grad, lora_b.grad], grads)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden"),
    (lambda a: a.update(base_hidden=a["base_hidden"][:-1]), ValueError, "base_hidden"),
    (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight"),
    (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias"),
    (lambda a: a.update(lora_A=a["lora_A"][:, :-1]), ValueError, "lora_A"),
    (lambda a: a.update(lora_B=None), ValueError, "lora_B"),
    (lambda a: a.update(labels=a["labels"][:-1]), ValueError, "labels"),
    (lambda a: a.update(labels=torch.full_like(a["labels"], 9)), ValueError, "labels"),
    (lambda a: a.update(softcap=0.0), ValueError, "softcap"),
    (lambda a: a.update(lam=-1.0), ValueError, "lam"),
])
def test_fused_linear_bad_arguments_name_the_argument(change, error, match):
    hidden, base_hidden, weight, bias, lora_a, lora_b, labels = _fused_linear_problem(torch.float32)
    args = dict(hidden=hidden, base_hidden=base_hidden, weight=weight, labels=labels, bias=bias, lora_A=lora_a,
                lora_B=lora_b, lam=1.0)
    change(args)
    with pytest.raises(error, match=match):
        fastmtt.fused_linear_mtt_loss(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_non_contiguous_hidden_and_transposed_weight(backend):
    hidden, base_hidden, weight, bias, lora_a, lora_b, labels = _fused_linear_problem(torch.float32, n=12, h=16, v=40)
    wide = torch.randn(12, 20)
    wide[:, 2:18] = hidden
    strided_weight = weight.t().contiguous().t()
    got = fastmtt.fused_linear_mtt_loss(wide[:, 2:18], base_hidden, strided_weight, labels, bias=bias, lam=0.5,
                                        reduction="none", backend=backend)
    want = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, bias=bias, lam=0.5,
                                         reduction="none", backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@st.composite
def fused_linear_problems(draw):
    from tests.test_fused_linear_mtt_loss import make_inputs as fused_inputs

    n_rows, vocab, hidden = draw(st.integers(2, 20)), draw(st.integers(2, 80)), draw(st.integers(1, 24))
    head = dict(bias=draw(st.booleans()), lora=draw(st.booleans()), weight_grad=draw(st.booleans()))
    inputs, labels, trainable = fused_inputs(draw(st.integers(0, 2**31 - 1)), n_rows=n_rows, vocab=vocab,
                                             hidden=hidden, ignored=draw(st.integers(0, n_rows - 2)), **head)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    options = dict(lam=draw(st.sampled_from([0.0, 0.4, 2.0])), temperature=draw(st.sampled_from([1.0, 2.5])),
                   direction=draw(st.sampled_from(["forward", "reverse"])), reduction=reduction,
                   softcap=draw(st.sampled_from([None, 3.0])), chunk_size=draw(st.sampled_from([None, 1, 7])))
    if reduction == "none":
        options["upstream"] = torch.randn(n_rows, generator=torch.Generator().manual_seed(n_rows))
    return inputs, labels, trainable, draw(st.sampled_from(list(DTYPES.values()))), options


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=fused_linear_problems())
def test_property_fused_linear_matches_reference(backend, problem):
    from tests.test_fused_linear_mtt_loss import check_against_reference as check_fused

    inputs, labels, trainable, dtype, options = problem  # rows 0 and 1 always hold labels (0 and V-1)
    check_fused(inputs, labels, trainable, dtype, backend=backend, **options)
