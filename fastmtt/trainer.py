"""Hugging Face Trainer integration: train a PEFT model with the MTT objective, logging ce and kl.

    trainer = MTTTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=..., mtt_lambda=1.0)

`MTTLossMixin` carries the whole integration, so any Trainer subclass gains it the same way, e.g.
TRL's SFTTrainer: ``class MTTSFTTrainer(MTTLossMixin, SFTTrainer): pass``.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

from fastmtt.objective import MTTObjective
from fastmtt.ops.mtt_loss import DEFAULT_LAM


class MTTLossMixin:
    """compute_loss = MTTObjective on the batch; logs `ce` and `kl` next to `loss`.

    Exact under gradient accumulation: the Trainer counts the predicted tokens of all micro-batches of
    an optimizer step (num_items_in_batch, over the shifted labels) and each micro-batch's loss is its
    sum divided by that count, so the accumulated gradient equals that of one large batch.
    Keyword arguments: objective (an MTTObjective) or mtt_lambda, mtt_temperature, mtt_direction.
    """

    def __init__(self, *args, objective: Optional[MTTObjective] = None, mtt_lambda: Optional[float] = None,
                 mtt_temperature: float = 1.0, mtt_direction: str = "forward", **kwargs):
        if objective is not None and mtt_lambda is not None:
            raise ValueError("pass either objective or mtt_lambda/mtt_temperature/mtt_direction, not both")
        if objective is not None and not isinstance(objective, MTTObjective):
            raise TypeError(f"objective must be a fastmtt.peft.MTTObjective, got {type(objective).__name__}")
        self.objective = objective or MTTObjective(lam=DEFAULT_LAM if mtt_lambda is None else mtt_lambda,
                                                   temperature=mtt_temperature, direction=mtt_direction)
        super().__init__(*args, **kwargs)
        # The objective takes num_items_in_batch and shifts labels: have the Trainer count predicted tokens
        # over labels[..., 1:] and treat the returned loss as already normalized for accumulation.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._mtt_totals = {"ce": 0.0, "kl": 0.0, "steps": 0.0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("MTT training needs `labels` in every batch (input_ids with -100 where no loss)")
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.is_floating_point():
            # Trainer divides the token count by the tensor/context/sequence-parallel sizes (1 here): a float.
            num_items_in_batch = num_items_in_batch.round().to(torch.int64)
        output = self.objective(self.accelerator.unwrap_model(model), labels=labels,
                                num_items_in_batch=num_items_in_batch, **inputs)
        loss = output.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages the gradients
        if model.training:
            # Same normalization as the logged loss: per optimizer step, averaged over logging steps.
            per_step = 1.0 if num_items_in_batch is not None else 1.0 / self.current_gradient_accumulation_steps
            self._mtt_totals["ce"] += float(output.ce) * per_step
            self._mtt_totals["kl"] += float(output.kl) * per_step
            self._mtt_totals["steps"] += 1.0 / self.current_gradient_accumulation_steps
        return (loss, {"ce": output.ce, "kl": output.kl}) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        totals = self._mtt_totals
        if "loss" in logs and totals["steps"] > 0:
            logs["ce"] = round(totals["ce"] / totals["steps"], 6)
            logs["kl"] = round(totals["kl"] / totals["steps"], 6)
            self._mtt_totals = {"ce": 0.0, "kl": 0.0, "steps": 0.0}
        return super().log(logs, *args, **kwargs)


class MTTTrainer(MTTLossMixin, Trainer):
    """transformers.Trainer training a PEFT model with CE + lam * T^2 * target-masked KL to its base."""
