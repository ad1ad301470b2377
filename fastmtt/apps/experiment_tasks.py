"""The experiment's data: the tasks (addition, far from the base; the PSF license prose, near it), the
retention texts that measure forgetting, and what a predictor that ignores the operands can score."""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import sysconfig
from typing import Dict, List, Sequence

import torch

from fastmtt.apps import ADDITION_DIGITS
from fastmtt.trainer import PadCollator


def retention_text() -> str:
    """The Python language reference prose that CPython ships as pydoc_data/topics.py."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


KJV_FILE = os.path.join(os.path.dirname(__file__), "data", "kjv_ruth_esther_jonah.txt")


def kjv_text() -> str:
    """Ruth, Esther and Jonah in the King James Version (public domain; Debian's bible-kjv-text 4.38, verse
    numbers removed, one paragraph per chapter): ordinary English narrative prose, about 12k SmolLM2 tokens."""
    with open(KJV_FILE, encoding="utf-8") as handle:
        return handle.read()


RETENTION_TEXTS = {"retention": retention_text, "kjv": kjv_text}  # column prefix -> text


def license_text() -> str:
    """The standard library's LICENSE.txt (history and terms of the PSF license): English legal prose."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the license task reads {path}, which this Python install lacks")
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def addition_problems(count: int, generator: torch.Generator, digits: int) -> List[tuple]:
    """`count` (a, b) pairs of random `digits`-digit numbers, drawn with replacement."""
    return [tuple(pair) for pair in torch.randint(10 ** (digits - 1), 10 ** digits, (count, 2),
                                                  generator=generator).tolist()]


def addition_examples(tokenizer, problems: Sequence[tuple]) -> List[Dict[str, list]]:
    """"a+b=" -> "c" + EOS for each (a, b); labels only on the answer and EOS."""
    examples = []
    for a, b in problems:
        prompt = tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(a + b), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(dict(input_ids=prompt + answer, labels=[-100] * len(prompt) + answer))
    return examples


def windows(tokens: List[int], length: int, starts: Sequence[int]) -> List[Dict[str, list]]:
    """Token windows tokens[s:s+length] with loss on every predicted token."""
    return [dict(input_ids=tokens[s:s + length], labels=tokens[s:s + length]) for s in starts]


def operand_blind_bound(digits: int) -> Dict[str, float]:
    """The best scores on the addition task of a predictor that ignores the operands (a, b uniform over the
    `digits`-digit numbers, one token per digit, then EOS), under teacher forcing: task_ce and task_acc per
    answer token from the true distribution of each token given the answer tokens before it (its
    entropy and its top-1 probability), exact_match the most likely sum's probability."""
    sums = collections.Counter(a + b for a in range(10 ** (digits - 1), 10 ** digits)
                               for b in range(10 ** (digits - 1), 10 ** digits))
    steps = collections.Counter()  # (answer prefix, next token) -> weight
    for total, weight in sums.items():
        answer = [*str(total), "EOS"]
        for i, token in enumerate(answer):
            steps[(tuple(answer[:i]), token)] += weight
    prefixes, best = collections.Counter(), collections.Counter()
    for (prefix, _), weight in steps.items():
        prefixes[prefix] += weight
        best[prefix] = max(best[prefix], weight)
    tokens = sum(weight * (len(str(total)) + 1) for total, weight in sums.items())
    ce = -sum(weight * math.log(weight / prefixes[prefix]) for (prefix, _), weight in steps.items())
    return dict(task_ce=ce / tokens, task_acc=sum(best.values()) / tokens,
                exact_match=max(sums.values()) / sum(sums.values()))


@dataclasses.dataclass
class TaskData:
    """Training examples (one epoch of the run, padded a batch at a time by `collate`), held-out task batches
    and, per retention text (the column prefixes of RETENTION_TEXTS), its held-out batches."""

    name: str
    train: List[Dict[str, list]]
    task_eval: List[Dict[str, torch.Tensor]]
    retention: Dict[str, List[Dict[str, torch.Tensor]]]
    has_answers: bool  # exact match is meaningful
    collate: PadCollator


def make_task(name: str, tokenizer, cfg, retention_tokens: Dict[str, List[int]]) -> TaskData:
    """Data of one task: cfg.steps * cfg.batch_size training examples and the held-out sets (fixed seed);
    cfg: an ExperimentConfig."""
    generator = torch.Generator().manual_seed(1234)
    collate = PadCollator(tokenizer.eos_token_id)
    n_train = cfg.steps * cfg.batch_size
    if name in ADDITION_DIGITS:
        digits = ADDITION_DIGITS[name]
        train = addition_examples(tokenizer, addition_problems(n_train, generator, digits))
        held_out = addition_examples(tokenizer, addition_problems(cfg.task_eval_examples, generator, digits))
    else:
        tokens = tokenizer(license_text(), add_special_tokens=False)["input_ids"]
        split = int(0.8 * len(tokens))  # train on the first 80%, score the rest
        train = windows(tokens, cfg.prose_length,
                        torch.randint(0, split - cfg.prose_length, (n_train,), generator=generator).tolist())
        held_out = windows(tokens, cfg.prose_length, range(split, len(tokens) - cfg.prose_length + 1,
                                                           cfg.prose_length))[:cfg.task_eval_examples]
    size = cfg.retention_length
    n_windows = max(1, cfg.retention_tokens // size)
    batch = lambda examples: [collate(examples[i:i + cfg.eval_batch_size])  # noqa: E731
                              for i in range(0, len(examples), cfg.eval_batch_size)]
    retention = {text: batch(windows(tokens, size, [i * ((len(tokens) - size) // n_windows) for i in range(n_windows)]))
                 for text, tokens in retention_tokens.items()}
    return TaskData(name, train, batch(held_out), retention, has_answers=name in ADDITION_DIGITS, collate=collate)
