"""Results: achieved rates and roofline fractions, the CSV, markdown tables and one plot per op."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from benchmarks.cases import CHECKS, OPS, SIZE_KEYS

MEASURES = ("median_ms", "p20_ms", "p80_ms", "reps", "cpu_ms", "peak_mb", "extra_mb", "gbps", "bw_frac", "tflops",
            "flop_frac", "copy_gbps", "matmul_tflops")
COLUMNS = ("op", "impl", "role", "shape", *SIZE_KEYS, "dtype", "mode", "status", "note", *MEASURES,
           "device", "device_type", "torch", "triton", "fastmtt", "python", "date")
# The issue-2 target: MTT loss on logits, N=2048, V=32000, fp32 on the CPU, fastmtt vs the reference.
TARGET = dict(op="mtt_loss", shape="N=2048 V=32000", dtype="float32", mode="forward+backward")
TARGET_TIME, TARGET_MEMORY = 1.0, 0.5


def roofline(row, rates) -> dict:
    """Achieved GB/s and TFLOP/s on the op's minimal traffic and flops, and their fractions of the
    device's measured copy bandwidth and matmul rate. Left blank for 'backward', whose share of the
    work is implementation-defined (fastmtt forms the loss gradient during forward), and for checks."""
    op = OPS[row["op"]]
    if row.get("status") != "ok" or row["mode"] not in ("forward", "forward+backward"):
        return {}
    work = op.impl(row["impl"]).work or op.work
    if work is None:
        return {}
    sizes = {key: row[key] for key in op.size_keys if key in row}
    moved, flops = work(sizes, row["mode"], torch.empty((), dtype=getattr(torch, row["dtype"])).element_size())
    seconds = row["median_ms"] / 1e3
    achieved = dict(gbps=round(moved / seconds / 1e9, 2), bw_frac=round(moved / seconds / (rates.copy_gbps * 1e9), 4))
    if flops:
        achieved.update(tflops=round(flops / seconds / 1e12, 3),
                        flop_frac=round(flops / seconds / (rates.matmul_tflops * 1e12), 4))
    return achieved


def write_csv(rows, path: Path, append: bool = False) -> Path:
    """Write `rows` (or add them to an existing file, its header kept)."""
    new = not (append and path.exists() and path.stat().st_size)
    with open(path, "w" if new else "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in COLUMNS})
    return path


def _csv_value(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def parse_value(text: str):
    """An int, else a float, else the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path) -> list:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in (*SIZE_KEYS, *MEASURES):
            if row.get(key) not in (None, ""):
                row[key] = parse_value(row[key])
            else:
                row.pop(key, None)
    return rows


def _find(rows, **match):
    return next((row for row in rows if all(row.get(k) == v for k, v in match.items())), None)


def _ok(row):
    return bool(row) and row.get("status") == "ok"


def _ms(row, spread=False):
    """Median ms; with spread, half the 20-80th percentile range relative to the median."""
    if not _ok(row):
        return (row or {}).get("status", "-")
    text = f"{row['median_ms']:.3g}"
    if spread and row.get("p80_ms") is not None:
        text += f" ±{50 * (row['p80_ms'] - row['p20_ms']) / row['median_ms']:.0f}%"
    return text


def _ratio(row, reference, key):
    if not (_ok(row) and _ok(reference)):
        return "-"
    if row is reference or not reference.get(key):
        return "1" if row is reference else "-"
    return f"{row[key] / reference[key]:.2f}x"


def _rate(row):
    """GB/s for memory-bound work, else TFLOP/s, each with its roofline fraction."""
    if not _ok(row) or row.get("gbps") is None:
        return "-"
    if row.get("tflops") is not None:
        return f"{row['tflops']:.3g} TFLOP/s ({100 * row['flop_frac']:.0f}%)"
    return f"{row['gbps']:.4g} GB/s ({100 * row['bw_frac']:.0f}%)"


def _reference(measured, shape, mode):
    """The row ratios are taken against: the op's reference, else the compiled reference."""
    return (_find(measured, shape=shape, role="reference", mode=mode)
            or _find(measured, shape=shape, role="compiled", mode=mode))


def markdown_tables(rows) -> str:
    """One table per op: median wall ms per mode (the last with its spread), extra peak memory and
    ratios to the reference at the op's last mode, and on CPU runs the process CPU time (which the
    time ratio then uses), on GPU runs the achieved rate with its roofline fraction; then checks,
    skipped implementations and the issue-2 target."""
    if not rows:
        return "(no results)"
    on_cpu = rows[0].get("device_type") == "cpu"
    time_key = "cpu_ms" if on_cpu else "median_ms"
    lines = [f"Device: {rows[0].get('device', '?')} | torch {rows[0].get('torch', '?')} | "
             f"triton {rows[0].get('triton', '?')} | {rows[0].get('date', '?')}"]
    if not on_cpu and rows[0].get("copy_gbps"):
        lines.append(f"Measured ceilings: copy {rows[0]['copy_gbps']:.0f} GB/s (read + write), "
                     f"bf16 matmul {rows[0]['matmul_tflops']:.0f} TFLOP/s")
    for op in OPS.values():
        mine = [row for row in rows if row["op"] == op.name]
        skipped = dict.fromkeys((row["impl"], row["status"]) for row in mine if row["status"].startswith("skipped"))
        measured = [row for row in mine if row.get("mode") in op.modes and not row["status"].startswith("skipped")]
        checked = [row for row in mine if row.get("mode") in CHECKS and not row["status"].startswith("skipped")]
        if not (measured or checked or skipped):
            continue
        main = op.modes[-1]
        extra = "CPU-time ms" if on_cpu else "rate (roofline)"
        lines += ["", op.name]
        if measured:
            lines += ["", "| shape | dtype | implementation | " + " | ".join(f"{mode} ms" for mode in op.modes)
                      + f" | extra MB | {extra} | time vs ref | memory vs ref |",
                      "|---|---|---|" + "---:|" * (len(op.modes) + 4)]
        for shape, dtype, impl in dict.fromkeys((row["shape"], row.get("dtype", ""), row["impl"]) for row in measured):
            by_mode = {mode: _find(measured, shape=shape, impl=impl, mode=mode) for mode in op.modes}
            full, reference = by_mode[main], _reference(measured, shape, main)
            memory = f"{full['extra_mb']:.0f}" if _ok(full) and full.get("extra_mb") is not None else "-"
            if on_cpu:
                rate = f"{full['cpu_ms']:.3g}" if _ok(full) and full.get("cpu_ms") is not None else "-"
            else:
                rate = _rate(full)
            times = " | ".join(_ms(by_mode[mode], spread=mode == main) for mode in op.modes)
            lines.append(f"| {shape} | {dtype} | {impl} | {times} | {memory} | {rate} "
                         f"| {_ratio(full, reference, time_key)} | {_ratio(full, reference, 'extra_mb')} |")
        notes = [f"- {row['mode']}, {row['impl']}, {row['shape']} {row.get('dtype', '')}: "
                 f"{row.get('note') or row['status']}" for row in checked]
        notes += [f"- {impl}: {status}" for impl, status in skipped]
        if notes:
            lines += ["", *notes]
    target = target_summary(rows)
    if target:
        lines += ["", target]
    return "\n".join(lines)


def target_summary(rows):
    """The issue-2 check on CPU results: fastmtt / reference time (wall and CPU) and extra peak memory."""
    reference = _find(rows, role="reference", device_type="cpu", **TARGET)
    fast = _find(rows, impl="fastmtt", device_type="cpu", **TARGET)
    if not (_ok(reference) and _ok(fast)):
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
    for op in OPS.values():
        measured = [row for row in rows if row["op"] == op.name and _ok(row) and row.get("mode") in op.modes]
        if not measured:
            continue
        shapes = list(dict.fromkeys(row["shape"] for row in measured))
        impls = list(dict.fromkeys(row["impl"] for row in measured))
        panels = [(mode, "median_ms", "ms") for mode in op.modes] + [(op.modes[-1], "extra_mb", "extra MB")]
        figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
        width = 0.8 / len(impls)
        for axis, (mode, key, unit) in zip(axes[0], panels):
            positive = False
            for index, impl in enumerate(impls):
                values = [(_find(measured, shape=s, impl=impl, mode=mode) or {}).get(key) for s in shapes]
                values = [v if v and v > 0 else float("nan") for v in values]
                positive |= any(v == v for v in values)
                axis.bar([i + index * width for i in range(len(shapes))], values, width, label=impl)
            axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            axis.set_xticklabels([s.replace(" ", "\n") for s in shapes], fontsize=7)
            if positive:  # a log axis needs a value above 0 (tiny runs allocate 0 extra MB)
                axis.set_yscale("log")
            axis.set_title(f"{mode}: {unit}")
        axes[0][0].legend(fontsize=7)
        figure.suptitle(f"{op.name} on {measured[0].get('device', '')}")
        figure.tight_layout()
        path = Path(f"{stem}-{op.name}.png")
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written
