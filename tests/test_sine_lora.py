"""SineLoRA against its formula, through PEFT: y = W x + b + s sin(omega B A) / sqrt(in) x, each adapter with its
own omega and scaling; nn.Linear and GPT-2's Conv1D adapted, other layer types refused naming the module."""
import math

import peft
import pytest
import torch

from fastmtt.sine_lora import SineLoraConfig, SineLoraLinear, load_sine_lora, sine_delta_weight
from tests.utils import tiny_gpt2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5))


def _adapted(omega=3.0):
    model = peft.get_peft_model(_model(), SineLoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                         sine_omega=omega))
    for module in model.modules():
        if isinstance(module, SineLoraLinear):
            torch.nn.init.normal_(module.lora_B["default"].weight)  # B starts at zero: make the update visible
    return model


def _by_formula(model, x, omega, adapter="default", scaling=2.0, sine=torch.sin):
    """The network with each layer's W + s sine(omega B A) / sqrt(in) of `adapter`, in float64 (sine=identity,
    omega=1, no sqrt: plain LoRA's W + s B A)."""
    h = x.double()
    for index in (0, 2):
        layer = model.base_model.model[index]
        A, B = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double()
        root = math.sqrt(A.shape[1]) if sine is torch.sin else 1.0
        weight = layer.base_layer.weight.double() + scaling * sine(omega * (B @ A)) / root
        h = h @ weight.T + layer.base_layer.bias.double()
        h = torch.tanh(h) if index == 0 else h
    return h


def test_sine_lora_output_follows_the_formula_and_disable_adapter_serves_the_base():
    model, x = _adapted(omega=3.0), torch.randn(7, 16)
    y = model(x)
    torch.testing.assert_close(y.double(), _by_formula(model, x, 3.0), rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        base = model(x)
    torch.testing.assert_close(base, _model()(x))
    assert (y - base).abs().max() > 0.1
    assert torch.equal(sine_delta_weight(torch.ones(2, 4), torch.zeros(3, 2), 200.0, 2.0), torch.zeros(3, 4))


def test_sine_lora_trains_only_its_factors_and_their_gradient_matches_the_formula():
    model, x = _adapted(omega=3.0), torch.randn(7, 16, dtype=torch.float64)
    model.double()
    model(x).square().sum().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"base_model.model.{i}.lora_{f}.default.weight" for i in (0, 2) for f in "AB"}
    layer = model.base_model.model[0]
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    h = x @ (layer.base_layer.weight + sine_delta_weight(A, B, 3.0, 2.0)).T + layer.base_layer.bias
    rest = model.base_model.model[2]
    out = torch.tanh(h) @ (rest.base_layer.weight + sine_delta_weight(rest.lora_A["default"].weight,
                                                                      rest.lora_B["default"].weight, 3.0, 2.0)).T
    (out + rest.base_layer.bias).square().sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad)


def test_sine_lora_merges_saves_and_loads(tmp_path):
    model, x = _adapted(omega=5.0), torch.randn(4, 16)
    y = model(x).detach()
    model.save_pretrained(tmp_path)
    loaded = load_sine_lora(_model(), str(tmp_path))
    assert isinstance(loaded.base_model.model[0], SineLoraLinear)
    assert loaded.base_model.model[0].sine_omega == {"default": 5.0}
    torch.testing.assert_close(loaded(x), y)
    torch.testing.assert_close(model.merge_and_unload()(x), y, rtol=1e-5, atol=1e-5)


def test_sine_lora_rejects_bad_settings(tmp_path):
    for omega in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sine_omega"):
            SineLoraConfig(r=4, target_modules=["0"], sine_omega=omega)
    with pytest.raises(ValueError, match="use_dora: SineLoRA is its own LoRA variant"):
        SineLoraConfig(r=4, target_modules=["0"], use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights: .* does not combine with init_lora_weights='mica'"):
        SineLoraConfig(r=4, target_modules=["0"], init_lora_weights="mica")
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["0"]))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="path: .* no SineLoRA adapter"):
        load_sine_lora(_model(), str(tmp_path))


def _randomize(model, adapter):
    for module in model.modules():
        if isinstance(module, SineLoraLinear) and adapter in module.lora_B:
            torch.nn.init.normal_(module.lora_B[adapter].weight)


def test_each_adapter_keeps_its_own_omega_and_scaling(tmp_path):
    model, x = _adapted(omega=3.0), torch.randn(7, 16)
    first = model(x).detach()
    model.add_adapter("second", SineLoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"], sine_omega=7.0))
    _randomize(model, "second")
    assert torch.equal(model(x), first)  # adding an adapter of another omega leaves the active one as it was
    assert model.base_model.model[0].sine_omega == {"default": 3.0, "second": 7.0}
    model.set_adapter("second")
    second = model(x).detach()
    torch.testing.assert_close(second.double(), _by_formula(model, x, 7.0, "second", scaling=3.0), rtol=1e-5,
                               atol=1e-5)
    assert (second - first).abs().max() > 0.1
    model.set_adapter("default")
    assert torch.equal(model(x), first)

    model.save_pretrained(tmp_path)  # the second adapter goes to tmp_path/second, its own omega in its config
    loaded = load_sine_lora(load_sine_lora(_model(), str(tmp_path)), str(tmp_path / "second"), adapter_name="second")
    assert loaded.base_model.model[2].sine_omega == {"default": 3.0, "second": 7.0}
    torch.testing.assert_close(loaded(x), first)
    loaded.set_adapter("second")
    torch.testing.assert_close(loaded(x), second)

    model.add_adapter("plain", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"], init_lora_weights=False))
    model.set_adapter("plain")  # a plain LoRA adapter on the same layers stays plain LoRA: W + s B A
    torch.testing.assert_close(model(x).double(), _by_formula(model, x, 1.0, "plain", scaling=1.0, sine=lambda t: t),
                               rtol=1e-5, atol=1e-5)
    model.delete_adapter("second")
    assert model.base_model.model[0].sine_omega == {"default": 3.0}


def test_sine_lora_on_gpt2_conv1d_follows_the_formula_merges_and_loads(tmp_path):
    config = SineLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], sine_omega=5.0)
    model = peft.get_peft_model(tiny_gpt2(bos_token_id=0, eos_token_id=0).eval(), config)  # eval: no dropout
    _randomize(model, "default")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SineLoraLinear)
    h = torch.randn(3, 16, dtype=torch.float64)
    model.double()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    weight = layer.base_layer.weight + 2.0 * torch.sin(5.0 * (B @ A)).T / 4.0  # Conv1D: y = x W + b, W [in, out]
    torch.testing.assert_close(layer(h), h @ weight + layer.base_layer.bias)

    ids = torch.randint(0, 32, (2, 6))
    logits = model(input_ids=ids).logits.detach()
    model.save_pretrained(tmp_path)
    loaded = load_sine_lora(tiny_gpt2(bos_token_id=0, eos_token_id=0).double(), str(tmp_path))
    torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
    merged = model.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(merged(input_ids=ids).logits, logits)


def test_sine_lora_refuses_layers_it_cannot_adapt_naming_them():
    """Embeddings and convolutions once became plain LoRA while the saved config said sine_omega."""
    embedded = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"target_modules: 0: SineLoRA adapts torch.nn.Linear and Conv1D layers, "
                                         r"not Embedding"):
        peft.get_peft_model(embedded, SineLoraConfig(r=2, target_modules=["0", "1"]))
    with pytest.raises(ValueError, match=r"target_modules: transformer.wte: .* not Embedding"):
        peft.get_peft_model(tiny_gpt2(bos_token_id=0, eos_token_id=0), SineLoraConfig(r=2, target_modules=["wte"]))
    with pytest.raises(ValueError, match=r"target_modules: 0: .* not Conv2d"):
        peft.get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), SineLoraConfig(r=2, target_modules=["0"]))
    plain = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="sine_omega"):  # a layer holding plain LoRA has no sine variant
        plain.add_adapter("sine", SineLoraConfig(r=2, target_modules=["0"]))
