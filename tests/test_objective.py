"""MTTObjective on tiny PEFT Llamas, checked against the reference on materialized logits."""
import pytest
import torch

import fastmtt
from fastmtt import reference
from fastmtt.objective import MTTObjective
from tests.utils import VOCAB, padded_batch, tiny_llama, tiny_peft, trainable_grads

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

def reference_loss(model, batch, **options):
    """Reference MTT on the full logits of the adapted and the base model (causal shift applied)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return reference.mtt_loss(logits[:, :-1].reshape(-1, VOCAB), base[:, :-1].reshape(-1, VOCAB),
                              batch["labels"][:, 1:].reshape(-1), **options)


@pytest.mark.parametrize("direction,temperature", [("forward", 1.0), ("reverse", 1.0), ("forward", 2.0)])
def test_matches_reference_with_lora_head_and_padding(direction, temperature):
    model, batch = tiny_peft(), padded_batch()
    options = dict(lam=0.7, temperature=temperature, direction=direction)
    got = MTTObjective(**options)(model, **batch)
    got.loss.backward()
    got_grads = trainable_grads(model)
    model.zero_grad()
    want = reference_loss(model, batch, **options)
    want.loss.backward()
    want_grads = trainable_grads(model)
    assert want.kl > 1e-3 and want.ce > 1.0  # the adapter really moved the model
    for name in ("loss", "ce", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    assert not got.ce.requires_grad and not got.kl.requires_grad
    assert any("lm_head" in name for name in got_grads)
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_base_pass_disables_adapters_without_grad():
    model, batch = tiny_peft(), padded_batch()
    adapted, base = MTTObjective().hidden_states(model, batch["input_ids"], batch["attention_mask"])
    with model.disable_adapter():
        expected_base = model.get_base_model().model(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(base, expected_base)
    assert not base.requires_grad and adapted.requires_grad
    assert (adapted - base).abs().max() > 1e-3  # adapters were back on for the adapted pass


def test_gradient_accumulation_matches_one_batch():
    model = tiny_peft()
    batch = padded_batch(batch=4)
    batch["labels"][2, :9] = -100  # the two halves have different numbers of predicted tokens
    objective = MTTObjective(lam=1.3)
    objective(model, **batch).loss.backward()
    whole = trainable_grads(model)
    model.zero_grad()
    total = int((batch["labels"][:, 1:] != -100).sum())
    for half in (slice(0, 2), slice(2, 4)):
        part = {key: value[half] for key, value in batch.items()}
        objective(model, **part, num_items_in_batch=torch.tensor(total)).loss.backward()
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_all_ignored_batch_gives_zero_loss():
    model, batch = tiny_peft(), padded_batch()
    batch["labels"].fill_(-100)
    out = MTTObjective()(model, **batch)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and float(out.ce) == 0.0
    assert all(torch.all(g == 0) for g in trainable_grads(model).values())


def test_head_loss_goes_through_the_fused_linear_loss(monkeypatch):
    calls = []

    def fused(hidden, base_hidden, weight, labels, **kwargs):
        calls.append(kwargs)
        return "fused result"

    monkeypatch.setattr(fastmtt.objective, "fused_linear_mtt_loss", fused)
    model, batch = tiny_peft(), padded_batch()
    assert MTTObjective(lam=0.5)(model, **batch) == "fused result"
    (kwargs,) = calls
    assert kwargs["lam"] == 0.5 and kwargs["lora_A"].shape == (4, 16) and kwargs["lora_B"].shape == (VOCAB, 4)
    assert kwargs["lora_scaling"] == 2.0 and kwargs["softcap"] is None and kwargs["return_components"] is True


def test_errors_name_the_problem():
    batch = padded_batch()
    with pytest.raises(TypeError, match="peft.PeftModel"):
        MTTObjective()(tiny_llama(), **batch)
    saved_head = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                    modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="output head"):
        MTTObjective()(saved_head, **batch)
    scaled = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    scaled.get_base_model().config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        MTTObjective()(scaled, **batch)
    dropout_head = tiny_peft(lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_dropout"):
        MTTObjective()(dropout_head.train(), **batch)
    with pytest.raises(ValueError, match="labels"):
        MTTObjective()(tiny_peft(), input_ids=batch["input_ids"], labels=batch["labels"][:, 1:])
    with pytest.raises(ValueError, match="lam"):
        MTTObjective(lam=-1.0)
