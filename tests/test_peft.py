"""patch_lora: a patched PEFT model gives PEFT's outputs and gradients, falling back where it must."""
import copy

import pytest
import torch
from torch import nn

from fastmtt import peft as fastmtt_peft
from fastmtt.peft import patch_lora, unpatch_lora
from tests.utils import (
    LLAMA_TARGETS,
    TINY_LLAMA,
    TOLERANCE,
    assert_parity,
    randomize_trainable,
    tiny_gpt2,
    tiny_llama,
    tiny_peft,
)
from tests.utils import token_ids as tokens

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def llama(**config):
    """Two layers (2 x 7 LoRA modules), grouped-query attention."""
    return tiny_llama(**{"num_hidden_layers": 2, "num_attention_heads": 4, **config})


def lora_model(base, targets=LLAMA_TARGETS, **config):
    return tiny_peft(targets, base=base, randomize=True, **config)


def outputs_and_grads(model, ids, seed=0):
    """Logits and the gradients of all trainable parameters for a fixed upstream gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(input_ids=ids).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)).to(logits.dtype)
    logits.backward(upstream)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return logits.detach(), grads


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that took the fused path."""
    calls = []
    real = fastmtt_peft.lora_linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastmtt_peft, "lora_linear", counting)
    return calls


def assert_same(got, want, atol=1e-5, rtol=1e-4):
    (logits, grads), (want_logits, want_grads) = got, want
    torch.testing.assert_close(logits, want_logits, atol=atol, rtol=rtol)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tiny_llama_parity(backend, fused_calls):
    model = lora_model(llama())
    ids = tokens()
    want = outputs_and_grads(model, ids)
    assert patch_lora(model, backend=backend) == 14
    assert patch_lora(model) == 0  # already patched
    got = outputs_and_grads(model, ids)
    assert len(fused_calls) == 14  # the forward of every LoRA module took the fused path
    assert_same(got, want)
    assert unpatch_lora(model) == 14
    assert not any("forward" in vars(m) for m in model.modules())
    again = outputs_and_grads(model, ids)
    torch.testing.assert_close(again[0], want[0], atol=0, rtol=0)


def test_base_bias_and_lora_bias(fused_calls):
    model = lora_model(llama(attention_bias=True, mlp_bias=True), lora_bias=True, bias="lora_only")
    trainable_bias = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("lora_B.default.bias")]
    assert len(trainable_bias) == 14
    ids = tokens()
    want = outputs_and_grads(model, ids)
    assert patch_lora(model) == 14
    assert_same(outputs_and_grads(model, ids), want)
    assert fused_calls


def test_trainable_base_bias(fused_calls):
    """bias='all' trains the base layers' biases too; the fused path passes their gradient on."""
    model = lora_model(llama(attention_bias=True, mlp_bias=True), bias="all")
    ids = tokens()
    want = outputs_and_grads(model, ids)
    assert any(n.endswith("base_layer.bias") for n in want[1])
    patch_lora(model)
    assert_same(outputs_and_grads(model, ids), want)
    assert fused_calls


def test_disabled_adapters_give_the_base_output(fused_calls):
    model = lora_model(llama())
    ids = tokens()
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids).logits
    patch_lora(model)
    with model.disable_adapter(), torch.no_grad():
        patched_base = model(input_ids=ids).logits
    assert not fused_calls
    torch.testing.assert_close(patched_base, base_logits, atol=0, rtol=0)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert fused_calls and (adapted - base_logits).abs().max() > 1e-2


def test_merged_adapters_fall_back(fused_calls):
    model = lora_model(llama())
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    patch_lora(model)
    model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert not fused_calls
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)
    assert fused_calls


def test_several_active_adapters_fall_back(fused_calls):
    model = lora_model(llama())
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    randomize_trainable(model)
    ids = tokens()
    want = outputs_and_grads(model, ids)
    assert len(want[1]) == 14 * 2 + 4 * 2
    assert patch_lora(model) == 14
    got = outputs_and_grads(model, ids)
    assert len(fused_calls) == 2 * 5  # the five modules that carry only "default"; q and v fall back
    assert_same(got, want)


def test_dora_falls_back(fused_calls):
    model = lora_model(llama(), use_dora=True)
    ids = tokens()
    want = outputs_and_grads(model, ids)
    assert patch_lora(model) == 0
    assert_same(outputs_and_grads(model, ids), want, atol=0, rtol=0)
    assert not fused_calls


def test_variant_adapter_next_to_vanilla_one(fused_calls):
    """One module, a vanilla and a DoRA adapter: fused while the vanilla one is active, PEFT's otherwise."""
    model = lora_model(llama(), targets=["q_proj"])
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    assert patch_lora(model) == 2
    ids = tokens()
    for name, fused in (("dora", False), ("default", True)):
        model.set_adapter(name)
        randomize_trainable(model)
        fused_calls.clear()
        got = outputs_and_grads(model, ids)
        assert bool(fused_calls) == fused
        unpatch_lora(model)
        assert_same(got, outputs_and_grads(model, ids))
        patch_lora(model)


def test_dropout_train_and_eval(fused_calls):
    """Training draws PEFT's own dropout masks (same RNG stream), eval applies none."""
    model = lora_model(llama(), lora_dropout=0.3)
    ids = tokens()
    model.train()
    want_train = outputs_and_grads(model, ids, seed=7)
    model.eval()
    want_eval = outputs_and_grads(model, ids, seed=7)
    assert (want_train[0] - want_eval[0]).abs().max() > 1e-3
    patch_lora(model)
    model.train()
    assert_same(outputs_and_grads(model, ids, seed=7), want_train)
    model.eval()
    assert_same(outputs_and_grads(model, ids, seed=7), want_eval)
    assert len(fused_calls) == 2 * 14


def test_dropout_through_the_kernel_keeps_training_semantics(fused_calls):
    """Triton path (in-kernel masks): eval matches PEFT exactly; train differs from eval, and backward
    reuses every forward mask: a central difference along a random direction in all trainable
    parameters, each forward under the same seed, matches the gradient."""
    model = lora_model(llama(), lora_dropout=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for param in params:
            param.mul_(0.25)  # milder attention logits keep the central difference accurate
    ids = tokens()
    model.eval()
    want_eval = outputs_and_grads(model, ids)
    patch_lora(model, backend="triton")
    assert_same(outputs_and_grads(model, ids), want_eval)
    model.train()
    logits, grads = outputs_and_grads(model, ids, seed=5)
    assert (logits - want_eval[0]).abs().max() > 1e-3
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(9)
    directions = [torch.randn(p.shape, generator=gen) for p in params]
    step = 1e-3
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for param, direction in zip(params, directions):
                param.add_(sign * step * direction)
            torch.manual_seed(5)
            values.append((model(input_ids=ids).logits * upstream).sum())
            for param, direction in zip(params, directions):
                param.sub_(sign * step * direction)
    numeric = (values[0] - values[1]) / (2 * step)
    analytic = sum((g * d).sum() for g, d in zip(grads.values(), directions))
    torch.testing.assert_close(numeric, analytic, rtol=1e-2, atol=1e-3)
    # a different seed gives other masks, hence another value
    torch.manual_seed(6)
    assert not torch.equal(model(input_ids=ids).logits.detach(), logits)


def test_gpt2_conv1d_fan_in_fan_out(fused_calls):
    model = lora_model(tiny_gpt2(), targets=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    ids = tokens()
    want = outputs_and_grads(model, ids)
    assert patch_lora(model) == 2 * 4
    assert_same(outputs_and_grads(model, ids), want)
    assert len(fused_calls) == 2 * 4


def assert_model_parity(got, peft_same_dtype, truth, dtype):
    """The CCE rule for a whole model: logits entry by entry; the gradients of all trainable parameters, two
    bf16 layers of backward away from the logits, as one vector in norm. Per entry, two correct bf16 runs that
    round at different points (the fused op rounds base + LoRA once, PEFT twice) differ at random after a
    layer of attention and RMSNorm: entries where PEFT happens to land nearer the truth than tol are noise,
    not a defect (measured: the patched model's relative error per parameter is 1-5%, as PEFT's)."""
    assert_parity("logits", got[0], peft_same_dtype[0], truth[0], dtype)
    assert got[1].keys() == truth[1].keys()
    flat = [torch.cat([grads[name].double().flatten() for name in truth[1]]) for grads in (got[1], peft_same_dtype[1],
                                                                                           truth[1])]
    err, peft_err, norm = (flat[0] - flat[2]).norm(), (flat[1] - flat[2]).norm(), flat[2].norm()
    assert err <= peft_err + TOLERANCE[dtype] * norm, f"gradients: error {err:.3g} > PEFT's {peft_err:.3g} + tol"


def test_input_dtype_casting_bf16_base_fp32_adapters(fused_calls):
    """PEFT keeps adapters in fp32 on a bf16 base and casts x for them; the fused path does the same.
    Compared with the CCE rule against the fp64 model."""
    bf16_model = lora_model(llama(dtype=torch.bfloat16))
    lora_weight = bf16_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight
    assert lora_weight.dtype == torch.float32
    truth_model = copy.deepcopy(bf16_model).double()
    ids = tokens()
    same = outputs_and_grads(bf16_model, ids)
    truth = outputs_and_grads(truth_model, ids)
    patch_lora(bf16_model)
    got = outputs_and_grads(bf16_model, ids)
    assert fused_calls
    assert all(grad.dtype == torch.float32 for grad in got[1].values())
    assert_model_parity(got, same, truth, torch.bfloat16)


def test_autocast(fused_calls):
    model = lora_model(llama())
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = outputs_and_grads(model, ids)
    truth = outputs_and_grads(copy.deepcopy(model).double(), ids)
    patch_lora(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_and_grads(model, ids)
    assert fused_calls and got[0].dtype == want[0].dtype
    assert_model_parity(got, want, truth, torch.bfloat16)


class FakeInt8Linear(nn.Linear):
    """A quantized base layer: int8 weight plus a per-row scale, dequantized in its own forward."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        scale = linear.weight.abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter((linear.weight / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale.detach())

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype))


def test_quantized_base_layers_fall_back(fused_calls):
    base = llama()
    for layer in base.model.layers:
        layer.self_attn.q_proj = FakeInt8Linear(layer.self_attn.q_proj)
    model = lora_model(base)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.Linear)
    ids = tokens()
    want = outputs_and_grads(model, ids)
    assert patch_lora(model) == 12
    assert_same(outputs_and_grads(model, ids), want)
    assert len(fused_calls) == 2 * 6


def test_extra_forward_arguments_and_hooks_fall_back(fused_calls):
    model = lora_model(llama(), targets=["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert patch_lora(model) == 2
    x = torch.randn(3, TINY_LLAMA["hidden_size"])
    want = type(layer).forward(layer, x)
    torch.testing.assert_close(layer(x), want)
    assert len(fused_calls) == 1
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    torch.testing.assert_close(layer(x), type(layer).forward(layer, x))
    assert len(fused_calls) == 1
    handle.remove()
    torch.testing.assert_close(layer(x, adapter_names=["default"] * 3), want)
    assert len(fused_calls) == 1


def test_disabled_input_dtype_casting_falls_back(fused_calls):
    """With PEFT's input casting off, bf16 inputs meet fp32 adapters: PEFT's own forward decides (it raises)."""
    from peft.helpers import disable_input_dtype_casting

    model = lora_model(llama(dtype=torch.bfloat16), targets=["q_proj"])
    ids = tokens()
    with disable_input_dtype_casting(model), pytest.raises(RuntimeError) as peft_error:
        model(input_ids=ids)
    patch_lora(model)
    with disable_input_dtype_casting(model), pytest.raises(RuntimeError) as patched_error:
        model(input_ids=ids)
    assert str(patched_error.value) == str(peft_error.value) and not fused_calls
    model(input_ids=ids)
    assert len(fused_calls) == 2


def one_layer(dtype=torch.float32, base_bias=True, adapter_dtype=True, **config):
    """A PEFT model around one nn.Linear(48, 40) (LoRA r=8, lora_alpha=12: scaling 1.5)."""
    base = nn.Sequential(nn.Linear(48, 40, bias=base_bias)).to(dtype)
    config = {"r": 8, "lora_alpha": 12, "target_modules": ["0"], "init_lora_weights": False, **config}
    return peft.get_peft_model(base, peft.LoraConfig(**config), autocast_adapter_dtype=adapter_dtype)


def layer_outputs_and_grads(model, x, autocast=None):
    """Output and the gradients of x and of every trainable parameter, dropout seeded."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def permuted(shape, order, dtype=torch.float32):
    """A random tensor of `shape` stored with its dimensions in `order` (non-contiguous)."""
    inverse = [order.index(i) for i in range(len(order))]
    return torch.randn(*[shape[i] for i in order], dtype=dtype).permute(*inverse)


BITWISE_CASES = {
    "fp32": dict(),
    "fp32 power-of-two scaling": dict(config=dict(lora_alpha=16)),
    "fp32 no bias": dict(config=dict(base_bias=False)),
    "fp32 rsLoRA": dict(config=dict(use_rslora=True)),
    "fp32 dropout": dict(config=dict(lora_dropout=0.3)),
    "fp64": dict(dtype=torch.float64),
    "bf16": dict(dtype=torch.bfloat16, config=dict(adapter_dtype=False)),
    "fp16": dict(dtype=torch.float16, config=dict(adapter_dtype=False)),
    "bf16 base, fp32 adapters, dropout": dict(dtype=torch.bfloat16, config=dict(lora_dropout=0.2)),
    "fp16 base, fp32 adapters": dict(dtype=torch.float16),
    "autocast bf16": dict(autocast=torch.bfloat16),
    "autocast bf16, dropout (PEFT's forward)": dict(autocast=torch.bfloat16, config=dict(lora_dropout=0.2)),
    "transposed input, dropout": dict(x=lambda dtype: permuted((21, 48), [1, 0], dtype), config=dict(lora_dropout=0.3)),
    "permuted 3-d input, dropout": dict(x=lambda dtype: permuted((3, 7, 48), [1, 0, 2], dtype),
                                        config=dict(lora_dropout=0.3)),
}


@pytest.mark.parametrize("case", BITWISE_CASES)
def test_patched_layer_is_peft_bit_for_bit(case, fused_calls):
    """What docs/guarantees.md promises bitwise: output and gradients (x, lora_A, lora_B, trainable biases)
    identical to PEFT's, in train mode with the same seed."""
    spec = BITWISE_CASES[case]
    dtype = spec.get("dtype", torch.float32)
    model = one_layer(dtype, **spec.get("config", {}))
    x = spec.get("x", lambda dtype: torch.randn(3, 7, 48, dtype=dtype))(dtype)
    want = layer_outputs_and_grads(model, x, spec.get("autocast"))
    assert patch_lora(model) == 1
    got = layer_outputs_and_grads(model, x, spec.get("autocast"))
    assert bool(fused_calls) == (case != "autocast bf16, dropout (PEFT's forward)")
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"{case}: entry {index} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_bias_within_its_rounding_bound(dtype, fused_calls):
    """lora_bias=True: the fused path folds s * lora_B.bias into the base bias, so the output differs from PEFT's
    by at most 4 u (|x| |W|^T + |b| + s |x| |A|^T |B|^T + s |b_B|) per entry, and lora_B.bias's gradient
    (s * sum(dy) against PEFT's sum(s * dy)) by at most M u sum|s dy|; u the dtype's unit roundoff."""
    model = one_layer(dtype, lora_bias=True)
    layer = model.base_model.model[0]
    x = torch.randn(3, 7, 48, dtype=dtype)
    want = layer_outputs_and_grads(model, x)
    patch_lora(model)
    got = layer_outputs_and_grads(model, x)
    assert fused_calls
    u = torch.finfo(dtype).eps / 2
    wide = {name: p.detach().double() for name, p in layer.named_parameters()}
    x64, s = x.double().abs(), layer.scaling["default"]
    wide = {name: value.abs() for name, value in wide.items()}
    magnitude = (x64 @ wide["base_layer.weight"].T + wide["base_layer.bias"]
                 + s * (x64 @ wide["lora_A.default.weight"].T) @ wide["lora_B.default.weight"].T
                 + s * wide["lora_B.default.bias"])
    assert ((got[0].double() - want[0].double()).abs() <= 4 * u * magnitude).all()
    dy = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(5)).to(dtype).double()
    rows = dy.reshape(-1, 40)
    bias_bound = rows.shape[0] * u * (s * rows.abs()).sum(0)
    assert ((got[-1].double() - want[-1].double()).abs() <= bias_bound).all()
    for index in (1, 2, 3):  # x, lora_A and lora_B weight gradients do not see the bias: bitwise
        assert torch.equal(got[index], want[index])


def test_lora_stacked_on_another_adapter_keeps_peft_forward(fused_calls):
    """A mixed model (LoHa first, LoRA second on one Linear): lora.Linear wraps loha.Linear; PEFT's forward
    runs both, so patch_lora declines the layer (its direct base layer is not a plain Linear)."""
    base = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    model = peft.get_peft_model(base, peft.LoHaConfig(target_modules=["0"], init_weights=False), mixed=True)
    model.add_adapter("lora", peft.LoraConfig(target_modules=["0", "2"], init_lora_weights=False))
    model.set_adapter(["default", "lora"])
    stacked = model.base_model.model[0]
    assert isinstance(stacked, peft.tuners.lora.Linear) and not isinstance(stacked.base_layer, nn.Linear)
    x = torch.randn(4, 10)
    with torch.no_grad():
        want = model(x)
    assert patch_lora(model) == 1  # only layer 2, whose base is the plain Linear
    assert "forward" not in vars(stacked)
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, want) and len(fused_calls) == 1


def test_torch_func_grad_and_vmap_over_a_patched_model(fused_calls):
    """torch.func.grad of functional_call, and vmap of it over examples, give PEFT's gradients."""
    model = lora_model(llama())
    model.eval()
    ids = tokens()
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss(params, ids):
        return torch.func.functional_call(model, params, (ids,), {}).logits.square().mean()

    def per_example(params, ids):
        return loss(params, ids[None])

    want = torch.func.grad(loss)(params, ids)
    want_each = torch.func.vmap(torch.func.grad(per_example), in_dims=(None, 0))(params, ids)
    patch_lora(model)
    got = torch.func.grad(loss)(params, ids)
    got_each = torch.func.vmap(torch.func.grad(per_example), in_dims=(None, 0))(params, ids)
    assert fused_calls
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got_each[name], want_each[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_training_step_of_a_patched_model(fused_calls):
    """torch.compile of a patched model's training step gives eager's gradients (zero on torch 2.11 before)."""
    model = lora_model(llama())
    patch_lora(model)
    ids = tokens()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(ids):
        loss = model(input_ids=ids).logits.square().mean()
        loss.backward()
        return loss.detach()

    eager = step(ids)
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(torch.compile(step, backend="aot_eager")(ids), eager)
    assert fused_calls
    for p, grad in zip(params, grads):
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-6)
