"""Benchmark runner: every op's implementations side by side, on the CPU or a CUDA GPU.

    python -m benchmarks --preset cpu --threads 1      # CPU sweep -> benchmarks/results/cpu-<date>.{csv,md,png}
    python -m benchmarks --device cuda --preset gpu    # GPU sweep (sizes of the issues)
    python -m benchmarks --table FILE.csv              # print the tables of an earlier run

On the CPU each (op, implementation) runs in its own worker process, so that peak resident set is
that implementation's alone; on CUDA everything runs in this process.
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
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.cases import MODES, OPS, mode_steps, prepare
from benchmarks.measure import device_name, measure_device_rates, peak_memory, time_step

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "RESULT "


def _error_status(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return "oom"
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _measure_config(op, impl, config, device, modes, budget_s):
    """Rows for one implementation at one config; its tensors are freed when this returns."""
    base = dict(op=op.name, impl=impl.name, role=impl.role, shape=config.label,
                dtype=str(config.dtype).replace("torch.", ""), **config.size_dict)
    try:
        _, forward, leaves, upstream = prepare(op, impl, config, device)
    except Exception as error:
        return [dict(base, mode=mode, status=_error_status(error)) for mode in modes]
    rows = []
    for mode in modes:
        # Each mode's setup drops the gradients and outputs left by the previous one.
        step, setup = mode_steps(forward, leaves, upstream, mode)
        row = dict(base, mode=mode, status="ok")
        try:
            timing = time_step(step, setup, device, budget_s=budget_s)
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                       cpu_ms=timing.cpu_ms)
            memory = peak_memory(step, setup, device)
            if memory is not None:
                row.update(peak_mb=memory.peak_mb, extra_mb=memory.extra_mb)
        except Exception as error:
            row["status"] = _error_status(error)
        rows.append(row)
    return rows


def measure_impl(op, impl, configs, device, modes, budget_s):
    """Rows (dicts) for one implementation over `configs` x `modes`, measured in this process."""
    rows = []
    for config in configs:
        rows += _measure_config(op, impl, config, device, modes, budget_s)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _worker_command(args, op_name, impl_name):
    return [sys.executable, "-m", "benchmarks.run", "--worker", "--device", args.device, "--preset", args.preset,
            "--ops", op_name, "--impls", impl_name, "--modes", *args.modes, "--budget", str(args.budget)] + (
        ["--threads", str(args.threads)] if args.threads else [])


def _run_worker(args, op, impl, configs):
    """Measure one implementation in a fresh process; a crash is recorded against its cases."""
    repo_root = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), repo_root)))
    done = subprocess.run(_worker_command(args, op.name, impl.name), stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=python_path))
    rows = [json.loads(line[len(RESULT_PREFIX):]) for line in done.stdout.splitlines()
            if line.startswith(RESULT_PREFIX)]
    measured = {(row["shape"], row["mode"]) for row in rows}
    status = f"error: worker exited with {done.returncode}"
    rows += [dict(op=op.name, impl=impl.name, role=impl.role, shape=config.label, mode=mode, status=status)
             for config in configs for mode in args.modes if (config.label, mode) not in measured]
    return rows


def _selected_impls(op, args):
    for impl in op.impls:
        if args.impls and impl.name not in args.impls:
            continue
        if any(word.lower() in impl.name.lower() for word in args.exclude):
            continue
        yield impl


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


def sweep(args, device, rates, meta):
    """Measure the selected ops and implementations, yielding the rows of each implementation."""
    for op_name in args.ops:
        op = OPS[op_name]
        configs = op.presets[args.preset]
        for impl in _selected_impls(op, args):
            reason = impl.unavailable(device)
            if reason is not None:
                print(f"# {op.name} / {impl.name}: skipped ({reason})", file=sys.stderr)
                rows = [dict(op=op.name, impl=impl.name, role=impl.role, status=f"skipped: {reason}")]
            else:
                print(f"# {op.name} / {impl.name} ...", file=sys.stderr, flush=True)
                if device.type == "cpu" and not args.in_process:
                    rows = _run_worker(args, op, impl, configs)
                else:
                    rows = measure_impl(op, impl, configs, device, args.modes, args.budget)
            yield [dict(row, **meta, **(report.roofline(row, rates) if rates else {})) for row in rows]


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
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--impls", nargs="+", default=[], help="only these implementations (exact names)")
    parser.add_argument("--exclude", nargs="+", default=[], help="skip implementations whose name contains one")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repetitions per case")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the CSV and the plots")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="on the CPU, measure without worker processes")
    parser.add_argument("--table", type=Path, help="print the tables (and redraw the plots) of an earlier results CSV")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.table is not None:
        rows = report.read_csv(args.table)
        if not args.no_plot:
            report.plot(rows, args.table.with_suffix(""))
        print(report.markdown_tables(rows))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    if args.worker:
        op = OPS[args.ops[0]]
        for config in op.presets[args.preset]:  # rows go out per config, so a crash loses only its own
            for row in _measure_config(op, op.impl(args.impls[0]), config, torch.device(args.device), args.modes,
                                       args.budget):
                print(RESULT_PREFIX + json.dumps(row), flush=True)
        return 0
    device = torch.device(args.device)
    # Roofline fractions are for GPU runs: a shared CPU's rates are too unsteady to divide by.
    rates = measure_device_rates(device, budget_s=args.budget) if device.type == "cuda" else None
    meta = run_metadata(device, rates)
    if rates:
        print(f"# {meta['device']}: copy {rates.copy_gbps:.0f} GB/s, bf16 matmul {rates.matmul_tflops:.0f} TFLOP/s",
              file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(meta['device']) if device.type == 'cuda' else 'cpu'}-{meta['date'][:10]}"
    rows, csv_path = [], report.write_csv([], args.out / f"{stem}.csv")
    for batch in sweep(args, device, rates, meta):
        rows += batch
        report.write_csv(rows, csv_path)  # kept current, should the run be cut short
    print(f"# wrote {csv_path}", file=sys.stderr)
    if not args.no_plot:
        for png in report.plot(rows, args.out / stem):
            print(f"# wrote {png}", file=sys.stderr)
    tables = report.markdown_tables(rows)
    csv_path.with_suffix(".md").write_text(tables + "\n")
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
