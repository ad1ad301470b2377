"""Operation registry: for each op, its inputs, the implementations compared and the sizes swept.

An implementation whose package or fastmtt entry point is missing is skipped with a note, so ops that
land later (fastmtt.fused_linear_mtt_loss, fastmtt.lora_linear) join the sweep without edits here.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

import fastmtt
from fastmtt import _dispatch, reference

LAM = 1.0
IGNORED_FRACTION = 0.05
LORA_SCALING = 2.0
MODES = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Config:
    """One point of a sweep: (name, size) pairs in display order, and the dtype."""

    sizes: Tuple[Tuple[str, int], ...]
    dtype: torch.dtype

    @property
    def size_dict(self) -> Dict[str, int]:
        return dict(self.sizes)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.sizes)


@dataclass(frozen=True)
class Impl:
    """An implementation: build(inputs) returns a zero-argument forward; unavailable(device) returns
    why it cannot run there (None when it can). `work` overrides the op's work model (floors do less)."""

    name: str
    role: str  # "reference", "compiled", "fastmtt" or "floor"
    build: Callable[[dict], Callable[[], torch.Tensor]]
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    work: Optional[Callable[[Dict[str, int], str, int], Tuple[float, float]]] = None


@dataclass(frozen=True)
class Op:
    """make_inputs(sizes, dtype, device) -> dict of tensors; `grad_inputs` name the leaves that get a
    gradient. work(sizes, mode, element_size) -> (minimal bytes moved, minimal flops)."""

    name: str
    make_inputs: Callable[[Dict[str, int], torch.dtype, torch.device], dict]
    grad_inputs: Tuple[str, ...]
    impls: Tuple[Impl, ...]
    work: Callable[[Dict[str, int], str, int], Tuple[float, float]]
    presets: Dict[str, Tuple[Config, ...]] = field(default_factory=dict)

    def impl(self, name: str) -> Impl:
        return next(impl for impl in self.impls if impl.name == name)


def _configs(dtype, keys, *points):
    return tuple(Config(tuple(zip(keys, point)), dtype) for point in points)


def _labels(n_rows, n_cols, device, generator):
    labels = torch.randint(0, n_cols, (n_rows,), generator=generator)
    labels[torch.rand(n_rows, generator=generator) < IGNORED_FRACTION] = -100
    return labels.to(device)


def _randn(*shape, dtype, device, generator, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


def _module_missing(module: str, needs_cuda: bool = False):
    def unavailable(device):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        if needs_cuda and device.type != "cuda":
            return f"{module} runs on CUDA only"
        return None

    return unavailable


def _fastmtt_missing(attribute: str, backend: Optional[str] = None, needs_cuda: bool = False):
    def unavailable(device):
        if not hasattr(fastmtt, attribute):
            return f"fastmtt.{attribute} is not in this build"
        if backend is not None and backend not in _dispatch.BACKENDS:
            return f"fastmtt has no backend={backend!r} in this build"
        if needs_cuda and device.type != "cuda":
            return f"fastmtt.{attribute}(backend={backend!r}) runs on CUDA only here"
        return None

    return unavailable


def _compiled(fn):
    """torch.compile of an eager forward, compiled once per implementation instance."""
    return torch.compile(fn)


# --- MTT loss on materialized logits -------------------------------------------------------------

def _mtt_inputs(sizes, dtype, device):
    gen = torch.Generator().manual_seed(0)
    n_rows, n_cols = sizes["N"], sizes["V"]
    logits = _randn(n_rows, n_cols, dtype=dtype, device=device, generator=gen, scale=2.0).requires_grad_()
    base = _randn(n_rows, n_cols, dtype=dtype, device=device, generator=gen, scale=2.0)
    return dict(logits=logits, base_logits=base, labels=_labels(n_rows, n_cols, device, gen))


def _mtt_reference(inputs):
    return lambda: reference.mtt_loss(inputs["logits"], inputs["base_logits"], inputs["labels"], lam=LAM).loss


def _mtt_compiled(inputs):
    loss = _compiled(lambda logits, base, labels: reference.mtt_loss(logits, base, labels, lam=LAM).loss)
    return lambda: loss(inputs["logits"], inputs["base_logits"], inputs["labels"])


def _mtt_fastmtt(inputs):
    return lambda: fastmtt.mtt_loss(inputs["logits"], inputs["base_logits"], inputs["labels"], lam=LAM)


def _mtt_work(sizes, mode, element_size):
    """Reads of both logit rows (forward) and the gradient write (backward); flops are negligible."""
    logits_bytes = sizes["N"] * sizes["V"] * element_size
    return {"forward": 2, "backward": 1, "forward+backward": 3}[mode] * logits_bytes, 0.0


MTT_LOSS = Op(
    name="mtt_loss",
    make_inputs=_mtt_inputs,
    grad_inputs=("logits",),
    impls=(
        Impl("reference (eager)", "reference", _mtt_reference),
        Impl("torch.compile(reference)", "compiled", _mtt_compiled),
        Impl("fastmtt", "fastmtt", _mtt_fastmtt),
    ),
    work=_mtt_work,
    presets={
        "tiny": _configs(torch.float32, ("N", "V"), (64, 256), (96, 1000)),
        "cpu": _configs(torch.float32, ("N", "V"), (512, 8000), (512, 32000), (2048, 32000)),
        "gpu": _configs(torch.bfloat16, ("N", "V"),
                        *[(n, v) for v in (32000, 128256) for n in (2048, 4096, 8192, 16384)]),
    },
)


# --- MTT loss from hidden states (fused linear) ---------------------------------------------------

def _linear_inputs(sizes, dtype, device):
    gen = torch.Generator().manual_seed(0)
    n_rows, hidden, vocab = sizes["N"], sizes["H"], sizes["V"]
    return dict(
        hidden=_randn(n_rows, hidden, dtype=dtype, device=device, generator=gen).requires_grad_(),
        base_hidden=_randn(n_rows, hidden, dtype=dtype, device=device, generator=gen),
        weight=_randn(vocab, hidden, dtype=dtype, device=device, generator=gen, scale=hidden ** -0.5),
        labels=_labels(n_rows, vocab, device, gen),
    )


def _linear_reference_loss(hidden, base_hidden, weight, labels):
    """Materialized logits = hidden @ W^T, then the MTT spec."""
    return reference.mtt_loss(hidden @ weight.T, base_hidden @ weight.T, labels, lam=LAM).loss


def _linear_reference(inputs):
    return lambda: _linear_reference_loss(**inputs)


def _linear_compiled(inputs):
    loss = _compiled(_linear_reference_loss)
    return lambda: loss(**inputs)


def _linear_fastmtt(backend):
    def build(inputs):
        return lambda: fastmtt.fused_linear_mtt_loss(
            inputs["hidden"], inputs["base_hidden"], inputs["weight"], inputs["labels"], lam=LAM, backend=backend)

    return build


def _liger_ce(inputs):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda: loss(inputs["weight"], inputs["hidden"], inputs["labels"])


def _cce_ce(inputs):
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
    grad_inputs=("hidden",),
    impls=(
        Impl("reference (eager)", "reference", _linear_reference),
        Impl("torch.compile(reference)", "compiled", _linear_compiled),
        Impl("fastmtt (chunked)", "fastmtt", _linear_fastmtt("torch"), _fastmtt_missing("fused_linear_mtt_loss")),
        # The tiled Triton kernels are backend="triton" (what "auto" picks on CUDA).
        Impl("fastmtt (tiled)", "fastmtt", _linear_fastmtt("triton"),
             _fastmtt_missing("fused_linear_mtt_loss", backend="triton", needs_cuda=True)),
        Impl("Liger fused linear CE (CE only)", "floor", _liger_ce,
             _module_missing("liger_kernel", needs_cuda=True), _ce_only_work),
        Impl("Cut Cross-Entropy (CE only)", "floor", _cce_ce,
             _module_missing("cut_cross_entropy", needs_cuda=True), _ce_only_work),
    ),
    work=_linear_work,
    presets={
        "tiny": _configs(torch.float32, ("N", "H", "V"), (64, 32, 256)),
        "cpu": _configs(torch.float32, ("N", "H", "V"), (512, 256, 8000), (512, 256, 32000), (512, 1024, 32000)),
        "gpu": _configs(torch.bfloat16, ("N", "H", "V"), (8192, 4096, 128256)),
    },
)


# --- LoRA linear -----------------------------------------------------------------------------------

def _lora_inputs(sizes, dtype, device):
    gen = torch.Generator().manual_seed(0)
    n_rows, d_in, d_out, rank = sizes["N"], sizes["K"], sizes["M"], sizes["r"]
    return dict(
        x=_randn(n_rows, d_in, dtype=dtype, device=device, generator=gen).requires_grad_(),
        weight=_randn(d_out, d_in, dtype=dtype, device=device, generator=gen, scale=d_in ** -0.5),
        lora_A=_randn(rank, d_in, dtype=dtype, device=device, generator=gen, scale=d_in ** -0.5).requires_grad_(),
        lora_B=_randn(d_out, rank, dtype=dtype, device=device, generator=gen, scale=rank ** -0.5).requires_grad_(),
    )


def _peft_lora(inputs):
    """PEFT's eager LoRA layer on an nn.Linear holding `weight`, adapter weights copied in."""
    from peft import LoraConfig, get_peft_model

    weight, lora_A, lora_B = inputs["weight"], inputs["lora_A"], inputs["lora_B"]
    rank = lora_A.shape[0]
    base = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    config = LoraConfig(r=rank, lora_alpha=int(LORA_SCALING * rank), lora_dropout=0.0, target_modules=["0"])
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


def _lora_fastmtt(inputs):
    return lambda: fastmtt.lora_linear(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"],
                                       LORA_SCALING)


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
    grad_inputs=("x", "lora_A", "lora_B"),
    impls=(
        Impl("PEFT LoRA (eager)", "reference", _peft_lora, _module_missing("peft")),
        Impl("x @ W^T (floor)", "floor", _plain_linear,
             work=lambda sizes, mode, element_size: _lora_work(sizes, mode, element_size, with_adapter=False)),
        Impl("fastmtt", "fastmtt", _lora_fastmtt, _fastmtt_missing("lora_linear")),
    ),
    work=_lora_work,
    presets={
        "tiny": _configs(torch.float32, ("N", "K", "M", "r"), (64, 32, 48, 4)),
        "cpu": _configs(torch.float32, ("N", "K", "M", "r"), (1024, 1024, 1024, 16), (4096, 1024, 1024, 16),
                        (1024, 1024, 1024, 64)),
        "gpu": _configs(torch.bfloat16, ("N", "K", "M", "r"), (8192, 4096, 4096, 16)),
    },
)

OPS = {op.name: op for op in (MTT_LOSS, FUSED_LINEAR_MTT_LOSS, LORA_LINEAR)}


def prepare(op: Op, impl: Impl, config: Config, device: torch.device):
    """(inputs, forward, gradient leaves, upstream gradient) for one case; runs forward once."""
    inputs = op.make_inputs(config.size_dict, config.dtype, device)
    forward = impl.build(inputs)
    leaves = [inputs[name] for name in op.grad_inputs]
    return inputs, forward, leaves, torch.ones_like(forward()).detach()


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
