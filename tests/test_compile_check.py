"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (real compiler, no GPU)."""
import os
import subprocess
import sys

import pytest

from fastmtt.apps import compile_check


def test_compile_check_cli_compiles_every_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastmtt", "compile-check"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    labels = {spec.label for spec in compile_check.all_specs()}
    assert len(lines) == len(labels) * len(compile_check.ARCHS)
    assert all("registers=" in line for line in lines)


def test_specs_carry_the_launch_time_specialization():
    """Sizes divisible by 16 and tensor pointers are marked 16-divisible, as Triton does at launch."""
    spec = next(s for s in compile_check.all_specs() if s.label.startswith("mtt_loss["))
    divisible = {spec.fn.arg_names[index] for (index,) in spec.attrs}
    assert {"logits_ptr", "base_ptr", "labels_ptr", "n_cols", "logits_stride"} <= divisible
    assert spec.signature["n_cols"] == "i32" and spec.signature["logits_ptr"] in ("*fp32", "*fp16", "*bf16")


def test_compile_check_reports_a_kernel_the_gpu_compiler_rejects():
    import triton
    import triton.language as tl

    def broken(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)  # BLOCK is not a power of two: rejected

    spec = compile_check.KernelSpec("broken", triton.runtime.jit.JITFunction(broken),
                                    {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 3})
    result = compile_check.compile_spec(spec, 90)
    assert not result.ok and "FAIL" in result.line()


def test_compile_check_prints_no_triton_deprecation_warning():
    probe = ("from fastmtt.apps import compile_check\n"
             "assert compile_check.compile_spec(next(iter(compile_check.all_specs())), 80).ok")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr[-3000:]


def test_an_unknown_arch_is_a_one_line_error_before_compiling():
    """--arch 0 once aborted inside LLVM (exit status 134); 101 too (a capability LLVM's NVPTX lacks)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for arch in ("0", "101"):
        proc = subprocess.run([sys.executable, "-m", "fastmtt", "compile-check", "--arch", "80", arch], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
        assert proc.stderr.count("\n") == 1 and "argument --arch: must be a CUDA compute capability" in proc.stderr
        assert proc.stderr.rstrip().endswith(f"got {arch} (see fastmtt compile-check --help)")
    with pytest.raises(compile_check.UsageError, match="--arch 0: not a compute capability"):
        compile_check.run(archs=[80, 0])
