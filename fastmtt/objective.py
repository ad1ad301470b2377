"""MTTObjective: the MTT objective for PEFT causal LMs.

It runs the model twice on a batch, once with the adapters disabled (no grad) and once adapted, takes
the final hidden states of both (full-vocabulary logits of a whole batch are never built), applies the
causal shift and evaluates CE + lam * T^2 * masked KL through the output head, honoring a LoRA adapter
on that head.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss
from fastmtt.options import DEFAULT_LAM, MTTOptions
from fastmtt.reference import MTTOutput

# Config attributes of heads that scale logits in ways the fused head loss does not model.
_UNSUPPORTED_LOGIT_SCALING = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier")


def _unwrap_causal_lm(model):
    """The PEFT model's underlying causal LM; a clear error for anything else."""
    try:
        from peft import PeftModel
    except ImportError as error:  # pragma: no cover - peft is a dependency
        raise ImportError("MTTObjective needs the peft package") from error
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"model must be a peft.PeftModel (e.g. from peft.get_peft_model), got {type(model).__name__}: "
            "MTT compares the adapted model with its own base, reached by disabling the adapters")
    if model.active_peft_config.is_prompt_learning:
        raise TypeError("MTTObjective supports adapter methods such as LoRA, not prompt-learning PEFT configs")
    return model.get_base_model()


def _decoder(causal_lm):
    """The causal LM's decoder stack (returns final hidden states, after the final norm)."""
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if decoder is None or decoder is causal_lm:
        decoder = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", ""), None)
    if not isinstance(decoder, torch.nn.Module):
        raise TypeError(f"cannot find the decoder of {type(causal_lm).__name__} (no get_decoder() or "
                        "base_model_prefix submodule)")
    return decoder


def _head_params(causal_lm):
    """dict(weight, bias, lora_A, lora_B, lora_scaling, softcap) describing the output head."""
    config = getattr(causal_lm, "config", None)
    for name in _UNSUPPORTED_LOGIT_SCALING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(causal_lm).__name__} scales its logits (config.{name}={value}); "
                                      "MTTObjective supports heads computing softcap(h W^T + b) only")
    softcap = getattr(config, "final_logit_softcapping", None)
    head = causal_lm.get_output_embeddings()
    params = dict(weight=None, bias=None, lora_A=None, lora_B=None, lora_scaling=1.0, softcap=softcap)
    if type(head) is torch.nn.Linear:
        params.update(weight=head.weight, bias=head.bias)
        return params
    base_layer = getattr(head, "base_layer", None)
    if not (hasattr(head, "lora_A") and type(base_layer) is torch.nn.Linear):
        raise ValueError(
            f"unsupported output head {type(head).__name__}: MTTObjective serves an nn.Linear head, optionally "
            "with a LoRA adapter (modules_to_save, DoRA and other head wrappers are not supported)")
    params.update(weight=base_layer.weight, bias=base_layer.bias)
    active = [name for name in head.active_adapters if name in head.lora_A]
    if head.disable_adapters or not active:
        return params
    if head.merged:
        raise ValueError("the LoRA adapter on the output head is merged; unmerge it for MTT training")
    if len(active) > 1:
        raise ValueError(f"one active LoRA adapter on the output head is supported, got {active}")
    (name,) = active
    dropout = head.lora_dropout[name]
    if head.use_dora.get(name, False) or getattr(head, "lora_bias", {}).get(name, False) or (
            head.training and not isinstance(dropout, torch.nn.Identity) and dropout.p > 0):
        raise ValueError("the LoRA adapter on the output head uses DoRA, lora_bias or lora_dropout > 0, "
                                  "which MTTObjective does not support on the head")
    params.update(lora_A=head.lora_A[name].weight, lora_B=head.lora_B[name].weight,
                  lora_scaling=float(head.scaling[name]))
    return params


class MTTObjective:
    """objective(model, input_ids=, attention_mask=, labels=, num_items_in_batch=None) -> MTTOutput.

    loss = mean over predicted tokens of CE_i + lam * T^2 * KL_i, where KL_i compares the adapted and
    base next-token distributions with the target removed ("forward": KL(base || adapted)). labels
    follow the Hugging Face convention (same as input_ids, -100 where no loss; shifted here). With
    num_items_in_batch the mean divides by that count instead (exact gradient accumulation).
    """

    def __init__(self, lam: float = DEFAULT_LAM, temperature: float = 1.0, direction: str = "forward",
                 ignore_index: int = -100, backend: str = "auto"):
        MTTOptions(lam=lam, temperature=temperature, direction=direction, ignore_index=ignore_index)
        self.lam, self.temperature, self.direction = float(lam), float(temperature), direction
        self.ignore_index, self.backend = ignore_index, backend

    def __repr__(self):
        return (f"MTTObjective(lam={self.lam}, temperature={self.temperature}, direction={self.direction!r}, "
                f"ignore_index={self.ignore_index})")

    def hidden_states(self, model, input_ids, attention_mask=None, **model_kwargs):
        """(adapted, base) final hidden states [B, L, D]; the base pass runs without grad, adapters off."""
        decoder = _decoder(_unwrap_causal_lm(model))
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        with torch.no_grad(), model.disable_adapter():
            base_hidden = decoder(**inputs).last_hidden_state
        return decoder(**inputs).last_hidden_state, base_hidden

    def __call__(self, model, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None,
                 num_items_in_batch: Optional[Union[int, torch.Tensor]] = None, **model_kwargs) -> MTTOutput:
        if labels is None or labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {None if labels is None else tuple(labels.shape)}")
        causal_lm = _unwrap_causal_lm(model)
        head = _head_params(causal_lm)
        hidden, base_hidden = self.hidden_states(model, input_ids, attention_mask, **model_kwargs)
        targets = labels[:, 1:]
        keep = targets != self.ignore_index  # only predicted positions reach the head
        return fused_linear_mtt_loss(hidden[:, :-1][keep], base_hidden[:, :-1][keep], labels=targets[keep],
                          lam=self.lam, temperature=self.temperature, direction=self.direction,
                          ignore_index=self.ignore_index, reduction="mean", num_items_in_batch=num_items_in_batch,
                          return_components=True, backend=self.backend, **head)
