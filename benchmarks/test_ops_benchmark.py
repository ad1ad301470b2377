"""The registry's cases under pytest-benchmark:  pytest benchmarks/test_ops_benchmark.py [--benchmark-only]

FASTMTT_BENCH_PRESET picks the sizes: tiny (default), cpu or gpu. Runs on CUDA when available.
Median/spread/memory/roofline side-by-side tables come from `python -m benchmarks` instead.
"""
import os

import pytest
import torch

from benchmarks.cases import OPS, mode_steps, prepare

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("FASTMTT_BENCH_PRESET", "tiny")
CASES = [pytest.param(op, impl, config, mode, id=f"{op.name}|{impl.name}|{config.label}|{mode}")
         for op in OPS.values() for impl in op.impls for config in op.presets[PRESET] for mode in op.modes]


def _synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("op, impl, config, mode", CASES)
def test_op(benchmark, op, impl, config, mode):
    reason = impl.unavailable(DEVICE) or impl.unsupported(config.size_dict)
    if reason is not None:
        pytest.skip(reason)
    _, forward, leaves, upstream = prepare(op, impl, config, DEVICE)
    step, setup = mode_steps(forward, leaves, upstream, mode)

    def timed():
        step()
        _synchronize()

    def untimed():
        setup()
        _synchronize()
        return (), {}

    benchmark.group = f"{op.name} {config.label} {mode}"
    benchmark.extra_info.update(op=op.name, impl=impl.name, shape=config.label, mode=mode,
                                dtype=str(config.dtype).replace("torch.", ""))
    benchmark.pedantic(timed, setup=untimed, rounds=5, warmup_rounds=1)
