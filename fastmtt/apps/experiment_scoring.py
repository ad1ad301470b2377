"""Scoring one adapter of the experiment: learning on the task's held-out examples, forgetting on each
retention text (`fastmtt.apps.evaluation.evaluate_lm`, the base's states of every held-out text read from the
grid's `fastmtt.BaseCache`, `experiment_training.GridBaseCache.retention`)."""
from __future__ import annotations

import math
from typing import Dict

from fastmtt.apps.evaluation import evaluate_lm


def score_retention(model, data, base_cache=None) -> Dict[str, float]:
    """{text}_ppl and {text}_kl (mean KL(base || model)) of each retention text of a `TaskData`; base_cache: a
    BaseCache holding their batches' base states (None: a second pass, adapters off)."""
    row = {}
    for text, batches in data.retention.items():
        metrics = evaluate_lm(model, batches, base_cache=base_cache)
        row.update({f"{text}_ppl": metrics["ppl"], f"{text}_kl": metrics["kl_to_base"]})
    return row


def score(model, data, base_cache=None) -> Dict[str, float]:
    """task_ce, task_acc, exact_match (NaN on a task without answers) and the retention scores (`score_retention`)."""
    task = evaluate_lm(model, data.task_eval, with_kl=False)
    return dict(task_ce=task["ce"], task_acc=task["acc"], exact_match=task["exact"] if data.has_answers else math.nan,
                **score_retention(model, data, base_cache))
