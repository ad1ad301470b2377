"""Benchmark runner: every op's implementations side by side, on the CPU or a CUDA GPU.

    python -m benchmarks --preset cpu --threads 1     # CPU sweep -> benchmarks/results/cpu-<date>.{csv,md,png}
    python -m benchmarks --device cpu --preset tiny   # every op at toy sizes (tests/test_benchmarks.py runs it)
    python -m benchmarks --device cuda --preset gpu   # the issues' GPU sizes (benchmarks/gpu_check.sh runs it in parts)
    python -m benchmarks --ops fused_linear_mtt_loss --shape N=4096 H=512 V=32000 head=lora   # sizes of your own
    python -m benchmarks --ops fused_linear_mtt_loss --roles fastmtt --modes determinism      # repeatable gradients?
    python -m benchmarks --table FILE.csv             # tables (and plots) of an earlier run

On the CPU each (op, implementation) runs in its own worker process, so that peak resident set is that
implementation's alone. On CUDA everything runs in this process, configuration by configuration, and
each configuration's rows reach the CSV as soon as they are measured, so a run cut short keeps them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.cases import CHECKS, MODES, OPS, ROLES, Config, determinism, mode_steps, prepare
from benchmarks.measure import device_name, measure_device_rates, peak_memory, time_step

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "RESULT "
OUT_OF_TIME = "skipped: time budget spent"


def _error_status(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return "oom"
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _case_row(op, impl, config):
    return dict(op=op.name, impl=impl.name, role=impl.role, shape=config.label,
                dtype=str(config.dtype).replace("torch.", ""), **config.size_dict)


def measure_config(op, impl, config, device, modes, budget_s, min_reps=3):
    """Rows for one implementation at one config, a row per mode; its tensors are freed on return."""
    base = _case_row(op, impl, config)
    reason = impl.unsupported(config.size_dict)
    if reason is not None:
        return [dict(base, mode=mode, status=f"skipped: {reason}") for mode in modes]
    try:
        _, forward, leaves, upstream = prepare(op, impl, config, device)
    except Exception as error:
        return [dict(base, mode=mode, status=_error_status(error)) for mode in modes]
    rows = []
    for mode in modes:
        row = dict(base, mode=mode, status="ok")
        try:
            if mode in CHECKS:
                row["note"] = determinism(forward, leaves, upstream)
            else:
                # Each mode's setup drops the gradients and outputs left by the previous one.
                step, setup = mode_steps(forward, leaves, upstream, mode)
                timing = time_step(step, setup, device, budget_s=budget_s, min_reps=min_reps)
                row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                           reps=timing.reps, cpu_ms=timing.cpu_ms)
                memory = peak_memory(step, setup, device)
                if memory is not None:
                    row.update(peak_mb=memory.peak_mb, extra_mb=memory.extra_mb)
        except Exception as error:
            row["status"] = _error_status(error)
        rows.append(row)
    return rows


def configs_for(args, op):
    """The preset's configs, or the --shape configs (in --dtype) when given."""
    if not args.shape:
        return op.presets[args.preset]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    configs = []
    for words in args.shape:
        pairs = tuple((key, report.parse_value(value)) for key, _, value in (word.partition("=") for word in words))
        unknown = [key for key, _ in pairs if key not in op.size_keys]
        if unknown:
            raise SystemExit(f"--shape: {op.name} takes {', '.join(op.size_keys)}, not {', '.join(unknown)}")
        configs.append(Config(pairs, dtype))
    return tuple(configs)


def _modes_for(args, op):
    return [mode for mode in args.modes if mode in op.modes or mode in CHECKS]


def _selected_impls(op, args):
    for impl in op.impls:
        if args.impls and impl.name not in args.impls:
            continue
        if args.roles and impl.role not in args.roles:
            continue
        if any(word.lower() in impl.name.lower() for word in args.exclude):
            continue
        yield impl


def _worker_command(args, op, impl, seconds_left):
    command = [sys.executable, "-m", "benchmarks.run", "--worker", "--device", args.device, "--preset", args.preset,
               "--ops", op.name, "--impls", impl.name, "--modes", *args.modes, "--budget", str(args.budget),
               "--min-reps", str(args.min_reps)]
    for words in args.shape or ():
        command += ["--shape", *words]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if seconds_left is not None:
        command += ["--deadline", str(max(0.0, seconds_left))]
    return command


def _run_worker(args, op, impl, seconds_left):
    """Measure one implementation in a fresh process; a crash is recorded against its cases."""
    repo_root = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), repo_root)))
    done = subprocess.run(_worker_command(args, op, impl, seconds_left), stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=python_path))
    rows = [json.loads(line[len(RESULT_PREFIX):]) for line in done.stdout.splitlines()
            if line.startswith(RESULT_PREFIX)]
    measured = {(row["shape"], row["mode"]) for row in rows}
    status = f"error: worker exited with {done.returncode}"
    rows += [dict(_case_row(op, impl, config), mode=mode, status=status)
             for config in configs_for(args, op) for mode in _modes_for(args, op)
             if (config.label, mode) not in measured]
    return rows


class Clock:
    """Seconds left of an optional budget, counted from construction."""

    def __init__(self, seconds):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self):
        return None if self.end is None else self.end - time.monotonic()

    def spent(self):
        return self.end is not None and time.monotonic() >= self.end


def measure_op(args, op, impls, device, clock):
    """Rows of the available `impls` of `op`, one batch per (config, implementation): config by config
    in the registry's order, the peers (third-party packages) after every config of the others."""
    modes, configs = _modes_for(args, op), configs_for(args, op)
    cases = [(config, impl) for peers in (False, True) for config in configs for impl in impls
             if (impl.role == "peer") == peers]
    for config, impl in cases:
        if clock.spent():
            yield [dict(_case_row(op, impl, config), mode=mode, status=OUT_OF_TIME) for mode in modes]
            continue
        print(f"# {op.name} / {impl.name} / {config.label} ...", file=sys.stderr, flush=True)
        yield measure_config(op, impl, config, device, modes, args.budget, args.min_reps)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sweep(args, device, clock):
    """Measure the selected ops and implementations, yielding rows in batches as they are measured."""
    for op_name in args.ops:
        op = OPS[op_name]
        if not _modes_for(args, op):
            continue
        impls = []
        for impl in _selected_impls(op, args):
            reason = impl.unavailable(device)
            if reason is None:
                impls.append(impl)
                continue
            print(f"# {op.name} / {impl.name}: skipped ({reason})", file=sys.stderr)
            yield [dict(op=op.name, impl=impl.name, role=impl.role, status=f"skipped: {reason}")]
        if device.type == "cpu" and not args.in_process:
            for impl in impls:
                print(f"# {op.name} / {impl.name} (worker) ...", file=sys.stderr, flush=True)
                yield _run_worker(args, op, impl, clock.left())
        else:
            yield from measure_op(args, op, impls, device, clock)


def _versions():
    def version(module):
        try:
            return __import__(module).__version__
        except ImportError:
            return ""

    import fastmtt

    return dict(torch=torch.__version__, triton=version("triton"), fastmtt=fastmtt.__version__,
                python=platform.python_version())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_metadata(device, rates):
    meta = dict(device=device_name(device), device_type=device.type,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **_versions())
    if rates:
        meta.update(copy_gbps=round(rates.copy_gbps, 2), matmul_tflops=round(rates.matmul_tflops, 3))
    return meta


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, choices=["tiny", "cpu", "gpu"],
                        help="sizes to sweep (default: gpu on cuda, cpu on the CPU)")
    parser.add_argument("--shape", nargs="+", action="append", metavar="KEY=VALUE",
                        help="one config instead of the preset's (repeatable; one op), e.g. N=1024 H=512 V=32000")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"],
                        help="dtype of the --shape configs (default: bfloat16 on cuda, float32 on the CPU)")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--impls", nargs="+", default=[], help="only these implementations (exact names)")
    parser.add_argument("--roles", nargs="+", default=[], choices=ROLES, help="only implementations of these roles")
    parser.add_argument("--exclude", nargs="+", default=[], help="skip implementations whose name contains one")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, *CHECKS],
                        help="timed modes (each op keeps those it has) and checks")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repetitions per case")
    parser.add_argument("--min-reps", type=int, default=3, help="timed repetitions per case at least")
    parser.add_argument("--deadline", type=float, help="start no case after this many seconds (the rest: skipped)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the CSV, tables and plots")
    parser.add_argument("--csv", type=Path, help="results file (default: OUT/<device>-<date>.csv)")
    parser.add_argument("--append", action="store_true", help="add to --csv instead of replacing it")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="on the CPU, measure without worker processes")
    parser.add_argument("--table", type=Path, help="print the tables (and redraw the plots) of an earlier results CSV")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def publish(csv_path: Path, plot: bool) -> str:
    """Tables of every row in `csv_path`, written beside it (.md) and returned; plots beside it too."""
    rows = report.read_csv(csv_path)
    tables = report.markdown_tables(rows)
    csv_path.with_suffix(".md").write_text(tables + "\n")
    if plot:
        for png in report.plot(rows, csv_path.with_suffix("")):
            print(f"# wrote {png}", file=sys.stderr)
    return tables


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.table is not None:
        print(publish(args.table, not args.no_plot))
        return 0
    if args.shape and len(args.ops) != 1:
        raise SystemExit("--shape needs exactly one op in --ops")
    clock = Clock(args.deadline)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    device = torch.device(args.device)
    if args.worker:  # rows go out per config, so a crash loses only its own
        op = OPS[args.ops[0]]
        for batch in measure_op(args, op, [op.impl(args.impls[0])], device, clock):
            for row in batch:
                print(RESULT_PREFIX + json.dumps(row), flush=True)
        return 0
    # Roofline fractions are for GPU runs: a shared CPU's rates are too unsteady to divide by.
    rates = measure_device_rates(device, budget_s=min(args.budget, 1.0)) if device.type == "cuda" else None
    meta = run_metadata(device, rates)
    print(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, fastmtt {meta['fastmtt']}"
          + (f": copy {rates.copy_gbps:.0f} GB/s, bf16 matmul {rates.matmul_tflops:.0f} TFLOP/s" if rates else ""),
          file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(meta['device']) if device.type == 'cuda' else 'cpu'}-{meta['date'][:10]}"
    csv_path = args.csv or args.out / f"{stem}.csv"
    report.write_csv([], csv_path, append=args.append)
    for batch in sweep(args, device, clock):
        rows = [dict(row, **meta, **(report.roofline(row, rates) if rates else {})) for row in batch]
        report.write_csv(rows, csv_path, append=True)  # kept current, should the run be cut short
    print(f"# wrote {csv_path}", file=sys.stderr)
    print(publish(csv_path, not args.no_plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
