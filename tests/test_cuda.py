"""CUDA parity at GPU sizes: every kernel against the fp64 reference, next to same-dtype PyTorch.

Run with real kernels: TRITON_INTERPRET=0 pytest -m cuda (benchmarks/gpu_check.sh does). Skipped
without a GPU; the fused-linear and LoRA tests also wait for those ops to exist in fastmtt.
"""
import pytest
import torch

import fastmtt
from fastmtt import _dispatch, reference
from tests.conftest import DTYPES, assert_parity

pytestmark = pytest.mark.cuda
LAM = 1.0


def _labels(n_rows, n_cols, generator):
    labels = torch.randint(0, n_cols, (n_rows,), generator=generator, device="cuda")
    labels[::17] = -100
    labels[1], labels[2] = 0, n_cols - 1  # targets at both ends of the vocabulary
    return labels


def _needs(attribute):
    return pytest.mark.skipif(not hasattr(fastmtt, attribute), reason=f"fastmtt.{attribute} not in this build")


def test_real_kernels_not_the_interpreter():
    assert not _dispatch.interpreting(), "export TRITON_INTERPRET=0 so the CUDA tests run compiled kernels"
    assert _dispatch.resolve_backend("auto", torch.ones(1, device="cuda")) == "triton"


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("n_rows, n_cols", [(8192, 32000), (2048, 128256)])
@pytest.mark.parametrize("direction, temperature", [("forward", 1.0), ("reverse", 2.0)])
def test_mtt_loss_kernel_matches_reference(dtype_name, n_rows, n_cols, direction, temperature):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(n_rows + n_cols)
    logits = (torch.randn(n_rows, n_cols, generator=gen, device="cuda") * 3).to(dtype)
    base = (logits.float() + torch.randn(n_rows, n_cols, generator=gen, device="cuda")).to(dtype)
    logits[3, 5] = 40.0  # a confident row
    labels = _labels(n_rows, n_cols, gen)
    options = dict(lam=LAM, temperature=temperature, direction=direction)

    truth_logits = logits.double().requires_grad_()
    truth = reference.mtt_loss(truth_logits, base.double(), labels, **options)
    truth.loss.backward()
    results = {}
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        out = fastmtt.mtt_loss(leaf, base, labels, return_components=True, backend=backend, **options)
        out.loss.backward()
        results[backend] = (out, leaf.grad)
    (torch_out, torch_grad), (kernel_out, kernel_grad) = results["torch"], results["triton"]
    for name in ("loss", "ce", "kl"):
        assert_parity(name, getattr(kernel_out, name), getattr(torch_out, name), getattr(truth, name), dtype)
    assert_parity("grad", kernel_grad, torch_grad, truth_logits.grad, dtype)


@_needs("fused_linear_mtt_loss")
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("n_rows, hidden, vocab", [(4096, 4096, 32000), (2048, 2048, 128256)])
def test_fused_linear_mtt_loss_matches_reference(dtype_name, n_rows, hidden, vocab):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(hidden + vocab)
    states = torch.randn(n_rows, hidden, generator=gen, device="cuda").to(dtype)
    base_states = (states.float() + 0.3 * torch.randn(n_rows, hidden, generator=gen, device="cuda")).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=gen, device="cuda") * 2 * hidden ** -0.5).to(dtype)
    labels = _labels(n_rows, vocab, gen)

    truth_states = states.double().requires_grad_()
    truth = reference.mtt_loss(truth_states @ weight.double().T, base_states.double() @ weight.double().T,
                               labels, lam=LAM)
    truth.loss.backward()
    results = {}
    for backend in ("torch", "auto"):
        leaf = states.clone().requires_grad_()
        out = fastmtt.fused_linear_mtt_loss(leaf, base_states, weight, labels, lam=LAM, return_components=True,
                                            backend=backend)
        out.loss.backward()
        results[backend] = (out, leaf.grad)
    (torch_out, torch_grad), (kernel_out, kernel_grad) = results["torch"], results["auto"]
    for name in ("loss", "ce", "kl"):
        assert_parity(name, getattr(kernel_out, name), getattr(torch_out, name), getattr(truth, name), dtype)
    assert_parity("grad hidden", kernel_grad, torch_grad, truth_states.grad, dtype)


@_needs("lora_linear")
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_lora_linear_matches_reference(dtype_name, n_rows=8192, d_in=4096, d_out=4096, rank=16, scaling=2.0):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(n_rows, d_in, generator=gen, device="cuda").to(dtype)
    weight = (torch.randn(d_out, d_in, generator=gen, device="cuda") * d_in ** -0.5).to(dtype)
    lora_a = (torch.randn(rank, d_in, generator=gen, device="cuda") * d_in ** -0.5).to(dtype)
    lora_b = (torch.randn(d_out, rank, generator=gen, device="cuda") * rank ** -0.5).to(dtype)
    upstream = torch.randn(n_rows, d_out, generator=gen, device="cuda").to(dtype)

    def run(fn, cast):
        leaves = [cast(t).requires_grad_() for t in (x, lora_a, lora_b)]
        out = fn(leaves[0], cast(weight), leaves[1], leaves[2])
        out.backward(cast(upstream))
        return [out] + [leaf.grad for leaf in leaves]

    def plain(x_, w, a, b):
        return x_ @ w.T + scaling * (x_ @ a.T) @ b.T

    truth = run(plain, lambda t: t.double())
    same_dtype = run(plain, lambda t: t.clone())
    kernel = run(lambda x_, w, a, b: fastmtt.lora_linear(x_, w, a, b, scaling, backend="triton"), lambda t: t.clone())
    for name, got, torch_value, want in zip(("out", "grad x", "grad A", "grad B"), kernel, same_dtype, truth):
        assert_parity(name, got, torch_value, want, dtype)


@pytest.mark.parametrize("path", ["chunked", "tiled"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_part_of_the_gradient_survives_bf16_on_confident_rows(path, direction):
    """The regularizer's share of dL/dh (gradient at lam minus at lam = 0) from bf16 inputs within 5% of fp64
    math on the same rounded inputs, at a wide vocabulary, on both CUDA paths."""
    from tests.test_fused_linear_mtt_loss import confident_hidden_states, kl_part_of_dh

    hidden, base_hidden, weight, labels = (t.cuda() for t in confident_hidden_states(512, 1024, 128256, seed=35))
    inputs = (hidden.bfloat16(), base_hidden.bfloat16(), weight.bfloat16(), labels)
    ours = kl_part_of_dh(fastmtt.fused_linear_mtt_loss, inputs, torch.bfloat16, direction=direction,
                         tiled=path == "tiled")
    truth = kl_part_of_dh(reference.fused_linear_mtt_loss, inputs, torch.float64, direction=direction)
    assert (ours - truth).norm() <= 0.05 * truth.norm()


def test_tiled_backward_refuses_deterministic_mode():
    from tests.test_fused_linear_mtt_loss import confident_hidden_states

    hidden, base_hidden, weight, labels = (t.cuda() for t in confident_hidden_states(64, 128, 4096, seed=36))
    hidden.requires_grad_(True)
    torch.use_deterministic_algorithms(True)
    try:
        loss = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, tiled=True)
        with pytest.raises(RuntimeError, match="deterministic"):
            loss.backward()
        chunked = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels)
        first = torch.autograd.grad(chunked, hidden)[0]
        again = torch.autograd.grad(fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels), hidden)[0]
        assert torch.equal(first, again)
    finally:
        torch.use_deterministic_algorithms(False)
