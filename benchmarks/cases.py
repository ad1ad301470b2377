"""Operation registry: for each op, its inputs, the implementations compared and the sizes swept.

One registry drives the CPU sweep and the GPU sweep (`python -m benchmarks`, `benchmarks/gpu_check.sh`)
and the pytest-benchmark file (`benchmarks/test_ops_benchmark.py`). An implementation whose package,
fastmtt entry point or keyword is missing is skipped with the reason, so a path that lands later joins
the sweep with one line here (for fused_linear_mtt_loss: one row of FUSED_LINEAR_VARIANTS).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fastmtt
from fastmtt import _dispatch, reference

LAM = 1.0
IGNORED_FRACTION = 0.05
LORA_SCALING = 2.0
HEAD_LORA_RANK = 16
MODES = ("forward", "backward", "forward+backward")
# Checks run through the same cases but report a finding instead of a time.
CHECKS = ("determinism",)
ROLES = ("fastmtt", "floor", "reference", "compiled", "peer")

# (bytes moved, flops) of one step at these sizes, mode and element size: the minimal work of the op.
WorkModel = Callable[[Dict[str, object], str, int], Tuple[float, float]]


@dataclass(frozen=True)
class Config:
    """One point of a sweep: (name, value) pairs in display order (sizes, a dropout rate, a head kind),
    and the dtype."""

    sizes: Tuple[Tuple[str, object], ...]
    dtype: torch.dtype

    @property
    def size_dict(self) -> Dict[str, object]:
        return dict(self.sizes)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.sizes)


@dataclass(frozen=True)
class Impl:
    """An implementation: build(inputs) returns a zero-argument forward (it may swap the inputs' leaves
    for its own parameters). unavailable(device) says why it cannot run there, unsupported(sizes) why
    it cannot run one config (None when it can). `work` overrides the op's work model (floors do less).
    `agrees_with` names the implementation whose value and gradients it must reproduce (tested)."""

    name: str
    role: str
    build: Callable[[dict], Callable[[], torch.Tensor]]
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    unsupported: Callable[[Dict[str, object]], Optional[str]] = lambda sizes: None
    work: Optional[WorkModel] = None
    agrees_with: Optional[str] = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")


@dataclass(frozen=True)
class Op:
    """make_inputs(sizes, dtype, device) -> dict of tensors (and a model, for a training step); every
    tensor or model parameter that requires grad is a leaf. `modes`: the timed modes that mean something
    for this op. work: the op's minimal work, None where no roofline applies."""

    name: str
    make_inputs: Callable[[Dict[str, object], torch.dtype, torch.device], dict]
    impls: Tuple[Impl, ...]
    work: Optional[WorkModel]
    presets: Dict[str, Tuple[Config, ...]] = field(default_factory=dict)
    modes: Tuple[str, ...] = MODES

    def impl(self, name: str) -> Impl:
        return next(impl for impl in self.impls if impl.name == name)

    @property
    def size_keys(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(key for configs in self.presets.values() for c in configs for key, _ in c.sizes))


def _configs(dtype, keys, *points):
    return tuple(Config(tuple(zip(keys, point)), dtype) for point in points)


def _generator(device):
    return torch.Generator(device=device).manual_seed(0)


def _randn(*shape, dtype, device, generator, scale=1.0):
    """Normal entries drawn where they live (a CPU draw of a GPU-sized tensor would take seconds)."""
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype).mul_(scale)


def _labels(n_rows, n_cols, device, generator):
    labels = torch.randint(0, n_cols, (n_rows,), generator=generator, device=device)
    return labels.masked_fill_(torch.rand(n_rows, generator=generator, device=device) < IGNORED_FRACTION, -100)


def _import_problem(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except ImportError as error:
        missing = error.name is not None and module.split(".")[0] == error.name
        return f"{error.name} is not installed" if missing else f"{module} does not import: {error}"
    except Exception as error:  # a package built for other versions can fail in any way at import
        return f"{module} does not import: {type(error).__name__}: {error}"
    return None


def _module_missing(module: str, needs_cuda: bool = False):
    def unavailable(device):
        if needs_cuda and device.type != "cuda":
            return f"{module} runs on CUDA only"
        return _import_problem(module)

    return unavailable


def _fastmtt_missing(attribute: str, backend: Optional[str] = None, keywords=(), needs_cuda: bool = False):
    def unavailable(device):
        function = getattr(fastmtt, attribute, None)
        if function is None:
            return f"fastmtt.{attribute} is not in this build"
        if backend is not None and backend not in _dispatch.BACKENDS:
            return f"fastmtt has no backend={backend!r} in this build"
        missing = [key for key in keywords if key not in inspect.signature(function).parameters]
        if missing:
            return f"fastmtt.{attribute} has no keyword {', '.join(missing)} in this build"
        if needs_cuda and device.type != "cuda" and not _dispatch.interpreting():
            return f"fastmtt.{attribute}(backend={backend!r}) runs on CUDA (or with TRITON_INTERPRET=1) only"
        return None

    return unavailable


def _fastmtt_variants(attribute, variants, build, agrees_with):
    """One Impl per (name, backend, keywords) row of `variants`: fastmtt.<attribute>(..., backend=backend,
    **keywords) through build(backend, keywords); a row whose keyword this build lacks is skipped."""
    return tuple(Impl(name, "fastmtt", build(backend, keywords),
                      _fastmtt_missing(attribute, backend, tuple(keywords), needs_cuda=backend == "triton"),
                      agrees_with=agrees_with)
                 for name, backend, keywords in variants)


def _frozen_head_only(sizes):
    return None if sizes.get("head", "frozen") == "frozen" else "frozen output head only"


# --- MTT loss on materialized logits -------------------------------------------------------------

def _mtt_inputs(sizes, dtype, device):
    gen = _generator(device)
    n_rows, n_cols = sizes["N"], sizes["V"]
    logits = _randn(n_rows, n_cols, dtype=dtype, device=device, generator=gen, scale=2.0).requires_grad_()
    base = _randn(n_rows, n_cols, dtype=dtype, device=device, generator=gen, scale=2.0)
    return dict(logits=logits, base_logits=base, labels=_labels(n_rows, n_cols, device, gen))


def _mtt_reference_loss(logits, base_logits, labels):
    return reference.mtt_loss(logits, base_logits, labels, lam=LAM).loss


def _mtt_reference(inputs):
    return lambda: _mtt_reference_loss(**inputs)


def _mtt_compiled(inputs):
    loss = torch.compile(_mtt_reference_loss)
    return lambda: loss(**inputs)


def _mtt_fastmtt(inputs):
    return lambda: fastmtt.mtt_loss(inputs["logits"], inputs["base_logits"], inputs["labels"], lam=LAM)


def _mtt_work(sizes, mode, element_size):
    """Reads of both logit rows (forward) and the gradient write (backward); flops are negligible."""
    logits_bytes = sizes["N"] * sizes["V"] * element_size
    return {"forward": 2, "backward": 1, "forward+backward": 3}[mode] * logits_bytes, 0.0


MTT_LOSS = Op(
    name="mtt_loss",
    make_inputs=_mtt_inputs,
    impls=(
        Impl("fastmtt", "fastmtt", _mtt_fastmtt, agrees_with="reference (eager)"),
        Impl("torch.compile(reference)", "compiled", _mtt_compiled, agrees_with="reference (eager)"),
        Impl("reference (eager)", "reference", _mtt_reference),
    ),
    work=_mtt_work,
    presets={
        "tiny": _configs(torch.float32, ("N", "V"), (64, 256), (96, 1000)),
        "cpu": _configs(torch.float32, ("N", "V"), (512, 8000), (512, 32000), (2048, 32000)),
        # Issue 12: N in {1024, 8192}, V in {32000, 128256}, bf16 then fp32, the target shape first.
        "gpu": tuple(config for dtype in (torch.bfloat16, torch.float32) for config in _configs(
            dtype, ("N", "V"), (8192, 128256), (1024, 128256), (8192, 32000), (1024, 32000))),
    },
)


# --- MTT loss from hidden states (fused linear) ---------------------------------------------------

def _linear_inputs(sizes, dtype, device):
    """hidden, base_hidden [N, H], weight [V, H], labels [N]; head "trained" adds a bias and trains the
    weight, "lora" adds a rank-16 LoRA on the head (trained), "frozen" (default) trains neither."""
    gen = _generator(device)
    n_rows, hidden_size, vocab = sizes["N"], sizes["H"], sizes["V"]
    head = sizes.get("head", "frozen")
    randn = dict(dtype=dtype, device=device, generator=gen)
    inputs = dict(
        hidden=_randn(n_rows, hidden_size, **randn).requires_grad_(),
        base_hidden=_randn(n_rows, hidden_size, **randn),
        weight=_randn(vocab, hidden_size, **randn, scale=hidden_size ** -0.5).requires_grad_(head == "trained"),
        labels=_labels(n_rows, vocab, device, gen),
    )
    if head == "trained":
        inputs["bias"] = _randn(vocab, **randn, scale=0.1).requires_grad_()
    elif head == "lora":
        inputs["lora_A"] = _randn(HEAD_LORA_RANK, hidden_size, **randn, scale=hidden_size ** -0.5).requires_grad_()
        inputs["lora_B"] = _randn(vocab, HEAD_LORA_RANK, **randn, scale=0.01).requires_grad_()
    elif head != "frozen":
        raise ValueError(f"head must be 'frozen', 'trained' or 'lora', got {head!r}")
    return inputs


def _head(inputs) -> dict:
    head = {key: inputs[key] for key in ("bias", "lora_A", "lora_B") if key in inputs}
    return dict(head, lora_scaling=LORA_SCALING) if "lora_A" in head else head


def _linear_reference_loss(hidden, base_hidden, weight, labels, **head):
    """Materialized logits softcap(h W^T + bias + s (h A^T) B^T), then the MTT spec, in the inputs' dtype."""
    return reference.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, lam=LAM, **head).loss


def _linear_reference(inputs):
    return lambda: _linear_reference_loss(inputs["hidden"], inputs["base_hidden"], inputs["weight"],
                                          inputs["labels"], **_head(inputs))


def _linear_compiled(inputs):
    loss = torch.compile(_linear_reference_loss)
    return lambda: loss(inputs["hidden"], inputs["base_hidden"], inputs["weight"], inputs["labels"], **_head(inputs))


# fastmtt.fused_linear_mtt_loss(..., backend=..., **keywords), one row per path: the default (on CUDA the
# chunked path with cuBLAS slabs and the Triton row kernel), the chunked path in PyTorch, the tiled kernels.
# A path selected by a new keyword is one more row, skipped until a build has the keyword.
FUSED_LINEAR_VARIANTS = (
    ("fastmtt (default)", "auto", {}),
    ("fastmtt (chunked, torch)", "torch", {}),
    ("fastmtt (tiled)", "triton", {"tiled": True}),
)


def _linear_fastmtt(backend, keywords):
    def build(inputs):
        return lambda: fastmtt.fused_linear_mtt_loss(
            inputs["hidden"], inputs["base_hidden"], inputs["weight"], inputs["labels"], lam=LAM,
            backend=backend, **keywords, **_head(inputs))

    return build


class _ThreeGemmFloor(torch.autograd.Function):
    """The matrix products a frozen-head fused linear loss cannot avoid, and nothing else: forward forms
    the adapted and the base logits h W^T, h0 W^T ([N, V] each), backward the hidden-state gradient
    dz W with the adapted logits standing in for dz. Returns a zero scalar."""

    @staticmethod
    def forward(ctx, hidden, base_hidden, weight):
        logits = hidden @ weight.T
        torch.mm(base_hidden, weight.T)  # the base logits: their cost is the point, their value unused
        ctx.save_for_backward(logits, weight)
        return hidden.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        logits, weight = ctx.saved_tensors
        return logits @ weight, None, None


def _three_gemm_floor(inputs):
    return lambda: _ThreeGemmFloor.apply(inputs["hidden"], inputs["base_hidden"], inputs["weight"])


def _liger_ce(inputs):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda: loss(inputs["weight"], inputs["hidden"], inputs["labels"])


def _liger_distillation(inputs):
    """Liger's chunked fused linear distillation loss: CE + LAM * KL(teacher || student) per token over the
    full vocabulary (beta=0 picks that KL: MTT's default direction, without removing the target), the
    base pass as teacher through the same head. compiled=True (Liger's default) on CUDA."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=LAM, beta=0.0,
                                   compiled=inputs["hidden"].is_cuda)
    return lambda: loss(inputs["hidden"], inputs["weight"], inputs["base_hidden"], inputs["weight"], inputs["labels"])


def _cut_cross_entropy(inputs):
    from cut_cross_entropy import linear_cross_entropy

    return lambda: linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"])


def _linear_work(sizes, mode, element_size, matmuls_forward=2):
    """Flops of the logit matmuls: `matmuls_forward` of 2NHV forward (adapted and base), one for the
    hidden-state gradient; bytes: hidden states and W read once (the logits need never exist)."""
    n_rows, hidden, vocab = sizes["N"], sizes["H"], sizes["V"]
    matmul = 2.0 * n_rows * hidden * vocab
    reads = (2 * n_rows * hidden + vocab * hidden) * element_size
    matmuls = {"forward": matmuls_forward, "backward": 1, "forward+backward": matmuls_forward + 1}[mode]
    return reads, matmuls * matmul


def _ce_only_work(sizes, mode, element_size):
    return _linear_work(sizes, mode, element_size, matmuls_forward=1)


FUSED_LINEAR_MTT_LOSS = Op(
    name="fused_linear_mtt_loss",
    make_inputs=_linear_inputs,
    impls=(
        *_fastmtt_variants("fused_linear_mtt_loss", FUSED_LINEAR_VARIANTS, _linear_fastmtt, "reference (eager)"),
        Impl("3-GEMM floor", "floor", _three_gemm_floor, unsupported=_frozen_head_only),
        Impl("reference (eager)", "reference", _linear_reference),
        Impl("Liger fused linear CE (CE only)", "peer", _liger_ce,
             _module_missing("liger_kernel.transformers", needs_cuda=True), _frozen_head_only, _ce_only_work),
        Impl("Cut Cross-Entropy (CE only)", "peer", _cut_cross_entropy,
             _module_missing("cut_cross_entropy", needs_cuda=True), _frozen_head_only, _ce_only_work),
        Impl("Liger fused linear distillation (CE + KL)", "peer", _liger_distillation,
             _module_missing("liger_kernel.chunked_loss"), _frozen_head_only),
        Impl("torch.compile(reference)", "compiled", _linear_compiled, agrees_with="reference (eager)"),
    ),
    work=_linear_work,
    presets={
        "tiny": _configs(torch.float32, ("N", "H", "V", "head"), (64, 32, 256, "frozen"), (48, 32, 200, "lora")),
        "cpu": _configs(torch.float32, ("N", "H", "V", "head"), (512, 256, 8000, "frozen"),
                        (512, 256, 32000, "frozen"), (512, 1024, 32000, "frozen"), (512, 256, 32000, "lora"),
                        (512, 256, 32000, "trained")),
        # Issue 11: Llama-3 8B's head, bf16, frozen; the N=8192 target first.
        "gpu": _configs(torch.bfloat16, ("N", "H", "V", "head"), (8192, 4096, 128256, "frozen"),
                        (1024, 4096, 128256, "frozen")),
    },
)


# --- LoRA linear -----------------------------------------------------------------------------------

def _lora_inputs(sizes, dtype, device):
    gen = _generator(device)
    n_rows, d_in, d_out, rank = sizes["N"], sizes["K"], sizes["M"], sizes["r"]
    randn = dict(dtype=dtype, device=device, generator=gen)
    return dict(
        x=_randn(n_rows, d_in, **randn).requires_grad_(),
        weight=_randn(d_out, d_in, **randn, scale=d_in ** -0.5),
        lora_A=_randn(rank, d_in, **randn, scale=d_in ** -0.5).requires_grad_(),
        lora_B=_randn(d_out, rank, **randn, scale=rank ** -0.5).requires_grad_(),
        dropout=float(sizes.get("dropout", 0.0)),
    )


def _peft_lora(inputs):
    """PEFT's eager LoRA layer on an nn.Linear holding `weight`, adapter weights copied in."""
    from peft import LoraConfig, get_peft_model

    weight, lora_A, lora_B = inputs["weight"], inputs["lora_A"], inputs["lora_B"]
    rank = lora_A.shape[0]
    base = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    config = LoraConfig(r=rank, lora_alpha=int(LORA_SCALING * rank), lora_dropout=inputs["dropout"],
                        target_modules=["0"])
    model = get_peft_model(base, config).to(device=weight.device, dtype=weight.dtype)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
    # Share the benchmark's leaves so gradients land where the other implementations put them.
    layer.lora_A["default"].weight = torch.nn.Parameter(lora_A.detach())
    layer.lora_B["default"].weight = torch.nn.Parameter(lora_B.detach())
    inputs["lora_A"], inputs["lora_B"] = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return lambda: model(inputs["x"])


def _plain_linear(inputs):
    return lambda: torch.nn.functional.linear(inputs["x"], inputs["weight"])


# fastmtt.lora_linear(..., backend=..., **keywords), one row per path: the default (cuBLAS on CUDA until a
# measurement puts the kernel first) and the fused Triton kernel.
LORA_VARIANTS = (
    ("fastmtt (default)", "auto", {}),
    ("fastmtt (Triton kernel)", "triton", {}),
)


def _lora_fastmtt(backend, keywords):
    def build(inputs):
        return lambda: fastmtt.lora_linear(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"],
                                           LORA_SCALING, dropout_p=inputs["dropout"], backend=backend, **keywords)

    return build


def _lora_work(sizes, mode, element_size, with_adapter=True):
    """Flops: 2NKM per dense product (x W^T forward, dY W backward for dx; W is frozen), plus the
    rank-r products of the adapter (2 forward, 4 backward); bytes: x, W and the output once."""
    n_rows, d_in, d_out, rank = sizes["N"], sizes["K"], sizes["M"], sizes["r"]
    dense = 2.0 * n_rows * d_in * d_out
    adapter = 2.0 * n_rows * rank * (d_in + d_out) if with_adapter else 0.0
    forward, backward = dense + adapter, dense + 2 * adapter
    flops = {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]
    return (n_rows * (d_in + d_out) + d_in * d_out) * element_size, flops


LORA_LINEAR = Op(
    name="lora_linear",
    make_inputs=_lora_inputs,
    impls=(
        *_fastmtt_variants("lora_linear", LORA_VARIANTS, _lora_fastmtt, "PEFT LoRA (eager)"),
        Impl("x @ W^T (floor)", "floor", _plain_linear,
             work=lambda sizes, mode, element_size: _lora_work(sizes, mode, element_size, with_adapter=False)),
        Impl("PEFT LoRA (eager)", "reference", _peft_lora, _module_missing("peft")),
    ),
    work=_lora_work,
    presets={
        "tiny": _configs(torch.float32, ("N", "K", "M", "r", "dropout"), (64, 32, 48, 4, 0.0), (32, 16, 24, 4, 0.1)),
        "cpu": _configs(torch.float32, ("N", "K", "M", "r", "dropout"), (1024, 1024, 1024, 16, 0.0),
                        (4096, 1024, 1024, 16, 0.0), (1024, 1024, 1024, 64, 0.0), (1024, 1024, 1024, 16, 0.1)),
        # Issue 12: Llama-3 8B's attention (4096x4096) and MLP (4096x14336) projections, 8192 tokens.
        "gpu": _configs(torch.bfloat16, ("N", "K", "M", "r", "dropout"),
                        *[(8192, 4096, m, r, p) for m in (4096, 14336) for r in (16, 64) for p in (0.0, 0.1)]),
    },
)


# --- A LoRA training step of a Llama-shaped model --------------------------------------------------

LLAMA_SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=512),
    # A decoder-dominated model (issue 37): SmolLM2-135M's width, 12 layers, an 8192-token vocabulary.
    "12l": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=8192),
    # Llama-3.2-1B's shape (1.2B parameters, Llama-3's 128256-token vocabulary).
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_FRACTION = 0.125  # leading positions of each sequence without a loss (labels -100)


def _llama_inputs(sizes, dtype, device):
    """A PEFT LoRA model (rank r on every projection, random weights) and a batch: B sequences of L tokens."""
    import peft
    import transformers

    shape = LLAMA_SHAPES[sizes["model"]]
    batch, length = sizes["B"], sizes["L"]
    config = transformers.LlamaConfig(max_position_embeddings=length, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        base = transformers.LlamaForCausalLM(config).to(dtype)
    lora = peft.LoraConfig(r=sizes["r"], lora_alpha=2 * sizes["r"], lora_dropout=float(sizes.get("dropout", 0.0)),
                           init_lora_weights=False, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(base, lora).train()
    input_ids = torch.randint(0, shape["vocab_size"], (batch, length), generator=_generator(device), device=device)
    labels = input_ids.clone()
    labels[:, : int(PROMPT_FRACTION * length)] = -100
    return dict(model=model, input_ids=input_ids, labels=labels)


def _train_step(objective: bool, patched: bool, cached: bool = False):
    """Forward of one batch to its loss: the model's own CE (logits materialized), or MTTObjective
    (base pass with adapters off, then the fused linear MTT loss); patched: patch_lora first; cached: the
    base states read from a BaseCache of the batch (built here, untimed) instead of the base pass."""
    def build(inputs):
        model, input_ids, labels = inputs["model"], inputs["input_ids"], inputs["labels"]
        if patched:
            from fastmtt.peft import patch_lora

            patch_lora(model)
        if objective:
            cache = None
            if cached:
                import tempfile

                inputs["cache_dir"] = tempfile.TemporaryDirectory()  # removed with the inputs
                cache = fastmtt.BaseCache.build(model, [dict(input_ids=input_ids)], inputs["cache_dir"].name,
                                                progress=False)
            mtt = fastmtt.MTTObjective(lam=LAM, base_cache=cache)
            return lambda: mtt(model, input_ids=input_ids, labels=labels).loss
        return lambda: model(input_ids=input_ids, labels=labels, use_cache=False).loss

    return build


_needs_transformers = _module_missing("transformers")
LORA_TRAIN_STEP = Op(
    name="lora_train_step",
    make_inputs=_llama_inputs,
    impls=(
        Impl("MTTObjective", "fastmtt", _train_step(objective=True, patched=False), _needs_transformers),
        Impl("MTTObjective (base cache)", "fastmtt", _train_step(objective=True, patched=False, cached=True),
             _fastmtt_missing("BaseCache"), agrees_with="MTTObjective"),
        Impl("CE (PEFT)", "reference", _train_step(objective=False, patched=False), _needs_transformers),
        Impl("patch_lora + CE", "fastmtt", _train_step(objective=False, patched=True), _needs_transformers,
             agrees_with="CE (PEFT)"),
        Impl("patch_lora + MTTObjective", "fastmtt", _train_step(objective=True, patched=True), _needs_transformers,
             agrees_with="MTTObjective"),
    ),
    work=None,
    presets={
        "tiny": _configs(torch.float32, ("model", "B", "L", "r", "dropout"), ("tiny", 2, 16, 4, 0.0)),
        "cpu": _configs(torch.float32, ("model", "B", "L", "r", "dropout"), ("small", 4, 128, 16, 0.0),
                        ("small", 4, 128, 16, 0.1), ("12l", 4, 256, 8, 0.0)),
        # Issue 11: a ~1B model, 8192 tokens; issue 12: the small model, patched against unpatched PEFT.
        "gpu": _configs(torch.bfloat16, ("model", "B", "L", "r", "dropout"), ("1b", 4, 2048, 16, 0.0),
                        ("small", 4, 128, 16, 0.0), ("small", 4, 128, 16, 0.1)),
    },
    modes=("forward+backward",),
)

OPS = {op.name: op for op in (FUSED_LINEAR_MTT_LOSS, MTT_LOSS, LORA_LINEAR, LORA_TRAIN_STEP)}
SIZE_KEYS = tuple(dict.fromkeys(key for op in OPS.values() for key in op.size_keys))


def leaves(inputs: dict) -> List[torch.Tensor]:
    """What gets a gradient: the input tensors that require one, and a model's trainable parameters."""
    found = [value for value in inputs.values() if isinstance(value, torch.Tensor) and value.requires_grad]
    if "model" in inputs:
        found += [p for p in inputs["model"].parameters() if p.requires_grad]
    return found


def prepare(op: Op, impl: Impl, config: Config, device: torch.device):
    """(inputs, forward, gradient leaves, upstream gradient) for one case; runs forward once."""
    inputs = op.make_inputs(config.size_dict, config.dtype, device)
    forward = impl.build(inputs)
    return inputs, forward, leaves(inputs), torch.ones_like(forward()).detach()


def mode_steps(forward, leaves, upstream, mode):
    """(step, setup) for one mode: forward keeps its output (as training does); backward times
    only the backward of a forward run in setup; setup also drops earlier gradients."""
    state = {}

    def clear():
        state.clear()
        for leaf in leaves:
            leaf.grad = None

    if mode == "forward":
        return lambda: state.__setitem__("out", forward()), clear
    if mode == "backward":
        def forward_untimed():
            clear()
            state["out"] = forward()

        return lambda: state["out"].backward(upstream), forward_untimed
    if mode == "forward+backward":
        return lambda: forward().backward(upstream), clear
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def determinism(forward, leaves, upstream) -> str:
    """Two forward + backward runs on the same inputs: are the gradients bitwise equal?"""
    runs = []
    for _ in range(2):
        for leaf in leaves:
            leaf.grad = None
        forward().backward(upstream)
        runs.append([leaf.grad.clone() for leaf in leaves if leaf.grad is not None])
    differences = [(a.double() - b.double()).abs().max().item() for a, b in zip(*runs) if not torch.equal(a, b)]
    if not differences:
        return "gradients bitwise equal"
    return f"gradients NOT bitwise equal (max |difference| {max(differences):.3g})"
