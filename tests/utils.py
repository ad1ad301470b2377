"""Shared test utilities: dtypes and tolerances, the parity rule, input builders for every op, tiny PEFT models,
and the one place where tests reach into fastmtt's internals (row implementations, kernel tiling)."""
import gc
import pathlib

import torch
import torch.distributed as dist
import torch.multiprocessing
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Absolute slack on top of the same-dtype PyTorch error (CCE rule), per dtype, times max(1, max |truth|).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}

IGNORE_INDEX = -100


# --- the parity rule -------------------------------------------------------------------------------------------

def assert_parity(name, got, same_dtype, truth, dtype):
    """Cut Cross-Entropy's rule, entry by entry: |truth - got| <= |truth - same_dtype| + tol wherever truth is
    finite, with tol = TOLERANCE[dtype] * max(1, max |truth|); elsewhere got must equal truth (same inf, NaN).

    got: our result; same_dtype: plain PyTorch in the working dtype; truth: the fp64 reference.
    """
    got, same_dtype, truth = (t.detach().double() for t in (got, same_dtype, truth))
    shapes = got.shape, same_dtype.shape, truth.shape
    assert shapes[0] == shapes[1] == shapes[2], f"{name}: shapes differ {shapes}"
    finite = truth.isfinite()
    assert torch.equal(got.isfinite(), finite), f"{name}: non-finite pattern differs"
    assert torch.equal(got[~finite].nan_to_num(), truth[~finite].nan_to_num()), f"{name}: non-finite values differ"
    if not finite.any():
        return
    truth, got, same_dtype = truth[finite], got[finite], same_dtype[finite]
    tol = TOLERANCE[dtype] * max(1.0, truth.abs().max().item())
    err = (got - truth).abs()
    allowed = (same_dtype - truth).abs().nan_to_num(nan=float("inf")) + tol
    bad = err > allowed
    if bad.any():
        worst = (err - allowed).argmax()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} entries beyond torch's error + tol ({tol:.3g}); worst: "
            f"truth {truth[worst].item():.6g}, ours {got[worst].item():.6g} (error {err[worst].item():.3g}), "
            f"torch {same_dtype[worst].item():.6g} (error {(same_dtype - truth).abs()[worst].item():.3g})")


def assert_parity_relative_to_scale(name, got, same_dtype, truth, rel=1e-3):
    """The parity rule with tol = rel * max |truth| (for values far below 1, where TOLERANCE's floor of
    max(1, max |truth|) would admit anything)."""
    got, same_dtype, truth = (t.detach().double() for t in (got, same_dtype, truth))
    err, allowed = (got - truth).abs(), (same_dtype - truth).abs() + rel * truth.abs().max()
    assert bool((err <= allowed).all()), f"{name}: worst excess {(err - allowed).max().item():.3g}"


# --- input builders --------------------------------------------------------------------------------------------

def mtt_inputs(n_rows, vocab, dtype, *, base_dtype=None, seed=0, ignore_fraction=0.25, spread=4.0,
               confident_rows=0, padded_columns=0, device="cpu"):
    """Random (logits [N, V], base_logits [N, V], labels [N]) for the logits op.

    The base is related to the adapted logits. About `ignore_fraction` of the rows are ignored; when N > 2,
    rows 0 and 1 target 0 and V - 1 (the last unpadded column). Rows 2 .. 2 + confident_rows - 1 are
    confident (their target logit raised by 40, p_y -> 1). The last `padded_columns` columns are -inf in both
    inputs (a padded vocabulary) and never targeted.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n_rows, vocab, generator=gen, device=device) * spread
    base = torch.randn(n_rows, vocab, generator=gen, device=device) * spread + 0.5 * logits
    real_vocab = vocab - padded_columns
    labels = torch.randint(0, real_vocab, (n_rows,), generator=gen, device=device)
    labels[torch.rand(n_rows, generator=gen, device=device) < ignore_fraction] = IGNORE_INDEX
    if n_rows > 2:
        labels[0], labels[1] = 0, real_vocab - 1
    confident = torch.arange(2, max(2, min(n_rows, 2 + confident_rows)), device=device)
    logits[confident, labels[confident].clamp(min=0)] += 40.0
    logits[:, real_vocab:] = float("-inf")
    base[:, real_vocab:] = float("-inf")
    return logits.to(dtype), base.to(base_dtype or dtype), labels


def offset_close_rows(n_rows, vocab, seed, *, offset=-100.0, noise=1e-3):
    """(logits, base_logits, labels) fp32 where the KL nearly cancels: GPT-2-like base logits 2 randn + offset,
    the adapted ones base + noise * randn (KL ~ noise^2 / 2 ~ 5e-7)."""
    gen = torch.Generator().manual_seed(seed)
    base = 2.0 * torch.randn(n_rows, vocab, generator=gen) + offset
    logits = base + noise * torch.randn(n_rows, vocab, generator=gen)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    labels[0], labels[-1] = 0, vocab - 1
    return logits, base, labels


# Slack on a KL of ~5e-7 (offset_close_rows): 10%; the former form from absolute logits erred by ~100%.
CLOSE_KL_TOLERANCE = 5e-8


def assert_kl_at_least_as_accurate(got, naive, truth):
    """Per row: |truth - got| <= |truth - naive fp32| + CLOSE_KL_TOLERANCE, and got >= 0."""
    got, naive, truth = (t.detach().double() for t in (got, naive, truth))
    assert bool((got >= 0).all()), f"negative KL {got.min().item():.3g}"
    err, allowed = (got - truth).abs(), (naive - truth).abs() + CLOSE_KL_TOLERANCE
    worst = (err - allowed).argmax()
    assert bool((err <= allowed).all()), (f"KL row {worst.item()}: truth {truth[worst].item():.4g}, ours "
                                          f"{got[worst].item():.4g}, naive fp32 {naive[worst].item():.4g}")


FUSED_LINEAR_GRADS = ("hidden", "weight", "bias", "lora_A", "lora_B")


def fused_linear_inputs(seed, *, n_rows=37, vocab=97, hidden=24, rank=4, bias=False, lora=False, weight_grad=False,
                        ignored=5, device="cpu"):
    """fp32 inputs of the fused-linear op with realistic logit sizes: (inputs, labels, trainable).

    inputs: hidden, base_hidden (a related base model) [N, H], weight [V, H], optionally bias [V] and
    lora_A [R, H], lora_B [V, R]. labels [N]: rows 0 and 1 target 0 and V-1, the next `ignored` rows are
    ignored. trainable: the names that get gradients (weight only with weight_grad).
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    inputs = dict(hidden=randn(n_rows, hidden), base_hidden=randn(n_rows, hidden),
                  weight=randn(vocab, hidden) * (2.0 / hidden**0.5))
    inputs["base_hidden"] = 0.7 * inputs["hidden"] + 0.5 * inputs["base_hidden"]
    if bias:
        inputs["bias"] = randn(vocab)
    if lora:
        inputs["lora_A"] = randn(rank, hidden) / hidden**0.5
        inputs["lora_B"] = randn(vocab, rank)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen, device=device)
    labels[:2] = torch.tensor([0, vocab - 1], device=device)
    labels[2:2 + ignored] = IGNORE_INDEX
    trainable = {"hidden", "bias", "lora_A", "lora_B"} | ({"weight"} if weight_grad else set())
    return inputs, labels, trainable


def confident_hidden_states(n_rows, hidden_size, vocab, seed):
    """Hidden states whose target logits stand ~20 nats above logits of std ~1, targets among a few frequent
    tokens at both ends of the vocabulary, and a base model close to the adapted one."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
    frequent = torch.cat([torch.arange(0, 8), torch.arange(vocab - 8, vocab)])
    labels = frequent[torch.randint(0, len(frequent), (n_rows,), generator=gen)]
    direction = weight[labels] / weight[labels].norm(dim=1, keepdim=True) ** 2
    hidden = 20.0 * direction + torch.randn(n_rows, hidden_size, generator=gen) * 0.5
    base_hidden = hidden + 0.02 * torch.randn(n_rows, hidden_size, generator=gen)
    return hidden, base_hidden, weight, labels


def lora_linear_inputs(lead, in_features, out_features, rank, dtype, *, lora_dtype=None, bias=True, seed=0,
                       device="cpu"):
    """x [*lead, in], weight [out, in], lora_A [R, in], lora_B [out, R], bias [out] or None; unit-variance
    outputs. The adapters are in lora_dtype (default: dtype)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, to=dtype):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(to)

    return dict(
        x=randn(*lead, in_features),
        weight=randn(out_features, in_features, scale=in_features**-0.5),
        lora_A=randn(rank, in_features, scale=in_features**-0.5, to=lora_dtype or dtype),
        lora_B=randn(out_features, rank, scale=rank**-0.5, to=lora_dtype or dtype),
        bias=randn(out_features) if bias else None,
    )


def kl_part_of_gradient(loss_at, x):
    """The regularizer's share of dL/dx, fp64: the gradient at lam = 1 minus the gradient at lam = 0.

    loss_at(leaf, lam) -> the loss (a tensor or an MTTOutput) at a fresh leaf copy of x.
    """
    grads = []
    for lam in (1.0, 0.0):
        leaf = x.detach().clone().requires_grad_(True)
        out = loss_at(leaf, lam)
        (out if torch.is_tensor(out) else out.loss).backward()
        grads.append(leaf.grad.double())
    return grads[0] - grads[1]


# --- tiny models -----------------------------------------------------------------------------------------------

VOCAB = 37  # not a power of two
TINY_LLAMA = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0, dtype=torch.float32, **config):
    """A randomly initialized LlamaForCausalLM of TINY_LLAMA's shape, `config` overriding it."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, **config})).to(dtype)


def tiny_gpt2(seed=0, **config):
    """A randomly initialized GPT2LMHeadModel (Conv1D layers, [in, out] weights)."""
    import transformers

    settings = dict(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=4)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **config}))


def tiny_peft(target_modules=("q_proj", "v_proj", "lm_head"), seed=0, *, base=None, r=4, lora_alpha=8,
              randomize=False, **lora):
    """PEFT LoRA (scaling lora_alpha / r = 2) on `base` (default: tiny_llama(seed)), adapters initialized
    randomly, not as the identity; randomize=True redraws every trainable tensor (biases included)."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), init_lora_weights=False,
                             **lora)
    model = peft.get_peft_model(tiny_llama(seed) if base is None else base, config)
    if randomize:
        randomize_trainable(model)
    return model


def randomize_trainable(model, seed=1):
    """Fresh nonzero values for every trainable tensor (lora_B included, so the LoRA term is live)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def trainable_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def token_ids(shape=(2, 9), vocab=VOCAB, seed=2):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def padded_batch(seed=1, batch=3, length=12):
    """Right-padded batch with -100 on padding and on a prompt prefix; target ids include 0 and V-1."""
    input_ids = token_ids((batch, length), seed=seed)
    input_ids[0, 3], input_ids[1, 4] = 0, VOCAB - 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[0, :5] = IGNORE_INDEX
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


# --- internals: the only calls past the public API (adapt here when their signatures change) --------------------

ROW_IMPLEMENTATIONS = ("torch", "triton")


def implementation(op, backend):
    """fastmtt's row function `op` ("mtt_rows", "mtt_partials" or "mtt_gradient") on backend "torch" or
    "triton", as the ops call it (fastmtt/rows.py)."""
    import functools

    import fastmtt.rows

    return functools.partial(getattr(fastmtt.rows, op), backend=backend)


def mtt_rows(backend, logits, base, labels, *, grad_out=None, **options):
    """Per-row (ce, kl) straight from a backend's row implementation, past every argument check (as under
    torch.compile); writes dL_i/dlogits into grad_out if given. options: MTTOptions' fields (lam defaults to 1)."""
    from fastmtt.options import MTTOptions
    from fastmtt.partials import CE, KL

    stats = implementation("mtt_rows", backend)(logits, base, labels, MTTOptions(**{"lam": 1.0, **options}),
                                                need_kl=True, grad_out=grad_out)
    return stats[CE], stats[KL]


def spy_on_row_gradients(monkeypatch):
    """Records the grad_out argument of every call of a row implementation made by mtt_loss."""
    import fastmtt.ops.mtt_loss as op

    seen = []
    real = op.mtt_rows
    monkeypatch.setattr(op, "mtt_rows", lambda *args, **kwargs: seen.append(kwargs["grad_out"]) or real(*args,
                                                                                                          **kwargs))
    return seen


def triton_dropout_mask(shape, dropout_p, seed=None, device="cpu"):
    """The keep mask (bool [rows, in_features]) of lora_linear's Triton path for a dropout seed; by default the
    seed that lora_linear draws next under the current torch seed."""
    from fastmtt.kernels.lora_linear import draw_dropout_seed, dropout_mask_triton

    return dropout_mask_triton(shape, dropout_p, draw_dropout_seed() if seed is None else seed, device)


def use_small_lora_tiles(monkeypatch):
    """16-wide tiles in lora_linear's Triton kernels: several row/column tiles, reduction steps and row splits."""
    from fastmtt.kernels import lora_linear as kernels

    monkeypatch.setattr(kernels, "_gemm_blocks", lambda *args: (16, 16, 16, 1, 1))
    monkeypatch.setattr(kernels, "_project_blocks", lambda *args: (16, 16, 1))
    monkeypatch.setattr(kernels, "_weight_grad_blocks", lambda *args: (16, 16, 1, 3))


def lora_max_rank():
    from fastmtt.kernels.lora_linear import MAX_RANK

    return MAX_RANK


WORLD = 2  # processes in the gloo tests


def launch_gloo(worker, tmp_path, *args):
    """Run worker(rank, rendezvous, out_dir, *args) on WORLD processes; the ranks' saved `rank{r}.pt` results.
    Processes start from a forkserver that has imported the worker's module: fast, and never forked from a
    process whose OpenMP threads have run (a fork from the test process can hang there)."""
    torch.multiprocessing.get_context("forkserver").set_forkserver_preload([worker.__module__])
    torch.multiprocessing.start_processes(worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), *args),
                                          nprocs=WORLD, start_method="forkserver")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def init_gloo(rank, rendezvous, backend="gloo"):
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)


def close_gloo():
    """Let every rank's pending work finish and free what holds the group (DDP's reducer) before it goes:
    destroying it from a frame teardown can deadlock (the gloo thread's last work item waits for the GIL the
    joining thread holds), and a process leaving with the group alive aborts in gloo's thread destructor."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


class HostReads(TorchDispatchMode):
    """Counts the ops that read device values on the host (a sync on CUDA) while active, as `reads`:
    (op, fastmtt file:line) pairs. Use with the Triton backend (the kernels' host code is the CUDA path's)
    and `fastmtt.reduction.reads_are_free` patched to False (CPU-only shortcuts read, the GPU path does not)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2",
               "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.SYNCING:
            import traceback

            frames = [f for f in traceback.extract_stack() if "/fastmtt/" in f.filename or "/kernels/" in f.filename]
            self.reads.append((name, f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"))
        return func(*args, **(kwargs or {}))
