"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (real compiler, no GPU)."""
import os
import subprocess
import sys

import pytest
import torch

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


def _public_calls():
    """The public calls users make, by path, at sizes that are multiples of 16 (as real ones are): the row
    kernel (fp32/fp16/bf16, CE only, reverse, per-token), the chunked and tiled fused linear loss (plain,
    biased, trained and LoRA heads, CE only; CE on some rows only) and the LoRA linear layer (PEFT's dtype
    pairs, dropout, bias, row-major and transposed weights), each forward and backward."""
    import fastmtt

    n_rows, n_hidden, n_cols, rank = 32, 32, 96, 8
    torch.manual_seed(0)
    labels = torch.randint(0, n_cols, (n_rows,))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for options in (dict(), dict(lam=0.0), dict(direction="reverse"), dict(reduction="none")):
            logits = torch.randn(n_rows, n_cols, dtype=dtype, requires_grad=True)
            loss = fastmtt.mtt_loss(logits, torch.randn(n_rows, n_cols, dtype=dtype), labels, backend="triton",
                                    **options)
            yield loss.sum()
    for tiled in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for head, options in ((dict(), dict()), (dict(), dict(lam=0.0)), (dict(bias=True), dict(softcap=30.0)),
                                  (dict(trained=True), dict()), (dict(lora=True), dict(lora_scaling=2.0))):
                hidden = torch.randn(n_rows, n_hidden, dtype=dtype, requires_grad=True)
                weight = (torch.randn(n_cols, n_hidden, dtype=dtype) / 4).requires_grad_(head.get("trained", False))
                extra = dict(bias=torch.randn(n_cols, dtype=dtype)) if head.get("bias") else {}
                if head.get("lora"):
                    extra = dict(lora_A=torch.randn(rank, n_hidden, dtype=dtype, requires_grad=True),
                                 lora_B=torch.randn(n_cols, rank, dtype=dtype, requires_grad=True))
                yield fastmtt.fused_linear_mtt_loss(hidden, torch.randn_like(hidden), weight, labels, backend="triton",
                                                    tiled=tiled, **extra, **options)
    from fastmtt.head import LinearHead
    from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss_with_options

    for tiled in (False, True):  # MTTObjective's every-position KL: CE on some rows only
        hidden = torch.randn(n_rows, n_hidden, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(n_cols, n_hidden, dtype=torch.bfloat16) / 4
        yield fused_linear_mtt_loss_with_options(hidden, torch.randn_like(hidden), LinearHead(weight), labels,
                                                 fastmtt.MTTOptions(), ce_rows=torch.arange(n_rows) % 2 == 0,
                                                 return_components=True, backend="triton", tiled=tiled).loss
    for x_dtype, adapter_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                   (torch.float16, torch.float16), (torch.bfloat16, torch.float32)):
        for dropout_p, bias, transposed in ((0.0, False, False), (0.1, True, False), (0.0, False, True)):
            x = torch.randn(n_rows, n_hidden, dtype=x_dtype, requires_grad=True)
            weight = torch.randn(n_hidden, n_cols, dtype=x_dtype).T if transposed else torch.randn(n_cols, n_hidden,
                                                                                                     dtype=x_dtype)
            lora_A = torch.randn(rank, n_hidden, dtype=adapter_dtype, requires_grad=True)
            lora_B = torch.randn(n_cols, rank, dtype=adapter_dtype, requires_grad=True)
            bias = torch.randn(n_cols, dtype=x_dtype) if bias else None
            yield fastmtt.lora_linear(x, weight, lora_A, lora_B, 2.0, bias, dropout_p=dropout_p,
                                      backend="triton").float().square().mean()


def test_the_specs_cover_every_launch_of_the_public_calls():
    """Each kernel launch of the public calls (run here in the interpreter) has a compile spec with the same
    kernel, pointer dtypes, layout and feature flags (tiles aside: registry.TILING_CONSTEXPRS), so
    compile-check compiles the paths that run."""
    from fastmtt.kernels.registry import recording_launches

    with recording_launches() as launches:
        for loss in _public_calls():
            loss.backward()
    covered = {spec.cover_key() for spec in compile_check.all_specs()}
    recorded = {launch.spec("recorded").cover_key(): launch for launch in launches}
    assert {key[0] for key in recorded} >= {"_mtt_loss_kernel", "_linear_mtt_fwd_kernel", "_linear_mtt_bwd_kernel",
                                            "_lora_project_kernel", "_lora_gemm_kernel", "_lora_weight_grad_kernel"}
    missing = [key for key in recorded if key not in covered]
    assert not missing, f"{len(missing)} of {len(recorded)} launch paths have no compile spec, e.g.:\n" + "\n".join(
        str(key) for key in missing[:6])
