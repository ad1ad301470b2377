"""Scoring one adapter of the experiment: learning on the task's held-out examples, forgetting on each
retention text (`fastmtt.apps.evaluation.evaluate_lm`, the base's pass of every held-out text run once)."""
from __future__ import annotations

import itertools
import math
from typing import Dict

from fastmtt.apps.evaluation import add_base_hidden, evaluate_lm


def cache_base_states(base_model, data) -> None:
    """The base model's final hidden states added to every retention batch of a `TaskData` (`add_base_hidden`)."""
    add_base_hidden(base_model, list(itertools.chain(*data.retention.values())))


def score_retention(model, data) -> Dict[str, float]:
    """{text}_ppl and {text}_kl (mean KL(base || model)) of each retention text of a `TaskData`."""
    row = {}
    for text, batches in data.retention.items():
        metrics = evaluate_lm(model, batches)
        row.update({f"{text}_ppl": metrics["ppl"], f"{text}_kl": metrics["kl_to_base"]})
    return row


def score(model, data) -> Dict[str, float]:
    """task_ce, task_acc, exact_match (NaN on a task without answers) and the retention scores."""
    task = evaluate_lm(model, data.task_eval, with_kl=False)
    return dict(task_ce=task["ce"], task_acc=task["acc"], exact_match=task["exact"] if data.has_answers else math.nan,
                **score_retention(model, data))
