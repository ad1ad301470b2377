"""`fastmtt cache-base`: the base model's final hidden states on a JSONL file (fastmtt.BaseCache), which
`fastmtt finetune --base-cache` then reads instead of running the base pass (and builds there when absent).

The model directory and the data are read as `fastmtt finetune` reads them (same formats, same truncation at
--max-length), so the examples cached are the examples trained on.
"""
from __future__ import annotations

import os
import sys

from fastmtt.apps import UsageError, check_out_dir, first_line


def run_cache_base(model_dir: str, data: str, out: str, *, batch_size: int = 8, max_length: int = 512,
                   device: str = "auto", dtype: str = "model", log=print):
    """Build (or resume, or extend) the base cache of `data` at `out`; every argument is checked before the
    model loads."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from fastmtt.apps.arguments import check_file, resolve_device
    from fastmtt.apps.finetune import _load_tokenizer, build_base_cache, check_model_dir, encode_records, read_jsonl

    check_file("--data", data)
    check_out_dir("--out", out, "the base cache")
    device = resolve_device(device)
    check_model_dir(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True).get_text_config()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--model: cannot read {os.path.join(model_dir, 'config.json')}: {first_line(exc)}") from exc
    examples = encode_records(read_jsonl(data), _load_tokenizer(model_dir), max_length,
                              getattr(config, "vocab_size", None), source=data)
    check_out_dir("--out", out, "the base cache", create=True)
    if not sys.stderr.isatty():  # progress bars (weight loading, the build) only on a terminal
        transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model: cannot load a causal LM from {model_dir}: {first_line(exc)}") from exc
    return build_base_cache(model, examples, out, batch_size=batch_size, flag="--out", dtype=dtype, log=log)
