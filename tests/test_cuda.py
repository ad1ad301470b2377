"""CUDA parity at GPU sizes: every kernel against the fp64 reference, next to same-dtype PyTorch.

Run with real kernels: TRITON_INTERPRET=0 pytest -m cuda (benchmarks/gpu_check.sh does). Skipped
without a GPU.
"""
import pytest
import torch

import fastmtt
from fastmtt import _dispatch, reference
from tests.utils import (
    DTYPES,
    assert_parity,
    confident_hidden_states,
    fused_linear_inputs,
    kl_part_of_gradient,
    lora_linear_inputs,
    mtt_inputs,
)

pytestmark = pytest.mark.cuda
LAM = 1.0


def test_real_kernels_not_the_interpreter():
    assert not _dispatch.interpreting(), "export TRITON_INTERPRET=0 so the CUDA tests run compiled kernels"
    assert _dispatch.resolve_backend("auto", torch.ones(1, device="cuda")) == "triton"


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("n_rows, n_cols", [(8192, 32000), (2048, 128256)])
@pytest.mark.parametrize("direction, temperature", [("forward", 1.0), ("reverse", 2.0)])
def test_mtt_loss_kernel_matches_reference(dtype_name, n_rows, n_cols, direction, temperature):
    dtype = DTYPES[dtype_name]
    logits, base, labels = mtt_inputs(n_rows, n_cols, dtype, seed=n_rows + n_cols, ignore_fraction=0.06, spread=3.0,
                                      confident_rows=1, device="cuda")
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


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("n_rows, hidden, vocab", [(4096, 4096, 32000), (2048, 2048, 128256)])
def test_fused_linear_mtt_loss_matches_reference(dtype_name, n_rows, hidden, vocab):
    dtype = DTYPES[dtype_name]
    inputs, labels, _ = fused_linear_inputs(hidden + vocab, n_rows=n_rows, vocab=vocab, hidden=hidden,
                                            ignored=n_rows // 17, device="cuda")
    states, base_states, weight = (inputs[k].to(dtype) for k in ("hidden", "base_hidden", "weight"))
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


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_lora_linear_matches_reference(dtype_name, n_rows=8192, d_in=4096, d_out=4096, rank=16, scaling=2.0):
    dtype = DTYPES[dtype_name]
    inputs = lora_linear_inputs((n_rows,), d_in, d_out, rank, dtype, bias=False, seed=rank, device="cuda")
    x, weight, lora_a, lora_b = (inputs[k] for k in ("x", "weight", "lora_A", "lora_B"))
    upstream = torch.randn(n_rows, d_out, generator=torch.Generator(device="cuda").manual_seed(rank + 1),
                           device="cuda").to(dtype)
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
    hidden, base_hidden, weight, labels = (t.cuda() for t in confident_hidden_states(512, 1024, 128256, seed=35))
    hidden, base_hidden, weight = hidden.bfloat16(), base_hidden.bfloat16(), weight.bfloat16()

    def kl_part(fn, dtype, **kw):
        return kl_part_of_gradient(lambda h, lam: fn(h, base_hidden.to(dtype), weight.to(dtype), labels, lam=lam,
                                                     direction=direction, **kw), hidden.to(dtype))

    ours = kl_part(fastmtt.fused_linear_mtt_loss, torch.bfloat16, tiled=path == "tiled")
    truth = kl_part(reference.fused_linear_mtt_loss, torch.float64)
    assert (ours - truth).norm() <= 0.05 * truth.norm()


def test_tiled_backward_refuses_deterministic_mode():
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


def test_16_bit_gemms_accumulate_in_fp32_on_tensor_cores_without_a_fallback():
    """The chunked path's GEMMs with a wider output (logits, weight gradients) take cuBLAS's out_dtype route
    on this GPU: no fallback warning, and the fp32 sum of exact products."""
    import warnings

    from fastmtt.head import accumulate_matmul, matmul_to

    a, b = (torch.randn(shape, device="cuda").to(torch.bfloat16) for shape in ((1024, 4096), (4096, 2048)))
    want = a.double() @ b.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        product = matmul_to(a, b, torch.float32)
        total = accumulate_matmul(torch.ones(1024, 2048, device="cuda"), a, b, alpha=0.5)
    assert torch.allclose(product.double(), want, rtol=1e-5, atol=1e-3)
    assert torch.allclose(total.double(), 1 + 0.5 * want, rtol=1e-5, atol=1e-3)
