"""The benchmark harness on tiny CPU sizes, so it cannot rot (timings themselves live in benchmarks/)."""
import csv
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import cases, report, run
from benchmarks.cases import CHECKS, MODES, OPS
from benchmarks.measure import DeviceRates, cpu_peak_reset_supported, peak_memory, time_step
from fastmtt import _dispatch
from tests.utils import ROOT

CPU = torch.device("cpu")
# torch.compile costs tens of seconds per shape on 2 cores; it wraps the reference checked below.
NO_COMPILE = ["--exclude", "compile"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _fresh(op, impl, config, dtype=torch.float32):
    """(output, gradients) of one forward + backward of `impl` on fresh inputs of `config`."""
    inputs = op.make_inputs(config.size_dict, dtype, CPU)
    out = impl.build(inputs)()
    leaves = cases.leaves(inputs)
    out.backward(torch.ones_like(out))
    return out.detach(), [leaf.grad for leaf in leaves]


AGREEING = [pytest.param(op, impl, id=f"{op.name}|{impl.name}") for op in OPS.values() for impl in op.impls
            if impl.agrees_with and impl.role != "compiled"]


@pytest.mark.parametrize("op, impl", AGREEING)
def test_implementations_agree_with_what_they_claim(op, impl):
    """Value and every gradient equal those of `agrees_with` at each tiny config without dropout, in fp32
    (what the Triton variants take; they run in Triton's interpreter here)."""
    other = op.impl(impl.agrees_with)
    reason = impl.unavailable(CPU) or other.unavailable(CPU)
    if reason:
        pytest.skip(reason)
    configs = [config for config in op.presets["tiny"]
               if not config.size_dict.get("dropout") and impl.unsupported(config.size_dict) is None]
    assert configs
    for config in configs:
        (got, grads), (want, want_grads) = _fresh(op, impl, config), _fresh(op, other, config)
        assert len(grads) == len(want_grads) > 0 and want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5, msg=f"{impl.name} value at {config.label}")
        for grad, want_grad in zip(grads, want_grads):
            assert want_grad.abs().max() > 0
            torch.testing.assert_close(grad, want_grad, rtol=2e-4, atol=2e-5,
                                       msg=f"{impl.name} gradient at {config.label}")


def test_peft_layer_computes_lora_and_feeds_the_benchmark_leaves():
    op = OPS["lora_linear"]
    inputs = op.make_inputs(op.presets["tiny"][0].size_dict, torch.float64, CPU)
    out = op.impl("PEFT LoRA (eager)").build(inputs)()
    x, weight, lora_a, lora_b = (inputs[k] for k in ("x", "weight", "lora_A", "lora_B"))
    x_, a_, b_ = (t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b))
    want = x_ @ weight.T + 2.0 * (x_ @ a_.T) @ b_.T
    torch.testing.assert_close(out, want)
    (out * want.detach()).sum().backward()
    (want * want.detach()).sum().backward()
    for got, expected in ((x, x_), (lora_a, a_), (lora_b, b_)):
        torch.testing.assert_close(got.grad, expected.grad)


def _linear_case():
    op = OPS["fused_linear_mtt_loss"]
    inputs = op.make_inputs(op.presets["tiny"][0].size_dict, torch.float64, CPU)
    hidden, base_hidden, weight, labels = (inputs[k] for k in ("hidden", "base_hidden", "weight", "labels"))
    logits, base_logits = hidden @ weight.T, base_hidden @ weight.T
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(logits, labels)
    return op, inputs, logits, base_logits, valid, ce


def test_three_gemm_floor_runs_the_three_products():
    op, inputs, logits, _, _, _ = _linear_case()
    out = op.impl("3-GEMM floor").build(inputs)()
    out.backward()
    torch.testing.assert_close(inputs["hidden"].grad, logits.detach() @ inputs["weight"])


def test_liger_distillation_adapter_is_ce_plus_lam_kl_base_to_adapted():
    """beta=0 and the argument order make Liger's loss CE + LAM * KL(base || adapted), full vocabulary."""
    pytest.importorskip("liger_kernel")
    op, inputs, logits, base_logits, valid, ce = _linear_case()
    log_q, log_p = logits.log_softmax(-1), base_logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[valid].mean()
    want = ce + cases.LAM * kl
    got = op.impl("Liger fused linear distillation (CE + KL)").build(inputs)()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # Liger sums in fp32
    got.backward()
    want_grad, = torch.autograd.grad(want, inputs["hidden"])
    torch.testing.assert_close(inputs["hidden"].grad, want_grad)


def test_liger_ce_adapter_is_the_cross_entropy():
    """Liger's fused linear CE is Triton only: it runs here in Triton's interpreter (tests set it)."""
    pytest.importorskip("liger_kernel")
    if not _dispatch.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    op, inputs, logits, _, _, ce = _linear_case()
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    got = op.impl("Liger fused linear CE (CE only)").build(inputs)()
    torch.testing.assert_close(got.double(), ce, rtol=1e-5, atol=1e-5)


def test_cut_cross_entropy_adapter_is_the_cross_entropy(monkeypatch):
    """CCE's Triton kernels fail in Triton's interpreter, so its own PyTorch path (compile unwrapped)
    stands in: that checks the adapter's arguments (e=hidden, c=weight, targets=labels)."""
    cce = pytest.importorskip("cut_cross_entropy")
    import cut_cross_entropy.torch_compile as cce_torch

    eager = cce_torch.torch_compile_linear_cross_entropy_apply._torchdynamo_orig_callable
    monkeypatch.setattr(cce_torch, "torch_compile_linear_cross_entropy_apply", eager)
    original = cce.linear_cross_entropy
    monkeypatch.setattr(cce, "linear_cross_entropy", lambda *a, **k: original(*a, **k, impl="torch_compile"))
    op, inputs, _, _, _, ce = _linear_case()
    got = op.impl("Cut Cross-Entropy (CE only)").build(inputs)()
    torch.testing.assert_close(got.double(), ce)


def test_fastmtt_variants_skip_what_this_build_lacks(monkeypatch):
    lacking = cases._fastmtt_missing("fused_linear_mtt_loss", "auto", ("no_such_keyword",))
    assert lacking(CPU) == "fastmtt.fused_linear_mtt_loss has no keyword no_such_keyword in this build"
    assert cases._fastmtt_missing("fused_linear_mtt_loss", "auto", ("chunk_size",))(CPU) is None
    tiled = OPS["fused_linear_mtt_loss"].impl("fastmtt (tiled)")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "runs on CUDA (or with TRITON_INTERPRET=1) only" in tiled.unavailable(CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tiled.unavailable(CPU) is None
    for op_name, variants in (("fused_linear_mtt_loss", cases.FUSED_LINEAR_VARIANTS),
                              ("lora_linear", cases.LORA_VARIANTS)):
        names = [name for name, _, _ in variants]
        assert [impl.name for impl in OPS[op_name].impls[:len(names)]] == names  # fastmtt first


def test_determinism_check_tells_equal_from_different_gradients():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    assert cases.determinism(lambda: (x * x).sum(), [x], torch.ones(())) == "gradients bitwise equal"
    noisy = cases.determinism(lambda: (x * torch.rand(50, dtype=torch.float64)).sum(), [x], torch.ones(()))
    assert noisy.startswith("gradients NOT bitwise equal (max |difference| 0.")


def test_gpu_preset_covers_the_issue_sizes():
    labels = {op: {(c.label, str(c.dtype)) for c in OPS[op].presets["gpu"]} for op in OPS}
    for n_rows in (8192, 1024):
        assert (f"N={n_rows} H=4096 V=128256 head=frozen", "torch.bfloat16") in labels["fused_linear_mtt_loss"]
        for vocab in (32000, 128256):
            for dtype in ("torch.bfloat16", "torch.float32"):
                assert (f"N={n_rows} V={vocab}", dtype) in labels["mtt_loss"]
    lora = {c.label for c in OPS["lora_linear"].presets["gpu"]}
    assert lora == {f"N=8192 K=4096 M={m} r={r} dropout={p}" for m in (4096, 14336) for r in (16, 64)
                    for p in (0.0, 0.1)}
    assert OPS["lora_train_step"].presets["gpu"][0].size_dict["model"] == "1b"
    assert OPS["mtt_loss"].presets["gpu"][0].label == "N=8192 V=128256"  # the target shape first


def test_time_step_times_the_step_not_the_setup():
    timing = time_step(lambda: time.sleep(0.003), lambda: time.sleep(0.02), CPU, budget_s=0.0)
    assert timing.reps == 3
    assert 3.0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms < 20.0
    assert timing.cpu_ms < 2.0  # sleeping takes wall time, not CPU time


@pytest.mark.skipif(not cpu_peak_reset_supported(), reason="needs /proc/self/clear_refs")
def test_peak_memory_counts_what_the_step_allocates():
    held = {}
    memory = peak_memory(lambda: held.__setitem__("x", torch.ones(50 << 20)), held.clear, CPU)
    assert 190 <= memory.extra_mb <= 260  # 200 MiB of ones, touched
    assert memory.peak_mb >= memory.extra_mb


def test_roofline_rates_use_the_op_work_model():
    row = dict(op="mtt_loss", impl="fastmtt", status="ok", mode="forward", N=1000, V=1000, dtype="float32",
               median_ms=1.0)
    rates = DeviceRates(copy_gbps=80.0, matmul_tflops=1.0)
    assert report.roofline(row, rates) == dict(gbps=8.0, bw_frac=0.1)  # 8 MB in 1 ms
    assert report.roofline(dict(row, mode="backward"), rates) == {}
    assert report.roofline(dict(row, mode="determinism"), rates) == {}
    floor = dict(op="lora_linear", impl="x @ W^T (floor)", status="ok", mode="forward", N=100, K=100, M=100, r=4,
                 dtype="float32", median_ms=1.0)
    assert report.roofline(floor, rates)["tflops"] == pytest.approx(2e6 / 1e-3 / 1e12, rel=1e-3)
    step = dict(op="lora_train_step", impl="CE (PEFT)", status="ok", mode="forward+backward", dtype="float32",
                median_ms=1.0)
    assert report.roofline(step, rates) == {}


def test_target_summary_reports_time_and_memory_ratios():
    base = dict(report.TARGET, device_type="cpu", status="ok")
    rows = [dict(base, impl="reference (eager)", role="reference", median_ms=100.0, cpu_ms=100.0, peak_mb=3000.0,
                 extra_mb=2000.0),
            dict(base, impl="fastmtt", role="fastmtt", median_ms=80.0, cpu_ms=120.0, peak_mb=1200.0, extra_mb=800.0)]
    text = report.target_summary(rows)
    assert "wall time 0.80x" in text and "CPU time 1.20x the reference (target <= 1.0x, NOT met)" not in text
    assert "CPU time 1.20x (target <= 1.0x, NOT met)" in text  # the CPU time decides on the CPU
    assert "extra peak memory 0.40x (target <= 0.5x, met" in text and "peak RSS 0.40x" in text
    assert report.target_summary([dict(row, status="oom") for row in rows]) is None


def test_tiny_preset_runs_every_op_and_notes_skips(tmp_path, capsys):
    """What `python -m benchmarks --device cpu --preset tiny` does, in this process, one rep of one timed
    mode and the check (the worker test below runs every mode)."""
    modes = ["forward+backward", *CHECKS]
    assert run.main(["--device", "cpu", "--preset", "tiny", "--in-process", *NO_COMPILE, "--budget", "0",
                     "--min-reps", "1", "--modes", *modes, "--no-plot", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(next(tmp_path.glob("cpu-*.csv")))
    for op in OPS.values():
        for impl in op.impls:
            if "compile" in impl.name:
                continue
            mine = [row for row in rows if row["op"] == op.name and row["impl"] == impl.name]
            reason = impl.unavailable(CPU)
            if reason:
                assert [row["status"] for row in mine] == [f"skipped: {reason}"]
                continue
            expected = {(config.label, mode) for config in op.presets["tiny"] for mode in modes}
            assert {(row["shape"], row["mode"]) for row in mine} == expected, (op.name, impl.name)
            for row in mine:
                unsupported = impl.unsupported({k: row[k] for k in op.size_keys if k in row})
                assert row["status"] == (f"skipped: {unsupported}" if unsupported else "ok"), row
                if row["status"] == "ok" and row["mode"] in MODES:
                    assert row["median_ms"] > 0 and row["reps"] >= 1 and row["torch"] == torch.__version__
    chunked = [row for row in rows if row["impl"] == "fastmtt (chunked, torch)" and row["mode"] == "determinism"]
    assert chunked and all(row["note"] == "gradients bitwise equal" for row in chunked)
    table = capsys.readouterr().out
    assert "| N=64 V=256 | float32 | fastmtt |" in table and "lora_train_step" in table
    assert "- determinism, fastmtt (chunked, torch), N=64 H=32 V=256 head=frozen float32: gradients bitwise" in table


def test_cpu_workers_write_csv_plot_and_table(tmp_path, capsys):
    assert run.main(["--device", "cpu", "--preset", "tiny", "--ops", "mtt_loss", "--impls", "fastmtt", "--budget", "0",
                     "--threads", "1", "--out", str(tmp_path)]) == 0
    csv_path, = tmp_path.glob("cpu-*.csv")
    assert list(tmp_path.glob("cpu-*-mtt_loss.png"))
    rows = report.read_csv(csv_path)
    assert {(row["shape"], row["mode"]) for row in rows} == {(c.label, m) for c in OPS["mtt_loss"].presets["tiny"]
                                                             for m in MODES}
    for row in rows:
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["reps"] >= 3 and row["device"]
        if cpu_peak_reset_supported():
            assert row["peak_mb"] > 0 and row["extra_mb"] >= 0
    table = capsys.readouterr().out
    assert csv_path.with_suffix(".md").read_text().strip() == table.strip()


def test_shape_deadline_and_append(tmp_path, capsys):
    csv_path = tmp_path / "results.csv"
    common = ["--device", "cpu", "--in-process", "--ops", "lora_linear", "--impls", "x @ W^T (floor)", "--budget", "0",
              "--modes", "forward", "--no-plot", "--csv", str(csv_path)]
    assert run.main([*common, "--shape", "N=8", "K=4", "M=6", "r=2", "--dtype", "float64"]) == 0
    assert run.main([*common, "--shape", "N=16", "K=4", "M=6", "r=2", "--deadline", "0", "--append"]) == 0
    rows = report.read_csv(csv_path)
    assert [(row["shape"], row["dtype"], row["status"]) for row in rows] == [
        ("N=8 K=4 M=6 r=2", "float64", "ok"), ("N=16 K=4 M=6 r=2", "float32", run.OUT_OF_TIME)]
    assert rows[0]["N"] == 8 and "N=8 K=4 M=6 r=2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="lora_linear takes N, K, M, r, dropout, not V"):
        run.main([*common, "--shape", "N=8", "V=4"])


def test_gpu_check_rehearsal_runs_the_parity_tests_first_and_writes_the_tables(tmp_path):
    """benchmarks/gpu_check.sh on the CPU at tiny sizes in two minutes, without matplotlib: the CUDA parity
    tests run first (here all skipped), then the headline sections append to the CSV and the tables are
    written; the versions are logged."""
    hide = tmp_path / "hide"
    (hide / "matplotlib").mkdir(parents=True)
    (hide / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", GPU_CHECK_PRESET="tiny", GPU_CHECK_SECONDS="120", OUT=str(out),
               PYTHON=sys.executable, PYTHONPATH=os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=360)
    log = done.stdout
    assert done.returncode == 0, log[-2000:] + done.stderr[-2000:]
    assert "torch " in log and "triton " in log and "driver: " in log
    sections = [line for line in log.splitlines() if line.startswith("== ")]
    assert "CUDA parity tests" in sections[1], sections
    assert "  CUDA parity tests (pytest -m cuda): exit 0" in log
    assert "no matplotlib: tables only" in log
    [table] = out.glob("*.csv")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row["op"] == "fused_linear_mtt_loss" and row["status"] == "ok" and float(row["median_ms"]) > 0
               for row in rows)
    assert "fused_linear_mtt_loss" in table.with_suffix(".md").read_text()
    assert (out / "gpu_check.log").read_text() == log


def test_every_position_kl_benchmark_times_one_call_against_two(capsys):
    """benchmarks/every_position_kl.py: the one fused call (ce_rows) and the two it replaced give the same loss
    and hidden gradient, and both are timed."""
    from benchmarks import every_position_kl

    every_position_kl.main(["--rows", "64", "--hidden", "16", "--vocab", "100", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| two calls (before) |" in out and "| one call, ce_rows (after) |" in out
    loss_difference, grad_difference = (float(x) for x in re.findall(r"difference\| ([0-9.e+-]+)", out))
    assert loss_difference < 1e-6 and grad_difference < 1e-6
