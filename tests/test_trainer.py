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
