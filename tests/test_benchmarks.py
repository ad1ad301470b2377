"""The benchmark harness on tiny CPU sizes, so it cannot rot (timings themselves live in benchmarks/)."""
import time

import pytest
import torch

import fastmtt
from benchmarks import report, run
from benchmarks.cases import MODES, OPS
from benchmarks.measure import DeviceRates, cpu_peak_reset_supported, peak_memory, time_step
from fastmtt import _dispatch

CPU = torch.device("cpu")
# torch.compile costs tens of seconds per shape on 2 cores; it wraps the reference checked below.
NO_COMPILE = ["--exclude", "compile"]


def _available(op):
    return [impl for impl in op.impls if impl.unavailable(CPU) is None and impl.role in ("reference", "fastmtt")]


@pytest.mark.parametrize("op_name", list(OPS))
def test_implementations_agree_with_the_reference(op_name):
    """Every non-floor implementation computes the reference's value and input gradients."""
    impls = _available(OPS[op_name])
    if len(impls) < 2:
        pytest.skip(f"{op_name}: only {[impl.name for impl in impls]} available in this build")
    _assert_agree(OPS[op_name], impls)


def _assert_agree(op, impls):
    op_name, config = op.name, op.presets["tiny"][0]
    results = {}
    for impl in impls:
        inputs = op.make_inputs(config.size_dict, torch.float64, CPU)
        out = impl.build(inputs)()
        out.backward(torch.ones_like(out))
        results[impl.name] = (out.detach(), [inputs[name].grad for name in op.grad_inputs])
    (_, (want, want_grads)), *others = results.items()
    for name, (got, grads) in others:
        torch.testing.assert_close(got, want, msg=f"{op_name}/{name} value")
        for grad, want_grad in zip(grads, want_grads):
            torch.testing.assert_close(grad, want_grad, msg=f"{op_name}/{name} gradient")


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


def test_roofline_fractions_use_the_op_work_model():
    row = dict(op="mtt_loss", impl="fastmtt", status="ok", mode="forward", N=1000, V=1000, dtype="float32",
               median_ms=1.0)
    rates = DeviceRates(copy_gbps=80.0, matmul_tflops=1.0)
    assert report.roofline(row, rates) == dict(bw_frac=0.1, flop_frac=None)  # 8 MB in 1 ms = 8 GB/s
    assert report.roofline(dict(row, mode="backward"), rates) == {}
    floor = dict(op="lora_linear", impl="x @ W^T (floor)", status="ok", mode="forward", N=100, K=100, M=100, r=4,
                 dtype="float32", median_ms=1.0)
    assert report.roofline(floor, rates)["flop_frac"] == pytest.approx(2e6 / 1e-3 / 1e12, rel=1e-3)


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


def test_runner_cpu_workers_write_csv_plot_and_table(tmp_path, capsys):
    assert run.main(["--device", "cpu", "--preset", "tiny", "--ops", "mtt_loss", *NO_COMPILE, "--budget", "0",
                     "--threads", "1", "--out", str(tmp_path)]) == 0
    csv_files = list(tmp_path.glob("cpu-*.csv"))
    assert len(csv_files) == 1 and list(tmp_path.glob("cpu-*-mtt_loss.png"))
    rows = report.read_csv(csv_files[0])
    expected = {(impl.name, config.label, mode) for impl in _available(OPS["mtt_loss"])
                for config in OPS["mtt_loss"].presets["tiny"] for mode in MODES}
    assert {(row["impl"], row["shape"], row["mode"]) for row in rows} == expected
    for row in rows:
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["reps"] >= 3 and row["device"] and row["torch"] == torch.__version__
        if cpu_peak_reset_supported():
            assert row["peak_mb"] > 0 and row["extra_mb"] >= 0
    table = capsys.readouterr().out
    assert "| N=64 V=256 | float32 | fastmtt |" in table
    assert csv_files[0].with_suffix(".md").read_text().strip() == table.strip()


def test_runner_in_process_covers_every_op_and_notes_skips(tmp_path, capsys):
    assert run.main(["--device", "cpu", "--preset", "tiny", "--in-process", *NO_COMPILE, "--budget", "0",
                     "--modes", "forward+backward", "--no-plot", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(next(tmp_path.glob("cpu-*.csv")))
    for op in OPS.values():
        for impl in op.impls:
            if "compile" in impl.name:
                continue
            statuses = {row["status"] for row in rows if row["op"] == op.name and row["impl"] == impl.name}
            reason = impl.unavailable(CPU)
            assert statuses == ({f"skipped: {reason}"} if reason else {"ok"}), (op.name, impl.name, statuses)
    assert hasattr(fastmtt, "fused_linear_mtt_loss") or "fastmtt.fused_linear_mtt_loss is not in this build" \
        in capsys.readouterr().out


def test_triton_interpret_zero_means_real_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _dispatch.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.interpreting()


def test_ops_join_the_sweep_once_fastmtt_has_them(monkeypatch):
    """Stand-ins with the announced signatures make the fastmtt rows run (and agree) with no harness edit."""
    def fused_linear_mtt_loss(hidden, base_hidden, weight, labels, *, lam, backend="auto", **options):
        return fastmtt.mtt_loss(hidden @ weight.T, base_hidden @ weight.T, labels, lam=lam, backend="torch")

    def lora_linear(x, weight, lora_a, lora_b, scaling, bias=None, dropout_p=0.0, backend="auto"):
        return x @ weight.T + scaling * (x @ lora_a.T) @ lora_b.T

    monkeypatch.setattr(fastmtt, "fused_linear_mtt_loss", fused_linear_mtt_loss, raising=False)
    monkeypatch.setattr(fastmtt, "lora_linear", lora_linear, raising=False)
    for op_name, impl_name in (("fused_linear_mtt_loss", "fastmtt (chunked)"), ("lora_linear", "fastmtt")):
        op = OPS[op_name]
        assert op.impl(impl_name).unavailable(CPU) is None
        rows = run.measure_impl(op, op.impl(impl_name), op.presets["tiny"], CPU, ["forward+backward"], 0.0)
        assert [row["status"] for row in rows] == ["ok"]
        _assert_agree(op, _available(op))
    assert "CUDA only" in OPS["fused_linear_mtt_loss"].impl("fastmtt (tiled)").unavailable(CPU)
