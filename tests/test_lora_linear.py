"""lora_linear against the plain PyTorch formula: fp64 truth, same-dtype PyTorch, both backends; dropout,
bad input, gradcheck and torch.compile."""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastmtt
from fastmtt.ops.lora_linear import lora_linear
from tests.utils import (
    DTYPES,
    assert_parity,
    lora_linear_inputs,
    lora_max_rank,
    triton_dropout_mask,
    use_small_lora_tiles,
)

BACKENDS = ("triton", "torch")


def plain_lora(x, weight, lora_A, lora_B, scaling, bias=None, keep=None):
    """PEFT's formula: base in x's dtype, x cast to the adapters' dtype for the LoRA branch."""
    x_lora = x.to(lora_A.dtype)
    if keep is not None:
        x_lora = x_lora * keep
    out = F.linear(x, weight, bias) if bias is None or bias.dtype == x.dtype else F.linear(x, weight) + bias
    return (out + F.linear(F.linear(x_lora, lora_A), lora_B) * scaling).to(x.dtype)


def run(fn, inputs, scaling, dy, **kwargs):
    """Output and gradients (x, lora_A, lora_B) of fn on fresh leaves."""
    leaves = {k: (v.detach().clone().requires_grad_(k in ("x", "lora_A", "lora_B")) if v is not None else None)
              for k, v in inputs.items()}
    y = fn(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], scaling, leaves["bias"], **kwargs)
    grads = torch.autograd.grad(y, [leaves["x"], leaves["lora_A"], leaves["lora_B"]], dy.to(y.dtype))
    return (y, *grads)


def as_fp64(inputs):
    return {k: (v.double() if v is not None else None) for k, v in inputs.items()}


NAMES = ("y", "dx", "dA", "dB")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rank,lead,in_f,out_f,bias", [
    (1, (37,), 45, 29, True),
    (8, (3, 11), 33, 70, False),
    (64, (2, 5), 50, 19, True),
])
def test_parity_with_plain_formula(backend, dtype_name, rank, lead, in_f, out_f, bias):
    dtype = DTYPES[dtype_name]
    inputs = lora_linear_inputs(lead, in_f, out_f, rank, dtype, bias=bias, seed=rank)
    dy = torch.randn(*lead, out_f)
    scaling = 1.7
    got = run(lora_linear, inputs, scaling, dy, backend=backend)
    same = run(plain_lora, inputs, scaling, dy)
    truth = run(plain_lora, as_fp64(inputs), scaling, dy.double())
    assert got[0].shape == (*lead, out_f) and got[0].dtype == dtype
    for name, g, s, t in zip(NAMES, got, same, truth):
        assert g.dtype == s.dtype
        assert_parity(name, g, s, t, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_fp32_adapters_on_half_inputs(backend, dtype_name):
    """PEFT keeps adapters in fp32 on a half-precision base: the LoRA branch then runs in fp32."""
    dtype = DTYPES[dtype_name]
    inputs = lora_linear_inputs((2, 9), 40, 24, 8, dtype, lora_dtype=torch.float32)
    inputs["bias"] = inputs["bias"].float()  # a folded lora_B bias is fp32 as well
    dy = torch.randn(2, 9, 24)
    got = run(lora_linear, inputs, 0.5, dy, backend=backend)
    same = run(plain_lora, inputs, 0.5, dy)
    truth = run(plain_lora, as_fp64(inputs), 0.5, dy.double())
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    for name, g, s, t in zip(NAMES, got, same, truth):
        assert_parity(name, g, s, t, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight_and_input(backend):
    """A transposed weight view (Conv1D's [in, out] storage) and a non-contiguous x, no copies needed."""
    inputs = lora_linear_inputs((21,), 36, 28, 8, torch.float32)
    inputs["weight"] = inputs["weight"].t().contiguous().t()
    inputs["x"] = torch.randn(36, 21).t()
    assert not inputs["weight"].is_contiguous() and not inputs["x"].is_contiguous()
    dy = torch.randn(21, 28)
    got = run(lora_linear, inputs, 2.0, dy, backend=backend)
    truth = run(plain_lora, as_fp64(inputs), 2.0, dy.double())
    for name, g, t in zip(NAMES, got, truth):
        torch.testing.assert_close(g.double(), t, rtol=1e-5, atol=1e-5, msg=name)


def test_triton_tiling_with_small_blocks(monkeypatch):
    """Several row/column tiles, several reduction steps and row splits of the weight gradients."""
    use_small_lora_tiles(monkeypatch)
    inputs = lora_linear_inputs((53,), 40, 50, 8, torch.float32)
    dy = torch.randn(53, 50)
    for p in (0.0, 0.25):
        torch.manual_seed(5)
        got = run(lora_linear, inputs, 0.5, dy, backend="triton", dropout_p=p)
        torch.manual_seed(5)
        keep = None
        if p > 0:
            keep = triton_dropout_mask((53, 40), p).double() / (1 - p)
        truth = run(plain_lora, as_fp64(inputs), 0.5, dy.double(), keep=keep)
        for name, g, t in zip(NAMES, got, truth):
            torch.testing.assert_close(g.double(), t, rtol=1e-5, atol=1e-5, msg=f"{name} p={p}")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_triton_dropout_uses_one_mask_in_forward_and_backward(dtype_name):
    dtype = DTYPES[dtype_name]
    p = 0.4
    inputs = lora_linear_inputs((2, 13), 30, 22, 8, dtype)
    dy = torch.randn(2, 13, 22)
    torch.manual_seed(11)
    got = run(lora_linear, inputs, 1.5, dy, backend="triton", dropout_p=p)
    torch.manual_seed(11)
    kept = triton_dropout_mask((26, 30), p).reshape(2, 13, 30)
    assert 0 < kept.sum() < kept.numel()
    same = run(plain_lora, inputs, 1.5, dy, keep=kept.to(dtype) / (1 - p))
    truth = run(plain_lora, as_fp64(inputs), 1.5, dy.double(), keep=kept.double() / (1 - p))
    for name, g, s, t in zip(NAMES, got, same, truth):
        assert_parity(name, g, s, t, dtype)


def test_triton_dropout_mask_statistics():
    first = triton_dropout_mask((64, 500), 0.3, seed=1234)
    assert abs(first.float().mean().item() - 0.7) < 0.01
    assert torch.equal(first, triton_dropout_mask((64, 500), 0.3, seed=1234))
    assert (first != triton_dropout_mask((64, 500), 0.3, seed=1235)).float().mean() > 0.3
    assert (first[:, 0::4] != first[:, 1::4]).float().mean() > 0.3  # one Philox call, four distinct draws
    # consecutive calls draw fresh seeds, hence fresh masks
    inputs = lora_linear_inputs((8,), 16, 16, 4, torch.float32)
    ys = [lora_linear(*(inputs[k] for k in ("x", "weight", "lora_A", "lora_B")), 1.0, dropout_p=0.5, backend="triton")
          for _ in range(2)]
    assert not torch.equal(*ys)


def test_torch_dropout_matches_functional_dropout():
    """The PyTorch path draws the same mask as F.dropout (so it reproduces PEFT under one seed)."""
    inputs = lora_linear_inputs((4, 7), 24, 18, 8, torch.float32)
    dy = torch.randn(4, 7, 18)

    def peft_style(x, weight, lora_A, lora_B, scaling, bias):
        return F.linear(x, weight, bias) + F.linear(F.linear(F.dropout(x, 0.3), lora_A), lora_B) * scaling

    torch.manual_seed(2)
    got = run(lora_linear, inputs, 0.8, dy, backend="torch", dropout_p=0.3)
    torch.manual_seed(2)
    want = run(peft_style, inputs, 0.8, dy)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_frozen_and_bias_gradient(backend):
    inputs = lora_linear_inputs((5, 3), 20, 12, 4, torch.float32)
    weight = inputs["weight"].requires_grad_()
    bias = inputs["bias"].requires_grad_()
    x, lora_A = inputs["x"].requires_grad_(), inputs["lora_A"]
    lora_B = inputs["lora_B"].requires_grad_()
    y = lora_linear(x, weight, lora_A, lora_B, 0.5, bias, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert weight.grad is None and lora_A.grad is None
    torch.testing.assert_close(bias.grad, dy.sum((0, 1)))
    assert x.grad is not None and lora_B.grad is not None


def test_double_backward_raises_naming_the_op_on_triton():
    inputs = lora_linear_inputs((5,), 20, 12, 4, torch.float32)
    x = inputs["x"].requires_grad_()
    y = lora_linear(x, inputs["weight"], inputs["lora_A"], inputs["lora_B"], 0.5, inputs["bias"], backend="triton")
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="lora_linear: double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradgradcheck_torch_path(dropout_p):
    """The PyTorch path's backward is differentiable (one seed fixes the mask in every evaluation)."""
    inputs = lora_linear_inputs((2, 3), 6, 5, 3, torch.float64, seed=27)
    leaves = tuple(inputs[k].requires_grad_(True) for k in ("x", "lora_A", "lora_B", "bias"))

    def fn(x, lora_A, lora_B, bias):
        torch.manual_seed(3)
        return lora_linear(x, inputs["weight"], lora_A, lora_B, 0.5, bias, dropout_p=dropout_p, backend="torch")

    assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_no_grad_and_empty_input():
    inputs = lora_linear_inputs((0, 4), 10, 6, 2, torch.float32)
    y = lora_linear(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], 1.0, backend="triton")
    assert y.shape == (0, 4, 6)
    inputs = lora_linear_inputs((3,), 10, 6, 2, torch.float32)
    with torch.no_grad():
        y = lora_linear(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], 1.0, backend="triton")
    torch.testing.assert_close(y, plain_lora(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], 1.0))


@pytest.mark.parametrize("change,message", [
    (dict(weight=torch.randn(6, 11)), "weight must have shape"),
    (dict(lora_A=torch.randn(2, 11)), "lora_A must have shape"),
    (dict(lora_B=torch.randn(5, 2)), "lora_B must have shape"),
    (dict(bias=torch.randn(5)), "bias must have shape"),
    (dict(weight=torch.randn(6, 10, dtype=torch.float64)), "weight must have x's dtype"),
    (dict(lora_B=torch.randn(6, 2, dtype=torch.float16)), "lora_B must have lora_A's dtype"),
    (dict(x=torch.ones(3, 10, dtype=torch.int64)), "x must be a floating-point tensor"),
    (dict(dropout_p=1.0), "dropout_p must lie in"),
    (dict(dropout_p="0.1"), "dropout_p must lie in \\[0, 1\\), got '0.1'"),
    (dict(scaling="2"), "scaling must be a real number"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_name_the_argument(change, message):
    args = dict(x=torch.randn(3, 10), weight=torch.randn(6, 10), lora_A=torch.randn(2, 10),
                lora_B=torch.randn(6, 2), scaling=1.0, bias=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        lora_linear(**args)


def test_triton_rank_limit():
    inputs = lora_linear_inputs((3,), 8, 8, lora_max_rank() + 1, torch.float32)
    args = [inputs[k] for k in ("x", "weight", "lora_A", "lora_B")]
    with pytest.raises(ValueError, match="rank up to"):
        lora_linear(*args, 1.0, backend="triton")
    torch.testing.assert_close(lora_linear(*args, 1.0), plain_lora(*args, 1.0))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name,lora_dtype_name", [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"),
                                                        ("bf16", "fp32")])
@pytest.mark.parametrize("rank,dropout_p", [(8, 0.0), (64, 0.2), (120, 0.1)])
def test_cuda_kernels_multi_tile(dtype_name, lora_dtype_name, rank, dropout_p):
    """Compiled kernels on a GPU: many tiles, row splits of the weight gradients, real bf16 dots."""
    dtype, lora_dtype = DTYPES[dtype_name], DTYPES[lora_dtype_name]
    inputs = lora_linear_inputs((3, 170), 520, 390, rank, dtype, lora_dtype=lora_dtype, device="cuda")
    dy = torch.randn(3, 170, 390, device="cuda")
    torch.manual_seed(4)
    got = run(lora_linear, inputs, 0.5, dy, backend="triton", dropout_p=dropout_p)
    torch.manual_seed(4)
    keep = None
    if dropout_p > 0:
        kept = triton_dropout_mask((510, 520), dropout_p, device="cuda").reshape(3, 170, 520)
        keep = kept.to(lora_dtype) / (1 - dropout_p)
    same = run(plain_lora, inputs, 0.5, dy, keep=keep)
    truth = run(plain_lora, as_fp64(inputs), 0.5, dy.double(), keep=None if keep is None else keep.double())
    for name, g, s, t in zip(NAMES, got, same, truth):
        assert_parity(name, g, s, t, dtype)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(with_bias):
    inputs = lora_linear_inputs((2, 3), 6, 5, 3, torch.float64, bias=with_bias, seed=28)
    leaves = tuple(inputs[k].requires_grad_(True) for k in ("x", "lora_A", "lora_B", "bias") if inputs[k] is not None)

    def fn(x, lora_A, lora_B, *bias):
        return lora_linear(x, inputs["weight"], lora_A, lora_B, 0.5, bias=bias[0] if bias else None, backend="torch")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_torch_compile_matches_eager():
    """A compiled training step gives eager's output and gradients (torch 2.11 traced the Function to all-zero
    adapter gradients while its forward returned a tensor an op handed back as itself)."""
    inputs = lora_linear_inputs((8,), 12, 10, 4, torch.float32, bias=True, seed=29)
    weight = inputs["weight"]
    x, bias = inputs["x"].requires_grad_(True), inputs["bias"].requires_grad_(True)
    lora_A, lora_B = inputs["lora_A"].requires_grad_(True), inputs["lora_B"].requires_grad_(True)
    leaves = [x, bias, lora_A, lora_B]

    def step(x):
        y = fastmtt.lora_linear(x, weight, lora_A, lora_B, 1.5, bias)
        y.square().sum().backward()
        return y.detach()

    eager = step(x)
    grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    torch.testing.assert_close(torch.compile(step, backend="aot_eager")(x), eager)
    assert all(grad.abs().max() > 0 for grad in grads)
    torch.testing.assert_close([leaf.grad for leaf in leaves], grads)


def test_bias_gradient_accumulates_in_the_inputs_precision():
    """fp64 inputs: the bias gradient is dy summed in fp64 (an fp32 sum is off by ~1e-8 relative here)."""
    inputs = lora_linear_inputs((64,), 6, 5, 2, torch.float64, seed=30)
    bias = inputs["bias"].requires_grad_(True)
    lora_B = inputs["lora_B"].requires_grad_(True)
    y = lora_linear(inputs["x"], inputs["weight"], inputs["lora_A"], lora_B, 0.5, bias, backend="torch")
    dy = 1 + torch.rand(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e-6
    y.backward(dy)
    assert bias.grad.dtype == torch.float64
    torch.testing.assert_close(bias.grad, dy.sum(0), rtol=1e-15, atol=0)
    assert not torch.allclose(dy.float().sum(0).double(), dy.sum(0), rtol=1e-9, atol=0)


def test_torch_func_grad_and_vmap():
    """torch.func.grad, vmap of it (per-example gradients) and jacrev agree with the plain formula's."""
    inputs = lora_linear_inputs((6,), 10, 7, 3, torch.float64, seed=31)
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]

    def loss(fn, lora_A, lora_B, x):
        return fn(x, weight, lora_A, lora_B, 1.5, bias).square().sum()

    ours = functools.partial(loss, functools.partial(lora_linear, backend="torch"))
    plain = functools.partial(loss, plain_lora)
    params = (inputs["lora_A"], inputs["lora_B"])
    for fn in (torch.func.grad(ours, argnums=(0, 1)), torch.func.jacrev(ours, argnums=(0, 1))):
        got, want = fn(*params, x), torch.func.grad(plain, argnums=(0, 1))(*params, x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    per_example = torch.func.vmap(torch.func.grad(ours, argnums=(0, 1)), in_dims=(None, None, 0))
    want = torch.func.vmap(torch.func.grad(plain, argnums=(0, 1)), in_dims=(None, None, 0))(*params, x)
    torch.testing.assert_close(per_example(*params, x), want, rtol=1e-12, atol=1e-12)


def test_dropout_like_native_dropout_where_torch_fuses_it(monkeypatch):
    """On CUDA F.dropout runs native_dropout: the PyTorch path then draws with it (here forced on the CPU)
    and its backward applies native_dropout's mask."""
    from fastmtt.pytorch import lora_linear as implementation

    monkeypatch.setattr(implementation, "_FUSED_DROPOUT_DEVICES", ("cpu",))
    inputs = lora_linear_inputs((4, 7), 24, 18, 8, torch.float32)
    dy = torch.randn(4, 7, 18)

    def native_style(x, weight, lora_A, lora_B, scaling, bias):
        dropped = torch.native_dropout(x, 0.3, True)[0]
        return F.linear(x, weight, bias) + F.linear(F.linear(dropped, lora_A), lora_B) * scaling

    torch.manual_seed(2)
    got = run(lora_linear, inputs, 0.8, dy, backend="torch", dropout_p=0.3)
    torch.manual_seed(2)
    want = run(native_style, inputs, 0.8, dy)
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g, w), name


def test_fp32_precision_is_read_through_the_new_api_where_torch_has_it(monkeypatch):
    """torch >= 2.9 raises on reading the legacy allow_tf32 flag once fp32_precision was set."""
    from fastmtt.kernels import lora_linear as kernels

    from fastmtt import _dispatch

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flag")
    before = matmul.fp32_precision
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    try:
        matmul.fp32_precision = "tf32"
        assert _dispatch.allows_tf32() and kernels._fp32_precision() == "tf32"
        matmul.fp32_precision = "ieee"
        assert not _dispatch.allows_tf32() and kernels._fp32_precision() == "tf32x3"
    finally:
        matmul.fp32_precision = before
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    lora_a, lora_b = torch.randn(2, 8), torch.randn(6, 2)
    torch.testing.assert_close(lora_linear(x, weight, lora_a, lora_b, 2.0),
                               x @ weight.T + 2.0 * (x @ lora_a.T) @ lora_b.T)


def test_auto_runs_the_fused_kernel_only_where_it_was_measured_faster(monkeypatch):
    from fastmtt.ops import lora_linear as op

    seen = []
    real = op.LoRALinearFunction.apply
    monkeypatch.setattr(op.LoRALinearFunction, "apply", lambda *args: seen.append(args[-1]) or real(*args))
    # as "auto" resolves for CUDA tensors: the kernel where the op says it serves the call (auto_kernel)
    monkeypatch.setattr(op, "resolve_backend", lambda backend, *tensors, auto_kernel: "triton" if auto_kernel
                        else "torch")
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    lora_a, lora_b = torch.randn(2, 8), torch.randn(6, 2)
    lora_linear(x, weight, lora_a, lora_b, 2.0)
    monkeypatch.setattr(op, "FUSED_KERNEL_MEASURED_FASTER", frozenset({(8, 6, 2, torch.float32, False)}))
    lora_linear(x, weight, lora_a, lora_b, 2.0)
    assert seen == ["torch", "triton"]
