"""MTTObjective's every-position KL (kl_positions="all"): one fused call with `ce_rows` against the two calls
it replaced (labelled rows with CE, unlabelled rows with ce_weight=0), forward + backward of the head loss.

    python -m benchmarks.every_position_kl [--rows 4096] [--hidden 512] [--vocab 32000] [--repeats 5]

Prints a markdown table (median time: the process's CPU time on the CPU, wall time on CUDA; the speed-up;
the largest difference of the loss and of the hidden gradient between the two). CPU by default (the PyTorch
path); on CUDA it times the Triton row kernel.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastmtt.head import LinearHead
from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss_with_options
from fastmtt.options import MTTOptions


def inputs(rows, hidden, vocab, labelled_fraction, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, hidden, generator=g, device=device, dtype=dtype)
    base = h + 0.1 * torch.randn(rows, hidden, generator=g, device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=g, device=device, dtype=dtype) / hidden**0.5
    targets = torch.randint(0, vocab, (rows,), generator=g, device=device)
    ce_rows = torch.arange(rows, device=device) >= int(rows * (1 - labelled_fraction))  # a prompt, then labels
    return h, base, weight, targets, ce_rows


def one_call(h, base, weight, targets, ce_rows, options):
    return fused_linear_mtt_loss_with_options(h, base, LinearHead(weight), targets, options, ce_rows=ce_rows,
                                              num_items_in_batch=ce_rows.sum(), return_components=True)


def two_calls(h, base, weight, targets, ce_rows, options):
    """The objective before: one call per kind of row."""
    count = ce_rows.sum()
    outputs = [fused_linear_mtt_loss_with_options(h[rows], base[rows], LinearHead(weight), targets[rows],
                                                  options.replace(ce_weight=weight_of_ce), num_items_in_batch=count,
                                                  return_components=True)
               for rows, weight_of_ce in ((ce_rows, 1.0), (~ce_rows, 0.0))]
    return [a + b for a, b in zip(*outputs)]


def timed(fns, args, repeats):
    """[(median seconds of forward + backward, loss, hidden gradient)] of each fn, the runs interleaved (so a
    change in the machine's load hits both alike): CPU time of this process on the CPU, wall time on CUDA."""
    clock = time.perf_counter if args[0].is_cuda else time.process_time
    times, results = [[] for _ in fns], [None] * len(fns)
    for repeat in range(repeats + 1):
        for index in (range(len(fns)) if repeat % 2 else reversed(range(len(fns)))):
            h = args[0].detach().requires_grad_(True)
            start = clock()
            loss = fns[index](h, *args[1:])[0]
            loss.backward()
            if h.is_cuda:
                torch.cuda.synchronize()
            times[index].append(clock() - start)
            results[index] = loss.detach(), h.grad
    return [(statistics.median(t[1:]), *result) for t, result in zip(times, results)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--labelled", type=float, default=0.5, help="fraction of rows with a label")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tensors = inputs(args.rows, args.hidden, args.vocab, args.labelled, device, dtype)
    options = MTTOptions(lam=0.3)
    before, after = timed((two_calls, one_call), (*tensors, options), args.repeats)
    print(f"N={args.rows} H={args.hidden} V={args.vocab} labelled={args.labelled} {device} {dtype} "
          f"threads={args.threads}, forward + backward, median of {args.repeats} "
          f"({'wall' if device == 'cuda' else 'CPU'} time)\n")
    print("| head loss | ms | speed-up |\n|---|---|---|")
    print(f"| two calls (before) | {before[0] * 1e3:.1f} | 1.00 |")
    print(f"| one call, ce_rows (after) | {after[0] * 1e3:.1f} | {before[0] / after[0]:.2f} |")
    print(f"\nmax |loss difference| {(before[1] - after[1]).abs().item():.2e}, "
          f"max |dh difference| {(before[2] - after[2]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
