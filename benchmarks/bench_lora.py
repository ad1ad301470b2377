"""LoRA linear benchmarks (recorded, not asserted).

CPU:  pytest benchmarks/bench_lora.py --benchmark-timer=time.process_time --benchmark-columns=min,median,rounds
      One thread, CPU time (stable on a shared machine). Forward + backward of one LoRA linear
      (PEFT-style eager ops versus lora_linear) and of a tiny PEFT Llama (LoRA on q/k/v/o and the MLP)
      with PEFT's eager LoRA versus patch_lora; on CPU the fused op runs its PyTorch path.
GPU:  from benchmarks.bench_lora import bench_lora_linear_gpu; print(bench_lora_linear_gpu())
"""
import pytest
import torch

MODEL_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4)
BATCH, SEQ, RANK = 4, 128, 16


def tiny_peft_llama(lora_dropout=0.0):
    from tests.utils import LLAMA_TARGETS, tiny_llama, tiny_peft

    base = tiny_llama(vocab_size=512, max_position_embeddings=SEQ, **MODEL_SHAPE)
    return tiny_peft(LLAMA_TARGETS, base=base, r=RANK, lora_alpha=2 * RANK, lora_dropout=lora_dropout)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
@pytest.mark.parametrize("variant", ["peft_eager", "fastmtt_patched"])
def test_tiny_llama_forward_backward_cpu(benchmark, variant, lora_dropout):
    from fastmtt.peft import patch_lora

    model = tiny_peft_llama(lora_dropout).train()
    if variant == "fastmtt_patched":
        assert patch_lora(model) == 14
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    train_step(model, ids)  # warm-up
    benchmark.group = f"tiny-llama fwd+bwd, lora_dropout={lora_dropout}"
    benchmark.pedantic(train_step, args=(model, ids), rounds=12, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("variant", ["eager", "lora_linear"])
def test_lora_layer_forward_backward_cpu(benchmark, variant):
    import torch.nn.functional as F

    from fastmtt.ops.lora_linear import lora_linear

    tokens, in_features, out_features = BATCH * SEQ, MODEL_SHAPE["hidden_size"], MODEL_SHAPE["intermediate_size"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=gen).requires_grad_()
    weight = torch.randn(out_features, in_features, generator=gen)
    lora_A = torch.randn(RANK, in_features, generator=gen).requires_grad_()
    lora_B = torch.randn(out_features, RANK, generator=gen).requires_grad_()
    dy = torch.randn(tokens, out_features, generator=gen)

    def forward():
        if variant == "eager":
            return F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * 2.0
        return lora_linear(x, weight, lora_A, lora_B, 2.0)

    benchmark.group = f"lora layer fwd+bwd [{tokens}x{in_features}] -> {out_features}, r={RANK}"
    benchmark.pedantic(lambda: torch.autograd.grad(forward(), (x, lora_A, lora_B), dy),
                       rounds=40, iterations=1, warmup_rounds=3)


def bench_lora_linear_gpu(tokens=8192, in_features=4096, out_features=4096, rank=16, dtype=torch.bfloat16,
                          dropout_p=0.0, lora_dtype=None):
    """Milliseconds for forward+backward of one LoRA linear on CUDA: fused Triton vs PEFT-style eager.
    Returns {"fused_ms": ..., "eager_ms": ..., "fused_fwd_ms": ..., "eager_fwd_ms": ...}."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from fastmtt.ops.lora_linear import lora_linear

    device = "cuda"
    lora_dtype = lora_dtype or dtype
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features**0.5
    lora_A = (torch.randn(rank, in_features, device=device, dtype=lora_dtype) / in_features**0.5).requires_grad_()
    lora_B = (torch.randn(out_features, rank, device=device, dtype=lora_dtype) / rank**0.5).requires_grad_()
    dy = torch.randn(tokens, out_features, device=device, dtype=dtype)

    def fused():
        return lora_linear(x, weight, lora_A, lora_B, 2.0, dropout_p=dropout_p, backend="triton")

    def eager():
        x_lora = F.dropout(x.to(lora_dtype), dropout_p)
        return (F.linear(x, weight) + F.linear(F.linear(x_lora, lora_A), lora_B) * 2.0).to(dtype)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), (x, lora_A, lora_B), dy)

    with torch.no_grad():
        fused_fwd, eager_fwd = do_bench(fused), do_bench(eager)
    return {"fused_ms": do_bench(step(fused)), "eager_ms": do_bench(step(eager)),
            "fused_fwd_ms": fused_fwd, "eager_fwd_ms": eager_fwd}
