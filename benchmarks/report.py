"""Results: roofline fractions, the CSV, markdown tables and one plot per op."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from benchmarks.cases import MODES, OPS

COLUMNS = ("op", "impl", "role", "shape", "N", "V", "H", "K", "M", "r", "dtype", "mode", "status",
           "median_ms", "p20_ms", "p80_ms", "reps", "cpu_ms", "peak_mb", "extra_mb", "bw_frac", "flop_frac",
           "device", "device_type", "copy_gbps", "matmul_tflops", "torch", "triton", "fastmtt", "python", "date")
NUMERIC = ("N", "V", "H", "K", "M", "r", "median_ms", "p20_ms", "p80_ms", "reps", "cpu_ms", "peak_mb", "extra_mb",
           "bw_frac", "flop_frac", "copy_gbps", "matmul_tflops")
# The issue-2 target: MTT loss on logits, N=2048, V=32000, fp32 on the CPU, fastmtt vs the reference.
TARGET = dict(op="mtt_loss", shape="N=2048 V=32000", dtype="float32", mode="forward+backward")
TARGET_TIME, TARGET_MEMORY = 1.0, 0.5


def roofline(row, rates) -> dict:
    """Fractions of the device's measured copy bandwidth and matmul rate achieved on the op's minimal
    traffic and flops. Left blank for 'backward', whose share of the work is implementation-defined
    (fastmtt computes the loss gradient during forward)."""
    if row.get("status") != "ok" or row["mode"] == "backward":
        return {}
    op = OPS[row["op"]]
    work = op.impl(row["impl"]).work or op.work
    sizes = {key: row[key] for key in ("N", "V", "H", "K", "M", "r") if key in row}
    moved, flops = work(sizes, row["mode"], torch.empty((), dtype=getattr(torch, row["dtype"])).element_size())
    seconds = row["median_ms"] / 1e3
    return dict(bw_frac=round(moved / seconds / (rates.copy_gbps * 1e9), 4),
                flop_frac=round(flops / seconds / (rates.matmul_tflops * 1e12), 4) if flops else None)


def write_csv(rows, path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in COLUMNS})
    return path


def _csv_value(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def read_csv(path: Path) -> list:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in NUMERIC:
            if row.get(key) not in (None, ""):
                row[key] = float(row[key]) if "." in row[key] or "e" in row[key] else int(row[key])
            else:
                row.pop(key, None)
    return rows


def _find(rows, **match):
    return next((row for row in rows if all(row.get(k) == v for k, v in match.items())), None)


def _ms(row, spread=False):
    """Median ms; with spread, half the 20-80th percentile range relative to the median."""
    if not (row and row.get("status") == "ok"):
        return (row or {}).get("status", "-")
    text = f"{row['median_ms']:.3g}"
    if spread and row.get("p80_ms") is not None:
        text += f" ±{50 * (row['p80_ms'] - row['p20_ms']) / row['median_ms']:.0f}%"
    return text


def _ratio(row, reference, key):
    if not (row and reference and row.get("status") == "ok" and reference.get("status") == "ok"):
        return "-"
    if row is reference or not reference.get(key):
        return "1" if row is reference else "-"
    return f"{row[key] / reference[key]:.2f}x"


def markdown_tables(rows) -> str:
    """One table per op: median wall ms per mode (forward+backward with its spread), extra peak memory,
    ratios to the op's reference at forward+backward, and on CPU runs the process CPU time (which the
    time ratio then uses), on GPU runs the roofline fraction; then skipped implementations and the
    issue-2 target."""
    if not rows:
        return "(no results)"
    on_cpu = rows[0].get("device_type") == "cpu"
    time_key = "cpu_ms" if on_cpu else "median_ms"
    lines = [f"Device: {rows[0].get('device', '?')} | torch {rows[0].get('torch', '?')} | "
             f"triton {rows[0].get('triton', '?')} | {rows[0].get('date', '?')}"]
    last_column = ("fwd+bwd CPU-time ms", "time vs ref (CPU time)") if on_cpu else ("roofline", "time vs ref")
    for op_name in OPS:
        measured = [row for row in rows if row["op"] == op_name and "mode" in row and row.get("shape")]
        skipped = [row for row in rows if row["op"] == op_name and row.get("status", "").startswith("skipped")]
        if not measured and not skipped:
            continue
        lines += ["", f"{op_name}", "",
                  "| shape | dtype | implementation | forward ms | backward ms | fwd+bwd ms | fwd+bwd extra MB "
                  f"| {last_column[0]} | {last_column[1]} | memory vs ref |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        cases = list(dict.fromkeys((row["shape"], row.get("dtype", ""), row["impl"]) for row in measured))
        for shape, dtype, impl in cases:
            by_mode = {mode: _find(measured, shape=shape, impl=impl, mode=mode) for mode in MODES}
            full = by_mode["forward+backward"]
            reference = _find(measured, shape=shape, role="reference", mode="forward+backward")
            memory = f"{full['extra_mb']:.0f}" if full and full.get("extra_mb") is not None else "-"
            if on_cpu:
                extra = f"{full['cpu_ms']:.3g}" if full and full.get("cpu_ms") is not None else "-"
            else:
                fractions = [full.get(k) for k in ("bw_frac", "flop_frac")] if full else []
                fraction = max((f for f in fractions if f is not None), default=None)
                extra = "-" if fraction is None else f"{100 * fraction:.1f}%"
            lines.append(f"| {shape} | {dtype} | {impl} | {_ms(by_mode['forward'])} | {_ms(by_mode['backward'])} "
                         f"| {_ms(full, spread=True)} | {memory} | {extra} | {_ratio(full, reference, time_key)} "
                         f"| {_ratio(full, reference, 'extra_mb')} |")
        for row in skipped:
            lines.append(f"\n- {row['impl']}: {row['status']}")
    target = target_summary(rows)
    if target:
        lines += ["", target]
    return "\n".join(lines)


def target_summary(rows):
    """The issue-2 check on CPU results: fastmtt / reference time (wall and CPU) and extra peak memory."""
    reference = _find(rows, role="reference", device_type="cpu", **TARGET)
    fast = _find(rows, impl="fastmtt", device_type="cpu", **TARGET)
    if not (reference and fast and reference.get("status") == fast.get("status") == "ok"):
        return None
    time_ratio = fast["median_ms"] / reference["median_ms"]
    text = (f"Issue-2 target (CPU, mtt_loss N=2048 V=32000 fp32, forward+backward): wall time {time_ratio:.2f}x "
            f"the reference")
    if fast.get("cpu_ms") and reference.get("cpu_ms"):
        time_ratio = fast["cpu_ms"] / reference["cpu_ms"]
        text += f", CPU time {time_ratio:.2f}x"
    text += f" (target <= {TARGET_TIME}x, {'met' if time_ratio <= TARGET_TIME else 'NOT met'})"
    if reference.get("extra_mb") and fast.get("extra_mb") is not None:
        memory_ratio = fast["extra_mb"] / reference["extra_mb"]
        total_ratio = fast["peak_mb"] / reference["peak_mb"]
        text += (f", extra peak memory {memory_ratio:.2f}x (target <= {TARGET_MEMORY}x, "
                 f"{'met' if memory_ratio <= TARGET_MEMORY else 'NOT met'}; whole-process peak RSS "
                 f"{total_ratio:.2f}x)")
    return text + "."


def plot(rows, stem: Path) -> list:
    """One PNG per op: median time per mode (grouped bars per shape, log scale) and extra peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op_name in OPS:
        measured = [row for row in rows if row["op"] == op_name and row.get("status") == "ok"]
        if not measured:
            continue
        shapes = list(dict.fromkeys(row["shape"] for row in measured))
        impls = list(dict.fromkeys(row["impl"] for row in measured))
        panels = [(mode, "median_ms", "ms") for mode in MODES] + [("forward+backward", "extra_mb", "extra MB")]
        figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
        width = 0.8 / len(impls)
        for axis, (mode, key, unit) in zip(axes, panels):
            for index, impl in enumerate(impls):
                values = [(_find(measured, shape=s, impl=impl, mode=mode) or {}).get(key) for s in shapes]
                axis.bar([i + index * width for i in range(len(shapes))],
                         [v if v else float("nan") for v in values], width, label=impl)
            axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            axis.set_xticklabels([s.replace(" ", "\n") for s in shapes], fontsize=7)
            axis.set_yscale("log")
            axis.set_title(f"{mode}: {unit}")
        axes[0].legend(fontsize=7)
        figure.suptitle(f"{op_name} on {measured[0].get('device', '')} ({measured[0].get('dtype', '')})")
        figure.tight_layout()
        path = Path(f"{stem}-{op_name}.png")
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written
