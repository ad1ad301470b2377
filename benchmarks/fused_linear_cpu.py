"""Peak memory and time of fused_linear_mtt_loss against eager materialized-logit baselines (CPU).

Each case runs in its own subprocess: it builds the inputs, reads its resident set size (RSS), runs
forward + backward `--repeats` times, and reports the median wall time, the median process CPU time
(all threads; steadier than wall time on a shared machine) and the peak RSS (VmHWM) minus the RSS
before the first run, i.e. the memory the loss itself needed beyond inputs already in place.

    python benchmarks/fused_linear_cpu.py [--rows 4096 --hidden 512 --vocab 32000 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = {
    "eager_reference": "reference.fused_linear_mtt_loss: logits materialized, plain PyTorch, autograd",
    "eager_mtt_loss": "logits materialized (h W^T), then fastmtt.mtt_loss",
    "fused_chunked": "fastmtt.fused_linear_mtt_loss, backend='torch' (chunked)",
}
HEADS = {
    "frozen_head": "weight frozen (LoRA elsewhere): gradient for hidden only",
    "trained_head": "weight and bias trained: gradients for hidden, weight, bias",
    "lora_head": "frozen weight + LoRA r=16 on the head: gradients for hidden, lora_A, lora_B",
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(case: str, head: str, rows: int, hidden_size: int, vocab: int, repeats: int) -> dict:
    import torch

    import fastmtt
    from fastmtt import reference

    torch.manual_seed(0)
    hidden = torch.randn(rows, hidden_size).requires_grad_()
    base_hidden = torch.randn(rows, hidden_size)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_(head == "trained_head")
    head_args = {}
    if head == "trained_head":
        head_args["bias"] = torch.zeros(vocab).requires_grad_()
    if head == "lora_head":
        head_args["lora_A"] = (torch.randn(16, hidden_size) / hidden_size**0.5).requires_grad_()
        head_args["lora_B"] = (torch.randn(vocab, 16) * 0.01).requires_grad_()
    labels = torch.randint(0, vocab, (rows,))
    labels[: rows // 10] = -100

    def step():
        if case == "fused_chunked":
            loss = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, **head_args, backend="torch")
        elif case == "eager_reference":
            loss = reference.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, **head_args,
                                                   lam=fastmtt.DEFAULT_LAM).loss
        else:
            logits = reference.linear_logits(hidden, weight, **head_args)
            with torch.no_grad():
                base_logits = reference.linear_logits(base_hidden, weight, bias=head_args.get("bias"))
            loss = fastmtt.mtt_loss(logits, base_logits, labels, backend="torch")
        loss.backward()
        for t in (hidden, weight, *head_args.values()):
            t.grad = None

    before = _rss_kib("VmRSS")
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return dict(case=case, head=head, seconds=statistics.median(wall), cpu_seconds=statistics.median(cpu),
                peak_mib=(_rss_kib("VmHWM") - before) / 1024, threads=torch.get_num_threads())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--one", nargs=2, metavar=("CASE", "HEAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.rows, args.hidden, args.vocab, args.repeats)
    if args.one:
        print(json.dumps(run_case(*args.one, *shape)))
        return 0

    print(f"N={args.rows} H={args.hidden} V={args.vocab} fp32, forward+backward, median of {args.repeats}; "
          "memory = peak RSS of a subprocess per case minus its RSS before the first run")
    print(f"{'head':<13} {'case':<16} {'wall s':>8} {'x eager':>8} {'cpu s':>8} {'x eager':>8} "
          f"{'peak MiB':>9} {'x eager':>8}")
    for head in args.heads:
        results = {}
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--hidden", str(args.hidden),
                                  "--vocab", str(args.vocab), "--repeats", str(args.repeats),
                                  "--one", case, head], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"case {case} / {head} failed:\n{out.stderr}")
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
        eager = results["eager_reference"]
        for case, r in results.items():
            print(f"{head:<13} {case:<16} {r['seconds']:8.2f} {r['seconds'] / eager['seconds']:8.2f} "
                  f"{r['cpu_seconds']:8.2f} {r['cpu_seconds'] / eager['cpu_seconds']:8.2f} "
                  f"{r['peak_mib']:9.1f} {r['peak_mib'] / eager['peak_mib']:8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
