"""Held-out language-model metrics of an adapted model, and its forgetting relative to its base."""
from __future__ import annotations

import math
from typing import Dict, Iterable

import torch

from fastmtt.objective import predicted_positions


@torch.no_grad()
def evaluate_lm(model, batches: Iterable[Dict[str, torch.Tensor]], device="cpu", with_kl: bool = True,
                ignore_index: int = -100) -> Dict[str, float]:
    """Token-averaged metrics over batches of dict(input_ids, labels, optional attention_mask), labels in
    the Hugging Face convention (shifted here, ignore_index where no loss):
    ce (nats/token), ppl = exp(ce), acc (top-1 next-token accuracy), tokens, and with_kl:
    kl_to_base = mean KL(base || model) of the full next-token distributions, the base being the PEFT
    model with its adapters disabled (0 for a model that is not a PEFT model)."""
    was_training = model.training
    model.eval()
    totals = dict(ce=0.0, acc=0.0, kl_to_base=0.0, tokens=0)
    for batch in batches:
        inputs = dict(input_ids=batch["input_ids"].to(device))
        if batch.get("attention_mask") is not None:
            inputs["attention_mask"] = batch["attention_mask"].to(device)
        labels = batch["labels"][:, 1:].to(device)
        mask = inputs.get("attention_mask")
        valid, _ = predicted_positions(batch["labels"].to(device), mask, ignore_index)
        log_q = model(**inputs).logits[:, :-1][valid].float().log_softmax(-1)
        targets = labels[valid]
        totals["ce"] -= float(log_q.gather(-1, targets[:, None]).sum())
        totals["acc"] += float((log_q.argmax(-1) == targets).sum())
        totals["tokens"] += int(valid.sum())
        if with_kl and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                log_p = model(**inputs).logits[:, :-1][valid].float().log_softmax(-1)
            totals["kl_to_base"] += float((log_p.exp() * (log_p - log_q)).sum())
    model.train(was_training)
    count = max(totals["tokens"], 1)
    metrics = {key: totals[key] / count for key in ("ce", "acc", "kl_to_base")}
    metrics["ppl"] = math.exp(metrics["ce"]) if metrics["ce"] < 709.0 else float("inf")  # exp overflows past 709
    metrics["tokens"] = totals["tokens"]
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
