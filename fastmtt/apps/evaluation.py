"""Held-out language-model metrics of an adapted model, and its forgetting relative to its base."""
from __future__ import annotations

import math
from typing import Dict, Iterable

import torch

from fastmtt.positions import predicted_positions


@torch.no_grad()
def evaluate_lm(model, batches: Iterable[Dict[str, torch.Tensor]], device="cpu", with_kl: bool = True,
                ignore_index: int = -100, base_cache=None) -> Dict[str, float]:
    """Token-averaged metrics over batches of dict(input_ids, labels, optional attention_mask), labels in
    the Hugging Face convention (shifted here, ignore_index where no loss):
    ce (nats/token), ppl = exp(ce), acc (top-1 next-token accuracy), tokens, exact (the share of sequences
    whose every predicted token is right: greedy decoding's exact match under teacher forcing), and with_kl:
    kl_to_base = mean KL(base || model) of the full next-token distributions, the base being the PEFT
    model with its adapters disabled (0 for a model that is not a PEFT model). base_cache: None (default:
    a second pass, adapters off) or a `fastmtt.BaseCache` holding the base's final hidden states of every
    batch's examples (a text scored many times: its base pass runs once, into the cache); the base logits are
    then the output head's on them. With a cache, final logit softcapping is a ValueError (the output head
    alone does not softcap)."""
    with_base = with_kl and hasattr(model, "disable_adapter")
    if with_base and base_cache is not None:
        if getattr(model.config, "final_logit_softcapping", None):
            raise ValueError("base_cache: the model softcaps its logits, which its output head alone does not")
        base_cache.check_model(model)
    was_training = model.training
    model.eval()
    totals = dict(ce=0.0, acc=0.0, kl_to_base=0.0, tokens=0, exact=0, sequences=0)
    for batch in batches:
        inputs = dict(input_ids=batch["input_ids"].to(device))
        if batch.get("attention_mask") is not None:
            inputs["attention_mask"] = batch["attention_mask"].to(device)
        labels = batch["labels"][:, 1:].to(device)
        mask = inputs.get("attention_mask")
        valid, _ = predicted_positions(batch["labels"].to(device), mask, ignore_index)
        log_q = model(**inputs).logits[:, :-1][valid].float().log_softmax(-1)
        targets = labels[valid]
        right = log_q.argmax(-1) == targets
        totals["ce"] -= float(log_q.gather(-1, targets[:, None]).sum())
        totals["acc"] += float(right.sum())
        totals["tokens"] += int(valid.sum())
        wrong = torch.zeros_like(valid, dtype=torch.long).masked_scatter(valid, (~right).long()).sum(1)
        totals["exact"] += int((wrong[valid.any(1)] == 0).sum())
        totals["sequences"] += int(valid.any(1).sum())
        if with_base:
            with model.disable_adapter():
                if base_cache is None:
                    base_logits = model(**inputs).logits[:, :-1][valid]
                else:
                    base_hidden = base_cache.base_hidden(inputs["input_ids"], inputs.get("attention_mask"))
                    base_logits = model.get_output_embeddings()(base_hidden[:, :-1][valid])
            log_p = base_logits.float().log_softmax(-1)
            totals["kl_to_base"] += float((log_p.exp() * (log_p - log_q)).sum())
    model.train(was_training)
    count = max(totals["tokens"], 1)
    metrics = {key: totals[key] / count for key in ("ce", "acc", "kl_to_base")}
    metrics["ppl"] = math.exp(metrics["ce"]) if metrics["ce"] < 709.0 else float("inf")  # exp overflows past 709
    metrics["tokens"] = totals["tokens"]
    metrics["exact"] = totals["exact"] / max(totals["sequences"], 1)
    if not with_kl:
        del metrics["kl_to_base"]
    return metrics


def format_kl(value: float) -> str:
    """A KL (nats) with 4 significant digits, in scientific notation below 1e-3: 0.872, 1.050e-06."""
    return f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.4g}"


def tensor_batches(tokens: torch.Tensor, batch_size: int):
    """Unpadded [N, L] token rows as evaluate_lm batches (every position after the first is predicted)."""
    return [dict(input_ids=tokens[i:i + batch_size], labels=tokens[i:i + batch_size])
            for i in range(0, len(tokens), batch_size)]
