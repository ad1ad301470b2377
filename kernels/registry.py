"""Every kernel's ahead-of-time compile specializations, derived from its launcher.

A launcher builds its launch as a `Launch` (kernel, grid, runtime arguments, constexprs, warps) and
runs it with `Launch.run()`. A kernel module registers, with `@compile_specs`, a generator that calls the
same plan-building code on meta tensors of realistic shapes; `Launch.spec` turns each plan into the
signature Triton specializes at launch (pointer dtypes, i32/i64 integers, 16-divisible integers and
16-aligned pointers), so `fastmtt compile-check` compiles what really runs and finds every kernel here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch

SPEC_SOURCES: list[Callable[[], Iterable[KernelSpec]]] = []
# (temperature, lam, mask_target) combinations that cover each value of each flag twice, for the specs.
FEATURE_COVER = ((1.0, 0.0, True), (2.0, 1.0, True), (1.0, 1.0, False), (2.0, 0.0, False))

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
        return self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                                      num_stages=self.num_stages)

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
