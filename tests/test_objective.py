"""MTTObjective on tiny PEFT Llamas, checked against the reference on materialized logits."""
import re

import pytest
import torch

import fastmtt
from fastmtt import reference
from fastmtt.objective import MTTObjective
from fastmtt.options import MTTOptions
from tests.utils import VOCAB, padded_batch, tiny_llama, tiny_peft, token_ids, trainable_grads

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
    got = MTTObjective(kl_positions="labels", **options)(model, **batch)
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


@pytest.mark.parametrize("mask_target", [True, False])
def test_kl_at_every_position_keeps_ce_on_the_labels(mask_target):
    """kl_positions="all" (the default): (sum of CE over labelled rows + lam T^2 * sum of KL over every attended
    row) / the labelled count; a row without a label masks its next input token. Padding takes no part."""
    model, batch = tiny_peft(), padded_batch(batch=4)
    batch["labels"][2, :7] = -100  # prompts of different lengths
    options = dict(lam=0.8, temperature=1.5, direction="reverse", mask_target=mask_target)
    got = MTTObjective(**options)(model, **batch)
    got.loss.backward()
    got_grads = trainable_grads(model)
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels, next_tokens = batch["labels"][:, 1:], batch["input_ids"][:, 1:]
    attended, labelled = batch["attention_mask"][:, 1:].bool(), labels != -100
    assert (attended & ~labelled).sum() >= 8 and (~attended).sum() >= 3
    kl = reference.masked_kl_rows(logits[attended], base[attended], next_tokens[attended], temperature=1.5,
                                  direction="reverse", mask_target=mask_target)
    ce = reference.cross_entropy_rows(logits[labelled], labels[labelled])
    count = labelled.sum()
    want_loss = (ce.sum() + 0.8 * 1.5**2 * kl.sum()) / count
    want_loss.backward()
    torch.testing.assert_close(got.loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce, ce.sum().detach() / count, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kl, kl.sum().detach() / count, rtol=1e-5, atol=1e-6)
    for name, grad in trainable_grads(model).items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    labels_only = MTTObjective(kl_positions="labels", **options)(model, **batch)
    assert float(labels_only.kl) < 0.8 * float(got.kl)  # the prompt's rows add to the divergence
    with pytest.raises(ValueError, match="kl_positions"):
        MTTObjective(kl_positions="prompt")


def test_base_pass_disables_adapters_without_grad():
    model, batch = tiny_peft(), padded_batch()
    adapted, base = MTTObjective().hidden_states(model, batch["input_ids"], batch["attention_mask"])
    with model.disable_adapter():
        expected_base = model.get_base_model().model(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(base, expected_base)
    assert not base.requires_grad and adapted.requires_grad
    assert (adapted - base).abs().max() > 1e-3  # adapters were back on for the adapted pass


@pytest.mark.parametrize("kl_positions", ["labels", "all"])
def test_gradient_accumulation_matches_one_batch(kl_positions):
    model = tiny_peft()
    batch = padded_batch(batch=4)
    batch["labels"][2, :9] = -100  # the two halves have different numbers of predicted tokens
    objective = MTTObjective(lam=1.3, kl_positions=kl_positions)
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


def test_every_position_kl_is_one_fused_call(monkeypatch):
    """kl_positions="all": labelled and unlabelled rows go through one fused call, CE marked by ce_rows (the
    result against the reference: test_kl_at_every_position_keeps_ce_on_the_labels)."""
    real, calls = fastmtt.objective.fused_linear_mtt_loss_with_options, []
    monkeypatch.setattr(fastmtt.objective, "fused_linear_mtt_loss_with_options",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or real(*args, **kwargs))
    model, batch = tiny_peft(), padded_batch(batch=4)
    batch["labels"][2, :7] = -100
    MTTObjective(lam=0.8)(model, **batch)
    ((args, kwargs),) = calls
    labelled = batch["labels"][:, 1:] != -100
    attended = batch["attention_mask"][:, :-1].bool() & batch["attention_mask"][:, 1:].bool()
    assert args[3].shape == (int(attended.sum()),) and int(kwargs["ce_rows"].sum()) == int(labelled.sum())
    assert int(kwargs["num_items_in_batch"]) == int(labelled.sum()) < int(attended.sum())


def test_head_loss_goes_through_the_fused_linear_loss(monkeypatch):
    calls = []

    def fused(hidden, base_hidden, head, labels, options, **kwargs):
        calls.append((head, options, kwargs))
        return "fused result"

    monkeypatch.setattr(fastmtt.objective, "fused_linear_mtt_loss_with_options", fused)
    model, batch = tiny_peft(), padded_batch()
    objective = MTTObjective(lam=0.5, mask_target=False, kl_positions="labels")
    assert objective(model, **batch) == "fused result"
    ((head, options, kwargs),) = calls
    assert options is objective.options and options.lam == 0.5 and options.mask_target is False
    assert head.lora_A.shape == (4, 16) and head.lora_B.shape == (VOCAB, 4)
    assert head.scaling == 2.0 and head.softcap is None and kwargs["return_components"] is True


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
    with pytest.raises(ValueError, match="labels"):
        MTTObjective()(tiny_peft(), input_ids=batch["input_ids"], labels=batch["labels"][:, 1:])
    with pytest.raises(ValueError, match="lam"):
        MTTObjective(lam=-1.0)


@pytest.mark.parametrize("lora,cause,fix", [
    (dict(lora_dropout=0.1), "lora_dropout=0.1", r"LoraConfig\(lora_dropout=...\) applies to every targeted module"),
    (dict(use_dora=True), "uses DoRA", r"use_dora=False"),
    (dict(lora_bias=True), "has a LoRA bias", r"lora_bias=False"),
])
def test_head_lora_error_names_the_cause_and_the_fix(lora, cause, fix):
    model = tiny_peft(**lora).train()
    with pytest.raises(ValueError, match="output head 'lm_head'") as error:
        MTTObjective()(model, **padded_batch())
    message = str(error.value)
    assert cause in message and "exclude the head from target_modules" in message
    assert len(re.findall(fix, message)) == 1
    assert sum(name in message for name in ("DoRA", "LoRA bias", "lora_dropout=0.1")) == 1


def test_options_object_or_keywords():
    options = MTTOptions(lam=0.3, temperature=2.0, direction="reverse", ignore_index=-1)
    assert MTTObjective(options=options).options is options
    assert MTTObjective(lam=0.3, temperature=2.0, direction="reverse", ignore_index=-1).options == options
    assert MTTObjective(mask_target=False).options == MTTOptions(mask_target=False)
    for keywords in (dict(lam=0.5), dict(lam=1.0), dict(ignore_index=-100), dict(mask_target=True)):  # defaults too
        name = next(iter(keywords))
        with pytest.raises(TypeError, match=rf"pass options=MTTOptions\(\.\.\.\) or {name}, not both"):
            MTTObjective(**keywords, options=options)
    with pytest.raises(TypeError, match=r"or lam, temperature, not both"):
        MTTObjective(1.0, 1.0, options=options)
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        MTTObjective(options=MTTOptions(reduction="sum"))
    with pytest.raises(TypeError, match="MTTOptions"):
        MTTObjective(options=dict(lam=0.3))
    with pytest.raises(ValueError, match="temperature"):
        MTTObjective(temperature=0.0)
    with pytest.raises(ValueError, match="lam must be finite"):
        MTTObjective(lam=float("inf"))


def tiny_gpt2_peft(init_lora_weights, lora_dropout, dropout=0.1):
    """GPT-2 style model with embedding/attention/residual dropout and LoRA on the attention (not the head)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=dropout, attn_pdrop=dropout, embd_pdrop=dropout)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=lora_dropout,
                           init_lora_weights=init_lora_weights, fan_in_fan_out=True)
    return peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)


def test_model_dropout_off_in_both_passes_identity_adapter_has_zero_kl():
    batch = padded_batch()
    identity = tiny_gpt2_peft(init_lora_weights=True, lora_dropout=0.5).train()  # LoRA B = 0
    for _ in range(2):
        out = MTTObjective(lam=1.0)(identity, **batch)
        assert float(out.kl) == 0.0 and float(out.ce) > 1.0
    dropouts = {name: module.p for name, module in identity.named_modules() if isinstance(module, torch.nn.Dropout)}
    assert dropouts and all(p == (0.5 if ".lora_dropout." in name else 0.0) for name, p in dropouts.items())

    kept = tiny_gpt2_peft(init_lora_weights=True, lora_dropout=0.0).train()
    assert float(MTTObjective(lam=1.0, disable_dropout=False)(kept, **batch).kl) > 1e-4  # the bug it prevents


def test_lora_dropout_still_acts_on_the_adapted_side():
    batch = padded_batch()
    model = tiny_gpt2_peft(init_lora_weights=False, lora_dropout=0.5)
    objective = MTTObjective(lam=1.0)
    model.eval()
    evaluated = [float(objective(model, **batch).loss.detach()) for _ in range(2)]
    model.train()
    trained = [float(objective(model, **batch).loss.detach()) for _ in range(2)]
    assert evaluated[0] == evaluated[1]
    assert trained[0] != trained[1] and all(abs(t - evaluated[0]) > 1e-4 for t in trained)


def test_autocast_runs_the_head_loss_in_its_dtype_without_autocast(monkeypatch):
    model, batch = tiny_peft(), padded_batch()
    outside = MTTObjective(lam=0.7)(model, **batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = MTTObjective(lam=0.7)(model, **batch)
    inside.loss.backward()
    grads = trainable_grads(model)
    assert all(grad.dtype == torch.float32 and grad.abs().max() > 0 for grad in grads.values())
    torch.testing.assert_close(inside.loss, outside.loss, rtol=2e-2, atol=0)  # bf16 passes, same objective

    seen = []
    real = fastmtt.objective.fused_linear_mtt_loss_with_options

    def spy(hidden, base_hidden, head, labels, options, **kwargs):
        seen.append((hidden.dtype, base_hidden.dtype, {t.dtype for t in head.tensors() if t is not None},
                     torch.is_autocast_enabled("cpu")))
        return real(hidden, base_hidden, head, labels, options, **kwargs)

    monkeypatch.setattr(fastmtt.objective, "fused_linear_mtt_loss_with_options", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        MTTObjective()(model, **batch)
    assert seen == [(torch.bfloat16, torch.bfloat16, {torch.bfloat16}, False)]  # one call: labelled rows and prompt


def padded(batch, left, right):
    """`batch` (one unpadded row) with `left` and `right` pad positions: token 0, label -100, mask 0."""
    def pad(tensor, fill):
        return torch.cat([tensor.new_full((1, left), fill), tensor, tensor.new_full((1, right), fill)], 1)

    return dict(input_ids=pad(batch["input_ids"], 0), labels=pad(batch["labels"], -100),
                attention_mask=pad(batch["attention_mask"], 0))


@pytest.mark.parametrize("kl_positions", ["labels", "all"])
def test_padding_on_either_side_never_changes_the_loss(kl_positions):
    """A position takes part only where it and the token it predicts are both attended: the last left pad
    (which predicts the first real token, labelled here) is neither a CE nor a KL row."""
    model = tiny_peft()
    input_ids = token_ids((1, 10))
    labels = input_ids.clone()
    labels[:, 1:4] = -100  # a prompt: KL alone there with kl_positions="all"
    unpadded = dict(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids))
    objective = MTTObjective(lam=1.0, temperature=1.5, kl_positions=kl_positions)
    results = []
    for left, right in ((0, 0), (3, 0), (0, 3), (2, 1)):
        model.zero_grad()
        out = objective(model, **padded(unpadded, left, right))
        out.loss.backward()
        results.append((out, trainable_grads(model)))
    (want, want_grads), *others = results
    assert float(want.kl) > 1e-3
    for got, got_grads in others:
        for name in ("loss", "ce", "kl"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="attention_mask must have the shape of labels"):
        objective(model, **dict(unpadded, attention_mask=unpadded["attention_mask"][:, 1:]))


@pytest.mark.parametrize("prompt", [True, False])
def test_inputs_embeds_instead_of_input_ids(prompt):
    """inputs_embeds= gives the objective of input_ids=. At every position (the default) only where every
    attended position has a label: a prompt's rows mask their next input token, which embeddings do not give."""
    model, batch = tiny_peft(), padded_batch()
    if not prompt:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    objective = MTTObjective(lam=0.7, kl_positions="labels" if prompt else "all")
    want = objective(model, **batch)
    want.loss.backward()
    want_grads = trainable_grads(model)
    model.zero_grad()
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    inputs = dict(inputs_embeds=embeds, labels=batch["labels"], attention_mask=batch["attention_mask"])
    got = objective(model, **inputs)
    got.loss.backward()
    for name in ("loss", "ce", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if not prompt:
        return
    with pytest.raises(ValueError, match=r"kl_positions='all' \(MTTObjective's default\) needs input_ids where a "
                                         r"position has no label .* or kl_positions='labels' with inputs_embeds"):
        MTTObjective(lam=0.7)(model, **inputs)
    for wrong in (dict(labels=batch["labels"]), dict(batch, inputs_embeds=embeds)):
        with pytest.raises(ValueError, match="exactly one of input_ids .* and inputs_embeds"):
            MTTObjective()(model, **wrong)
    with pytest.raises(ValueError, match=r"labels must have the shape \(3, 12\)"):
        MTTObjective()(model, **dict(inputs, labels=batch["labels"][:, 1:]))


def test_lora_variant_on_the_head_is_refused():
    model = tiny_peft(alora_invocation_tokens=[1, 2])  # aLoRA: the adapter acts after the invocation tokens only
    with pytest.raises(ValueError, match="output head 'lm_head' uses the LoRA variant ALoraLinearVariant: exclude"):
        MTTObjective()(model, **padded_batch())


def test_adalora_on_the_head_is_refused_as_unsupported():
    config = peft.AdaLoraConfig(init_r=2, target_r=2, total_step=10, target_modules=["q_proj", "lm_head"])
    model = peft.get_peft_model(tiny_llama(), config)
    with pytest.raises(ValueError, match="unsupported output head SVDLinear: .*AdaLoRA"):
        MTTObjective()(model, **padded_batch())


def test_kl_budget_follows_trls_adaptive_controller():
    budget = fastmtt.objective.KLBudget(target_kl=0.1, horizon=4.0)
    assert budget.update(2.0, 0.1) == 2.0  # on target: unchanged
    assert budget.update(2.0, 0.11) == pytest.approx(2.0 * (1 + 0.1 / 4))
    assert budget.update(2.0, 5.0) == pytest.approx(2.0 * (1 + 0.2 / 4))  # the correction is clipped at +-20%
    assert budget.update(2.0, 0.0) == pytest.approx(2.0 * (1 - 0.2 / 4))
    assert budget.update(2.0, float("nan")) == 2.0
    for name, value in (("target_kl", 0.0), ("target_kl", float("inf")), ("horizon", -1.0), ("horizon", 0.5),
                        ("target_kl", True)):
        with pytest.raises(ValueError, match=f"^{name} "):
            fastmtt.objective.KLBudget(**{"target_kl": 0.1, "horizon": 1.0, name: value})


def test_target_kl_moves_lam_towards_the_budget_at_each_end_step():
    """A divergence above the budget raises lam, below it lowers lam, at end_step only; calls under no_grad
    (evaluation) do not count."""
    model, batch = tiny_peft(), padded_batch()
    kl = float(MTTObjective(lam=1.0)(model, **batch).kl)
    assert kl > 1e-3
    above, below = MTTObjective(lam=1.0, target_kl=kl / 10), MTTObjective(lam=1.0, target_kl=kl * 10, kl_horizon=2.0)
    for objective in (above, below):
        with torch.no_grad():
            objective(model, **batch)
        assert objective.end_step() == 1.0
        objective(model, **batch).loss.backward()
        assert objective.options.lam == 1.0  # not before the step ends
        objective.end_step()
    assert above.options.lam == pytest.approx(1.0 + 0.2 / 10) and below.options.lam == pytest.approx(1.0 - 0.2 / 2)
    assert above.end_step() == above.options.lam  # a step without calls leaves lam
    assert "KLBudget(target_kl=" in repr(above)
    with pytest.raises(ValueError, match="lam must be > 0 with target_kl"):
        MTTObjective(lam=0.0, target_kl=0.1)


@pytest.mark.parametrize("ratio", [1.0, 1.1])
def test_budget_moves_lam_by_the_whole_steps_kl_for_any_micro_batching(ratio):
    """Budget = the step's true KL / ratio, horizon 1, the model unchanged: three steps end at lam (1 + (ratio
    - 1))^3 for one call of 4 rows, 2 x 2 with the step's count, 4 x 1 each with its own mean."""
    model, batch = tiny_peft(), padded_batch(batch=4)
    batch["labels"][2, :9] = -100  # the micro-batches have different numbers of predicted tokens
    true_kl = float(MTTObjective(lam=1.0)(model, **batch).kl)
    total = int((batch["labels"][:, 1:] != -100).sum())
    for parts, count in ((1, None), (2, total), (4, None)):
        objective = MTTObjective(lam=1.0, target_kl=true_kl / ratio, kl_horizon=1.0)
        path = []
        for _ in range(3):
            for rows in torch.arange(4).chunk(parts):
                objective(model, **{key: value[rows] for key, value in batch.items()}, num_items_in_batch=count)
            path.append(objective.end_step())
        assert path == pytest.approx([ratio, ratio**2, ratio**3], rel=1e-6), (parts, count)


def test_state_dict_restores_lam():
    model, batch = tiny_peft(), padded_batch()
    trained = MTTObjective(lam=1.0, target_kl=1e-9, kl_horizon=1.0)
    for _ in range(2):
        trained(model, **batch).loss.backward()
        trained.end_step()
    assert trained.state_dict() == {"lam": pytest.approx(1.44)}
    resumed = MTTObjective(lam=1.0, target_kl=1e-9, kl_horizon=1.0)
    resumed.load_state_dict(trained.state_dict())
    assert resumed.options.lam == trained.options.lam
    for wrong in ({}, {"lam": -1.0}, {"lam": 1.0, "step": 3}):
        with pytest.raises(ValueError, match="lam"):
            resumed.load_state_dict(wrong)


def packed_sequences():
    """Three sequences of 5, 7 and 4 tokens (targets 0 and V - 1 among them)."""
    seqs = [token_ids((n,), seed=seed) for n, seed in ((5, 4), (7, 5), (4, 6))]
    seqs[0][2], seqs[1][3] = 0, VOCAB - 1
    return seqs


@pytest.mark.parametrize("kl_positions", ["all", "labels"])
@pytest.mark.parametrize("layout", ["flattening", "flattening_flash_kwargs", "labels_everywhere"])
def test_packed_sequences_equal_the_sequences_apart(kl_positions, layout):
    """DataCollatorWithFlattening (position_ids restart, no attention mask; with FlashAttention's cu_seq_lens_q/k
    too), or a hand-packed row labelled everywhere: no row predicts the next sequence's first token, so loss
    and gradients are those of the three sequences apart (each summed, divided by the total count)."""
    seqs = packed_sequences()
    flash = layout == "flattening_flash_kwargs"
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash)(
        [{"input_ids": seq.tolist()} for seq in seqs])
    if layout == "labels_everywhere":
        batch["labels"] = batch["input_ids"].clone()
    objective = MTTObjective(lam=0.8, temperature=1.5, kl_positions=kl_positions)
    model = tiny_peft()
    got = objective(model, **batch)
    got.loss.backward()
    got_grads = trainable_grads(model)
    model.zero_grad()
    total = sum(len(seq) - 1 for seq in seqs)
    want = [objective(model, input_ids=seq[None], labels=seq[None], num_items_in_batch=total) for seq in seqs]
    sum(part.loss for part in want).backward()
    for index, name in enumerate(("loss", "ce", "kl")):
        torch.testing.assert_close(getattr(got, name), sum(part[index] for part in want).detach(), rtol=1e-5,
                                   atol=1e-6)
    assert float(got.kl) > 1e-3
    for name, grad in trainable_grads(model).items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sequence_ids_mark_every_sequence_start():
    from fastmtt.positions import sequence_ids

    labels = torch.zeros(1, 9, dtype=torch.int64)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    want = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 3]])
    assert torch.equal(sequence_ids(labels, position_ids=position_ids), want)
    assert torch.equal(sequence_ids(labels, position_ids=position_ids + 2), want)  # OPT-style offsets
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert torch.equal(sequence_ids(labels, cu_seq_lens=[("cu_seq_lens_q", cu)]), want)
    assert torch.equal(sequence_ids(labels, seq_idx=torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])), want)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(sequence_ids(labels, mask, position_ids), want * mask)
    assert sequence_ids(labels, mask) is mask  # a padded batch: its own mask
    labelled, attended = fastmtt.positions.predicted_positions(labels, want, -100)
    assert attended.tolist() == [[True, True, False, True, False, True, True, True]]
    with pytest.raises(ValueError, match="cu_seq_lens_k must be the 1-D cumulative sequence lengths"):
        sequence_ids(labels, cu_seq_lens=[("cu_seq_lens_k", torch.tensor([0, 3, 8]))])
    with pytest.raises(ValueError, match="position_ids must have the shape of labels"):
        sequence_ids(labels, position_ids=position_ids[:, 1:])


def identity_peft(target_modules=("q_proj", "v_proj")):
    """PEFT LoRA initialized as the identity (lora_B = 0)."""
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=list(target_modules)))


def neftune(model, alpha=20.0):
    """Activate NEFTune on `model` as transformers' Trainer does (a forward hook on the input embeddings)."""
    from transformers.integrations.neftune import activate_neftune

    return activate_neftune(model, alpha)


def test_neftune_noise_is_drawn_once_for_both_passes():
    batch = padded_batch()
    model = identity_peft().train()
    clean = MTTObjective(lam=1.0)(model, **batch)
    neftune(model)
    noisy = MTTObjective(lam=1.0)(model, **batch)
    assert float(noisy.kl) == 0.0 and abs(float(noisy.ce) - float(clean.ce)) > 1e-4  # noised, alike in both passes
    checkpointed = identity_peft().train()  # PEFT with gradient checkpointing: the embeddings' output needs grad
    checkpointed.get_base_model().gradient_checkpointing_enable(dict(use_reentrant=True))
    checkpointed.enable_input_require_grads()
    neftune(checkpointed)
    output = MTTObjective(lam=1.0)(checkpointed, **batch)
    output.loss.backward()
    assert float(output.kl) == 0.0 and all(grad.abs().max() > 0 for name, grad in
                                           trainable_grads(checkpointed).items() if "lora_B" in name)
    adapted_embeddings = tiny_peft(target_modules=("q_proj", "embed_tokens")).train()
    neftune(adapted_embeddings)
    with pytest.raises(ValueError, match=r"NEFTune \(neftune_noise_alpha\) on input embeddings that are trained"):
        MTTObjective()(adapted_embeddings, **batch)
    trained_weights = identity_peft().train()
    trained_weights.get_input_embeddings().weight.requires_grad_(True)
    neftune(trained_weights)
    with pytest.raises(ValueError, match="neftune_noise_alpha=None"):
        MTTObjective()(trained_weights, **batch)


def smoothed_reference(model, batch, eps, lam):
    """(loss, ce): (1 - eps) CE + eps * mean_v(-log p_v) (+ lam * KL for the loss) over the labelled rows, from
    the full logits; the loss carries the gradient."""
    want = reference_loss(model, batch, lam=lam)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labelled = batch["labels"][:, 1:] != -100
    log_p = torch.log_softmax(logits[labelled].double(), -1)
    nll = -log_p.gather(1, batch["labels"][:, 1:][labelled][:, None]).sum() / labelled.sum()
    smooth = -log_p.mean(-1).sum() / labelled.sum()
    shift = eps * (smooth - nll)
    return want.loss + shift, (want.ce + shift).detach()


@pytest.mark.parametrize("bias", [False, True])
def test_label_smoothing_in_the_ce_part(bias):
    base = tiny_llama()
    if bias:
        base.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.5)
    model, batch, eps = tiny_peft(base=base, target_modules=("q_proj", "v_proj", "lm_head")), padded_batch(), 0.3
    got = MTTObjective(lam=0.7, kl_positions="labels", label_smoothing=eps)(model, **batch)
    got.loss.backward()
    got_grads = trainable_grads(model)
    model.zero_grad()
    want_loss, want_ce = smoothed_reference(model, batch, eps, 0.7)
    want_loss.backward()
    torch.testing.assert_close(got.ce.double(), want_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss.double(), want_loss.detach(), rtol=1e-5, atol=1e-6)
    plain = MTTObjective(lam=0.7, kl_positions="labels")(model, **batch)
    assert abs(float(plain.ce) - float(got.ce)) > 1e-3
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for wrong in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="label_smoothing must be a number in"):
            MTTObjective(label_smoothing=wrong)
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="label_smoothing .* final logit softcapping"):
        MTTObjective(label_smoothing=eps)(model, **batch)


def tiny_mixtral_peft(coef=0.5):
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32, output_router_logits=True,
                                        router_aux_loss_coef=coef)
    torch.manual_seed(0)
    return peft.get_peft_model(transformers.MixtralForCausalLM(config),
                               peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_moe_router_aux_loss_is_added_as_the_model_adds_it(monkeypatch):
    """lam 0: the model's own loss (CE + router_aux_loss_coef * load-balancing loss) and its gradients."""
    model, batch = tiny_mixtral_peft(), padded_batch()
    got = MTTObjective(lam=0.0)(model, **batch)
    got.loss.backward()
    got_grads = trainable_grads(model)
    model.zero_grad()
    want = model(**batch)
    want.loss.backward()
    assert float(want.aux_loss.detach()) > 0.1
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss - got.ce, 0.5 * want.aux_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    regularized = MTTObjective(lam=0.7)(model, **batch)
    torch.testing.assert_close(regularized.loss, regularized.ce + 0.7 * regularized.kl + 0.5 * want.aux_loss.detach(),
                               rtol=1e-5, atol=1e-6)
    monkeypatch.delattr(transformers.models.mixtral.modeling_mixtral, "load_balancing_loss_func")
    with pytest.raises(ValueError, match="MixtralForCausalLM returns router logits .* output_router_logits=False"):
        MTTObjective()(model, **batch)


def test_every_entry_point_defaults_to_the_settings_the_experiment_chose():
    """lam = 0.3 (docs/experiments.md#the-defaults) for MTT and for mask_target=False, and the divergence at
    every position, wherever they are not given."""
    import inspect

    from fastmtt.apps.cli import build_parser
    from fastmtt.apps.finetune import run_finetune

    assert fastmtt.DEFAULT_LAM == 0.3
    assert MTTOptions().lam == MTTOptions(mask_target=False).lam == 0.3
    assert MTTObjective().options.lam == MTTObjective(mask_target=False).options.lam == 0.3
    for function in (fastmtt.mtt_loss, fastmtt.fused_linear_mtt_loss, run_finetune):
        assert inspect.signature(function).parameters["lam"].default == 0.3, function.__name__
    args = build_parser().parse_args(["finetune", "--model", "m", "--data", "d.jsonl", "--out", "o"])
    assert args.lam == 0.3 and args.kl_positions == "all"
    assert MTTObjective().kl_positions == MTTObjective(mask_target=False).kl_positions == "all"
    assert inspect.signature(run_finetune).parameters["kl_positions"].default == "all"
