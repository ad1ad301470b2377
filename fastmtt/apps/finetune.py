"""`fastmtt finetune`: LoRA fine-tuning of a local Hugging Face causal LM on a local JSONL file with MTT.

Nothing is downloaded: the model (and its tokenizer, if any) load from the local directory only. The
arguments and both data files are checked before the model loads; mistakes raise UsageError naming the
argument, or the file and line of the record.

JSONL formats (one object per line, each in one of these; a key of none of them is an error):
  {"input_ids": [...]}                       pre-tokenized; every token after the first is predicted
  {"input_ids": [...], "labels": [...]}      pre-tokenized with explicit labels (-100 = no loss); an
                                             "attention_mask" of ones (no padding) may come with them
  {"text": "..."}                            tokenized with the model directory's tokenizer (+ EOS)
  {"prompt": "...", "completion": "..."}     loss on the completion tokens only
An optional "retain" JSONL (same formats) measures forgetting: perplexity and KL(base || adapted)
before and after training.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from fastmtt.apps import UsageError, check_out_dir, first_line
from fastmtt.apps.arguments import check_file, check_options, resolve_device
from fastmtt.apps.evaluation import evaluate_lm, format_kl
from fastmtt.options import DEFAULT_KL_POSITIONS, DEFAULT_LAM


def read_jsonl(path: str) -> List[Tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file; errors name the file and line."""
    records = []
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from exc
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{path} line {number}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                 f"{exc.start + 1})") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path} line {number}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
            if not isinstance(record, dict):
                raise UsageError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise UsageError(f"{path}: no JSON lines found")
    return records


def _field(where: str, record: dict, key: str, kind: str, default=None):
    """record[key] (or default), a string (kind "text") or a list of JSON integers (kind "ids"), else a UsageError."""
    value = record.get(key, default)
    if isinstance(value, str) if kind == "text" else isinstance(value, list) and all(
            type(t) is int for t in value):  # not bool, not float
        return value
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    wanted = "a string" if kind == "text" else "a list of integer token ids"
    raise UsageError(f"{where}: \"{key}\" must be {wanted}, got {shown}")


# Record formats: name -> (keys it needs, keys it may have).
RECORD_FORMATS = {
    "pre-tokenized": ({"input_ids"}, {"labels", "attention_mask"}),  # the mask all ones: no padding inside
    "text": ({"text"}, set()),
    "prompt/completion": ({"prompt", "completion"}, set()),
}


def record_format(where: str, record: dict) -> str:
    """The name of the one format in RECORD_FORMATS `record` is written in; a UsageError naming `where` and the
    key when it has a key of no format (a typo), keys of two formats, or lacks one its format needs."""
    known = {key for needed, optional in RECORD_FORMATS.values() for key in needed | optional}
    unknown = sorted(record.keys() - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise UsageError(f'{where}: unknown key "{unknown[0]}"{hint}; a record has "input_ids" (and "labels", '
                         f'"attention_mask"), "text", or "prompt" and "completion"')
    matched = [name for name, (needed, optional) in RECORD_FORMATS.items() if record.keys() & (needed | optional)]
    if len(matched) > 1:
        keys = " and ".join("/".join(f'"{k}"' for k in sorted(record.keys() & (needed | optional)))
                            for needed, optional in (RECORD_FORMATS[name] for name in matched))
        raise UsageError(f"{where}: ambiguous record: it has {keys}; give one format per record")
    if not matched:
        raise UsageError(f"{where}: expected keys 'input_ids', 'text' or 'prompt'+'completion', got {sorted(record)}")
    missing = sorted(RECORD_FORMATS[matched[0]][0] - record.keys())
    if missing:
        raise UsageError(f'{where}: a {matched[0]} record needs "{missing[0]}" too, got {sorted(record)}')
    return matched[0]


def encode_records(records: List[Tuple[int, dict]], tokenizer, max_length: int, vocab_size: Optional[int],
                   source: str = "data", max_positions: Optional[int] = None, log=print) -> List[Dict[str, list]]:
    """Each (line number, record) -> dict(input_ids, labels), truncated to max_length (formats: RECORD_FORMATS
    and the module docstring). Token ids must lie in [0, vocab_size) (vocab_size None: >= 0), labels too or be
    -100, and a truncated record must fit the model's max_positions. A record left with no label to predict
    (after the first position, within max_length) is dropped, their count logged; none left is a UsageError."""
    examples = []
    for number, record in records:
        where = f"{source} line {number}"
        kind = record_format(where, record)
        if kind == "pre-tokenized":
            input_ids = _field(where, record, "input_ids", "ids")
            labels = _field(where, record, "labels", "ids", default=input_ids)
            mask = _field(where, record, "attention_mask", "ids", default=[1] * len(input_ids))
            if mask != [1] * len(input_ids):
                raise UsageError(f'{where}: "attention_mask" must be all 1, as long as input_ids (give records '
                                 "without padding; batches are padded for you)")
        else:
            if tokenizer is None:
                raise UsageError(f"{where}: text records need a tokenizer in the model directory; "
                                 "give pre-tokenized {\"input_ids\": [...]} records instead")
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            if kind == "text":
                input_ids = tokenizer(_field(where, record, "text", "text"), add_special_tokens=True)["input_ids"] + eos
                labels = list(input_ids)
            else:
                prompt = tokenizer(_field(where, record, "prompt", "text"), add_special_tokens=True)["input_ids"]
                completion = tokenizer(_field(where, record, "completion", "text"),
                                       add_special_tokens=False)["input_ids"] + eos
                input_ids, labels = prompt + completion, [-100] * len(prompt) + completion
        if len(labels) != len(input_ids) or len(input_ids) < 2:
            raise UsageError(f"{where}: need at least 2 tokens and labels as long as input_ids")
        limit = float("inf") if vocab_size is None else vocab_size
        outside = [t for t in input_ids if not 0 <= t < limit] + [t for t in labels if t != -100 and not 0 <= t < limit]
        if outside:
            reason = "is negative" if vocab_size is None else f"is outside the model's vocabulary [0, {vocab_size})"
            raise UsageError(f"{where}: token id {outside[0]} {reason}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if max_positions is not None and len(input_ids) > max_positions:
            raise UsageError(f"--max-length: {where} keeps {len(input_ids)} tokens, more than the model's "
                             f"{max_positions} positions (give --max-length {max_positions})")
        if any(label != -100 for label in labels[1:]):  # the first label is never predicted
            examples.append(dict(input_ids=input_ids, labels=labels))
    if not examples:
        raise UsageError(f"{source}: no token to predict: every label is -100, or lies past --max-length {max_length}")
    if len(examples) < len(records):
        log(f"{source}: dropped {len(records) - len(examples)} of {len(records)} records with no token to predict "
            f"(every label -100, or past --max-length {max_length})")
    return examples


def check_model_dir(model_dir: str) -> str:
    """A local Hugging Face model directory (config.json inside); nothing is looked up on the hub."""
    if not os.path.isdir(model_dir):
        raise UsageError(f"--model: no such directory: {model_dir} (give a local Hugging Face model directory)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"--model: {model_dir} has no config.json: not a Hugging Face model directory")
    return model_dir


def check_adapter(config, lora, model_dir: str) -> None:
    """The LoRA config applied to a weightless copy of the model (meta tensors), and the output head the MTT loss
    reads checked, before any weights load: --target-modules matching nothing, --lora-dropout on a targeted head,
    a head MTTObjective cannot serve: UsageError. A model that cannot be built without weights is left to loading."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from fastmtt.objective import output_head

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # whatever the reason, loading the real model reports it (as one line)
        return
    try:
        with warnings.catch_warnings():  # PEFT's warnings come once, when the real model is adapted
            warnings.simplefilter("ignore")
            get_peft_model(skeleton, copy.deepcopy(lora))  # PEFT resolves and edits the config it gets
    except ValueError as exc:  # e.g. --target-modules names no module of this model
        raise UsageError(f"cannot add LoRA to {model_dir}: {first_line(exc)}") from exc
    head = skeleton.get_output_embeddings()  # PEFT adapted the skeleton in place
    if lora.lora_dropout > 0 and hasattr(head, "lora_dropout"):
        name = next(path for path, module in skeleton.named_modules() if module is head)
        raise UsageError(f"--target-modules/--lora-dropout: the output head {name} is a target, and the fused MTT "
                         f"loss applies no dropout to it: leave {name} out of --target-modules, or give "
                         "--lora-dropout 0")
    try:
        output_head(skeleton.train())
    except ValueError as exc:
        raise UsageError(f"--model: {model_dir}: {first_line(exc)}") from exc


def _load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def build_base_cache(model, examples, path: str, *, batch_size: int, flag: str, dtype: Optional[str] = None, log=print):
    """BaseCache.build over the examples' input_ids (an interrupted build resumes, a finished one is reused
    or extended); a cache of another base model at `path` is a UsageError naming `flag`."""
    import torch

    from fastmtt.base_cache import BaseCache

    stored = None if dtype in (None, "model") else getattr(torch, dtype)
    try:
        cache = BaseCache.build(model, [e["input_ids"] for e in examples], path, batch_size=batch_size, dtype=stored)
    except ValueError as exc:
        raise UsageError(f"{flag}: {first_line(exc)}") from exc
    size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    tokens = sum(length for _, length in cache.entries.values())
    per_token = cache.hidden_size * cache.dtype.itemsize
    log(f"base cache: {len(cache)} examples, {tokens} tokens, {size / 2**20:.1f} MiB on disk ({cache.hidden_size} x "
        f"{cache.dtype.itemsize} = {per_token} bytes per token) at {path}")
    return cache


def run_finetune(model_dir: str, data: str, out: str, retain: Optional[str] = None, lam: float = DEFAULT_LAM,
                 temperature: float = 1.0, direction: str = "forward", lora_r: int = 8, lora_alpha: int = 16,
                 lora_dropout: float = 0.0, target_modules="all-linear", epochs: float = 1.0, max_steps: int = -1,
                 batch_size: int = 8, grad_accum: int = 1, lr: float = 2e-4, max_length: int = 512,
                 seed: int = 0, device: str = "auto", kl_positions: str = DEFAULT_KL_POSITIONS,
                 base_cache: Optional[str] = None, log=print) -> Dict[str, Dict[str, float]]:
    """Train a LoRA adapter with MTTTrainer, save it (and metrics.json) to `out`; returns the metrics. Every
    argument is checked here, once, before the model loads (errors: UsageError naming the flag)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments, set_seed
    from transformers.utils import logging as transformers_logging

    from fastmtt.objective import MTTObjective
    from fastmtt.trainer import MTTTrainer, PadCollator

    check_file("--data", data)
    if retain:
        check_file("--retain", retain)
    check_out_dir("--out", out, "the adapter")
    if base_cache:
        check_out_dir("--base-cache", base_cache, "the base cache")
    device = resolve_device(device)
    check_model_dir(model_dir)
    options = check_options(lam=lam, temperature=temperature, direction=direction)
    if not sys.stderr.isatty():  # progress bars (weight loading, training) only on a terminal
        transformers_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # config.json malformed, or of an unknown model
        raise UsageError(f"--model: cannot read {os.path.join(model_dir, 'config.json')}: {first_line(exc)}") from exc
    text_config = config.get_text_config()
    hidden_size = getattr(text_config, "hidden_size", None)
    if isinstance(hidden_size, int) and lora_r > hidden_size:
        raise UsageError(f"--lora-r: {lora_r} exceeds the model's hidden size {hidden_size}")
    vocab_size = getattr(text_config, "vocab_size", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    positions = positions if isinstance(positions, int) and positions > 0 else None
    tokenizer = _load_tokenizer(model_dir)

    def encode(path):
        return encode_records(read_jsonl(path), tokenizer, max_length, vocab_size, source=path,
                              max_positions=positions, log=log)

    train_examples = encode(data)
    retain_examples = encode(retain) if retain else None
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM")
    check_adapter(config, lora, model_dir)
    check_out_dir("--out", out, "the adapter", create=True)
    set_seed(seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model: cannot load a causal LM from {model_dir}: {first_line(exc)}") from exc
    pad_id = next((i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                               config.pad_token_id, config.eos_token_id) if isinstance(i, int)), 0)
    collate = PadCollator(pad_id)
    try:
        model = get_peft_model(model, lora).to(device)
    except ValueError as exc:  # e.g. --target-modules names no module of this model
        raise UsageError(f"cannot add LoRA to {model_dir}: {first_line(exc)}") from exc

    metrics: Dict[str, Dict[str, float]] = {}
    retain_batches = None
    if retain_examples is not None:
        retain_batches = [collate(retain_examples[i:i + batch_size])
                          for i in range(0, len(retain_examples), batch_size)]
        metrics["retain_before"] = evaluate_lm(model, retain_batches, device)
        log(f"retain before: ppl {metrics['retain_before']['ppl']:.3f}")

    args = TrainingArguments(output_dir=out, num_train_epochs=epochs, max_steps=max_steps,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                             learning_rate=lr, logging_steps=max(1, min(10, max_steps if max_steps > 0 else 10)),
                             save_strategy="no", report_to=[], seed=seed, use_cpu=device == "cpu",
                             remove_unused_columns=False, disable_tqdm=not sys.stderr.isatty())
    if base_cache:  # built on first use (an interrupted build resumes), reused after
        base_cache = build_base_cache(model, train_examples, base_cache, batch_size=batch_size, flag="--base-cache",
                                      log=log)
    trainer = MTTTrainer(model=model, args=args, train_dataset=train_examples, data_collator=collate,
                         objective=MTTObjective(options=options, kl_positions=kl_positions,
                                                base_cache=base_cache or None))
    try:
        trainer.train()
    except torch.OutOfMemoryError as exc:
        raise UsageError(f"out of memory on {device} ({first_line(exc)}): lower --batch-size or --max-length "
                         "(raise --grad-accum to keep the step's size)") from exc
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad):
        raise UsageError("training diverged: the adapter has NaN or infinite weights, nothing saved "
                         "(lower --lr, --lam or --lora-alpha)")
    metrics["train_log"] = [entry for entry in trainer.state.log_history if "ce" in entry]
    if retain_batches is not None:
        metrics["retain_after"] = evaluate_lm(model, retain_batches, device)
        before, after = metrics["retain_before"], metrics["retain_after"]
        log(f"retain after: ppl {after['ppl']:.3f} ({after['ppl'] - before['ppl']:+.3g}), "
            f"KL(base || adapted) {format_kl(after['kl_to_base'])} nats/token")
    model.save_pretrained(out)
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    log(f"saved the adapter and metrics.json to {out}")
    return metrics
