"""`fastmtt demo`: does MTT learn a new language with less forgetting? A self-contained toy, no downloads.

1. A synthetic *base* language: a sparse random Markov chain over a small vocabulary (each token has a
   few likely successors with unequal probabilities, plus a little uniform smoothing).
2. A shifted *target* language: in every context, with probability `shift` the next token is a new
   successor the base language almost never produces; otherwise it follows the base chain.
3. A tiny random-init Llama is pretrained on the base language, then one LoRA adapter is trained on
   a small target corpus several ways: CE only, CE + full-vocabulary KL(base || adapted), and
   CE + MTT (target-masked KL) over a sweep of lam.
4. Learning = held-out target CE / accuracy; forgetting = held-out base perplexity increase and the
   mean KL(base model || adapted) of next-token distributions on base text.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastmtt.apps import check_out_dir, presets
from fastmtt.apps.evaluation import evaluate_lm, format_kl, tensor_batches
from fastmtt.objective import MTTObjective


@dataclasses.dataclass
class DemoConfig:
    """Sizes of one demo run; the defaults are the --quick preset."""

    vocab_size: int = 192
    branching: int = 6            # likely successors per token in the base language
    smoothing: float = 0.02       # uniform mass mixed into every base transition
    shift: float = 0.9            # probability that the target language takes its new successor
    seq_len: int = 24
    hidden_size: int = 48
    num_layers: int = 2
    num_heads: int = 4
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    finetune_sequences: int = 128  # size of the (small) target training corpus
    finetune_steps: int = 80
    finetune_lr: float = 3e-3
    batch_size: int = 32
    lora_rank: int = 8
    eval_sequences: int = 256
    lams: Sequence[float] = (0.3, 1.0, 3.0, 10.0)
    methods: Sequence[str] = ("ce", "kl", "mtt")
    directions: Sequence[str] = ("forward",)
    seed: int = 0


PRESETS = {
    "tiny": dict(vocab_size=48, hidden_size=32, num_layers=1, seq_len=16, pretrain_steps=30, finetune_steps=8,
                 finetune_sequences=16, batch_size=8, eval_sequences=16, lams=(1.0,)),
    "quick": dict(),
    "full": dict(vocab_size=256, hidden_size=64, pretrain_steps=1000, finetune_steps=200, eval_sequences=512,
                 lams=(0.1, 0.3, 1.0, 3.0, 10.0, 30.0), directions=("forward", "reverse")),
}


class MarkovLanguage:
    """First-order Markov chain: transition[c] is the next-token distribution after token c."""

    def __init__(self, transition: torch.Tensor):
        self.transition = transition

    def sample(self, n_sequences: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """[n_sequences, length] token ids; the first token is uniform."""
        vocab = self.transition.shape[0]
        tokens = torch.empty(n_sequences, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (n_sequences,), generator=generator)
        for position in range(1, length):
            tokens[:, position] = torch.multinomial(self.transition[tokens[:, position - 1]], 1,
                                                    generator=generator).squeeze(1)
        return tokens

    def entropy(self) -> float:
        """Mean entropy (nats) of the transitions: the best achievable CE under uniform contexts."""
        p = self.transition
        return float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())


def make_languages(vocab_size: int, branching: int, smoothing: float, shift: float, seed: int):
    """(base, target) Markov languages. Base: `branching` successors per token with Dirichlet(1) weights,
    mixed with `smoothing` uniform mass. Target: with probability `shift` a new successor that lies
    outside the base's likely set, otherwise the base transition."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(vocab_size, vocab_size, generator=generator)
    order = scores.argsort(dim=1)
    likely, new = order[:, :branching], order[:, branching]
    weights = torch._standard_gamma(torch.ones(vocab_size, branching))  # Dirichlet(1) via normalized gammas
    weights = weights / weights.sum(1, keepdim=True)
    base = torch.zeros(vocab_size, vocab_size).scatter_(1, likely, weights)
    base = (1 - smoothing) * base + smoothing / vocab_size
    target = (1 - shift) * base
    target[torch.arange(vocab_size), new] += shift
    return MarkovLanguage(base), MarkovLanguage(target)


def build_model(cfg: DemoConfig):
    """A tiny random-init Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=2 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                         max_position_embeddings=cfg.seq_len, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _progress(iterable, show: bool, **kwargs):
    """A progress bar on stderr when `show` and stderr is a terminal (redirected output stays clean text)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (show and sys.stderr.isatty()), dynamic_ncols=True, leave=False, **kwargs)


def pretrain(model, language: MarkovLanguage, cfg: DemoConfig, device, generator, progress=True):
    """Next-token CE training of the full model on fresh samples of `language`."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                   pct_start=0.1)
    for _ in _progress(range(cfg.pretrain_steps), progress, desc="pretrain base"):
        batch = language.sample(cfg.batch_size, cfg.seq_len, generator).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def _full_kl_loss(model, batch, lam):
    """CE + lam * KL(base || adapted) over the full vocabulary (the usual distillation regularizer)."""
    logits = model(input_ids=batch).logits[:, :-1]
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=batch).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    kl = F.kl_div(logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True,
                  reduction="none").sum(-1).mean()
    return ce + lam * kl


def finetune(base_model, corpus: torch.Tensor, cfg: DemoConfig, method: str, lam: float, direction: str,
             device, progress=True, desc=""):
    """Train a fresh LoRA adapter on `corpus` [N, L]; same init and batch order for every method."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(copy.deepcopy(base_model), lora).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.finetune_lr,
                                  weight_decay=0.0)
    objective = MTTObjective(lam=lam, direction=direction)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in _progress(range(cfg.finetune_steps), progress, desc=desc):
        batch = corpus[torch.randint(len(corpus), (cfg.batch_size,), generator=generator)].to(device)
        if method == "kl":
            loss = _full_kl_loss(model, batch, lam)
        else:  # "ce" is MTT at lam = 0
            loss = objective(model, input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def evaluate(model, base_text: torch.Tensor, target_text: torch.Tensor, batch_size: int, device) -> Dict[str, float]:
    """target_ce, target_acc on held-out target text; base_ce and base_kl = mean KL(base model || model)
    on held-out base text (the base being the PEFT model with its adapter disabled)."""
    target = evaluate_lm(model, tensor_batches(target_text, batch_size), device, with_kl=False)
    base = evaluate_lm(model, tensor_batches(base_text, batch_size), device)
    return dict(target_ce=target["ce"], target_acc=target["acc"], base_ce=base["ce"], base_kl=base["kl_to_base"])


def run_demo(cfg: DemoConfig, out_dir: Optional[str] = None, device: str = "cpu", progress: bool = True,
             log=print) -> List[Dict[str, float]]:
    """Pretrain, fine-tune every (method, lam, direction), evaluate; write results.csv and frontier.png
    to out_dir when given. Returns one row per run."""
    if out_dir:  # a folder that cannot be written fails now, not after the runs
        check_out_dir("--out", out_dir, "results.csv and frontier.png", create=True)
    torch.manual_seed(cfg.seed)
    started = time.time()
    base_lang, target_lang = make_languages(cfg.vocab_size, cfg.branching, cfg.smoothing, cfg.shift, cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed + 2)
    corpus = target_lang.sample(cfg.finetune_sequences, cfg.seq_len, data_gen)
    base_eval = base_lang.sample(cfg.eval_sequences, cfg.seq_len, data_gen)
    target_eval = target_lang.sample(cfg.eval_sequences, cfg.seq_len, data_gen)

    base_model = pretrain(build_model(cfg), base_lang, cfg, device, data_gen, progress)
    reference = evaluate(base_model, base_eval, target_eval, cfg.batch_size, device)
    log(f"base model: base-language CE {reference['base_ce']:.3f} (chain entropy {base_lang.entropy():.3f}), "
        f"target-language CE {reference['target_ce']:.3f} (chain entropy {target_lang.entropy():.3f})")
    rows = [dict(method="base model", direction="", lam=float("nan"), **reference)]

    runs = [("ce", 0.0, "forward")] if "ce" in cfg.methods else []
    runs += [(method, lam, direction) for method in cfg.methods if method != "ce" for lam in cfg.lams
             for direction in (cfg.directions if method == "mtt" else ("forward",))]
    for method, lam, direction in _progress(runs, progress, desc="fine-tune runs"):
        label = f"{method} lam={lam:g}" + (f" {direction}" if method == "mtt" else "")
        model = finetune(base_model, corpus, cfg, method, lam, direction, device, progress, desc=label)
        rows.append(dict(method=method, direction=direction if method == "mtt" else "", lam=lam,
                         **evaluate(model, base_eval, target_eval, cfg.batch_size, device)))
    base_ppl = math.exp(reference["base_ce"])
    for row in rows:
        row["base_ppl"] = math.exp(row["base_ce"])
        row["base_ppl_increase"] = row["base_ppl"] - base_ppl
    log(format_table(rows))
    log(f"({len(runs)} fine-tuning runs in {time.time() - started:.0f}s on {device})")
    if out_dir:
        write_csv(rows, os.path.join(out_dir, "results.csv"))
        plot_frontier(rows, os.path.join(out_dir, "frontier.png"), cfg)
        log(f"wrote {os.path.join(out_dir, 'results.csv')} and {os.path.join(out_dir, 'frontier.png')}")
    return rows


COLUMNS = ("method", "direction", "lam", "target_ce", "target_acc", "base_ppl", "base_ppl_increase", "base_kl")


def format_table(rows) -> str:
    """Markdown table of the runs."""
    lines = ["| method | lam | target CE (lower: learned) | target acc | base PPL | base PPL increase "
             "| KL(base \u2016 adapted) on base text |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        name = row["method"] + (f" ({row['direction']})" if row["direction"] == "reverse" else "")
        lam = "" if math.isnan(row["lam"]) else f"{row['lam']:g}"
        lines.append(f"| {name} | {lam} | {row['target_ce']:.3f} | {row['target_acc']:.3f} | {row['base_ppl']:.2f} "
                     f"| {row['base_ppl_increase']:+.2f} | {format_kl(row['base_kl'])} |")
    return "\n".join(lines)


def write_csv(rows, path):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + ("base_ce",), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_frontier(rows, path, cfg: DemoConfig):
    """Save draw_frontier's plot to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    draw_frontier(rows, ax, cfg)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def draw_frontier(rows, ax, cfg: DemoConfig):
    """Learning (target CE) against forgetting (KL to base on base text), one curve per method, each
    point labeled with its lam; lower left is better. The base model (no adapter) sits far above the
    curves, so it is a note, not a point that would squeeze them."""
    ce_only = [r for r in rows if r["method"] == "ce"]
    curves = sorted({(r["method"], r["direction"]) for r in rows if r["method"] in ("kl", "mtt")})
    for method, direction in curves:
        points = sorted((r for r in rows if (r["method"], r["direction"]) == (method, direction)),
                        key=lambda r: r["lam"])
        points = ce_only + points  # every curve starts at lam = 0 (CE only)
        label = "CE + full KL" if method == "kl" else f"CE + MTT ({direction})"
        ax.plot([r["base_kl"] for r in points], [r["target_ce"] for r in points], marker="o", label=label)
        for r in points[1:]:
            ax.annotate(f"\u03bb={r['lam']:g}", (r["base_kl"], r["target_ce"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for r in ce_only:
        ax.scatter([r["base_kl"]], [r["target_ce"]], s=90, marker="*", color="black", zorder=5, label="CE only")
    base = next(r for r in rows if r["method"] == "base model")
    ax.text(0.98, 0.98, f"base model, no adapter: target CE {base['target_ce']:.2f}, KL 0", transform=ax.transAxes,
            ha="right", va="top", fontsize=8, color="gray")
    ax.text(0.02, 0.02, "\u2199 better: learns more, forgets less", transform=ax.transAxes, ha="left",
            va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("forgetting: mean KL(base \u2016 adapted) on held-out base text (nats/token)")
    ax.set_ylabel("held-out target CE (nats/token, lower = learned)")
    ax.set_title(f"LoRA on a shifted Markov language (shift={cfg.shift:g}): learning vs forgetting", fontsize=9)
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.93))


def config_for(preset: str, **overrides) -> DemoConfig:
    """DemoConfig of a preset ('tiny', 'quick', 'full') with overrides (None values ignored)."""
    return presets.config_for(DemoConfig, PRESETS, preset, **overrides)
