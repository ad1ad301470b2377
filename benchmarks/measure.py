"""Timing, peak memory and device rates, on CUDA (CUDA events) and on the CPU (monotonic clock).

time_step(step, setup) times `step` alone, `setup` runs untimed before each repetition; on the CPU it
also takes the process CPU time of each step, which time-slicing on a shared machine does not
inflate the way it does the wall clock (run single-threaded for it to match an idle wall clock). Peak memory
is what one step allocates beyond what was live when it started: CUDA max_memory_allocated after a
reset, or on the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) of the worker
process that runs the case.
"""
from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 << 20


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    cpu_ms: Optional[float] = None  # CPU only: median process CPU time of one step


def _quantile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def time_step(step: Callable[[], object], setup: Callable[[], object], device: torch.device, *,
              budget_s: float, min_reps: int = 3, max_reps: int = 100, warmup: Optional[int] = None) -> Timing:
    """Median and 20/80th percentiles of `step` over repetitions that fit in `budget_s` (at least
    min_reps), after `warmup` untimed runs (default 3 on CUDA, 1 on the CPU). On CUDA each repetition
    is bracketed by events after an L2 flush."""
    cuda = device.type == "cuda"
    warmup = (3 if cuda else 1) if warmup is None else warmup
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if cuda else None
    for _ in range(warmup):
        setup()
        step()
    times_ms, cpu_times_ms = [], []
    started = time.perf_counter()
    while len(times_ms) < max_reps and (len(times_ms) < min_reps or time.perf_counter() - started < budget_s):
        setup()
        if cuda:
            flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times_ms.append(begin.elapsed_time(end))
        else:
            begin, begin_cpu = time.perf_counter(), time.process_time()
            step()
            times_ms.append((time.perf_counter() - begin) * 1e3)
            cpu_times_ms.append((time.process_time() - begin_cpu) * 1e3)
    times_ms.sort()
    return Timing(statistics.median(times_ms), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8), len(times_ms),
                  statistics.median(cpu_times_ms) if cpu_times_ms else None)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+)", status.read(), re.MULTILINE).group(1))


def _release_cpu_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def cpu_peak_reset_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


@dataclass
class Memory:
    peak_mb: float  # process peak: CUDA allocated bytes, or the resident set (runtime and inputs included)
    extra_mb: float  # peak minus what was live when the step started


def peak_memory(step: Callable[[], object], setup: Callable[[], object], device: torch.device) -> Optional[Memory]:
    """Peak memory of one `step` run after `setup`; None where the CPU peak cannot be reset."""
    setup()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return Memory(peak / 2**20, (peak - before) / 2**20)
    _release_cpu_memory()
    if not cpu_peak_reset_supported():
        return None
    before_kib = _proc_status_kib("VmRSS")
    step()
    peak_kib = _proc_status_kib("VmHWM")
    return Memory(peak_kib / 1024, max(0, peak_kib - before_kib) / 1024)


@dataclass
class DeviceRates:
    copy_gbps: float  # bytes read + written per second by a large device copy
    matmul_tflops: float  # dense matmul rate (bf16 on CUDA, fp32 on the CPU)


def measure_device_rates(device: torch.device, budget_s: float = 1.0) -> DeviceRates:
    """A GPU's own copy bandwidth (1 GiB copy) and bf16 matmul rate (8192^3), the ceilings for the
    roofline fractions."""
    copy_bytes = 1 << 30
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    copy = time_step(lambda: target.copy_(source), lambda: None, device, budget_s=budget_s)
    side = 8192
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    matmul = time_step(lambda: a @ b, lambda: None, device, budget_s=budget_s)
    return DeviceRates(2 * copy_bytes / copy.median_ms / 1e6, 2 * side**3 / matmul.median_ms / 1e9)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"
