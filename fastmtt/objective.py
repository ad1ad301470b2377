"""MTTObjective: the MTT objective for PEFT causal LMs, single-process or data-parallel.

It runs the model twice on a batch, once with the adapters disabled (no grad) and once adapted, takes
the final hidden states of both (full-vocabulary logits of a whole batch are never built), applies the
causal shift and evaluates CE + lam * T^2 * masked KL through the output head, honoring a LoRA adapter
on that head.

Both passes and the head loss run inside one ordinary forward of the model the caller holds (the
PeftModel, or a DDP / FSDP / `Accelerator.prepare` wrapper around it): the objective calls that model
with the keyword `fastmtt_mtt`, which the causal LM's forward (patched once per model, as fused-loss
packages patch it for their CE) answers with the loss instead of logits. So the wrapper prepares its
gradient synchronization as for any forward, and FSDP has the parameters unsharded while the head is read.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastmtt._dispatch import check_backend
from fastmtt.head import LinearHead
from fastmtt.models import adapter_modules, decoder_of
from fastmtt.ops.fused_linear_mtt_loss import fused_linear_mtt_loss_with_options
from fastmtt.options import DEFAULT_KL_POSITIONS, KL_POSITIONS, MTTOptions, options_from
from fastmtt.peft import lora_linear_class
from fastmtt.positions import batch_sequence_ids, predicted_positions
from fastmtt.reduction import MTTOutput

# Config attributes of heads that scale logits in ways the fused head loss does not model.
_UNSUPPORTED_LOGIT_SCALING = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier")
# Dropout probabilities transformers' modules keep as plain floats (Llama's attention_dropout, OPT's dropout, ...).
_DROPOUT_FLOATS = ("attention_dropout", "hidden_dropout", "activation_dropout", "dropout")


def _unwrap(model):
    """(peft_model, group): the PeftModel inside `model` and, when `model` averages gradients over ranks
    (DDP, FSDP), the process group of that average (None: the default group); group is False otherwise."""
    from peft import PeftModel

    averaging, sharded = _data_parallel_types()
    group, inner = False, model
    while not isinstance(inner, PeftModel):
        if isinstance(inner, torch.nn.DataParallel):
            raise TypeError("torch.nn.DataParallel is not supported: launch one process per device (torchrun, "
                            "accelerate launch) so the model is wrapped in DistributedDataParallel")
        if isinstance(inner, averaging):  # DDP averages over its process group, FSDP over the default one
            group = inner.process_group if isinstance(inner, DistributedDataParallel) else None
        nested = getattr(inner, "module", None)  # DDP, FSDP1 and other wrappers
        nested = getattr(inner, "_orig_mod", None) if nested is None else nested  # torch.compile
        if not isinstance(nested, torch.nn.Module):
            raise TypeError(
                f"model must be a peft.PeftModel (e.g. from peft.get_peft_model), or a DDP/FSDP wrapper of one, got "
                f"{type(inner).__name__}: MTT compares the adapted model with its own base, reached by disabling "
                "the adapters")
        inner = nested
    if isinstance(inner, sharded):  # FSDP2 fully_shard keeps the module and averages over its mesh
        group = None
    if inner.active_peft_config.is_prompt_learning:
        raise TypeError("MTTObjective supports adapter methods such as LoRA, not prompt-learning PEFT configs")
    return inner, group


def _data_parallel_types():
    """(wrapper classes that average gradients over ranks, FSDP2's module class)."""
    if not dist.is_available():
        return (), ()
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return (DistributedDataParallel, FullyShardedDataParallel), FSDPModule


class _MTTForward:
    """The causal LM's forward, patched: the original one unless called with fastmtt_mtt (a callable
    (causal_lm, **forward_kwargs) -> MTTOutput), whose result it returns instead. It keeps the original
    signature (the Trainer reads it to choose dataset columns) and is an object, not a closure, so copies
    and pickles of the model stay consistent."""

    def __init__(self, causal_lm):
        self.causal_lm, self.original = causal_lm, causal_lm.forward

    @property
    def __signature__(self):
        return inspect.signature(self.original)

    def __call__(self, *args, fastmtt_mtt=None, **kwargs):
        if fastmtt_mtt is None:
            return self.original(*args, **kwargs)
        if args:
            raise TypeError("the MTT forward takes keyword arguments only")
        return fastmtt_mtt(self.causal_lm, **kwargs)


def _install_mtt_forward(causal_lm):
    if not isinstance(vars(causal_lm).get("forward"), _MTTForward):
        causal_lm.forward = _MTTForward(causal_lm)


def disable_model_dropout(peft_model) -> None:
    """Set every dropout probability of the base model to 0: torch dropout modules and the float
    probabilities transformers' modules read. The adapters' own dropout (LoRA's lora_dropout) stays."""
    adapters = {id(module) for module in adapter_modules(peft_model)}
    for module in peft_model.modules():
        if id(module) in adapters:
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in _DROPOUT_FLOATS:
            if isinstance(vars(module).get(name), float):
                setattr(module, name, 0.0)


def _head_lora_problem(head, name):
    """Why the head's LoRA adapter `name` cannot be served, and the fix; None when it can."""
    config_fix = ("exclude the head from target_modules (LoraConfig options apply to every targeted module) or "
                  "set LoraConfig({}) for all")
    if head.use_dora.get(name, False):
        return "uses DoRA: " + config_fix.format("use_dora=False")
    variant = getattr(head, "lora_variant", {}).get(name)
    if variant is not None:  # aLoRA, Arrow, ...: the head loss computes plain LoRA only
        return f"uses the LoRA variant {type(variant).__name__}: exclude the head from target_modules"
    if getattr(head, "lora_bias", {}).get(name, False):
        return "has a LoRA bias: " + config_fix.format("lora_bias=False")
    dropout = head.lora_dropout[name]
    if head.training and not isinstance(dropout, torch.nn.Identity) and dropout.p > 0:
        return (f"has lora_dropout={dropout.p} (in training mode): LoraConfig(lora_dropout=...) applies to every "
                "targeted module, so exclude the head from target_modules, or set lora_dropout=0")
    return None


def output_head(causal_lm) -> LinearHead:
    """The causal LM's output head as a LinearHead: an nn.Linear (weight, bias), optionally with one
    active LoRA adapter (lora_A, lora_B, scaling) and Gemma-2 style final logit softcapping."""
    config = getattr(causal_lm, "config", None)
    for name in _UNSUPPORTED_LOGIT_SCALING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(causal_lm).__name__} scales its logits (config.{name}={value}); "
                             "MTTObjective supports heads computing softcap(h W^T + b) only")
    softcap = getattr(config, "final_logit_softcapping", None)
    head = causal_lm.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        return _unsharded(LinearHead(head.weight, head.bias, softcap=softcap))
    base_layer = getattr(head, "base_layer", None)
    if not (isinstance(head, lora_linear_class()) and type(base_layer) is torch.nn.Linear):
        raise ValueError(
            f"unsupported output head {type(head).__name__}: MTTObjective serves an nn.Linear head, optionally "
            "with a LoRA adapter (modules_to_save, AdaLoRA, DoRA and other head wrappers are not supported)")
    plain = LinearHead(base_layer.weight, base_layer.bias, softcap=softcap)
    active = [name for name in head.active_adapters if name in head.lora_A]
    if head.disable_adapters or not active:
        return _unsharded(plain)
    if head.merged:
        raise ValueError("the LoRA adapter on the output head is merged; unmerge it for MTT training")
    if len(active) > 1:
        raise ValueError(f"one active LoRA adapter on the output head is supported, got {active}")
    (name,) = active
    problem = _head_lora_problem(head, name)
    if problem is not None:
        head_name = next(path for path, module in causal_lm.named_modules() if module is head)
        raise ValueError(f"the LoRA adapter on the output head '{head_name}' {problem}")
    return _unsharded(LinearHead(plain.weight, plain.bias, head.lora_A[name].weight, head.lora_B[name].weight,
                                 float(head.scaling[name]), softcap))


def _unsharded(head: LinearHead) -> LinearHead:
    if dist.is_available():
        from torch.distributed.tensor import DTensor

        for field in ("weight", "bias", "lora_A", "lora_B"):
            if isinstance(getattr(head, field), DTensor):
                raise ValueError(
                    f"the output head's {field} is sharded during the forward (fully_shard applied to the head on "
                    "its own): MTTObjective reads the head inside the model's forward, so shard it with the root "
                    "module (fully_shard the decoder layers, then the whole model)")
    return head


@contextlib.contextmanager
def _embeddings_drawn_once(embedding):
    """Within it, an input embedding module with forward hooks (NEFTune adds noise in one) returns, for the same
    input tensor, its first output again: both passes see one draw. Refused with NEFTune where the embeddings
    are trained (an adapter or trainable weights: the passes' embeddings differ, or the gradient needs the
    second draw)."""
    if not embedding._forward_hooks:
        yield
        return
    if _is_adapted(embedding) or any(p.requires_grad for p in embedding.parameters()):
        if getattr(embedding, "neftune_noise_alpha", None) is not None and embedding.training:
            raise ValueError("NEFTune (neftune_noise_alpha) on input embeddings that are trained (a PEFT adapter, "
                             "modules_to_save or trainable weights): the two passes would draw different noise; "
                             "freeze the embeddings (leave them out of target_modules / modules_to_save), or set "
                             "neftune_noise_alpha=None")
        yield
        return
    first = {}

    def replay(module, args, output):  # the first output, needing grad as this one does (enable_input_require_grads)
        if first and args and args[0] is first["input"]:
            return first["output"].detach().requires_grad_(output.requires_grad)
        first.update(input=args[0] if args else None, output=output)
        return output

    handle = embedding.register_forward_hook(replay)
    try:
        yield
    finally:
        handle.remove()


def _is_adapted(module) -> bool:
    """Whether disabling the adapters changes what `module` computes (a PEFT tuner layer, modules_to_save)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))


def _smoothing_term(hidden, head: LinearHead, labels, rows_mask, ignore_index, num_items_in_batch):
    """sum over the labelled rows of (mean over the vocabulary of -log p) - CE = z_y - mean_v z_v, divided as the
    loss is (num_items_in_batch, default the labelled count): label smoothing's share beyond CE, exact for a head
    z = h W^T + bias + s (h A^T) B^T (linear in W, bias, B, so mean_v z_v uses their means); fp32, differentiable."""
    labelled, _ = predicted_positions(labels, rows_mask, ignore_index)
    rows, targets = hidden[:, :-1][labelled].float(), labels[:, 1:][labelled]
    weight = head.weight.float()
    gap = (rows * (weight[targets] - weight.mean(0))).sum(-1)
    if head.bias is not None:
        gap = gap + head.bias.float()[targets] - head.bias.float().mean()
    if head.has_lora:
        lora_b = head.lora_B.float()
        gap = gap + head.scaling * ((rows @ head.lora_A.float().T) * (lora_b[targets] - lora_b.mean(0))).sum(-1)
    count = labelled.sum() if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, device=gap.device).to(gap.dtype)
    return gap.sum() / count.clamp(min=1)


def _router_aux_loss(causal_lm, decoder_output, attention_mask):
    """The load-balancing loss a MoE causal LM adds to its loss (Mixtral, Qwen-MoE, ...: its module's
    load_balancing_loss_func of the adapted pass's router logits), or None without router logits."""
    router_logits = getattr(decoder_output, "router_logits", None)
    if router_logits is None or len(router_logits) == 0:
        return None
    module = sys.modules[type(causal_lm).__module__]
    loss_fn = getattr(module, "load_balancing_loss_func", None)
    needed = ("router_aux_loss_coef", "num_experts", "num_experts_per_tok")
    if loss_fn is None or not all(hasattr(causal_lm, name) for name in needed):
        raise ValueError(f"{type(causal_lm).__name__} returns router logits (output_router_logits) but its aux loss "
                         "is not one MTTObjective knows how to add: set output_router_logits=False")
    return loss_fn(router_logits, causal_lm.num_experts, causal_lm.num_experts_per_tok, attention_mask)


def causal_head_loss(hidden, base_hidden, head: LinearHead, labels, options: MTTOptions, *, input_ids=None,
                     attention_mask=None, kl_positions=DEFAULT_KL_POSITIONS, num_items_in_batch=None, backend="auto",
                     dtype=None) -> MTTOutput:
    """MTTOutput of the fused head loss on final hidden states [B, L, H] (adapted, base), the causal shift
    applied: CE + lam T^2 D at the labelled positions (labels [B, L], ignore_index where none) and, with
    kl_positions="all", D alone (ce_weight=0) at the other attended positions, their next input token
    (input_ids [B, L]) being the target to mask (input_ids may be None where every attended position is
    labelled); see `predicted_positions` for attention_mask [B, L]. One fused call (`ce_rows` marks the
    labelled rows); both parts divide by num_items_in_batch (default: the labelled count). dtype: the rows'
    dtype in the head loss (default theirs)."""
    hidden, base_hidden, targets = hidden[:, :-1], base_hidden[:, :-1], labels[:, 1:]
    labelled, attended = predicted_positions(labels, attention_mask, options.ignore_index)  # rows of the head
    rows, ce_rows = labelled, None
    if kl_positions == "all" and options.lam > 0 and (input_ids is not None or bool((attended & ~labelled).any())):
        if input_ids is None:
            raise ValueError("kl_positions='all' (MTTObjective's default) needs input_ids where a position has no "
                             "label (inputs_embeds alone does not give the next input token, the target to mask "
                             "there): pass input_ids, or kl_positions='labels' with inputs_embeds")
        rows, targets = attended, torch.where(labelled, targets, input_ids[:, 1:])  # one fused call for both
        ce_rows = labelled[rows]
        if num_items_in_batch is None:
            num_items_in_batch = labelled.sum()
    dtype = dtype or hidden.dtype
    return fused_linear_mtt_loss_with_options(
        hidden[rows].to(dtype), base_hidden[rows].to(dtype), head, targets[rows], options,
        num_items_in_batch=num_items_in_batch, return_components=True, backend=backend, ce_rows=ce_rows)


class KLBudget:
    """A forgetting budget instead of a fixed lam: TRL's adaptive KL controller (PPO's, Ziegler et al. 2019)
    applied to lam. After a training step whose mean divergence was kl,

        lam <- lam * (1 + clip(kl / target_kl - 1, -0.2, 0.2) / horizon),

    so lam grows while the divergence is above target_kl and shrinks below it, by at most a factor
    exp(0.2) every `horizon` steps.

    Args:
        target_kl: the divergence to hold, > 0 (MTTOutput.kl's units: nats per labelled token; with
            kl_positions="all" the sum over every position per labelled token).
        horizon: steps per e-fold of the largest correction, >= 1 (default 10), so one step changes lam by
            at most 20%.
    """

    def __init__(self, target_kl: float, horizon: float = 10.0):
        for name, value, least in (("target_kl", target_kl, "> 0"), ("horizon", horizon, ">= 1")):
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value < float("inf")
                    or not (value > 0 if name == "target_kl" else value >= 1)):
                raise ValueError(f"{name} must be a finite number {least}, got {value!r}")
        self.target_kl, self.horizon = float(target_kl), float(horizon)

    def update(self, lam: float, kl: float) -> float:
        """The next lam after a step with divergence `kl` (a non-finite kl leaves lam as it is)."""
        if not math.isfinite(kl):
            return lam
        error = min(0.2, max(-0.2, kl / self.target_kl - 1.0))
        return lam * (1.0 + error / self.horizon)

    def __repr__(self):
        return f"KLBudget(target_kl={self.target_kl:g}, horizon={self.horizon:g})"


class MTTObjective:
    """objective(model, input_ids=, attention_mask=, labels=, num_items_in_batch=None) -> MTTOutput
    (inputs_embeds= [B, L, H] instead of input_ids: given to both passes).

    loss = mean over predicted tokens of CE_i + lam * T^2 * KL_i, where KL_i compares the adapted and
    base next-token distributions with the target removed ("forward": KL(base || adapted)). labels
    follow the Hugging Face convention (same as input_ids, -100 where no loss; shifted here).
    num_items_in_batch: the mean divides by that count instead (exact gradient accumulation: the
    predicted tokens of all micro-batches of the step): an int, numpy integer or one-element integer
    tensor, >= 0 (floats are refused). A position counts only where it and the token it predicts are both
    attended, so padding on either side never changes the loss.

    model: a peft.PeftModel, or a DDP / FSDP wrapper of one. data_parallel_size (default: the wrapper's
    world size, 1 without one) > 1: the count is over that many ranks (all-reduced when
    num_items_in_batch is None; give the global count otherwise) and the outputs are multiplied by it, so
    the wrapper's gradient average is the gradient of the global batch and the mean of loss, ce, kl over
    ranks is the global value. 1 under a wrapper: each rank's own mean (the wrapper averages the means).

    Options: lam, temperature, direction, ignore_index, mask_target (see MTTOptions; None: its default), or
    options= a ready MTTOptions (reduction 'mean'), not both. kl_positions: "all" (default) puts the divergence
    at every attended position, the prompt's too (their target to mask is the next input token): loss = (sum
    of CE over labelled tokens + lam T^2 * sum of KL over all positions) / the labelled count, so lam weighs
    one position's KL as one label's CE; "labels" only where CE is.
    disable_dropout=True sets the base model's dropout to 0 (on the first call, permanently, as TRL does
    for reference-model comparisons): otherwise the two passes draw different masks, so KL > 0 for an
    adapter equal to the base and the regularizer pulls against dropout noise. LoRA's lora_dropout on the
    adapted side is unaffected.
    target_kl: a forgetting budget (`KLBudget`): lam (the starting value, > 0) moves once per optimizer step,
    at `end_step()`, towards holding the step's divergence at target_kl: the KL summed over every call under
    grad since the last end_step (all micro-batches) and over all ranks, per labelled token, so any
    micro-batching, token averaging or number of ranks gives the same lam path; `objective.options.lam` is the
    current value, `state_dict()` / `load_state_dict()` save and restore it. end_step reads the divergence on
    the host once (a device sync on CUDA) and, under data parallelism, all-reduces it: every rank calls it.
    MTTTrainer calls it after every optimizer step and saves lam in its checkpoints.
    label_smoothing: eps in [0, 1), CE's label smoothing as transformers' (`label_smoothing_factor`):
    (1 - eps) CE + eps * mean over the vocabulary of -log p, at the labelled positions.
    Packed batches (DataCollatorWithFlattening: position_ids restarting, no attention mask; or seq_idx,
    cu_seq_lens_q / cu_seq_lens_k) end every row set at a sequence boundary (`sequence_ids`). NEFTune's noise
    (a forward hook on the input embeddings) is drawn once: both passes see the same embeddings. A MoE model's
    router aux loss (output_router_logits) is added to the loss as the model adds it.

    Args:
        lam, temperature, direction, ignore_index, mask_target: the loss settings (MTTOptions' fields; None,
            the default: MTTOptions' default).
        backend: of the fused-linear loss, "auto" (default), "triton" or "torch".
        options: a ready MTTOptions (reduction 'mean') instead of the settings above (default None).
        disable_dropout: set the base model's dropout to 0 on the first call (default True).
        kl_positions: "all" (default) or "labels".
        target_kl: None (default: lam is fixed) or the divergence to hold; kl_horizon: the KLBudget horizon,
            in optimizer steps (end_step calls; default 10).
        label_smoothing: CE's label smoothing eps in [0, 1) (default 0).
        base_cache: None (default) or a `fastmtt.BaseCache` (or its path) of the base's final hidden states on
            the training examples: each batch row's states are read from it and the base pass is skipped.

    Calling it: objective(model, input_ids=None, labels=None, attention_mask=None, num_items_in_batch=None,
    data_parallel_size=None, *, inputs_embeds=None, **model_kwargs) with input_ids [B, L] (or inputs_embeds
    [B, L, H]), labels [B, L] and attention_mask [B, L].

    Returns:
        MTTOutput(loss, ce, kl) of the call, each a scalar; loss carries the gradient into the adapters.

    Example:
        >>> import fastmtt, peft, transformers
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
        ...                             peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        >>> input_ids = torch.randint(0, 64, (2, 8))
        >>> output = fastmtt.MTTObjective(lam=0.5)(model, input_ids=input_ids, labels=input_ids)
        >>> output.loss.backward()
        >>> float(output.kl)  # the adapters start as the identity: no divergence yet
        0.0
    """

    def __init__(self, lam: Optional[float] = None, temperature: Optional[float] = None,
                 direction: Optional[str] = None, ignore_index: Optional[int] = None, backend: str = "auto", *,
                 mask_target: Optional[bool] = None, options: Optional[MTTOptions] = None,
                 disable_dropout: bool = True, kl_positions: str = DEFAULT_KL_POSITIONS,
                 target_kl: Optional[float] = None, kl_horizon: float = 10.0, label_smoothing: float = 0.0,
                 base_cache=None):
        keywords = dict(lam=lam, temperature=temperature, direction=direction, ignore_index=ignore_index,
                        mask_target=mask_target)
        options = options_from(options, {name: value for name, value in keywords.items() if value is not None})
        if options.reduction != "mean":
            raise ValueError(f"MTTObjective averages over predicted tokens: options.reduction must be 'mean', "
                             f"got {options.reduction!r}")
        check_backend(backend)
        if kl_positions not in KL_POSITIONS:
            raise ValueError(f"kl_positions must be one of {KL_POSITIONS}, got {kl_positions!r}")
        self.options, self.backend, self.disable_dropout = options, backend, bool(disable_dropout)
        self.kl_positions = kl_positions
        self.kl_budget = None if target_kl is None else KLBudget(target_kl, kl_horizon)
        if self.kl_budget is not None and options.lam == 0:
            raise ValueError("lam must be > 0 with target_kl: the budget scales lam, and 0 stays 0")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self._step_kl, self._step_group = None, False  # [KL sum, labelled count] of this step's calls; their group
        if base_cache is not None:
            from fastmtt.base_cache import BaseCache

            base_cache = BaseCache.open(base_cache) if isinstance(base_cache, (str, os.PathLike)) else base_cache
            if not isinstance(base_cache, BaseCache):
                raise TypeError(f"base_cache must be a fastmtt.BaseCache or its path, got {type(base_cache).__name__}")
            if not self.disable_dropout:
                raise ValueError("base_cache holds the base model without dropout: disable_dropout=False asks for a "
                                 "base pass with dropout, which a cache cannot reproduce")
        self.base_cache = base_cache

    def __repr__(self):
        return (f"MTTObjective({self.options}, backend={self.backend!r}, disable_dropout={self.disable_dropout}, "
                f"kl_positions={self.kl_positions!r}" + ("" if self.kl_budget is None else f", {self.kl_budget}")
                + (f", label_smoothing={self.label_smoothing:g}" if self.label_smoothing else "") + ")")

    def end_step(self) -> float:
        """Say that the optimizer step ended: with target_kl, lam moves by the step's divergence (the KL sum of
        every call under grad since the last end_step, all-reduced over the ranks of their model's wrapper,
        per labelled token; a step without labelled tokens leaves lam). Returns the current lam."""
        step, group = self._step_kl, self._step_group
        self._step_kl, self._step_group = None, False
        if self.kl_budget is not None and step is not None:
            if group is not False:
                dist.all_reduce(step, group=group)
            kl_sum, count = step.tolist()
            kl = kl_sum / count if count > 0 else math.nan
            self.options = self.options.replace(lam=self.kl_budget.update(self.options.lam, kl))
        return self.options.lam

    def state_dict(self) -> dict:
        """What changes during training: {"lam": the current lam} (moved by a forgetting budget)."""
        return {"lam": self.options.lam}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` (e.g. when resuming a run)."""
        if not isinstance(state, dict) or set(state) != {"lam"}:
            raise ValueError(f"state must be a dict with the key 'lam' (from state_dict()), got {state!r}")
        self.options = self.options.replace(lam=state["lam"])
        self._step_kl, self._step_group = None, False

    def hidden_states(self, model, input_ids=None, attention_mask=None, **model_kwargs):
        """(adapted, base) final hidden states [B, L, D], outside any wrapper's forward (inspection)."""
        peft_model, _ = _unwrap(model)
        adapted, base_hidden = self._both_passes(peft_model, peft_model.get_base_model(),
                                                 dict(input_ids=input_ids, attention_mask=attention_mask,
                                                      **model_kwargs))
        return adapted.last_hidden_state, base_hidden

    def _both_passes(self, peft_model, causal_lm, inputs):
        """(the adapted decoder's output, base final hidden states); the base pass runs without grad, adapters
        off, or the base cache serves the base states. Input embeddings with forward hooks (NEFTune's noise) give
        the adapted pass the base pass's output."""
        decoder = decoder_of(causal_lm)
        inputs = dict(inputs, use_cache=False)
        if self.base_cache is not None:
            return decoder(**inputs), self.base_cache.base_hidden_for(peft_model, decoder, inputs)
        with _embeddings_drawn_once(causal_lm.get_input_embeddings()):
            with torch.no_grad(), peft_model.disable_adapter():
                base_hidden = decoder(**inputs).last_hidden_state
            return decoder(**inputs), base_hidden

    def _loss_in_forward(self, peft_model, causal_lm, *, labels, num_items_in_batch, output_attentions=None,
                         output_hidden_states=None, return_dict=None, **inputs) -> MTTOutput:
        """What the patched causal-LM forward returns when asked for the MTT loss."""
        head = output_head(causal_lm)
        if self.label_smoothing and head.softcap is not None:
            raise ValueError(f"label_smoothing (label_smoothing_factor) with final logit softcapping "
                             f"(config.final_logit_softcapping={head.softcap}) is not supported")
        adapted, base_hidden = self._both_passes(peft_model, causal_lm, inputs)
        hidden = adapted.last_hidden_state
        rows_mask = batch_sequence_ids(labels, inputs)
        device_type = hidden.device.type
        dtype = None
        if torch.is_autocast_enabled(device_type):  # e.g. Accelerator(mixed_precision=...) around this forward
            # The head in the autocast dtype, as autocast runs a Linear head, statistics in fp32 by the op itself.
            dtype = torch.get_autocast_dtype(device_type)
            head = head.with_tensors(*(None if t is None else t.to(dtype) for t in head.tensors()))
        with torch.autocast(device_type, enabled=False):
            output = causal_head_loss(hidden, base_hidden, head, labels, self.options,
                                      input_ids=inputs.get("input_ids"), attention_mask=rows_mask,
                                      kl_positions=self.kl_positions, num_items_in_batch=num_items_in_batch,
                                      backend=self.backend, dtype=dtype)
            if self.label_smoothing:
                smoothing = self.label_smoothing * self.options.ce_weight * _smoothing_term(
                    hidden, head, labels, rows_mask, self.options.ignore_index, num_items_in_batch)
                output = MTTOutput(output.loss + smoothing, output.ce + smoothing.detach(), output.kl)
        aux_loss = _router_aux_loss(causal_lm, adapted, inputs.get("attention_mask"))
        if aux_loss is not None:
            output = output._replace(loss=output.loss + causal_lm.router_aux_loss_coef * aux_loss.to(output.loss))
        return output

    def __call__(self, model, input_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
                 data_parallel_size: Optional[int] = None, *, inputs_embeds: Optional[torch.Tensor] = None,
                 **model_kwargs) -> MTTOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, L] and inputs_embeds [B, L, H]")
        shape = tuple(input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:-1])
        if labels is None or tuple(labels.shape) != shape:
            raise ValueError(f"labels must have the shape {shape} of input_ids (or inputs_embeds without its last "
                             f"dim), got {None if labels is None else tuple(labels.shape)}")
        if data_parallel_size is not None and (isinstance(data_parallel_size, bool) or
                                               not isinstance(data_parallel_size, int) or data_parallel_size < 1):
            raise ValueError(f"data_parallel_size must be None or a positive int, got {data_parallel_size!r}")
        peft_model, group = _unwrap(model)
        _install_mtt_forward(peft_model.get_base_model())
        if self.disable_dropout:
            disable_model_dropout(peft_model)
        if data_parallel_size is None:
            data_parallel_size = 1 if group is False else dist.get_world_size(group)
        budget_step = self.kl_budget is not None and torch.is_grad_enabled()
        if data_parallel_size > 1 and num_items_in_batch is None or budget_step:
            rows_mask = batch_sequence_ids(labels, dict(model_kwargs, attention_mask=attention_mask))
            labelled = predicted_positions(labels, rows_mask, self.options.ignore_index)[0].sum()
        if data_parallel_size > 1 and num_items_in_batch is None:
            num_items_in_batch = labelled.clone()
            dist.all_reduce(num_items_in_batch, group=None if group is False else group)
        loss_in_forward = functools.partial(self._loss_in_forward, peft_model, num_items_in_batch=num_items_in_batch)
        output = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                       fastmtt_mtt=loss_in_forward, **model_kwargs)
        if budget_step:  # this call's KL sum (its kl times the count it divided by) and labelled count
            count = labelled if num_items_in_batch is None else num_items_in_batch
            count = torch.as_tensor(count, device=output.kl.device).to(torch.float64)
            step = torch.stack((output.kl.detach().to(torch.float64) * count, labelled.to(count)))
            self._step_kl = step if self._step_kl is None else self._step_kl + step
            if group is not False or data_parallel_size > 1:
                self._step_group = None if group is False else group
        if data_parallel_size > 1:  # the wrapper averages gradients over ranks: undo that average for a global sum
            output = MTTOutput(*(value * data_parallel_size for value in output))
        return output
