"""The experiment's data: the tasks (addition, far from the base; the PSF license prose, near it), the
retention texts that measure forgetting, and what a predictor that ignores the operands can score."""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import sysconfig
from typing import Dict, List, Optional, Sequence

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


def addition_problems(count: int, generator: torch.Generator, digits: int,
                      exclude: Optional[set] = None) -> List[tuple]:
    """`count` (a, b) pairs of random `digits`-digit numbers. Without exclude, drawn with replacement; with it
    (a set of `unordered` pairs), each pair is new: neither it nor its swap (b, a) is in exclude or drawn before
    (a ValueError naming count where too few are left)."""
    low, high = 10 ** (digits - 1), 10 ** digits
    draw = lambda n: [tuple(pair) for pair in torch.randint(low, high, (n, 2), generator=generator).tolist()]  # noqa: E731
    if exclude is None:
        return draw(count)
    left = (high - low) * (high - low + 1) // 2 - len(exclude)
    if count > left:
        raise ValueError(f"count: {count} new {digits}-digit problems asked for, {left} left")
    seen, problems = set(exclude), []
    while len(problems) < count:
        for pair in draw(count):
            if unordered(pair) not in seen and len(problems) < count:
                seen.add(unordered(pair))
                problems.append(pair)
    return problems


def unordered(pair: tuple) -> tuple:
    """(a, b) and (b, a) as one problem: (min, max)."""
    return min(pair), max(pair)


def train_overlap(train: Sequence[tuple], held_out: Sequence[tuple]) -> int:
    """How many held-out problems are training problems, a swap (b + a for a + b) counting as the same."""
    seen = {unordered(pair) for pair in train}
    return sum(unordered(pair) in seen for pair in held_out)


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
    (scored), validation batches (for choosing a setting such as the step count; never scored), per retention
    text (the column prefixes of RETENTION_TEXTS) its held-out batches, and how many scored examples are
    training ones (`train_overlap`; 0 by construction)."""

    name: str
    train: List[Dict[str, list]]
    task_eval: List[Dict[str, torch.Tensor]]
    validation: List[Dict[str, torch.Tensor]]
    retention: Dict[str, List[Dict[str, torch.Tensor]]]
    has_answers: bool  # exact match is meaningful
    collate: PadCollator
    train_overlap: int = 0


LICENSE_SPLITS = (0.7, 0.8)  # the license text: train before the first share, validate up to the second, score after


def make_task(name: str, tokenizer, cfg, retention_tokens: Dict[str, List[int]]) -> TaskData:
    """Data of one task (fixed seed; cfg an ExperimentConfig): cfg.steps * cfg.batch_size training examples and
    cfg.task_eval_examples scored and validation examples each, the three disjoint. Addition: the training
    problems drawn with replacement, then the scored and the validation ones, each new (`addition_problems`:
    no problem, nor its swap, seen before). License: 16-token windows drawn from the first 70% of the text,
    consecutive ones of the next 10% validate, of the last 20% are scored (LICENSE_SPLITS)."""
    generator = torch.Generator().manual_seed(1234)
    collate = PadCollator(tokenizer.eos_token_id)
    n_train, n_eval, length = cfg.steps * cfg.batch_size, cfg.task_eval_examples, cfg.prose_length
    overlap = 0
    if name in ADDITION_DIGITS:
        digits = ADDITION_DIGITS[name]
        train_problems = addition_problems(n_train, generator, digits)
        seen = {unordered(pair) for pair in train_problems}
        scored = addition_problems(n_eval, generator, digits, exclude=seen)
        validation = addition_problems(n_eval, generator, digits, exclude=seen | {unordered(p) for p in scored})
        overlap = train_overlap(train_problems, scored)
        train, held_out, validation = (addition_examples(tokenizer, problems)
                                       for problems in (train_problems, scored, validation))
    else:
        tokens = tokenizer(license_text(), add_special_tokens=False)["input_ids"]
        train_end, scored_start = (int(share * len(tokens)) for share in LICENSE_SPLITS)
        train = windows(tokens, length, torch.randint(0, train_end - length, (n_train,), generator=generator).tolist())
        validation = windows(tokens, length, range(train_end, scored_start - length + 1, length))[:n_eval]
        held_out = windows(tokens, length, range(scored_start, len(tokens) - length + 1, length))[:n_eval]
    size = cfg.retention_length
    n_windows = max(1, cfg.retention_tokens // size)
    batch = lambda examples: [collate(examples[i:i + cfg.eval_batch_size])  # noqa: E731
                              for i in range(0, len(examples), cfg.eval_batch_size)]
    retention = {text: batch(windows(tokens, size, [i * ((len(tokens) - size) // n_windows) for i in range(n_windows)]))
                 for text, tokens in retention_tokens.items()}
    return TaskData(name, train, batch(held_out), batch(validation), retention, has_answers=name in ADDITION_DIGITS,
                    collate=collate, train_overlap=overlap)
