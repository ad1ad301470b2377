"""SineLoRA against its formula, through PEFT: y = W x + b + s sin(omega B A) / sqrt(in) x."""
import math

import peft
import pytest
import torch

from fastmtt.sine_lora import SineLoraConfig, SineLoraLinear, load_sine_lora, sine_delta_weight


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


def _by_formula(model, x, omega):
    """The network with each layer's W + s sin(omega B A) / sqrt(in), in float64."""
    h = x.double()
    for index in (0, 2):
        layer = model.base_model.model[index]
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        weight = layer.base_layer.weight.double() + 2.0 * torch.sin(omega * (B @ A)) / math.sqrt(A.shape[1])
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
    assert isinstance(loaded.base_model.model[0], SineLoraLinear) and loaded.base_model.model[0].sine_omega == 5.0
    torch.testing.assert_close(loaded(x), y)
    torch.testing.assert_close(model.merge_and_unload()(x), y, rtol=1e-5, atol=1e-5)


def test_sine_lora_rejects_bad_settings(tmp_path):
    for omega in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sine_omega"):
            SineLoraConfig(r=4, target_modules=["0"], sine_omega=omega)
    with pytest.raises(ValueError, match="use_dora"):
        SineLoraConfig(r=4, target_modules=["0"], use_dora=True)
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["0"]))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="path: .* no SineLoRA adapter"):
        load_sine_lora(_model(), str(tmp_path))
