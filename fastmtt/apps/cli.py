"""The `fastmtt` command line.

Kept free of torch imports at module level: `fastmtt --help` answers at once. Every user error is one
line on stderr and exit status 2 (an interrupt: 130; any other fault: one line naming it, status 1);
`--debug` (or FASTMTT_DEBUG=1) shows the traceback instead. A subcommand is a parser in `build_parser`
whose `func` takes the parsed arguments and returns the exit status; argument checks shared by the
commands live in `fastmtt/apps/arguments.py`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from fastmtt.apps import (
    EXPERIMENT_ADAPTERS,
    EXPERIMENT_METHODS,
    EXPERIMENT_TASKS,
    KNOWN_ARCHS,
    SMOLLM2_LAYERS,
    UsageError,
    check_out_dir,
    first_line,
)
from fastmtt.apps.arguments import resolve_device
from fastmtt.options import DEFAULT_KL_POSITIONS, DEFAULT_LAM, DIRECTIONS, KL_POSITIONS


def _number(kind, test, requirement):
    """argparse type: a finite `kind` passing `test`; the error says `requirement`."""
    def parse(text):
        value = kind(text)  # a ValueError here: argparse reports "invalid <kind> value"
        if not ((kind is int or math.isfinite(value)) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _count(high):
    """argparse type: an integer in [1, high]."""
    return _number(int, lambda v: 1 <= v <= high, f"an integer in [1, {high}]")


positive_int = _number(int, lambda v: v > 0, "a positive integer")
probability = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")
lam_value = _number(float, lambda v: 0 <= v <= 1e6, "in [0, 1e6]")
temperature_value = _number(float, lambda v: 0.01 <= v <= 100, "in [0.01, 100]")
kl_budget = _number(float, lambda v: 0 < v <= 100, "in (0, 100]")
learning_rate = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
epoch_count = _number(float, lambda v: 0 < v <= 1e6, "in (0, 1e6]")
seed_value = _number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32 - 1]")  # numpy's seed range
thread_count = _count(1024)
cuda_arch = _number(int, lambda v: v in KNOWN_ARCHS, "a CUDA compute capability Triton compiles for: "
                    + " ".join(map(str, KNOWN_ARCHS)))


def _compile_check(args) -> int:
    from fastmtt.apps import compile_check

    results = compile_check.run(archs=args.arch)
    return 0 if results and all(r.ok for r in results) else 1


def _demo(args) -> int:
    check_out_dir("--out", args.out, "results.csv and frontier.png")
    device = resolve_device(args.device)

    import torch

    from fastmtt.apps.demo import config_for, run_demo

    torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else args.preset
    cfg = config_for(preset, seed=args.seed, shift=args.shift, lams=args.lams, directions=args.directions)
    run_demo(cfg, out_dir=args.out, device=device, progress=not args.no_progress)
    return 0


def _target_modules(names):
    """--target-modules as PEFT takes it: none given, or just all-linear, is PEFT's "all-linear" (every linear
    layer but the output head); else the list of names."""
    return "all-linear" if names in (None, ["all-linear"]) else names


def _finetune(args) -> int:
    from fastmtt.apps.finetune import run_finetune  # checks every argument, once, before the model loads

    run_finetune(args.model, args.data, args.out, retain=args.retain, lam=args.lam, temperature=args.temperature,
                 direction=args.direction, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                 lora_dropout=args.lora_dropout, target_modules=_target_modules(args.target_modules),
                 epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                 grad_accum=args.grad_accum, lr=args.lr, max_length=args.max_length, seed=args.seed,
                 device=args.device, kl_positions=args.kl_positions, base_cache=args.base_cache)
    return 0


def _cache_base(args) -> int:
    from fastmtt.apps.cache_base import run_cache_base

    run_cache_base(args.model, args.data, args.out, batch_size=args.batch_size, max_length=args.max_length,
                   device=args.device, dtype=args.dtype)
    return 0


def _experiment(args) -> int:
    check_out_dir("--out", args.out, "results.csv, summary.md and frontier.png")
    if args.cache_dir:
        check_out_dir("--cache-dir", args.cache_dir, "the dequantized model")

    import torch

    from fastmtt.apps.experiment import config_for, run_experiment

    torch.set_num_threads(args.threads)
    cfg = config_for("quick" if args.quick else args.preset, tasks=args.tasks, adapters=args.adapters,
                     methods=args.methods, directions=args.directions, lams=args.lams, seeds=args.seeds,
                     steps=args.steps, lr=args.lr, temperature=args.temperature, adapted_layers=args.adapted_layers,
                     kl_positions=args.kl_positions, target_kls=args.target_kls,
                     retention_tokens=args.retention_tokens)
    try:
        run_experiment(cfg, out_dir=args.out, cache_dir=args.cache_dir, resume=args.resume)
    except ImportError as exc:  # the model package or gguf is missing: say how to install them
        raise UsageError(str(exc)) from exc
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (plus the usual exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastmtt", description="fastmtt: the Mask-the-Target loss (CE + target-masked KL to the "
                                                  "frozen base) for LoRA fine-tuning. Errors are one line; --debug "
                                                  "shows the traceback.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or FASTMTT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("compile-check", help="compile every Triton kernel for sm_80 and sm_90 (no GPU needed)")
    check.add_argument("--arch", type=cuda_arch, nargs="+", default=[80, 90], help="compute capabilities (80 is sm_80)")
    check.set_defaults(func=_compile_check)

    demo = sub.add_parser("demo", help="toy experiment: learning vs forgetting of CE, full KL and MTT "
                                       "(CPU, no downloads)")
    demo.add_argument("--quick", action="store_true",
                      help="small run: about 30 s on one quiet CPU core (the default full run: about 4 min)")
    demo.add_argument("--preset", choices=("tiny", "quick", "full"), default="full",
                      help="run size (default full; --quick is --preset quick)")
    demo.add_argument("--out", default="fastmtt-demo", help="folder for results.csv and frontier.png")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when present)")
    demo.add_argument("--seed", type=seed_value, default=0)
    demo.add_argument("--shift", type=probability, help="probability of the target language's new successor")
    demo.add_argument("--lams", type=lam_value, nargs="+", help="lam values swept for full KL and MTT")
    demo.add_argument("--directions", nargs="+", choices=DIRECTIONS, help="MTT KL directions")
    demo.add_argument("--threads", type=thread_count, default=1,
                      help="CPU threads (default 1: the models are tiny, more threads mostly add overhead)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide progress bars (they only show when stderr is a terminal)")
    demo.set_defaults(func=_demo)

    exp = sub.add_parser("experiment", help="CE, full KL and MTT on SmolLM2-135M (CPU, offline; needs "
                                             "`make experiment-setup`): learning vs forgetting")
    exp.add_argument("--quick", action="store_true",
                     help="one task, LoRA, 3 lams, 2 seeds")
    exp.add_argument("--preset", choices=("tiny", "quick", "full", "far"), default="full",
                     help="run size (default full; far: 2-digit addition, adapters on all layers, 300 steps (the "
                          "near task 50), 6 lams, 3 seeds)")
    exp.add_argument("--out", default="fastmtt-experiment", help="folder for results.csv, summary.md, frontier.png")
    exp.add_argument("--resume", action="store_true", help="keep the runs already in OUT/results.csv")
    exp.add_argument("--cache-dir", help="folder of the dequantized model (default ~/.cache/fastmtt/smollm2-135m)")
    exp.add_argument("--tasks", nargs="+", choices=EXPERIMENT_TASKS)
    exp.add_argument("--adapters", nargs="+", choices=EXPERIMENT_ADAPTERS)
    exp.add_argument("--methods", nargs="+", choices=EXPERIMENT_METHODS)
    exp.add_argument("--directions", nargs="+", choices=DIRECTIONS, help="MTT KL directions")
    exp.add_argument("--lams", type=lam_value, nargs="+", help="lam values swept for full KL and MTT")
    exp.add_argument("--target-kls", type=kl_budget, nargs="+",
                     help="forgetting budgets swept for full KL and MTT: lam starts at 1 and adapts to hold the "
                          "training divergence at each (KLBudget)")
    exp.add_argument("--seeds", type=seed_value, nargs="+")
    exp.add_argument("--steps", type=_count(10000), help="training steps of each run, every task (batch 8)")
    exp.add_argument("--lr", type=learning_rate, help="AdamW learning rate (not part of a run's key in results.csv: "
                                                      "give each learning rate its own --out)")
    exp.add_argument("--temperature", type=temperature_value, help="KL temperature of full KL and MTT (default 1)")
    exp.add_argument("--kl-positions", choices=KL_POSITIONS,
                     help="where full KL and MTT apply: the labelled positions (default) or every position")
    exp.add_argument("--adapted-layers", type=_count(SMOLLM2_LAYERS),
                     help=f"adapters on the last N of the {SMOLLM2_LAYERS} decoder layers (default 10)")
    exp.add_argument("--retention-tokens", type=_count(10**6),
                     help="held-out tokens of each retention text scored for forgetting; with --resume, finished "
                          "runs scored on another count are scored again from their saved adapters")
    exp.add_argument("--threads", type=thread_count, default=1, help="CPU threads (default 1)")
    exp.set_defaults(func=_experiment)

    tune = sub.add_parser("finetune", help="LoRA fine-tuning of a local causal LM on a JSONL file with MTT",
                          description="Formats: {\"input_ids\": [...]} (optional \"labels\"), {\"text\": ...}, "
                                      "or {\"prompt\": ..., \"completion\": ...} (loss on the completion).")
    tune.add_argument("--model", required=True, help="local Hugging Face model directory (nothing is downloaded)")
    tune.add_argument("--data", required=True, help="training JSONL")
    tune.add_argument("--retain", help="held-out JSONL of the base's domain: reports forgetting before/after")
    tune.add_argument("--out", required=True, help="folder for the adapter and metrics.json")
    tune.add_argument("--lam", type=lam_value, default=DEFAULT_LAM, help="MTT weight (default %(default)s)")
    tune.add_argument("--temperature", type=temperature_value, default=1.0)
    tune.add_argument("--direction", choices=DIRECTIONS, default="forward")
    tune.add_argument("--kl-positions", choices=KL_POSITIONS, default=DEFAULT_KL_POSITIONS,
                      help="where the KL applies: every token, the prompt's too, or the labelled tokens "
                           "(default %(default)s)")
    tune.add_argument("--lora-r", type=_count(65536), default=8, help="LoRA rank (at most the model's hidden size)")
    tune.add_argument("--lora-alpha", type=_count(65536), default=16)
    tune.add_argument("--lora-dropout", type=probability, default=0.0)
    tune.add_argument("--target-modules", nargs="+", help="LoRA target modules (default all-linear: every linear "
                                                          "layer but the output head)")
    tune.add_argument("--epochs", type=epoch_count, default=1.0)
    tune.add_argument("--max-steps", type=_number(int, lambda v: v == -1 or v > 0, "-1 or a positive integer"),
                      default=-1, help="overrides --epochs when > 0")
    tune.add_argument("--batch-size", type=positive_int, default=8)
    tune.add_argument("--grad-accum", type=positive_int, default=1)
    tune.add_argument("--lr", type=learning_rate, default=2e-4)
    tune.add_argument("--max-length", type=_number(int, lambda v: v >= 2, "at least 2"), default=512)
    tune.add_argument("--seed", type=seed_value, default=0)
    tune.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when present)")
    tune.add_argument("--base-cache", help="folder of the base model's cached hidden states (`fastmtt cache-base`): "
                                           "read instead of running the base pass; built there first when absent")
    tune.set_defaults(func=_finetune)

    cache = sub.add_parser("cache-base", help="cache the base model's final hidden states on a JSONL file, for "
                                              "finetune --base-cache (an interrupted build resumes)")
    cache.add_argument("--model", required=True, help="local Hugging Face model directory (nothing is downloaded)")
    cache.add_argument("--data", required=True, help="training JSONL (the formats of finetune)")
    cache.add_argument("--out", required=True, help="folder of the cache")
    cache.add_argument("--batch-size", type=positive_int, default=8)
    cache.add_argument("--max-length", type=_number(int, lambda v: v >= 2, "at least 2"), default=512,
                       help="truncation, as finetune's (default %(default)s)")
    cache.add_argument("--dtype", choices=("model", "float32", "bfloat16", "float16"), default="model",
                       help="of the stored states (default: the model's)")
    cache.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when present)")
    cache.set_defaults(func=_cache_base)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # peft calls a transformers 5 method deprecated in favor of another; nothing for a CLI user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not sys.stderr.isatty():  # library progress bars (transformers, gguf) would fill a log file with \r lines
        os.environ.setdefault("TQDM_DISABLE", "1")
    debug = args.debug or os.environ.get("FASTMTT_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except UsageError as exc:
        if debug:
            raise
        print(f"fastmtt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"fastmtt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a fault of fastmtt or a library, not of the input: one line too, exit status 1
        if debug:
            raise
        print(f"fastmtt {args.command}: internal error: {type(exc).__name__}: {first_line(exc)} (fastmtt --debug "
              f"{args.command} ... shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
