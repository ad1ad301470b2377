"""fused_linear_mtt_loss against the reference on materialized logits (CCE parity rule, fp64 truth)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmtt
from fastmtt import reference
from tests.conftest import DTYPES, assert_parity

N_ROWS, HIDDEN, VOCAB, RANK = 37, 24, 97, 4  # 37 rows: never a multiple of the chunk sizes below
GRAD_NAMES = ("hidden", "weight", "bias", "lora_A", "lora_B")


def make_inputs(seed, *, bias=False, lora=False, weight_grad=False, n_rows=N_ROWS, vocab=VOCAB, hidden=HIDDEN,
                ignored=5):
    """fp32 inputs with realistic logit sizes; labels include 0, V-1 and `ignored` ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden=torch.randn(n_rows, hidden, generator=gen),
        base_hidden=torch.randn(n_rows, hidden, generator=gen),
        weight=torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden**0.5),
    )
    inputs["base_hidden"] = 0.7 * inputs["hidden"] + 0.5 * inputs["base_hidden"]  # a related base model
    if bias:
        inputs["bias"] = torch.randn(vocab, generator=gen)
    if lora:
        inputs["lora_A"] = torch.randn(RANK, hidden, generator=gen) / hidden**0.5
        inputs["lora_B"] = torch.randn(vocab, RANK, generator=gen)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    labels[:2] = torch.tensor([0, vocab - 1])
    labels[2:2 + ignored] = -100
    trainable = {"hidden", "bias", "lora_A", "lora_B"} | ({"weight"} if weight_grad else set())
    return inputs, labels, trainable


def evaluate(fn, inputs, labels, trainable, dtype, upstream=None, **options):
    """(loss, ce, kl, {name: grad}) for fn(inputs cast to dtype); `upstream` weights 'none' rows."""
    leaves = {k: v.detach().to(dtype).requires_grad_(k in trainable) for k, v in inputs.items()}
    args = dict(leaves)
    out = fn(args.pop("hidden"), args.pop("base_hidden"), args.pop("weight"), labels, **args, **options,
             **({"return_components": True} if fn is fastmtt.fused_linear_mtt_loss else {}))
    loss = out.loss
    weighted = (loss * upstream.to(loss.dtype)).sum() if upstream is not None else loss * 1.5
    names = [k for k in GRAD_NAMES if k in trainable and k in leaves]
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
    inputs, labels, trainable = make_inputs(10, **options)
    extra = dict(lora_scaling=0.5) if "lora_A" in inputs else {}
    check_against_reference(inputs, labels, trainable, DTYPES[dtype_name], softcap=softcap, lam=0.8,
                            temperature=1.5, chunk_size=8, **extra)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_directions_reductions_and_upstream_weights(direction, reduction, weight_grad):
    inputs, labels, trainable = make_inputs(11, bias=True, lora=True, weight_grad=weight_grad)
    upstream = torch.rand(N_ROWS) + 0.5 if reduction == "none" else None
    check_against_reference(inputs, labels, trainable, torch.float32, upstream=upstream, lora_scaling=2.0,
                            softcap=5.0, lam=1.3, temperature=0.7, direction=direction, reduction=reduction,
                            chunk_size=16)


def test_num_items_in_batch_and_default_chunk():
    inputs, labels, trainable = make_inputs(12, bias=True, weight_grad=True)
    check_against_reference(inputs, labels, trainable, torch.float32, lam=0.5, num_items_in_batch=100)
    check_against_reference(inputs, labels, trainable, torch.float32, lam=0.0)


def test_all_rows_ignored_gives_zero_loss_and_zero_gradients():
    inputs, labels, trainable = make_inputs(13, lora=True, weight_grad=True, ignored=N_ROWS)
    labels[:] = -100
    for reduction in ("mean", "sum"):
        loss, ce, kl, grads = evaluate(fastmtt.fused_linear_mtt_loss, inputs, labels, trainable, torch.float32,
                                       reduction=reduction, chunk_size=8)
        assert loss.item() == 0.0 and ce.item() == 0.0 and kl.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_confident_logits_and_lora_in_another_dtype():
    inputs, labels, trainable = make_inputs(14, lora=True)
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
    inputs, labels, trainable = make_inputs(15, bias=True, lora=True, weight_grad=True, n_rows=n_rows, vocab=vocab)
    leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in inputs.items()}
    with _LargestTensor() as probe:
        loss = fastmtt.fused_linear_mtt_loss(*(leaves.pop(k) for k in ("hidden", "base_hidden", "weight")), labels,
                                             **leaves, softcap=3.0, reduction=reduction, chunk_size=chunk)
        loss.sum().backward()
    assert probe.largest <= max(2 * chunk * vocab, vocab * HIDDEN) < n_rows * vocab  # both slabs of one chunk


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_tiled_triton_path_through_the_interpreter(dtype_name, direction):
    inputs, labels, trainable = make_inputs(16, bias=True, lora=True, weight_grad=True)
    check_against_reference(inputs, labels, trainable, DTYPES[dtype_name], backend="triton", tiled=True,
                            lora_scaling=0.5, softcap=4.0, lam=0.8, temperature=1.5, direction=direction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tiled_reductions_plain_head_unit_temperature(reduction):
    inputs, labels, trainable = make_inputs(19)
    upstream = torch.rand(N_ROWS) + 0.5 if reduction == "none" else None
    check_against_reference(inputs, labels, trainable, torch.float32, backend="triton", tiled=True, upstream=upstream,
                            lam=0.6, reduction=reduction, **({"num_items_in_batch": 50} if reduction == "mean" else {}))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_tiled_several_tiles_along_rows_vocabulary_and_hidden(direction):
    # Interpreter tiles are at most 64 rows x 1024 columns x 256 hidden: 2 x 2 x 2 tiles here.
    inputs, labels, trainable = make_inputs(22, bias=True, lora=True, weight_grad=True, n_rows=70, vocab=1100,
                                            hidden=300)
    check_against_reference(inputs, labels, trainable, torch.float32, backend="triton", tiled=True,
                            lora_scaling=0.5, softcap=6.0, lam=0.9, direction=direction)


def test_leading_dimensions_are_flattened():
    inputs, labels, trainable = make_inputs(23, n_rows=36)
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
    inputs, labels, trainable = make_inputs(20, bias=True, weight_grad=True)
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
    inputs, labels, trainable = make_inputs(21, bias=True, vocab=2500)
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
    inputs, labels, _ = make_inputs(17, bias=True)
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
])
def test_bad_arguments_are_named(change, message):
    inputs, labels, _ = make_inputs(18)
    kwargs = {**inputs, "labels": labels, **change}
    with pytest.raises((ValueError, TypeError), match=message):
        fastmtt.fused_linear_mtt_loss(kwargs.pop("hidden"), kwargs.pop("base_hidden"), kwargs.pop("weight"),
                                      kwargs.pop("labels"), **kwargs)


# --- the chunked path with the Triton row kernel, the full KL, vocabulary splits ---

@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_path_with_the_triton_row_kernel(dtype_name, direction):
    inputs, labels, trainable = make_inputs(31, bias=True, lora=True, weight_grad=True)
    check_against_reference(inputs, labels, trainable, DTYPES[dtype_name], backend="triton", chunk_size=16,
                            lora_scaling=0.5, softcap=4.0, lam=0.8, temperature=1.5, direction=direction)


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", True)])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_full_vocabulary_kl_matches_reference(backend, tiled, direction):
    inputs, labels, trainable = make_inputs(32, bias=True, lora=True)
    check_against_reference(inputs, labels, trainable, torch.float32, backend=backend, tiled=tiled, lam=0.7,
                            direction=direction, mask_target=False)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_target", [True, False])
def test_tiled_vocabulary_splits_merge_to_the_whole_vocabulary(direction, mask_target):
    """The tiled forward over 1, 2 and 3 vocabulary splits (labels in every split), merged: same loss and
    gradients."""
    from fastmtt.head import LinearHead
    from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss_with_options
    from fastmtt.options import MTTOptions

    inputs, labels, _ = make_inputs(33, bias=True, vocab=2100, n_rows=20)
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


def confident_hidden_states(n_rows, hidden_size, vocab, seed):
    """Hidden states whose target logits stand ~20 nats above logits of std ~1, targets among a few frequent
    tokens at both ends of the vocabulary, and a base model close to the adapted one."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
    frequent = torch.cat([torch.arange(0, 8), torch.arange(vocab - 8, vocab)])
    labels = frequent[torch.randint(0, len(frequent), (n_rows,), generator=gen)]
    direction = weight[labels] / weight[labels].norm(dim=1, keepdim=True) ** 2
    hidden = 20.0 * direction + torch.randn(n_rows, hidden_size, generator=gen) * 0.5
    base_hidden = hidden + 0.02 * torch.randn(n_rows, hidden_size, generator=gen)
    return hidden, base_hidden, weight, labels


def kl_part_of_dh(fn, inputs, dtype, **options):
    """dL/dh at lam = 1 minus at lam = 0 (fp64) of fn on (hidden, base_hidden, weight, labels) cast to dtype."""
    hidden, base_hidden, weight, labels = inputs
    grads = []
    for lam in (1.0, 0.0):
        h = hidden.detach().to(dtype).requires_grad_(True)
        out = fn(h, base_hidden.to(dtype), weight.to(dtype), labels, lam=lam, **options)
        (out if torch.is_tensor(out) else out.loss).backward()
        grads.append(h.grad.double())
    return grads[0] - grads[1]


@pytest.mark.parametrize("backend,tiled", [("torch", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_part_of_the_gradient_survives_bf16_on_confident_rows(backend, tiled, direction):
    """dL/dh at lam minus at lam = 0, from bf16 inputs, within 5% (in norm) of fp64 math on the same
    rounded inputs, for every path (a bf16 logit slab or a gradient filter would lose most of it)."""
    hidden, base_hidden, weight, labels = (t.bfloat16() if t.is_floating_point() else t
                                           for t in confident_hidden_states(24, 64, 4096, seed=34))

    inputs = (hidden, base_hidden, weight, labels)
    ours = kl_part_of_dh(fastmtt.fused_linear_mtt_loss, inputs, torch.bfloat16, direction=direction, backend=backend,
                         tiled=tiled)
    truth = kl_part_of_dh(reference.fused_linear_mtt_loss, inputs, torch.float64, direction=direction)
    assert truth.norm() > 0
    assert (ours - truth).norm() <= 0.05 * truth.norm()


def test_tiled_backward_refuses_deterministic_mode():
    inputs, labels, _ = make_inputs(35)
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
