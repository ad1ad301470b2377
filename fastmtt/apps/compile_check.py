"""Ahead-of-time compilation of every Triton kernel for real GPUs, with no GPU present.

Each kernel module registers its specializations, derived from its launcher with the launch-time
specialization applied (fastmtt/kernels/registry.py); this module imports every module of
fastmtt.kernels, compiles each spec for sm_80 and sm_90 and reports registers, stack bytes (where
spills go, from the cubin via cuobjdump) and, on sm_90, whether the kernel uses wgmma.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterable

from fastmtt._dispatch import interpreting
from fastmtt.apps import KNOWN_ARCHS, UsageError, first_line
from fastmtt.kernels.registry import KernelSpec

ARCHS = (80, 90)


@dataclasses.dataclass
class CompileResult:
    label: str
    arch: int
    ok: bool
    registers: int | None = None
    stack_bytes: int | None = None  # spilled registers live in the stack frame
    wgmma: bool | None = None  # Hopper's warpgroup MMA in the SASS (sm_90 only)
    seconds: float = 0.0
    error: str = ""

    def line(self) -> str:
        if not self.ok:
            return f"FAIL sm_{self.arch} {self.label}: {self.error}"
        regs = "?" if self.registers is None else self.registers
        stack = "?" if self.stack_bytes is None else self.stack_bytes
        wgmma = "" if self.wgmma is None else f" wgmma={'yes' if self.wgmma else 'no'}"
        return f"ok   sm_{self.arch} {self.label}: registers={regs} stack_bytes={stack}{wgmma} ({self.seconds:.1f}s)"


def all_specs() -> Iterable[KernelSpec]:
    """Every registered spec of every module in fastmtt.kernels, each label once."""
    import fastmtt.kernels
    from fastmtt.kernels import registry

    for module in pkgutil.iter_modules(fastmtt.kernels.__path__):
        importlib.import_module(f"fastmtt.kernels.{module.name}")
    seen = set()
    for source in registry.SPEC_SOURCES:
        for spec in source():
            if spec.label not in seen:
                seen.add(spec.label)
                yield spec


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = [int(v) for v in re.findall(r"REG:(\d+)", out)]
    stack = [int(v) for v in re.findall(r"STACK:(\d+)", out)]
    return (max(regs) if regs else None, max(stack) if stack else None)


def compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            # FP fusion (FMA) stated, as Triton 3.9's default is: unset, Triton warns that the default changes.
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True},
        )
        regs, stack = _resource_usage(compiled.asm["cubin"])
        wgmma = "wgmma" in compiled.asm["ptx"] if arch >= 90 else None
        return CompileResult(spec.label, arch, True, regs, stack, wgmma, time.perf_counter() - start)
    except Exception as exc:  # report every failure, keep going
        return CompileResult(spec.label, arch, False, seconds=time.perf_counter() - start,
                             error=f"{type(exc).__name__}: {first_line(exc)}")


def run(archs: Iterable[int] = ARCHS, out=sys.stdout) -> list[CompileResult]:
    """Compile every spec for every arch (each one of KNOWN_ARCHS), print one line each, return the results."""
    archs = list(archs)
    unknown = [arch for arch in archs if arch not in KNOWN_ARCHS]
    if unknown:  # LLVM aborts the process on an architecture it cannot target
        raise UsageError(f"--arch {unknown[0]}: not a compute capability Triton compiles for "
                         f"({' '.join(map(str, KNOWN_ARCHS))})")
    if interpreting():
        raise UsageError("compile-check needs the real Triton compiler: unset TRITON_INTERPRET")
    results = []
    for spec in all_specs():
        for arch in archs:
            result = compile_spec(spec, arch)
            print(result.line(), file=out, flush=True)
            results.append(result)
    failed = sum(not r.ok for r in results)
    print(f"compile-check: {len(results) - failed} compiled, {failed} failed", file=out)
    return results
