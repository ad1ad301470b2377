"""Training one adapter of the experiment: the adapter's PEFT config, the objective (`fastmtt.MTTObjective`,
as a user trains), the base model's cached states that a grid's runs share (`GridBaseCache`), the seeded run
and the step count chosen on a validation split."""
from __future__ import annotations

import collections
import copy
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastmtt.apps.evaluation import evaluate_lm
from fastmtt.base_cache import BaseCache, fingerprint
from fastmtt.objective import MTTObjective

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted_layer_indices(model, adapted_layers: int) -> List[int]:
    """The indices of the last `adapted_layers` decoder layers of the causal LM (a ValueError naming
    adapted_layers outside [1, its layer count])."""
    n_layers = len(model.get_decoder().layers)
    if not 1 <= adapted_layers <= n_layers:
        raise ValueError(f"adapted_layers must be in [1, {n_layers}], got {adapted_layers}")
    return list(range(n_layers - adapted_layers, n_layers))


def adapter_config(kind: str, rank: int, layers: Optional[Sequence[int]] = None):
    """PEFT config of a LoRA, DoRA, RandLoRA (randlora_alpha = 20 r, PEFT's guidance; its default 640 is 80 r at
    r = 8) or SineLoRA (fastmtt.sine_lora, omega 200) adapter on every linear layer of the decoder layers
    `layers` (indices; None: all of them)."""
    import peft

    where = dict(target_modules=LORA_TARGETS, layers_to_transform=None if layers is None else list(layers))
    if kind == "randlora":
        if not hasattr(peft, "RandLoraConfig"):
            raise ValueError(f"the installed peft {peft.__version__} has no RandLoraConfig")
        return peft.RandLoraConfig(r=rank, randlora_alpha=20 * rank, **where)
    if kind == "sinelora":
        from fastmtt.sine_lora import SineLoraConfig

        return SineLoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, **where)
    return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_dora=kind == "dora", **where)


BUDGET_LAM = 1.0  # the lam a run with a forgetting budget starts from
# A budget run's KLBudget horizon is its steps / BUDGET_MOVES (at least 1): lam can move by up to a factor
# e^(0.2 * BUDGET_MOVES) either way in a run of any length (a fixed horizon of 10 lets the 50-step near task
# move lam by e at most, less than its budgets need).
BUDGET_MOVES = 30


def budget_horizon(steps: int) -> float:
    """KLBudget's horizon, in steps, for a run of `steps` steps."""
    return max(1.0, steps / BUDGET_MOVES)


class GridBaseCache:
    """The frozen base model's final hidden states of one task's texts in one `fastmtt.BaseCache`, at
    folder/<task>-<the base's fingerprint digest>, shared by every run of a grid (lam, seed, method) and by
    resumed grids: built by the first run that needs a set of texts, extended by one needing texts it lacks.

    Args:
        base_model: the frozen base causal LM. folder: where the grid keeps its caches. task: the task's name.
    """

    def __init__(self, base_model, folder: str, task: str):
        self.base_model = base_model
        self.path = os.path.join(folder, f"{task}-{fingerprint(base_model)['digest'][:16]}")
        self.cache: Optional[BaseCache] = None
        self._held = set()  # names of the sets of texts this object has had the cache built over

    def holding(self, name: str, examples, batch_size: int) -> BaseCache:
        """The cache, holding `examples` (what `BaseCache.build` takes: dicts with input_ids [L], or padded
        batches [B, L] with their attention_mask) under `name`: on this object's first call for `name` the
        build runs over them (batch_size examples a base forward), skipping those already cached."""
        if name not in self._held:
            self.cache = BaseCache.build(self.base_model, examples, self.path, batch_size=batch_size, progress=False)
            self._held.add(name)
        return self.cache

    def training(self, data, cfg) -> BaseCache:
        """The cache holding a `TaskData`'s training examples (cfg.batch_size a base forward)."""
        return self.holding("train", data.train, cfg.batch_size)

    def retention(self, data, cfg) -> BaseCache:
        """The cache holding each retention text's held-out batches of a `TaskData`, built a batch at a time
        (cfg.eval_batch_size): the states a base pass over that batch gives."""
        for text, batches in data.retention.items():
            self.holding(f"retention:{text}", batches, cfg.eval_batch_size)
        return self.cache


def build_objective(cfg, method: str, lam: float, direction: str, target_kl: float = 0.0,
                    base_cache: Optional[BaseCache] = None) -> MTTObjective:
    """The one place the experiment builds its objective: CE + lam T^2 D per labelled token, D the target-masked
    KL (`direction`) for "mtt", the full-vocabulary KL(base || adapted) for "kl", none for "ce"; at
    cfg.kl_positions; target_kl > 0: a forgetting budget from lam (`KLBudget`, horizon `budget_horizon(cfg.steps)`).
    cfg: an ExperimentConfig. base_cache: None (the base pass runs at every step) or a BaseCache holding the
    training examples' base states (`MTTObjective(base_cache=...)`: read, not run)."""
    budget = dict(target_kl=target_kl, kl_horizon=budget_horizon(cfg.steps)) if target_kl > 0 else {}
    return MTTObjective(lam=0.0 if method == "ce" else lam, temperature=cfg.temperature,
                        direction=direction if method == "mtt" else "forward", mask_target=method != "kl",
                        kl_positions=cfg.kl_positions, base_cache=base_cache, **budget)


def train_adapter(base_model, data, cfg, adapter: str, method: str, lam: float, direction: str, seed: int,
                  target_kl: float = 0.0, after_step: Optional[Callable[[int, object], None]] = None,
                  base_cache: Optional[BaseCache] = None):
    """A fresh adapter on the last cfg.adapted_layers decoder layers of base_model (a copy; seeded init),
    trained for one epoch of data.train (a `TaskData`; seeded order) through `build_objective` (base_cache: of
    the training examples, or None); after_step(step, model), if given, runs after each optimizer step (step
    counts from 1). Returns (the PEFT model in eval mode, the lam of the last step)."""
    from peft import get_peft_model

    objective = build_objective(cfg, method, lam, direction, target_kl, base_cache)
    layers = adapted_layer_indices(base_model, cfg.adapted_layers)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base_model), adapter_config(adapter, cfg.rank, layers)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.adapter_lrs.get(adapter, cfg.lr), weight_decay=0.0)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    for step in range(cfg.steps):
        batch = data.collate([data.train[i] for i in order[step * cfg.batch_size:(step + 1) * cfg.batch_size]])
        out = objective(model, **batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        objective.end_step()  # a forgetting budget moves lam once per optimizer step
        if after_step is not None:
            after_step(step + 1, model)
    return model.eval(), objective.options.lam


def load_adapter(base_model, adapter: str, path: str):
    """The adapter saved in folder `path` (by a finished run) on a copy of base_model; None if it holds none."""
    from peft import PeftModel

    from fastmtt.sine_lora import load_sine_lora

    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        return None
    load = load_sine_lora if adapter == "sinelora" else PeftModel.from_pretrained
    return load(copy.deepcopy(base_model), path).eval()


def validation_curve(base_model, data, cfg, checkpoints: Sequence[int], seeds: Sequence[int],
                     adapter: str = "lora") -> Dict[int, float]:
    """{steps: CE only's task CE on data.validation after that many steps, mean over seeds} for each of
    checkpoints: one run of cfg.steps steps per seed (the data built for them), scored at every checkpoint. The
    scored held-out examples take no part: a step count chosen here is not fitted to them."""
    if max(checkpoints) > cfg.steps:
        raise ValueError(f"checkpoints: at most cfg.steps = {cfg.steps}, got {max(checkpoints)}")
    scores = collections.defaultdict(list)

    def after_step(step, model):
        if step in checkpoints:
            scores[step].append(evaluate_lm(model, data.validation, with_kl=False)["ce"])

    for seed in seeds:
        train_adapter(base_model, data, cfg, adapter, "ce", 0.0, "", seed, after_step=after_step)
    return {step: sum(values) / len(values) for step, values in sorted(scores.items())}
