"""fused_linear_mtt_loss against the reference on materialized logits (CCE parity rule, fp64 truth), memory,
the tiled path's gradient filter, bad input, layouts, gradcheck, torch.compile and property tests."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fastmtt
from fastmtt import reference
from fastmtt.options import DIRECTIONS
from tests.utils import (
    DTYPES,
    FUSED_LINEAR_GRADS,
    HostReads,
    assert_kl_at_least_as_accurate,
    assert_parity,
    confident_hidden_states,
    fused_linear_inputs,
    kl_part_of_gradient,
)

N_ROWS, HIDDEN, VOCAB, RANK = 37, 24, 97, 4  # fused_linear_inputs' defaults; 37 rows: never a multiple of a chunk


def evaluate(fn, inputs, labels, trainable, dtype, upstream=None, **options):
    """(loss, ce, kl, {name: grad}) for fn(inputs cast to dtype); `upstream` weights 'none' rows."""
    leaves = {k: v.detach().to(dtype).requires_grad_(k in trainable) for k, v in inputs.items()}
    args = dict(leaves)
    out = fn(args.pop("hidden"), args.pop("base_hidden"), args.pop("weight"), labels, **args, **options,
             **({"return_components": True} if fn is fastmtt.fused_linear_mtt_loss else {}))
    loss = out.loss
    weighted = (loss * upstream.to(loss.dtype)).sum() if upstream is not None else loss * 1.5
    names = [k for k in FUSED_LINEAR_GRADS if k in trainable and k in leaves]
    grads = torch.autograd.grad(weighted, [leaves[k] for k in names])
    return loss, out.ce, out.kl, dict(zip(names, grads))


def check_against_reference(inputs, labels, trainable, dtype, *, backend="torch", upstream=None, **options):
    got = evaluate(fastmtt.fused_linear_mtt_loss, inputs, labels, trainable, dtype, upstream,
                   backend=backend, **options)
    for execution_only in ("chunk_size", "grad_threshold", "tiled"):
        options.pop(execution_only, None)
    same = evaluate(reference.fused_linear_mtt_loss, inputs, labels, trainable, dtype, upstream, **options)
    truth = evaluate(reference.fused_linear_mtt_loss, inputs, labels, trainable, torch.float64, upstream, **options)
    for what, g, s, t in zip(("loss", "ce", "kl"), got[:3], same[:3], truth[:3]):
        assert_parity(what, g, s, t, dtype)
    assert got[3].keys() == truth[3].keys()
    for name, grad in got[3].items():
        assert grad.dtype == dtype, name
        assert_parity(f"d{name}", grad, same[3][name], truth[3][name], dtype)
        assert truth[3][name].abs().max() > 0, f"d{name} is trivially zero"
    return got


HEADS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "lora": dict(lora=True),
    "softcap": dict(softcap=4.0),
    "all+weight_grad": dict(bias=True, lora=True, softcap=4.0, weight_grad=True),
}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("head", list(HEADS))
def test_parity_over_dtypes_and_heads(dtype_name, head):
    options = dict(HEADS[head])
    softcap = options.pop("softcap", None)
    inputs, labels, trainable = fused_linear_inputs(10, **options)
    extra = dict(lora_scaling=0.5) if "lora_A" in inputs else {}
    check_against_reference(inputs, labels, trainable, DTYPES[dtype_name], softcap=softcap, lam=0.8,
                            temperature=1.5, chunk_size=8, **extra)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_directions_reductions_and_upstream_weights(direction, reduction, weight_grad):
    inputs, labels, trainable = fused_linear_inputs(11, bias=True, lora=True, weight_grad=weight_grad)
    upstream = torch.rand(N_ROWS) + 0.5 if reduction == "none" else None
    check_against_reference(inputs, labels, trainable, torch.float32, upstream=upstream, lora_scaling=2.0,
                            softcap=5.0, lam=1.3, temperature=0.7, direction=direction, reduction=reduction,
                            chunk_size=16)


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("ce_weight,reduction", [(0.0, "mean"), (0.0, "none"), (0.4, "sum")])
def test_ce_weight_on_every_path(backend, tiled, ce_weight, reduction):
    """ce_weight = 0: the divergence alone (rows of a prompt, the next token being the masked target)."""
    inputs, labels, trainable = fused_linear_inputs(14, bias=True, lora=True, weight_grad=True)
    upstream = torch.rand(N_ROWS) + 0.5 if reduction == "none" else None
    got = check_against_reference(inputs, labels, trainable, torch.float32, backend=backend, tiled=tiled,
                                  upstream=upstream, lora_scaling=0.5, lam=0.8, temperature=1.5, direction="reverse",
                                  ce_weight=ce_weight, reduction=reduction, num_items_in_batch=50 if reduction ==
                                  "mean" else None, **({} if tiled else {"chunk_size": 16}))
    assert ce_weight > 0 or got[1].abs().max() == 0


def test_num_items_in_batch_and_default_chunk():
    inputs, labels, trainable = fused_linear_inputs(12, bias=True, weight_grad=True)
    check_against_reference(inputs, labels, trainable, torch.float32, lam=0.5, num_items_in_batch=100)
    check_against_reference(inputs, labels, trainable, torch.float32, lam=0.0)


def test_all_rows_ignored_gives_zero_loss_and_zero_gradients():
    inputs, labels, trainable = fused_linear_inputs(13, lora=True, weight_grad=True, ignored=N_ROWS)
    labels[:] = -100
    for reduction in ("mean", "sum"):
        loss, ce, kl, grads = evaluate(fastmtt.fused_linear_mtt_loss, inputs, labels, trainable, torch.float32,
                                       reduction=reduction, chunk_size=8)
        assert loss.item() == 0.0 and ce.item() == 0.0 and kl.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_confident_logits_and_lora_in_another_dtype():
    inputs, labels, trainable = fused_linear_inputs(14, lora=True)
    inputs["weight"] = inputs["weight"] * 30.0  # near one-hot distributions on both sides
    check_against_reference(inputs, labels, trainable, torch.float32, lam=1.0, chunk_size=5)
    hidden = inputs["hidden"].bfloat16().requires_grad_()
    lora_A, lora_B = (inputs[k].clone().requires_grad_() for k in ("lora_A", "lora_B"))
    loss = fastmtt.fused_linear_mtt_loss(hidden, inputs["base_hidden"].bfloat16(), inputs["weight"].bfloat16(),
                                         labels, lora_A=lora_A, lora_B=lora_B)
    loss.backward()
    assert lora_A.grad.dtype == torch.float32 and lora_B.grad.abs().max() > 0


class _LargestTensor(TorchDispatchMode):
    """Largest number of elements of any tensor produced by an op."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_materializes_tokens_by_vocabulary(reduction):
    n_rows, vocab, chunk = 256, 301, 32
    inputs, labels, trainable = fused_linear_inputs(15, bias=True, lora=True, weight_grad=True, n_rows=n_rows,
                                                    vocab=vocab)
    leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in inputs.items()}
    with _LargestTensor() as probe:
        loss = fastmtt.fused_linear_mtt_loss(*(leaves.pop(k) for k in ("hidden", "base_hidden", "weight")), labels,
                                             **leaves, softcap=3.0, reduction=reduction, chunk_size=chunk)
        loss.sum().backward()
    assert probe.largest <= max(2 * chunk * vocab, vocab * HIDDEN) < n_rows * vocab  # both slabs of one chunk


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_tiled_triton_path_through_the_interpreter(dtype_name, direction):
    inputs, labels, trainable = fused_linear_inputs(16, bias=True, lora=True, weight_grad=True)
    check_against_reference(inputs, labels, trainable, DTYPES[dtype_name], backend="triton", tiled=True,
                            lora_scaling=0.5, softcap=4.0, lam=0.8, temperature=1.5, direction=direction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tiled_reductions_plain_head_unit_temperature(reduction):
    inputs, labels, trainable = fused_linear_inputs(19)
    upstream = torch.rand(N_ROWS) + 0.5 if reduction == "none" else None
    check_against_reference(inputs, labels, trainable, torch.float32, backend="triton", tiled=True, upstream=upstream,
                            lam=0.6, reduction=reduction, **({"num_items_in_batch": 50} if reduction == "mean" else {}))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_tiled_several_tiles_along_rows_vocabulary_and_hidden(direction):
    # Interpreter tiles are at most 64 rows x 1024 columns x 256 hidden: 2 x 2 x 2 tiles here.
    inputs, labels, trainable = fused_linear_inputs(22, bias=True, lora=True, weight_grad=True, n_rows=70, vocab=1100,
                                            hidden=300)
    check_against_reference(inputs, labels, trainable, torch.float32, backend="triton", tiled=True,
                            lora_scaling=0.5, softcap=6.0, lam=0.9, direction=direction)


def test_leading_dimensions_are_flattened():
    inputs, labels, trainable = fused_linear_inputs(23, n_rows=36)
    upstream = torch.rand(36) + 0.5
    flat = evaluate(fastmtt.fused_linear_mtt_loss, inputs, labels, trainable, torch.float32, upstream,
                    reduction="none")
    shaped_inputs = {k: v.reshape(4, 9, -1) if k in ("hidden", "base_hidden") else v for k, v in inputs.items()}
    shaped = evaluate(fastmtt.fused_linear_mtt_loss, shaped_inputs, labels.reshape(4, 9), trainable, torch.float32,
                      upstream.reshape(4, 9), reduction="none")
    assert shaped[0].shape == (4, 9)
    torch.testing.assert_close(shaped[0].reshape(-1), flat[0])
    torch.testing.assert_close(shaped[3]["hidden"].reshape(36, -1), flat[3]["hidden"])


def test_tiled_cross_entropy_only_and_all_ignored():
    inputs, labels, trainable = fused_linear_inputs(20, bias=True, weight_grad=True)
    check_against_reference(inputs, labels, trainable, torch.float32, backend="triton", tiled=True, lam=0.0,
                            softcap=3.0)
    labels[:] = -100
    loss, ce, kl, grads = evaluate(fastmtt.fused_linear_mtt_loss, inputs, labels, trainable, torch.float32,
                                   backend="triton", tiled=True)
    assert loss.item() == 0.0 and kl.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_tiled_gradient_filter_skips_only_negligible_tiles_and_only_for_plain_ce():
    # Three vocabulary tiles when interpreting (1024 columns each); the last two are pushed far below
    # the targets by the bias, so every |dL/dz| there is ~1e-9: the default bf16 filter skips them at
    # lam = 0. With lam > 0 nothing is skipped: the divergence's gradient is many small entries.
    inputs, labels, trainable = fused_linear_inputs(21, bias=True, vocab=2500)
    inputs["bias"][1024:] -= 20.0
    labels = torch.where(labels == -100, labels, labels % 1024)
    for lam in (0.0, 1.0):
        exact = evaluate(fastmtt.fused_linear_mtt_loss, inputs, labels, trainable, torch.bfloat16, backend="triton",
                         tiled=True, grad_threshold=0.0, lam=lam)[3]
        default = check_against_reference(inputs, labels, trainable, torch.bfloat16, backend="triton", tiled=True,
                                          lam=lam)[3]
        assert torch.count_nonzero(exact["bias"][1024:]) > 0
        assert torch.equal(default["bias"][:1024], exact["bias"][:1024])
        if lam == 0.0:
            assert torch.count_nonzero(default["bias"][1024:]) == 0
        else:
            assert torch.equal(default["bias"], exact["bias"])
    dropped = evaluate(fastmtt.fused_linear_mtt_loss, inputs, labels, trainable, torch.bfloat16, backend="triton",
                       tiled=True, grad_threshold=10.0, lam=0.0)[3]  # above every |dL/dz|: every tile skipped
    assert all(torch.count_nonzero(g) == 0 for g in dropped.values())


def test_module_matches_function():
    inputs, labels, _ = fused_linear_inputs(17, bias=True)
    module = fastmtt.FusedLinearMTTLoss(lam=0.3, softcap=4.0, chunk_size=8)
    expected = fastmtt.fused_linear_mtt_loss(inputs["hidden"], inputs["base_hidden"], inputs["weight"], labels,
                                             bias=inputs["bias"], lam=0.3, softcap=4.0)
    got = module(inputs["hidden"], inputs["base_hidden"], inputs["weight"], labels, bias=inputs["bias"])
    torch.testing.assert_close(got, expected)
    assert "softcap=4.0" in repr(module)


@pytest.mark.parametrize("change, message", [
    (dict(weight=torch.randn(VOCAB, HIDDEN + 1)), "weight must have shape"),
    (dict(weight=torch.randn(VOCAB, HIDDEN, dtype=torch.float64)), "weight must have the dtype"),
    (dict(bias=torch.randn(VOCAB + 1)), "bias must have shape"),
    (dict(lora_A=torch.randn(RANK, HIDDEN)), "lora_A and lora_B"),
    (dict(lora_A=torch.randn(RANK, HIDDEN), lora_B=torch.randn(VOCAB, RANK + 1)), "lora_B must have shape"),
    (dict(softcap=0.0), "softcap"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(grad_threshold=-1.0), "grad_threshold"),
    (dict(base_hidden=torch.randn(N_ROWS, HIDDEN + 1)), "base_hidden must have shape"),
    (dict(labels=torch.full((N_ROWS,), VOCAB)), "labels must lie in"),
    (dict(labels=torch.zeros(N_ROWS - 1, dtype=torch.long)), "labels"),
    (dict(hidden=torch.ones(N_ROWS, HIDDEN, dtype=torch.long)), "hidden"),
    (dict(base_hidden=torch.randn(N_ROWS - 1, HIDDEN)), "base_hidden"),
    (dict(lora_A=torch.randn(RANK, HIDDEN - 1), lora_B=torch.randn(VOCAB, RANK)), "lora_A"),
    (dict(lam=-1.0), "lam"),
    (dict(ce_weight=-0.5), "ce_weight"),
    (dict(softcap=float("inf")), "softcap must be None or a finite real number, got inf"),
    (dict(softcap="30"), "softcap must be None or a finite real number, got '30'"),
    (dict(grad_threshold="0.1"), "grad_threshold must be None or a finite real number, got '0.1'"),
    (dict(tiled="y"), "tiled must be a bool, got 'y'"),
    (dict(return_components="y"), "return_components must be a bool, got 'y'"),
    (dict(lora_scaling=float("nan")), "lora_scaling must be a finite real number"),
])
def test_bad_arguments_are_named(change, message):
    inputs, labels, _ = fused_linear_inputs(18)
    kwargs = {**inputs, "labels": labels, **change}
    with pytest.raises((ValueError, TypeError), match=message):
        fastmtt.fused_linear_mtt_loss(kwargs.pop("hidden"), kwargs.pop("base_hidden"), kwargs.pop("weight"),
                                      kwargs.pop("labels"), **kwargs)


@pytest.mark.parametrize("direction,reduction,softcap", [("forward", "mean", None), ("reverse", "none", 4.0),
                                                         ("forward", "sum", 2.0)])
def test_gradcheck_float64(direction, reduction, softcap):
    """weight and bias also form the base logits, which are constants of the loss (the base is frozen),
    so a finite difference through them measures another function; their gradients are checked
    against the reference above."""
    inputs, labels, _ = fused_linear_inputs(30, n_rows=7, hidden=5, vocab=9, rank=2, bias=True, lora=True, ignored=1)
    inputs = {k: v.double() for k, v in inputs.items()}
    leaves = tuple(inputs[k].requires_grad_(True) for k in ("hidden", "lora_A", "lora_B"))

    def fn(hidden, lora_A, lora_B):
        return fastmtt.fused_linear_mtt_loss(
            hidden, inputs["base_hidden"], inputs["weight"], labels, bias=inputs["bias"], lora_A=lora_A,
            lora_B=lora_B, lora_scaling=0.5, softcap=softcap, lam=0.8, temperature=1.5, direction=direction,
            reduction=reduction, chunk_size=3, backend="torch")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_torch_compile_training_step_matches_eager():
    inputs, labels, _ = fused_linear_inputs(31, n_rows=40, hidden=16, vocab=70, bias=True, lora=True)
    lora_A, lora_B = inputs["lora_A"].requires_grad_(True), inputs["lora_B"].requires_grad_(True)

    def step(hidden):
        out = fastmtt.fused_linear_mtt_loss(hidden, inputs["base_hidden"], inputs["weight"], labels,
                                            bias=inputs["bias"], lora_A=lora_A, lora_B=lora_B, lora_scaling=2.0,
                                            lam=0.5, return_components=True)
        out.loss.backward()
        return out.loss.detach(), out.kl

    x = inputs["hidden"].clone().requires_grad_(True)
    eager = step(x)
    grads = [x.grad.clone(), lora_A.grad.clone(), lora_B.grad.clone()]
    x.grad = lora_A.grad = lora_B.grad = None
    torch.testing.assert_close(torch.compile(step)(x), eager)
    torch.testing.assert_close([x.grad, lora_A.grad, lora_B.grad], grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_hidden_and_transposed_weight(backend):
    inputs, labels, _ = fused_linear_inputs(32, n_rows=12, hidden=16, vocab=40, bias=True)
    hidden, base_hidden, weight, bias = (inputs[k] for k in ("hidden", "base_hidden", "weight", "bias"))
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
    n_rows, vocab, hidden = draw(st.integers(2, 20)), draw(st.integers(2, 80)), draw(st.integers(1, 24))
    head = dict(bias=draw(st.booleans()), lora=draw(st.booleans()), weight_grad=draw(st.booleans()))
    inputs, labels, trainable = fused_linear_inputs(draw(st.integers(0, 2**31 - 1)), n_rows=n_rows, vocab=vocab,
                                                    hidden=hidden, ignored=draw(st.integers(0, n_rows - 2)), **head)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    options = dict(lam=draw(st.sampled_from([0.0, 0.4, 2.0])), temperature=draw(st.sampled_from([1.0, 2.5])),
                   direction=draw(st.sampled_from(DIRECTIONS)), reduction=reduction,
                   softcap=draw(st.sampled_from([None, 3.0])), chunk_size=draw(st.sampled_from([None, 1, 7])))
    if reduction == "none":
        options["upstream"] = torch.randn(n_rows, generator=torch.Generator().manual_seed(n_rows))
    return inputs, labels, trainable, draw(st.sampled_from(list(DTYPES.values()))), options


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=fused_linear_problems())
def test_property_matches_reference(backend, problem):
    inputs, labels, trainable, dtype, options = problem  # rows 0 and 1 always hold labels (0 and V-1)
    check_against_reference(inputs, labels, trainable, dtype, backend=backend, **options)
# --- the chunked path with the Triton row kernel, the full KL, vocabulary splits ---

@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_path_with_the_triton_row_kernel(dtype_name, direction):
    inputs, labels, trainable = fused_linear_inputs(31, bias=True, lora=True, weight_grad=True)
    check_against_reference(inputs, labels, trainable, DTYPES[dtype_name], backend="triton", chunk_size=16,
                            lora_scaling=0.5, softcap=4.0, lam=0.8, temperature=1.5, direction=direction)


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", True)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_full_vocabulary_kl_matches_reference(backend, tiled, direction):
    inputs, labels, trainable = fused_linear_inputs(32, bias=True, lora=True)
    check_against_reference(inputs, labels, trainable, torch.float32, backend=backend, tiled=tiled, lam=0.7,
                            direction=direction, mask_target=False)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mask_target", [True, False])
def test_tiled_vocabulary_splits_merge_to_the_whole_vocabulary(direction, mask_target):
    """The tiled forward over 1, 2 and 3 vocabulary splits (labels in every split), merged: same loss and
    gradients."""
    from fastmtt.head import LinearHead
    from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss_with_options
    from fastmtt.options import MTTOptions

    inputs, labels, _ = fused_linear_inputs(33, bias=True, vocab=2100, n_rows=20)
    labels[2:5] = torch.tensor([1023, 1024, 2099])
    options = MTTOptions(lam=0.9, direction=direction, mask_target=mask_target)
    results = []
    for splits in (1, 2, 3):
        hidden = inputs["hidden"].clone().requires_grad_(True)
        head = LinearHead(inputs["weight"], inputs["bias"])
        out = fused_linear_mtt_loss_with_options(hidden, inputs["base_hidden"], head, labels, options, backend="triton",
                                                 tiled=True, splits=splits, return_components=True)
        out.loss.backward()
        results.append((out.loss.detach(), out.kl, hidden.grad))
    for loss, kl, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kl, results[0][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kl_part_of_the_gradient_survives_bf16_on_confident_rows(backend, tiled, direction):
    """dL/dh at lam minus at lam = 0, from bf16 inputs, within 5% (in norm) of fp64 math on the same
    rounded inputs, for every path (a bf16 logit slab or a gradient filter would lose most of it)."""
    hidden, base_hidden, weight, labels = (t.bfloat16() if t.is_floating_point() else t
                                           for t in confident_hidden_states(24, 64, 4096, seed=34))

    def kl_part(fn, dtype, **kw):
        return kl_part_of_gradient(lambda h, lam: fn(h, base_hidden.to(dtype), weight.to(dtype), labels, lam=lam,
                                                     direction=direction, **kw), hidden.to(dtype))

    ours = kl_part(fastmtt.fused_linear_mtt_loss, torch.bfloat16, backend=backend, tiled=tiled)
    truth = kl_part(reference.fused_linear_mtt_loss, torch.float64)
    assert truth.norm() > 0
    assert (ours - truth).norm() <= 0.05 * truth.norm()


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", False), ("triton", True)])
def test_kl_alone_with_ce_weight_zero_survives_bf16_on_confident_rows(backend, tiled):
    """ce_weight = 0 (the prompt rows of kl_positions="all"): the whole gradient is the divergence's, many
    small entries; from bf16 inputs within 2% (in norm) of fp64 math on the same rounded inputs."""
    hidden, base_hidden, weight, labels = (t.bfloat16() if t.is_floating_point() else t
                                           for t in confident_hidden_states(24, 64, 4096, seed=36))

    def gradient(fn, dtype, **kw):
        leaf = hidden.detach().to(dtype).requires_grad_(True)
        out = fn(leaf, base_hidden.to(dtype), weight.to(dtype), labels, lam=1.0, ce_weight=0.0, **kw)
        (out if torch.is_tensor(out) else out.loss).backward()
        return leaf.grad.double()

    ours = gradient(fastmtt.fused_linear_mtt_loss, torch.bfloat16, backend=backend, tiled=tiled)
    truth = gradient(reference.fused_linear_mtt_loss, torch.float64)
    assert truth.norm() > 0
    assert (ours - truth).norm() <= 0.02 * truth.norm()  # here 0.2-0.3%; CE's part left in would be 5.5%


def test_tiled_backward_refuses_deterministic_mode():
    inputs, labels, _ = fused_linear_inputs(35)
    hidden = inputs["hidden"].clone().requires_grad_(True)
    torch.use_deterministic_algorithms(True)
    try:
        loss = fastmtt.fused_linear_mtt_loss(hidden, inputs["base_hidden"], inputs["weight"], labels,
                                             backend="triton", tiled=True)
        with pytest.raises(RuntimeError, match="not deterministic"):
            loss.backward()
        chunked = [torch.autograd.grad(fastmtt.fused_linear_mtt_loss(hidden, inputs["base_hidden"], inputs["weight"],
                                                                     labels, backend="triton"), hidden)[0]
                   for _ in range(2)]
        assert torch.equal(*chunked)
    finally:
        torch.use_deterministic_algorithms(False)


def close_offset_head(n_rows=24, hidden_size=16, vocab=515, seed=5):
    """Inputs whose logits are 2 randn - 100 (a bias of -100) and whose base pass differs by ~1e-3 nats:
    the KL (~5e-7) cancels unless formed relative to the row maxima."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden_size, generator=gen) * (2.0 / hidden_size**0.5)
    hidden = torch.randn(n_rows, hidden_size, generator=gen)
    base_hidden = hidden + 1e-3 * torch.randn(n_rows, hidden_size, generator=gen)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    return dict(hidden=hidden, base_hidden=base_hidden, weight=weight, bias=torch.full((vocab,), -100.0)), labels


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kl_of_close_rows_with_offset_logits_keeps_its_digits(backend, tiled, direction):
    """Every path: the per-row KL at least as accurate as naive fp32 on the same logits, never negative."""
    inputs, labels = close_offset_head()
    options = dict(lam=1.0, direction=direction, reduction="none", ce_weight=0.0)
    rows = torch.ones(labels.shape[0])
    got = evaluate(fastmtt.fused_linear_mtt_loss, inputs, labels, {"hidden"}, torch.float32, rows, backend=backend,
                   tiled=tiled, **options)
    naive = evaluate(reference.fused_linear_mtt_loss, inputs, labels, {"hidden"}, torch.float32, rows, **options)
    truth = evaluate(reference.fused_linear_mtt_loss, inputs, labels, {"hidden"}, torch.float64, rows, **options)
    assert_kl_at_least_as_accurate(got[2], naive[2], truth[2])


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_on_leaf_inputs_gives_the_same_gradients_every_backward(backend, tiled, reduction):
    """Three backwards through one graph, .grad zeroed in between: the same gradients each time (the
    forward's gradient buffers go to the first backward, later ones walk the chunks again)."""
    inputs, labels, trainable = fused_linear_inputs(31, lora=True, bias=True)
    leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in inputs.items()}
    rows = (1, N_ROWS, -1)
    hidden, base_hidden = leaves["hidden"].view(rows), inputs["base_hidden"].view(rows)
    loss = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, leaves["weight"], labels.view(1, N_ROWS),
                                         bias=leaves["bias"], lora_A=leaves["lora_A"], lora_B=leaves["lora_B"],
                                         backend=backend, tiled=tiled, reduction=reduction)
    upstream = torch.ones_like(loss) if reduction == "mean" else torch.randn(1, N_ROWS)
    names = sorted(trainable)
    expected = None
    for _ in range(3):
        loss.backward(upstream, retain_graph=True)
        grads = {k: leaves[k].grad.clone() for k in names}
        expected = expected or grads
        for k in names:
            torch.testing.assert_close(grads[k], expected[k])
            leaves[k].grad.data.zero_()
    reference_grads = evaluate(reference.fused_linear_mtt_loss, inputs, labels, trainable, torch.float32,
                               upstream.reshape(-1) if reduction == "none" else None, lam=fastmtt.DEFAULT_LAM,
                               reduction=reduction)[3]
    scale = 1.0 if reduction == "none" else 1 / 1.5  # evaluate's mean upstream is 1.5
    for k in names:
        torch.testing.assert_close(expected[k], reference_grads[k] * scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", True)])
def test_double_backward_raises_naming_the_op(backend, tiled):
    inputs, labels, _ = fused_linear_inputs(32)
    hidden = inputs["hidden"].clone().requires_grad_(True)
    loss = fastmtt.fused_linear_mtt_loss(hidden, inputs["base_hidden"], inputs["weight"], labels, backend=backend,
                                         tiled=tiled)
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_mtt_loss: double backward"):
        grad.square().sum().backward()


@pytest.mark.parametrize("op", ["mm", "addmm"])
def test_gemm_fallback_without_out_dtype_warns_once(monkeypatch, op):
    """No silent slow path: a GPU whose torch.mm (logits) or torch.addmm (weight gradients) lacks out_dtype
    makes the chunked path widen its inputs (a slower GEMM); the probe says so once, with the reason."""
    import warnings

    from fastmtt import head

    def gemm_without_out_dtype(*args, out_dtype=None, **kwargs):
        raise RuntimeError("out_dtype is not supported here\nsecond line")

    def on_the_cpu(make):
        return lambda *shape, device=None, **kw: make(*shape, **kw)

    for name in ("ones", "zeros"):
        monkeypatch.setattr(torch, name, on_the_cpu(getattr(torch, name)))
    monkeypatch.setattr(torch, op, gemm_without_out_dtype)
    head._out_dtype_supported.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=rf"torch.{op}\(out_dtype=torch.float32\) is unavailable .*"
                                                r"out_dtype is not supported here\); the fused linear loss widens"):
            assert not head._out_dtype_supported(op, torch.bfloat16, torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not head._out_dtype_supported(op, torch.bfloat16, torch.float32)
    finally:
        head._out_dtype_supported.cache_clear()


def test_accumulate_matmul_adds_the_fp32_product_of_16_bit_inputs():
    from fastmtt.head import accumulate_matmul

    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(shape, generator=gen).to(torch.bfloat16) for shape in ((33, 20), (20, 17)))
    total = torch.randn(33, 17, generator=gen)
    want = total + 0.5 * (a.double() @ b.double()).float()
    got = accumulate_matmul(total, a, b, alpha=0.5)
    assert got is total and torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["chunked", "tiled"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_host_read_per_call_on_the_gpu_path(monkeypatch, path, reduction):
    """The Triton path reads the device once per forward + backward: check_values (label range, a
    num_items_in_batch tensor's sign, the predicted-row count that compacts the rows), nothing in backward."""
    monkeypatch.setattr("fastmtt.reduction.reads_are_free", lambda tensor: False)
    inputs, labels, trainable = fused_linear_inputs(21, bias=True, lora=True, weight_grad=True)
    leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in inputs.items()}
    num_items = torch.tensor(30) if reduction == "mean" else None
    with HostReads() as host:
        loss = fastmtt.fused_linear_mtt_loss(leaves["hidden"], leaves["base_hidden"], leaves["weight"], labels,
                                             bias=leaves["bias"], lora_A=leaves["lora_A"], lora_B=leaves["lora_B"],
                                             lam=0.5, reduction=reduction, num_items_in_batch=num_items,
                                             backend="triton", tiled=path == "tiled", chunk_size=16)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
    assert len(host.reads) == 1, host.reads
    assert all(leaves[k].grad.abs().sum() > 0 for k in trainable)


@pytest.mark.parametrize("n_rows, vocab, free_gib, chunks", [(8192, 128256, 100, 3), (8192, 128256, 4, 5),
                                                               (300, 32000, 80, 1), (100_000, 151936, 80, 36)])
def test_default_gpu_chunks_are_equal_multiples_of_128_within_the_memory(n_rows, vocab, free_gib, chunks):
    from fastmtt.ops.chunked_linear_mtt import SLAB_BYTES_PER_ENTRY, default_chunk_size

    free = free_gib << 30
    rows = default_chunk_size(n_rows, 4096, vocab, torch.device("cuda"), free_bytes=free)
    sizes = [min(rows, n_rows - start) for start in range(0, n_rows, rows)]
    assert rows % 128 == 0 and len(sizes) == chunks
    assert sizes[0] - sizes[-1] < 128 * chunks  # equal but for the rounding to 128 rows
    assert rows * vocab * SLAB_BYTES_PER_ENTRY <= max(min(1 << 32, free // 2), 1024 * vocab * SLAB_BYTES_PER_ENTRY)
    assert rows >= min(1024, -(-n_rows // 128) * 128)


def _two_part_loss(fn, leaves, labels, ce_rows, **options):
    """The loss of two calls: CE and the divergence on ce_rows, the divergence alone (ce_weight=0) elsewhere."""
    outs = [fn(leaves["hidden"][rows], leaves["base_hidden"][rows], leaves["weight"], labels[rows],
               bias=leaves["bias"], lora_A=leaves["lora_A"], lora_B=leaves["lora_B"], **options, ce_weight=weight)
            for rows, weight in ((ce_rows, 1.0), (~ce_rows, 0.0))]
    return fastmtt.MTTOutput(*(a + b for a, b in zip(*outs)))


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", False), ("triton", True)])
def test_ce_rows_in_one_call_equal_two_calls_and_the_reference(backend, tiled):
    """ce_rows (MTTObjective's every-position KL): CE where it marks a row, the divergence alone elsewhere, in
    one call; equal to the two calls it replaces and, by the parity rule, to the fp64 reference."""
    from fastmtt.head import LinearHead
    from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss_with_options

    inputs, labels, trainable = fused_linear_inputs(23, bias=True, lora=True, weight_grad=True)
    ce_rows = torch.rand(N_ROWS, generator=torch.Generator().manual_seed(3)) < 0.5
    ce_rows[:2] = torch.tensor([True, False])  # targets 0 and V-1 on either side
    settings = dict(lam=0.8, temperature=1.5, direction="forward", num_items_in_batch=40)
    names = [k for k in FUSED_LINEAR_GRADS if k in trainable]

    def run(dtype, one_call, fn=fastmtt.fused_linear_mtt_loss):
        leaves = {k: v.detach().to(dtype).requires_grad_(k in trainable) for k, v in inputs.items()}
        if one_call:
            options = fastmtt.MTTOptions(**{k: v for k, v in settings.items() if k != "num_items_in_batch"})
            head = LinearHead(leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"])
            out = fused_linear_mtt_loss_with_options(
                leaves["hidden"], leaves["base_hidden"], head, labels, options, ce_rows=ce_rows,
                num_items_in_batch=40, return_components=True, backend=backend, tiled=tiled,
                chunk_size=None if tiled else 16)
        else:
            extra = {} if fn is not fastmtt.fused_linear_mtt_loss else dict(return_components=True, backend=backend)
            out = _two_part_loss(fn, leaves, labels, ce_rows, **settings, **extra)
        return out, dict(zip(names, torch.autograd.grad(out.loss * 1.5, [leaves[k] for k in names])))

    one, two = run(torch.float32, True), run(torch.float32, False)
    same, truth = run(torch.float32, False, reference.fused_linear_mtt_loss), run(torch.float64, False,
                                                                                  reference.fused_linear_mtt_loss)
    assert bool(torch.isfinite(one[0].loss)) and one[0].ce > 0 and one[0].kl > 0
    for what, got, want in zip(("loss", "ce", "kl"), one[0], two[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=what)
        assert_parity(what, got, getattr(same[0], what), getattr(truth[0], what), torch.float32)
    assert one[1].keys() == truth[1].keys() and one[1]
    for name, grad in one[1].items():
        torch.testing.assert_close(grad, two[1][name], rtol=1e-4, atol=1e-6, msg=name)
        assert_parity(f"d{name}", grad, same[1][name], truth[1][name], torch.float32)
