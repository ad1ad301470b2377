"""MTTTrainer: exact gradient accumulation, ce/kl logging, TRL SFTTrainer through the mixin."""
import pytest
import torch

from fastmtt.objective import MTTObjective
from fastmtt.options import MTTOptions
from fastmtt.trainer import MTTLossMixin, MTTTrainer
from tests.utils import VOCAB, padded_batch, tiny_peft, trainable_grads

transformers = pytest.importorskip("transformers")

LR = 0.5


def dataset_of(batch):
    return [{key: value[i] for key, value in batch.items()} for i in range(len(batch["input_ids"]))]


def four_examples(left_padded=False):
    batch = padded_batch(batch=4, length=10)
    batch["labels"][3, :7] = -100  # micro-batches with different numbers of predicted tokens
    if left_padded:  # row 1's padding moves to the front; its first real token keeps its label
        for key in batch:
            batch[key][1] = batch[key][1].roll(4)
    return batch


def training_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
                    max_steps=1, weight_decay=0.0, max_grad_norm=1e9, logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def adapter_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("micro_batch,accumulation", [(4, 1), (2, 2), (1, 4)])
def test_one_step_equals_full_batch_gradient_step(tmp_path, micro_batch, accumulation, left_padded):
    """Also left-padded: the Trainer counts the tokens the objective predicts (not the first real token,
    which only a pad would predict)."""
    batch = four_examples(left_padded)
    reference_model = tiny_peft()
    MTTObjective(lam=0.8)(reference_model, **batch).loss.backward()
    expected = {name: p.detach() - LR * trainable_grads(reference_model)[name]
                for name, p in reference_model.named_parameters() if p.requires_grad}

    model = tiny_peft()
    trainer = MTTTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=micro_batch,
                                                         gradient_accumulation_steps=accumulation),
                         train_dataset=dataset_of(batch), mtt_lambda=0.8)
    trainer.train()
    got = adapter_weights(model)
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-5, atol=1e-6, msg=name)

    (logged,) = [entry for entry in trainer.state.log_history if "ce" in entry]
    full = MTTObjective(lam=0.8)(tiny_peft(), **batch)
    assert logged["ce"] == pytest.approx(float(full.ce), rel=1e-4)
    assert logged["kl"] == pytest.approx(float(full.kl), rel=1e-4) and logged["kl"] > 1e-4
    assert logged["loss"] == pytest.approx(logged["ce"] + 0.8 * logged["kl"], rel=1e-3)


def test_objective_and_lambda_arguments(tmp_path):
    args = training_args(tmp_path)
    objective = MTTObjective(lam=0.2, direction="reverse")
    trainer = MTTTrainer(model=tiny_peft(), args=args, train_dataset=dataset_of(four_examples()), objective=objective)
    assert trainer.objective is objective
    with pytest.raises(TypeError, match=r"objective=MTTObjective\(\.\.\.\) or mtt_lambda, not both"):
        MTTTrainer(model=tiny_peft(), args=args, objective=objective, mtt_lambda=1.0)
    with pytest.raises(TypeError, match=r"options=MTTOptions\(\.\.\.\) or lam, not both"):
        MTTTrainer(model=tiny_peft(), args=args, mtt_options=MTTOptions(lam=2.0), mtt_lambda=1.0)
    with pytest.raises(TypeError, match="MTTObjective"):
        MTTTrainer(model=tiny_peft(), args=args, objective=lambda *a, **k: None)
    built = MTTTrainer(model=tiny_peft(), args=args, mtt_lambda=0.3, mtt_temperature=2.0, mtt_direction="reverse",
                       mtt_mask_target=False, mtt_disable_dropout=False).objective
    assert built.options == MTTOptions(lam=0.3, temperature=2.0, direction="reverse", mask_target=False)
    assert built.disable_dropout is False
    default = MTTTrainer(model=tiny_peft(), args=args, mtt_lambda=None).objective
    assert default.options == MTTOptions() and default.kl_positions == "all"
    assert MTTTrainer(model=tiny_peft(), args=args, mtt_kl_positions="labels").objective.kl_positions == "labels"
    for wrong in ("mtt_lam", "mtt_reduction_mode"):
        with pytest.raises(TypeError, match=f"unknown keyword {wrong}"):
            MTTTrainer(model=tiny_peft(), args=args, **{wrong: 1.0})


def test_short_run_logs_its_first_and_last_step(tmp_path):
    batch = padded_batch(seed=3, batch=16, length=10)
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=3, per_device_train_batch_size=8,
                         gradient_accumulation_steps=4, logging_steps=10)
    trainer = MTTTrainer(model=tiny_peft(), args=args, train_dataset=dataset_of(batch), mtt_lambda=0.8)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.max_steps == 3 and [entry["step"] for entry in logged] == [1, 3]
    assert all(entry["ce"] > 1.0 and entry["kl"] > 1e-4 for entry in logged)


def test_small_kl_is_logged_with_its_digits(tmp_path):
    batch = four_examples()
    model = tiny_peft()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.mul_(3e-3)  # an adapter barely away from its base: KL ~ 1e-6
    expected = float(MTTObjective(lam=0.8)(model, **batch).kl)
    assert 1e-7 < expected < 1e-5
    trainer = MTTTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=4),
                         train_dataset=dataset_of(batch), mtt_lambda=0.8)
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert logged["kl"] == pytest.approx(expected, rel=1e-4)


def test_trl_sft_trainer_with_mixin(tmp_path):
    trl = pytest.importorskip("trl")

    class MTTSFTTrainer(MTTLossMixin, trl.SFTTrainer):
        pass

    batch = four_examples()
    model = tiny_peft(target_modules=("q_proj", "v_proj"))  # TRL refuses LoRA on lm_head
    before = adapter_weights(model)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=LR, optim="sgd", logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    data = [{"input_ids": ids.tolist()} for ids in batch["input_ids"]]
    trainer = MTTSFTTrainer(model=model, args=args, train_dataset=data_as_dataset(data),
                            processing_class=tiny_tokenizer(), mtt_lambda=0.8)
    trainer.train()
    assert any("kl" in entry and entry["kl"] > 0 for entry in trainer.state.log_history)
    assert any((adapter_weights(model)[name] - weight).abs().max() > 0 for name, weight in before.items())


def tiny_tokenizer():
    """A word-level tokenizer over the tiny model's vocabulary (TRL wants one; nothing is downloaded)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t1", pad_token="t0", eos_token="t2")


def data_as_dataset(rows):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_list(rows)


def eight_examples():
    batch = padded_batch(seed=5, batch=8, length=10)
    batch["labels"][3, :7] = -100  # micro-batches with different numbers of predicted tokens
    return batch


@pytest.mark.parametrize("ratio", [1.0, 1.1])
@pytest.mark.parametrize("micro_batch,accumulation", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_budget_lam_path_is_the_same_for_any_micro_batching(tmp_path, micro_batch, accumulation, ratio):
    """lr 0 (the model never changes), budget = the step's true KL / ratio, horizon 1: lam moves once per
    optimizer step by the whole step's KL, to ratio, ratio^2, ratio^3 after 3 steps."""
    batch = eight_examples()
    true_kl = float(MTTObjective(lam=1.0)(tiny_peft(), **batch).kl)
    args = training_args(tmp_path, learning_rate=0.0, max_steps=3, per_device_train_batch_size=micro_batch,
                         gradient_accumulation_steps=accumulation)
    trainer = MTTTrainer(model=tiny_peft(), args=args, train_dataset=dataset_of(batch), mtt_lambda=1.0,
                         mtt_target_kl=true_kl / ratio, mtt_kl_horizon=1.0)
    trainer.train()
    logged = [entry["lam"] for entry in trainer.state.log_history if "lam" in entry]
    assert logged == pytest.approx([ratio, ratio**2, ratio**3], rel=1e-6)
    assert trainer.objective.options.lam == pytest.approx(ratio**3, rel=1e-6)


@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_budget_lam_is_saved_in_checkpoints_and_restored_on_resume(tmp_path, restore_callbacks):
    """Horizon 1 and a budget far below the KL: lam grows by 20% per step, 1.2^4 = 2.0736 after four steps,
    whether straight or two steps, then resumed from checkpoint-2 by a fresh trainer (also where the Trainer
    rebuilds the callbacks from the checkpoint: restore_callback_states_from_checkpoint)."""
    import json

    def run(out_dir, max_steps, resume=None):
        args = training_args(out_dir, max_steps=max_steps, per_device_train_batch_size=4, save_strategy="steps",
                             save_steps=2, restore_callback_states_from_checkpoint=restore_callbacks)
        model = tiny_peft()
        trainer = MTTTrainer(model=model, args=args, train_dataset=dataset_of(four_examples()), mtt_lambda=1.0,
                             mtt_target_kl=1e-9, mtt_kl_horizon=1.0)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.objective.options.lam, adapter_weights(model)

    straight_lam, straight = run(tmp_path / "straight", 4)
    assert straight_lam == pytest.approx(1.2**4)
    first_lam, _ = run(tmp_path / "resumed", 2)
    saved = json.loads((tmp_path / "resumed" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["MTTObjectiveState"]["attributes"] == {"objective_state": {"lam": first_lam}}
    assert first_lam == pytest.approx(1.44)
    resumed_lam, resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "resumed" / "checkpoint-2"))
    assert resumed_lam == pytest.approx(straight_lam, rel=1e-12)
    for name, weight in straight.items():
        torch.testing.assert_close(resumed[name], weight, msg=name)


def packed_dataset():
    from tests.test_objective import packed_sequences

    return [{"input_ids": seq.tolist()} for seq in packed_sequences()]


def test_packed_batches_are_counted_per_sequence(tmp_path):
    """DataCollatorWithFlattening's one row, labels on every token (hand-packed): the Trainer's count stops at
    each sequence boundary, as the objective's rows do."""
    collate = transformers.DataCollatorWithFlattening()
    batch = collate(packed_dataset())
    batch["labels"] = batch["input_ids"].clone()
    trainer = MTTTrainer(model=tiny_peft(), args=training_args(tmp_path), mtt_lambda=0.8)
    count = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert int(count) == sum(len(example["input_ids"]) - 1 for example in packed_dataset()) == 13


def test_neftune_base_pass_sees_the_adapted_pass_embeddings(tmp_path):
    """TrainingArguments(neftune_noise_alpha=20) with an identity adapter: KL exactly 0 at step 1, the noise
    applied (CE differs from the noiseless run's)."""
    from tests.test_objective import identity_peft

    logged = {}
    for alpha in (None, 20.0):
        trainer = MTTTrainer(model=identity_peft(), args=training_args(tmp_path, neftune_noise_alpha=alpha,
                                                                       per_device_train_batch_size=4),
                             train_dataset=dataset_of(four_examples()), mtt_lambda=1.0)
        trainer.train()
        (logged[alpha],) = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert logged[20.0]["kl"] == 0.0 and logged[None]["kl"] == 0.0
    assert abs(logged[20.0]["ce"] - logged[None]["ce"]) > 1e-4


def test_label_smoothing_factor_is_the_objectives_label_smoothing(tmp_path):
    batch = four_examples()
    want = MTTObjective(lam=0.8, label_smoothing=0.3)(tiny_peft(), **batch)
    plain = MTTObjective(lam=0.8)(tiny_peft(), **batch)
    args = training_args(tmp_path, label_smoothing_factor=0.3, per_device_train_batch_size=4)
    trainer = MTTTrainer(model=tiny_peft(), args=args, train_dataset=dataset_of(batch), mtt_lambda=0.8)
    assert trainer.objective.label_smoothing == 0.3
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "ce" in entry]
    assert logged["ce"] == pytest.approx(float(want.ce), rel=1e-5)
    assert abs(logged["ce"] - float(plain.ce)) > 1e-3
    with pytest.raises(ValueError, match="label_smoothing_factor=0.3 and the objective's label_smoothing=0.1"):
        MTTTrainer(model=tiny_peft(), args=args, mtt_label_smoothing=0.1)


def test_moe_aux_loss_is_in_the_trainers_loss(tmp_path):
    """A tiny Mixtral (output_router_logits=True, router_aux_loss_coef=0.5) at lam 0: the logged loss is the
    model's own loss, CE + 0.5 * its load-balancing loss."""
    from tests.test_objective import tiny_mixtral_peft

    batch = four_examples()
    want = tiny_mixtral_peft()(**batch)
    trainer = MTTTrainer(model=tiny_mixtral_peft(), args=training_args(tmp_path, per_device_train_batch_size=4),
                         train_dataset=dataset_of(batch), mtt_lambda=0.0)
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "ce" in entry]
    assert logged["loss"] == pytest.approx(float(want.loss.detach()), rel=1e-4)
    assert logged["loss"] - logged["ce"] == pytest.approx(0.5 * float(want.aux_loss.detach()), rel=1e-3)
