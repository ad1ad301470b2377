"""pytest-benchmark: fused_linear_mtt_loss against materialized-logit baselines, forward + backward.

    pytest benchmarks/bench_fused_linear.py --benchmark-only [-k cpu | -k cuda]

CPU cases: N=1024, H=512, V=32000 fp32 (the memory comparison lives in fused_linear_cpu.py).
CUDA cases: N=8192, H=4096, V=128256 bf16 (Llama-3 head); peak allocated memory goes to extra_info.
Numbers are recorded, never asserted.
"""
import pytest
import torch

import fastmtt
from fastmtt import reference

SHAPES = {"cpu": (1024, 512, 32000, torch.float32), "cuda": (8192, 4096, 128256, torch.bfloat16)}
CASES = ("eager_reference", "eager_mtt_loss", "fused")


def make_inputs(device, head):
    rows, hidden_size, vocab, dtype = SHAPES[device]
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = dict(
        hidden=torch.randn(rows, hidden_size, generator=gen, device=device, dtype=dtype).requires_grad_(),
        base_hidden=torch.randn(rows, hidden_size, generator=gen, device=device, dtype=dtype),
        weight=(torch.randn(vocab, hidden_size, generator=gen, device=device, dtype=dtype)
                / hidden_size**0.5).requires_grad_(head == "trained_head"),
    )
    if head == "lora_head":
        inputs["lora_A"] = (torch.randn(16, hidden_size, generator=gen, device=device) / hidden_size**0.5
                            ).to(dtype).requires_grad_()
        inputs["lora_B"] = (torch.randn(vocab, 16, generator=gen, device=device) * 0.01).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    labels[: rows // 10] = -100
    return inputs, labels


def step(case, inputs, labels):
    args = dict(inputs)
    hidden, base_hidden, weight = args.pop("hidden"), args.pop("base_hidden"), args.pop("weight")
    if case == "fused":
        loss = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, **args)
    elif case == "eager_reference":
        loss = reference.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, **args,
                                               lam=fastmtt.DEFAULT_LAM).loss
    else:
        logits = reference.linear_logits(hidden, weight, **args)
        with torch.no_grad():
            base_logits = reference.linear_logits(base_hidden, weight)
        loss = fastmtt.mtt_loss(logits, base_logits, labels)
    loss.backward()
    for t in inputs.values():
        t.grad = None


def run_benchmark(benchmark, device, case, head):
    inputs, labels = make_inputs(device, head)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def target():
        step(case, inputs, labels)
        sync()

    if device == "cuda":
        target()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        target()
        benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    benchmark.extra_info.update(shape=str(SHAPES[device][:3]), dtype=str(SHAPES[device][3]), head=head)
    benchmark.pedantic(target, rounds=3, warmup_rounds=1 if device == "cuda" else 0)


@pytest.mark.parametrize("head", ["frozen_head", "lora_head"])
@pytest.mark.parametrize("case", CASES)
def test_fused_linear_cpu(benchmark, case, head):
    run_benchmark(benchmark, "cpu", case, head)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head", ["frozen_head", "lora_head", "trained_head"])
@pytest.mark.parametrize("case", CASES)
def test_fused_linear_cuda(benchmark, case, head):
    run_benchmark(benchmark, "cuda", case, head)
