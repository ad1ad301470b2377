"""Hugging Face Trainer integration: train a PEFT model with the MTT objective, logging ce and kl.

    trainer = MTTTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=..., mtt_lambda=1.0)

`MTTLossMixin` carries the whole integration, so any Trainer subclass gains it the same way, e.g.
TRL's SFTTrainer: ``class MTTSFTTrainer(MTTLossMixin, SFTTrainer): pass``. It runs as launched: one
process, or several with `accelerate launch` / `torchrun` (DDP, FSDP).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from fastmtt.objective import MTTObjective
from fastmtt.positions import batch_sequence_ids, predicted_positions


class LogFirstAndLastStep(TrainerCallback):
    """Log the first and the last optimizer step whatever logging_steps is, so short runs report too."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.logging_strategy != "no" and state.global_step in (1, state.max_steps):
            control.should_log = True


class MTTObjectiveState(TrainerCallback, ExportableState):
    """Ends the objective's step after every optimizer step (a forgetting budget moves lam there) and keeps
    the objective's `state_dict()` in the Trainer's checkpoints (trainer_state.json, `stateful_callbacks`),
    restored when training resumes from one. `objective`: a class attribute, so that the copy the Trainer
    builds with restore_callback_states_from_checkpoint=True serves the same objective."""

    objective: Optional[MTTObjective] = None

    @classmethod
    def serving(cls, objective: MTTObjective) -> MTTObjectiveState:
        return type(cls.__name__, (cls,), {"objective": objective})()

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        if saved and "objective_state" in saved.get("attributes", {}):
            self.objective.load_state_dict(saved["attributes"]["objective_state"])

    def on_step_end(self, args, state, control, **kwargs):
        self.objective.end_step()

    def state(self) -> dict:
        return {"args": {}, "attributes": {"objective_state": self.objective.state_dict()}}


class MTTLossMixin:
    """compute_loss = MTTObjective on the batch; logs `ce` and `kl` next to `loss`.

    Exact under gradient accumulation and data parallelism: the Trainer counts the predicted tokens of
    all micro-batches of an optimizer step over all processes (num_items_in_batch, over the shifted
    labels), each micro-batch's loss is its sum divided by that count times the number of processes,
    and DDP/FSDP average the gradients: the step's gradient is that of one large batch. The objective's
    step ends after every optimizer step (`MTTObjectiveState`: a forgetting budget moves lam once per step,
    logged as `lam`, saved in checkpoints and restored on resume_from_checkpoint). label_smoothing_factor
    is the objective's label_smoothing.
    Keyword arguments: objective (an MTTObjective), or MTTObjective's keywords prefixed with `mtt_`
    (mtt_lambda for lam, mtt_temperature, mtt_direction, mtt_mask_target, mtt_disable_dropout, ...).
    """

    def __init__(self, *args, objective: Optional[MTTObjective] = None, **kwargs):
        keywords = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith("mtt_")}
        keywords = {name: value for name, value in keywords.items() if value is not None}  # None: the default
        if objective is not None and keywords:
            raise TypeError(f"pass objective=MTTObjective(...) or {', '.join(sorted(keywords))}, not both")
        if objective is not None and not isinstance(objective, MTTObjective):
            raise TypeError(f"objective must be a fastmtt.MTTObjective, got {type(objective).__name__}")
        self.objective = objective or MTTObjective(**_objective_keywords(keywords))
        super().__init__(*args, **kwargs)
        # The objective takes num_items_in_batch and shifts labels: have the Trainer count predicted tokens
        # over labels[..., 1:] and treat the returned loss as already normalized for accumulation.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._mtt_totals, self._mtt_steps = None, 0.0  # sum of [ce, kl] and optimizer steps since the last log
        self.add_callback(LogFirstAndLastStep)
        self.add_callback(MTTObjectiveState.serving(self.objective))
        smoothing = float(self.args.label_smoothing_factor or 0.0)  # the CE part's, in the fused loss
        if smoothing:
            if not 0 < smoothing < 1:
                raise ValueError(f"label_smoothing_factor must be in [0, 1), got {smoothing}")
            if self.objective.label_smoothing not in (0.0, smoothing):
                raise ValueError(f"label_smoothing_factor={smoothing} and the objective's label_smoothing="
                                 f"{self.objective.label_smoothing} differ: give one")
            self.objective.label_smoothing = smoothing

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("MTT training needs `labels` in every batch (input_ids with -100 where no loss)")
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.is_floating_point():
            # Trainer divides the token count by the tensor/context/sequence-parallel sizes (1 here): a float.
            num_items_in_batch = num_items_in_batch.round().to(torch.int64)
        # As Trainer.compute_loss: a count over all processes (average_tokens_across_devices) comes with the loss
        # multiplied by their number (DDP/FSDP average the gradients; evaluation averages the losses); else
        # each process's own mean.
        over_processes = self.args.average_tokens_across_devices and num_items_in_batch is not None
        output = self.objective(model, labels=labels, num_items_in_batch=num_items_in_batch,
                                data_parallel_size=self.accelerator.num_processes if over_processes else 1, **inputs)
        if model.training:
            # Same normalization as the logged loss: per optimizer step, averaged over logging steps.
            per_step = 1.0 if num_items_in_batch is not None else 1.0 / self.current_gradient_accumulation_steps
            step = torch.stack((output.ce, output.kl)).double() * per_step
            self._mtt_totals = step if self._mtt_totals is None else self._mtt_totals + step
            self._mtt_steps += 1.0 / self.current_gradient_accumulation_steps
        return (output.loss, {"ce": output.ce, "kl": output.kl}) if return_outputs else output.loss

    def _get_num_items_in_batch(self, batch_samples, device):
        """The Trainer's token count over the positions the objective predicts: it counts labels[..., 1:],
        which under left padding includes the first real token, predicted from a pad (see
        `predicted_positions`); given as shift_labels, which the Trainer counts as they are."""
        ignore_index = self.objective.options.ignore_index
        counted = []
        for batch in batch_samples:
            if isinstance(batch, dict) and torch.is_tensor(batch.get("labels")) and "shift_labels" not in batch:
                labelled, _ = predicted_positions(batch["labels"], batch_sequence_ids(batch["labels"], batch),
                                                  ignore_index)
                batch = {**batch, "shift_labels": batch["labels"][..., 1:].masked_fill(~labelled, -100)}
            counted.append(batch)
        return super()._get_num_items_in_batch(counted, device)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._mtt_totals is not None:
            # Every process logs together (the Trainer gathers the loss the same way): mean over processes.
            ce, kl = (self.accelerator.reduce(self._mtt_totals, reduction="mean") / self._mtt_steps).tolist()
            logs["ce"], logs["kl"] = ce, kl  # full precision: a KL of 1e-6 stays visible
            if self.objective.kl_budget is not None:
                logs["lam"] = self.objective.options.lam
            self._mtt_totals, self._mtt_steps = None, 0.0
        return super().log(logs, *args, **kwargs)


class PadCollator:
    """A data collator for MTT training: right-pads a batch of tokenized examples to its longest.

    Args:
        pad_id: the token id that pads input_ids (e.g. the tokenizer's pad_token_id, or its eos_token_id).

    Call it with a list of examples, each a dict with "input_ids" and "labels" (lists of ints of one
    length, -100 where no loss). Returns a dict of int64 tensors [B, L], L the longest example:
    input_ids (padded with pad_id), attention_mask (1 on the tokens, 0 on the padding) and labels
    (padded with -100).

    Example:
        >>> from fastmtt.trainer import PadCollator
        >>> collate = PadCollator(pad_id=0)
        >>> batch = collate([dict(input_ids=[5, 6, 7], labels=[5, 6, 7]), dict(input_ids=[8], labels=[8])])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[5, 6, 7], [8, -100, -100]])
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples):
        length = max(len(e["input_ids"]) for e in examples)
        pad = lambda values, fill: list(values) + [fill] * (length - len(values))  # noqa: E731
        return dict(input_ids=torch.tensor([pad(e["input_ids"], self.pad_id) for e in examples]),
                    attention_mask=torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
                    labels=torch.tensor([pad(e["labels"], -100) for e in examples]))


def _objective_keywords(keywords):
    """MTTObjective's keyword arguments from the Trainer's mtt_* ones (mtt_lambda is lam)."""
    accepted = set(inspect.signature(MTTObjective).parameters)
    arguments = {}
    for name, value in keywords.items():
        argument = "lam" if name == "mtt_lambda" else name.removeprefix("mtt_")
        if argument not in accepted or argument == "lam" and name != "mtt_lambda":
            raise TypeError(f"unknown keyword {name}: the MTT keywords are mtt_lambda and "
                            f"{', '.join('mtt_' + p for p in sorted(accepted - {'lam'}))}")
        arguments[argument] = value
    return arguments


class MTTTrainer(MTTLossMixin, Trainer):
    """transformers.Trainer training a PEFT model with CE + lam * T^2 * target-masked KL to its base."""
