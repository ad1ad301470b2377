"""Every kernel's ahead-of-time compile specializations, derived from its launcher.

A launcher builds its launch as a `Launch` (kernel, grid, runtime arguments, constexprs, warps) and
runs it with `Launch.run()`. A kernel module registers, with `@compile_specs`, a generator that calls its
host functions (those the ops call) on meta tensors of realistic shapes inside `planning_for_gpu()`, where
launchers plan as for an H200 and `Launch.run()` records `Launch.spec`, the signature Triton specializes
at launch (pointer dtypes, i32/i64 integers, 16-divisible integers and 16-aligned pointers, integers 1 as
constants), instead of launching: `fastmtt compile-check` compiles what really runs. `recording_launches()`
collects the launches of real calls: tests/test_compile_check.py checks that each one's
`KernelSpec.cover_key` is among the specs' (every path of the public calls is compiled).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterable

import torch

SPEC_SOURCES: list[Callable[[], Iterable[KernelSpec]]] = []
# MTTOptions settings for the specs: the default, each of lam = 0 (plain CE), the reverse divergence, no
# masking and temperature 2 alone, and all four together: every pair of values of every two of these flags.
FEATURE_COVER = (dict(), dict(lam=0.0), dict(direction="reverse"), dict(mask_target=False), dict(temperature=2.0),
                 dict(lam=0.0, direction="reverse", mask_target=False, temperature=2.0))
PLANNED_SM_COUNT = 132  # an H200's, for the launches planned on meta tensors

# Constexprs that the launcher picks from sizes or from the interpreter (tiles, padded rank, upcasts, the fp32
# dot lowering): a cover key leaves them out, so an interpreted launch matches the GPU spec of its path.
TILING_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_V", "BLOCK_H", "BLOCK_C", "BLOCK_L", "BLOCK_K", "R_PAD", "R",
                     "GROUP_M", "UPCAST", "FP32_PRECISION")
_RECORDINGS: list[list] = []  # of recording_launches()
_PLANS: list[list] = []  # of planning_for_gpu()

_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                  torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8"}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One specialization: Triton signature strings, constexprs and divisibility attributes."""

    label: str
    fn: Callable
    signature: dict
    constexprs: dict
    attrs: dict = dataclasses.field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def cover_key(self) -> tuple:
        """What a launch path fixes, whatever the sizes: the kernel, its pointer dtypes, its constexprs
        (integers that are 1, e.g. unit strides, among them: the layout) but TILING_CONSTEXPRS; the other
        integers and floats count only as present."""
        def kind_of(name, kind):
            if kind == "constexpr":
                return self.constexprs[name]
            return kind if kind.startswith("*") else "runtime"

        return self.fn.__name__, tuple((name, kind_of(name, kind)) for name, kind in self.signature.items()
                                       if name not in TILING_CONSTEXPRS)


@contextlib.contextmanager
def recording_launches():
    """Collect every `Launch` run inside the block (they still run): `with recording_launches() as launches`."""
    launches = []
    _RECORDINGS.append(launches)
    try:
        yield launches
    finally:
        _RECORDINGS.remove(launches)


@contextlib.contextmanager
def planning_for_gpu():
    """Inside the block launchers plan as for a GPU (TRITON_INTERPRET=0, `sm_count` of meta tensors
    PLANNED_SM_COUNT) and `Launch.run()` records the spec it would compile instead of launching:
    `with planning_for_gpu() as specs:` around host functions called on meta tensors."""
    specs = []
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    _PLANS.append(specs)
    try:
        yield specs
    finally:
        _PLANS.remove(specs)
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; PLANNED_SM_COUNT while planning, else 1."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return PLANNED_SM_COUNT if _PLANS else 1


@dataclasses.dataclass
class Launch:
    """One kernel launch: kernel[grid](**args, **constexprs, num_warps=..., num_stages=...)."""

    kernel: Callable
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3

    def run(self):
        if _PLANS:
            _PLANS[-1].append(self.spec(self.label()))
            return None
        for launches in _RECORDINGS:
            launches.append(self)
        return self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                                      num_stages=self.num_stages)

    def label(self) -> str:
        """The kernel with its pointer dtypes, unit strides and constexprs, e.g.
        `mtt_loss[logits=bf16 ... logits_stride=1 ... MASK_TARGET=1]`."""
        words = []
        for name in self.kernel.arg_names:
            value = self.constexprs.get(name, self.args.get(name))
            if isinstance(value, torch.Tensor):
                words.append(f"{name.removesuffix('_ptr')}={_POINTER_TYPES[value.dtype]}")
            elif name in self.constexprs or value == 1 and not isinstance(value, float):
                words.append(f"{name}={int(value) if isinstance(value, bool) else value}")
        return f"{self.kernel.__name__.strip('_').removesuffix('_kernel')}[{' '.join(words)}] warps={self.num_warps}"

    def spec(self, label: str) -> KernelSpec:
        """The specialization Triton would compile for this launch (as `triton.compile` takes it)."""
        signature, attrs, constexprs = {}, {}, dict(self.constexprs)
        for index, name in enumerate(self.kernel.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            value = self.args[name]
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + _POINTER_TYPES[value.dtype]
                attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                if value == 1:  # Triton turns an integer 1 into a constant at launch
                    signature[name] = "constexpr"
                    constexprs[name] = 1
                    continue
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{label}: cannot type argument {name}={value!r}")
        return KernelSpec(label, self.kernel, signature, constexprs, attrs, self.num_warps, self.num_stages)


def compile_specs(generator: Callable[[], Iterable[KernelSpec]]):
    """Register a kernel module's generator of compile specs (decorator)."""
    SPEC_SOURCES.append(generator)
    return generator


def meta_tensor(*shape, dtype) -> torch.Tensor:
    """A shape-only tensor for building launches without memory or a device."""
    return torch.empty(shape, dtype=dtype, device="meta")
