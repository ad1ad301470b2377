"""`fastmtt experiment`: its pieces on a tiny random Llama (seconds), and a tiny real run on SmolLM2-135M
(needs `make experiment-setup`; about 30 s the first time the model is dequantized)."""
import dataclasses
import importlib.util
import itertools
import math
import re
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastmtt.apps import experiment
from fastmtt.apps import experiment_statistics as stats
from fastmtt.apps import experiment_summary as summary
from fastmtt.apps import experiment_tasks as tasks
from fastmtt.apps import experiment_training as training
from fastmtt.apps.evaluation import evaluate_lm
from fastmtt.positions import predicted_positions
from fastmtt.reference import masked_kl_rows
from fastmtt.trainer import PadCollator

pytestmark = pytest.mark.usefixtures("one_thread")


class DigitTokenizer:
    """One token per character of '0123456789+=', EOS = 12."""

    eos_token_id = 12

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": ["0123456789+=".index(c) for c in text]}


def tiny_llama(vocab_size=13, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_addition_examples_put_the_loss_on_the_answer_only():
    problems = tasks.addition_problems(5, torch.Generator().manual_seed(3), 3)
    examples = tasks.addition_examples(DigitTokenizer(), problems)
    for example in examples:
        text = "".join("0123456789+=|"[t] for t in example["input_ids"])
        a, rest = text.split("+")
        b, answer = rest.split("=")
        assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999 and answer == f"{int(a) + int(b)}|"
        answered = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        assert example["labels"][:len(a) + len(b) + 2] == [-100] * (len(a) + len(b) + 2)
        assert "".join("0123456789+=|"[t] for t in answered) == answer


def lora_away_from_the_base(model, layers=None):
    """A LoRA adapter (rank 4) on tiny_llama whose lora_B is random, so the adapted model differs from its base."""
    from peft import get_peft_model

    adapted = get_peft_model(model, training.adapter_config("lora", 4, layers))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    return adapted


def test_cached_base_states_give_the_scores_of_a_second_base_pass(tmp_path):
    """evaluate_lm with a BaseCache of the batches: the base's final hidden states through the head are its
    logits, padding skipped; an adapter on the top 2 of 3 layers only (adapted_layer_indices) leaves the first
    untouched."""
    from fastmtt import BaseCache

    batch = PadCollator(12)([dict(input_ids=[1, 2, 3, 4, 5], labels=[-100, -100, 3, 4, 5]),
                             dict(input_ids=[6, 7, 8], labels=[-100, 7, 8])])
    model = tiny_llama()
    assert training.adapted_layer_indices(model, 2) == [1, 2]
    with pytest.raises(ValueError, match="adapted_layers must be in"):
        training.adapted_layer_indices(model, 4)
    cache = BaseCache.build(model, [batch], tmp_path, progress=False)
    assert len(cache) == 2 and cache[[6, 7, 8]].shape == (3, 32)
    adapted = lora_away_from_the_base(model, layers=[1, 2])
    assert not any("layers.0." in name for name, _ in adapted.named_parameters() if "lora" in name)
    with_cache, second_pass = evaluate_lm(adapted, [batch], base_cache=cache), evaluate_lm(adapted, [batch])
    assert with_cache["kl_to_base"] > 1e-3 and with_cache == pytest.approx(second_pass, rel=1e-6)
    assert with_cache["ppl"] == pytest.approx(math.exp(with_cache["ce"])) and with_cache["tokens"] == 5
    with pytest.raises(ValueError, match=r"batch row 0, .*\(4 tokens, starting \[1, 2, 3, 9\]\), is not in"):
        evaluate_lm(adapted, [dict(input_ids=torch.tensor([[1, 2, 3, 9]]), labels=torch.tensor([[1, 2, 3, 9]]))],
                    base_cache=cache)


def logits_and_base_logits(adapted, batch):
    """fp64 next-token logits [B, L, V] of the adapted model and of its base (adapters off)."""
    logits = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    with torch.no_grad(), adapted.disable_adapter():
        base = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    return logits[:, :-1], base[:, :-1]


@pytest.mark.parametrize("method, direction", [("ce", ""), ("kl", "forward"), ("mtt", "forward"), ("mtt", "reverse")])
def test_objective_is_ce_plus_lam_times_the_methods_divergence(method, direction):
    """build_objective (an MTTObjective) on the answer rows: CE + lam T^2 D, D the method's divergence."""
    batch = PadCollator(12)(tasks.addition_examples(DigitTokenizer(), tasks.addition_problems(
        4, torch.Generator().manual_seed(1), 3)))
    adapted = lora_away_from_the_base(tiny_llama())
    lam, temperature = 0.7, 1.5
    cfg = experiment.config_for("tiny", temperature=temperature, kl_positions="labels")
    out = training.build_objective(cfg, method, lam, direction)(adapted, **batch)

    logits, base_logits = logits_and_base_logits(adapted, batch)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits, base_logits = logits[keep], base_logits[keep]
    ce = torch.nn.functional.cross_entropy(logits, targets[keep])
    if method == "kl":
        log_q, log_p = (logits / temperature).log_softmax(-1), (base_logits / temperature).log_softmax(-1)
        divergence = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    elif method == "mtt":
        divergence = masked_kl_rows(logits, base_logits, targets[keep], temperature=temperature,
                                    direction=direction).mean()
    else:
        divergence = torch.zeros((), dtype=torch.float64)
    assert float(divergence.detach()) > 1e-4 or method == "ce"
    expected = ce + (0.0 if method == "ce" else lam * temperature**2) * divergence
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["kl", "mtt"])
def test_regularizer_at_every_position_keeps_ce_on_the_answer(method):
    """kl_positions="all": (sum of CE over the answer rows + lam T^2 * sum of D over every predicted, unpadded
    row) / the answer rows' count, as MTTObjective; D's target on a prompt row being the next input token."""
    problems = tasks.addition_problems(4, torch.Generator().manual_seed(2), 3)
    examples = tasks.addition_examples(DigitTokenizer(), problems)
    examples[1] = {key: value[:-2] for key, value in examples[1].items()}  # a shorter row: padding to skip
    batch = PadCollator(12)(examples)
    assert not batch["attention_mask"].all()
    adapted = lora_away_from_the_base(tiny_llama())
    lam, temperature = 0.7, 1.5
    cfg = experiment.config_for("tiny", temperature=temperature, kl_positions="all")
    out = training.build_objective(cfg, method, lam, "reverse")(adapted, **batch)

    logits, base_logits = logits_and_base_logits(adapted, batch)
    targets, next_tokens = batch["labels"][:, 1:], batch["input_ids"][:, 1:]
    answer = targets != -100
    predicted = batch["attention_mask"][:, 1:].bool()
    assert (predicted & ~answer).sum() > answer.sum()  # the prompt holds most of the rows
    logits, base_logits = logits[predicted], base_logits[predicted]
    divergence = masked_kl_rows(logits, base_logits, next_tokens[predicted], temperature=temperature,
                                direction="reverse" if method == "mtt" else "forward", mask_target=method == "mtt")
    ce = torch.nn.functional.cross_entropy(logits[answer[predicted]], targets[answer])
    expected = ce + lam * temperature**2 * divergence.sum() / answer.sum()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.kl.double(), divergence.sum() / answer.sum(), rtol=1e-4, atol=1e-6)
    labelled = dataclasses.replace(cfg, kl_positions="labels")
    answer_only = training.build_objective(labelled, method, lam, "reverse")(adapted, **batch)
    assert abs(float(answer_only.loss.detach()) - float(out.loss.detach())) > 1e-3


def test_equal_learning_interpolates_along_each_curve():
    def row(method, lam, seed, task_ce, kl, ppl):
        return dict(task="addition", adapter="lora", method=method, direction="forward" if method == "mtt" else "",
                    kl_positions="labels", lam=lam, target_kl=0.0, final_lam=lam, temperature=1.0, seed=seed,
                    task_ce=task_ce, task_acc=0.5,
                    exact_match=0.1, retention_ppl=ppl, retention_kl=kl)

    rows = [dict(row("base", 0.0, 0, 3.0, 0.0, 30.0), adapter=""),
            row("ce", 0.0, 0, 1.0, 0.40, 40.0), row("ce", 0.0, 1, 1.2, 0.60, 42.0),
            row("kl", 1.0, 0, 2.0, 0.10, 31.0), row("kl", 1.0, 1, 2.0, 0.10, 31.0),
            row("kl", 3.0, 0, 2.8, 0.05, 32.0), row("kl", 3.0, 1, 2.8, 0.05, 32.0),  # dominated in PPL
            row("mtt", 1.0, 0, 1.5, 0.30, 35.0), row("mtt", 1.0, 1, 1.5, 0.30, 35.0)]
    points = stats.grouped(rows)[("addition", "lora")]
    mean, std, low, high = points[("CE only", 0.0)]["retention_kl"]
    assert (mean, low, high) == pytest.approx((0.5, 0.4, 0.6)) and std == pytest.approx(math.sqrt(0.02))
    curves = stats.curves_of(points)
    assert sorted(curves) == ["MTT forward", "full KL"] and [lam for lam, _ in curves["full KL"]] == [0.0, 1.0, 3.0]
    # CE only at task CE 1.1 (KL 0.5); full KL at 2.0 (KL 0.1): at 1.55, halfway, KL 0.3.
    assert stats.at_equal_learning(curves["full KL"], 1.55, "retention_kl") == pytest.approx(0.3)
    assert math.isnan(stats.at_equal_learning(curves["MTT forward"], 1.8, "retention_kl"))
    text = summary.summarize(rows)
    assert "| full KL | 1 | 2 | 2.000 ± 0.000 |" in text
    # levels: base task CE 3.0 minus 50/75/90% of CE only's gain 1.9; full KL at 1.575: KL 0.5 - 0.4 * 0.475 / 0.9;
    # at 2.05 KL 0.1 - 0.05 * 0.05 / 0.8, while lam 3 (PPL 32 > 31) is off the PPL front, which ends at 2.0
    assert "| 2.050 (50%) | - | 0.0969 / - |" in text and "| 1.575 (75%) | - | 0.2889 / 35.72 |" in text
    assert ("| exploratory | task_ce 1.575 (75%) | KL, Python prose | MTT forward - full KL | 0 | - | not comparable "
            "(a curve does not reach the level) |" in text)
    # at 90% (task CE 1.290) both seeds' curves reach the level; on the addition task the primary pair is the
    # every-position one (the default kl_positions), so this row is exploratory
    assert "| exploratory | task_ce 1.290 (90%) | KL, Python prose | MTT forward - full KL | 2 | " in text


@pytest.fixture
def no_model(monkeypatch):
    """Fails a test that loads SmolLM2: argument errors must be found before that."""
    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: pytest.fail("the model was loaded"))


ARGUMENT_ERRORS = [  # each once found only after the model loaded (or hidden behind the missing-model message)
    (["--lams", "-1"], "argument --lams: must be in [0, 1e6], got -1"),
    (["--lams", "1", "nan"], "argument --lams: must be in [0, 1e6], got nan"),
    (["--lams", "inf"], "argument --lams: must be in [0, 1e6], got inf"),
    (["--adapted-layers", "0"], "argument --adapted-layers: must be an integer in [1, 30], got 0"),
    (["--adapted-layers", "99"], "argument --adapted-layers: must be an integer in [1, 30], got 99"),
    (["--seeds", "0", "-1"], "argument --seeds: must be an integer in [0, 2**32 - 1], got -1"),
    (["--steps", "1000000000"], "argument --steps: must be an integer in [1, 10000], got 1000000000"),
    (["--temperature", "inf"], "argument --temperature: must be in [0.01, 100], got inf"),
    (["--target-kls", "0.01", "0"], "argument --target-kls: must be in (0, 100], got 0"),
    (["--lr", "0"], "argument --lr: must be in (0, 1], got 0"),
    (["--retention-tokens", "0"], "argument --retention-tokens: must be an integer in [1, 1000000], got 0"),
    (["--threads", str(2**40)], "argument --threads: must be an integer in [1, 1024]"),
    (["--out", "{file}"], "--out: {file} is a file; give a folder for results.csv, summary.md and frontier.png"),
    (["--out", "{file}/out"], "--out: cannot write results.csv, summary.md and frontier.png to {file}/out"),
    (["--cache-dir", "{file}"], "--cache-dir: {file} is a file; give a folder for the dequantized model"),
]


@pytest.mark.parametrize("flags, message", ARGUMENT_ERRORS, ids=[" ".join(f) for f, _ in ARGUMENT_ERRORS])
def test_argument_errors_come_before_the_model_loads(tmp_path, capsys, no_model, flags, message):
    from tests.test_cli import cli_error

    (tmp_path / "file").write_text("")
    flags = [flag.format(file=tmp_path / "file") for flag in flags]
    argv = ["experiment", "--preset", "tiny", "--out", str(tmp_path / "out"), *flags]
    assert message.format(file=tmp_path / "file") in cli_error(capsys, *argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("csv_text, message", [("task,lam\naddition,1\n", "no column 'adapter'"),
                                               (None, "could not convert string to float: 'x'"),
                                               (b"\xff\xfe", "codec can't decode byte 0xff")])
def test_a_bad_results_csv_to_resume_is_a_one_line_error(tmp_path, capsys, no_model, csv_text, message):
    from tests.test_cli import cli_error

    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "results.csv"
    if csv_text is None:  # the right columns, a seed that is no number
        columns = experiment.COLUMNS
        csv_text = ",".join(columns) + "\n" + ",".join("x" if c == "seed" else "1" for c in columns)
    path.write_bytes(csv_text if isinstance(csv_text, bytes) else csv_text.encode())
    error = cli_error(capsys, "experiment", "--preset", "tiny", "--out", str(tmp_path / "out"), "--resume")
    assert f"--resume: {path} is not a results.csv of this experiment" in error and message in error


def test_a_damaged_model_cache_is_a_one_line_error(tmp_path, capsys):
    from tests.test_cli import cli_error

    (tmp_path / "cache").mkdir()
    tiny_llama().config.save_pretrained(tmp_path / "cache")
    (tmp_path / "cache" / "model.safetensors").write_text("cut short")
    error = cli_error(capsys, "experiment", "--preset", "tiny", "--cache-dir", str(tmp_path / "cache"), "--out",
                      str(tmp_path / "out"))
    assert f"--cache-dir: cannot load the model cached in {tmp_path / 'cache'} (" in error
    assert error.rstrip().endswith("delete that folder to rebuild it")


def test_adapted_layers_beyond_the_loaded_model_stop_before_training(tmp_path, capsys, monkeypatch):
    from tests.test_cli import cli_error

    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: (tiny_llama(layers=3), DigitTokenizer()))
    monkeypatch.setattr(experiment, "train_adapter", lambda *args: pytest.fail("training started"))
    error = cli_error(capsys, "experiment", "--preset", "tiny", "--adapted-layers", "4", "--out", str(tmp_path))
    assert "--adapted-layers: adapted_layers must be in [1, 3], got 4" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(experiment.model_package_folder() is None or importlib.util.find_spec("gguf") is None,
                    reason=f"the real-model run needs {experiment.MISSING_MODEL}")
def test_tiny_run_on_smollm2(tmp_path):
    """The command line end to end, its output going to a pipe (no progress bars there)."""
    command = [sys.executable, "-m", "fastmtt", "experiment", "--preset", "tiny", "--methods", "ce", "kl", "mtt",
               "--lams", "3", "--adapted-layers", "2", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout + result.stderr and "it/s" not in result.stderr
    rows = experiment.read_csv(str(tmp_path / "results.csv"))
    by_method = {row["method"]: row for row in rows}
    assert len(rows) == 4 and set(by_method) == {"base", "ce", "kl", "mtt"}
    base, ce = by_method["base"], by_method["ce"]
    for text in ("retention", "kjv"):  # Python prose and the KJV
        assert abs(base[f"{text}_kl"]) < 1e-5 and 5 < base[f"{text}_ppl"] < 200  # coherent English model
    assert ce["task_ce"] < base["task_ce"] - 0.3  # two steps of CE already teach the answer format
    for row in rows[1:]:
        assert row["retention_kl"] > 1e-5 and row["kjv_kl"] > 1e-5 and row["seconds"] > 0
        adapter = tmp_path / "adapters" / experiment.run_name(row) / "adapter_config.json"
        assert adapter.exists(), sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert (tmp_path / "frontier.png").stat().st_size > 10_000 and "| CE only | 0 | 1 |" in (
        tmp_path / "summary.md").read_text()
    assert "| CE only | 0 | 1 |" in result.stdout
    assert [p.name.split("-")[0] for p in (tmp_path / "base_cache").iterdir()] == ["addition"]  # one BaseCache


def test_each_adapter_kind_starts_at_the_base_and_gets_gradients():
    """LoRA, DoRA, RandLoRA (randlora_alpha 20 r) and SineLoRA adapt a tiny Llama and start at the base model."""
    import peft

    from fastmtt.sine_lora import SineLoraConfig, SineLoraLinear

    assert training.adapter_config("randlora", 8).randlora_alpha == 160
    assert isinstance(training.adapter_config("sinelora", 8), SineLoraConfig)
    ids = torch.randint(0, 13, (2, 6))
    for kind in experiment.ADAPTERS:
        model = tiny_llama()
        base = model(input_ids=ids).logits
        adapted = peft.get_peft_model(model, training.adapter_config(kind, 4))
        torch.testing.assert_close(adapted(input_ids=ids).logits, base)
        adapted(input_ids=ids).logits.square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.parameters() if p.requires_grad), kind
    assert any(isinstance(m, SineLoraLinear) for m in adapted.modules())


def test_results_written_before_the_kjv_scores_still_read(tmp_path):
    """docs/experiment/results.csv predates kl_positions and the KJV columns: they read as "labels" and NaN."""
    from tests.utils import ROOT

    rows = experiment.read_csv(str(ROOT / "docs" / "experiment" / "results.csv"))
    assert len(rows) > 10 and all(row["kl_positions"] in ("labels", "all") for row in rows)
    assert all(math.isnan(row["kjv_kl"]) and math.isnan(row["kjv_ppl"]) for row in rows)
    assert all(row["retention_kl"] >= 0 for row in rows)


def test_operand_blind_bound_is_the_entropy_of_the_sum_per_answer_token():
    """For 1-digit operands by hand: sums 2..18 of 81 pairs; 2 or 3 tokens per answer (EOS included)."""
    counts = {total: 9 - abs(total - 10) for total in range(2, 19)}
    entropy = -sum(c / 81 * math.log(c / 81) for c in counts.values())  # the whole answer: H(sum)
    tokens = sum(c * (len(str(total)) + 1) for total, c in counts.items()) / 81
    assert tasks.operand_blind_bound(1)["task_ce"] == pytest.approx(entropy / tokens)
    assert tasks.operand_blind_bound(1)["exact_match"] == pytest.approx(9 / 81)
    bound = tasks.operand_blind_bound(3)  # the held-out estimate: CE 1.603, 187 of 442 tokens right
    assert bound["task_ce"] == pytest.approx(1.586, abs=1e-3) and bound["task_acc"] == pytest.approx(0.417, abs=1e-3)
    tokenizer = DigitTokenizer()
    examples = tasks.addition_examples(tokenizer, tasks.addition_problems(50, torch.Generator().manual_seed(0), 2))
    prompts = ["".join("0123456789+="[t] for t in e["input_ids"][:6]) for e in examples]
    assert all(len(p) == 6 and p[2] == "+" and p[5] == "=" and p[0] != "0" and p[3] != "0" for p in prompts)


@pytest.mark.parametrize("p, df, quantile", [(0.95, 1, 6.313752), (0.95, 2, 2.919986), (0.95, 3, 2.353363),
                                              (0.95, 4, 2.131847), (0.95, 9, 1.833113), (0.95, 29, 1.699127),
                                              (0.975, 4, 2.776445), (0.05, 5, -2.015048)])
def test_t_quantiles_match_the_tables(p, df, quantile):
    assert stats.t_quantile(p, df) == pytest.approx(quantile, abs=1e-6)
    assert stats.t_cdf(quantile, df) == pytest.approx(p, abs=1e-7)  # the tables round to 6 decimals


def test_a_t_interval_covers_the_mean_by_the_t_quantile():
    mean, low, high = stats.t_interval([1.0, 2.0, 6.0])  # mean 3, std sqrt(7), n 3: half width 2.919986 sqrt(7/3)
    half = 2.919986 * math.sqrt(7 / 3)
    assert (mean, high - mean, mean - low) == pytest.approx((3.0, half, half))
    assert all(math.isnan(v) for v in stats.t_interval([1.0])[1:])


def test_pareto_points_and_the_seed_paired_verdict():
    assert stats.pareto([(1.0, 0.5), (2.0, 0.1), (1.5, 0.6), (3.0, 0.1)]) == [(1.0, 0.5), (2.0, 0.1)]
    assert stats.interpolate([(1.0, 0.5), (2.0, 0.1)], 1.5) == pytest.approx(0.3)
    assert math.isnan(stats.interpolate([(1.0, 0.5), (2.0, 0.1)], 2.5))

    def runs(kl, shift=0.0, seeds=5):
        """A point at task CE 2.0 with forgetting kl + shift * seed per seed (CE only: (1.0, 0.5) for every seed)."""
        return [dict(seed=float(seed), task_ce=2.0, retention_kl=kl + shift * seed) for seed in range(seeds)]

    ce_only = [dict(seed=float(seed), task_ce=1.0, retention_kl=0.5) for seed in range(5)]
    # seed effects shared by both curves cancel in the paired differences: halfway, 0.3 + 0.01 s vs 0.35 + 0.01 s
    clear = {("CE only", 0.0): ce_only, ("MTT forward", 1.0): runs(0.1, 0.02), ("full KL", 1.0): runs(0.2, 0.02)}
    diff, low, high, seeds = stats.paired_difference(clear, "MTT forward", "full KL", 1.5)
    assert (diff, low, high, seeds) == pytest.approx((-0.05, -0.05, -0.05, 5))
    assert stats.verdict(diff, low, high, seeds) == "forgets less"
    assert stats.verdict(diff, low, high, 3) == "forgets less (preliminary: 3 seeds)"
    assert stats.verdict(diff, low, high, 2) == "no verdict: 2 seed(s)"
    # another curve's rows never move the interval; a seed missing from a curve drops out of the pairs
    unrelated = {**clear, ("MTT forward, all positions", 1.0): runs(0.0, 0.3)}
    assert stats.paired_difference(unrelated, "MTT forward", "full KL", 1.5) == (diff, low, high, seeds)
    noisy = {**clear, ("MTT forward", 1.0): [dict(r, retention_kl=0.1 + 0.3 * (-1) ** i)
                                             for i, r in enumerate(runs(0.1))]}
    diff, low, high, seeds = stats.paired_difference(noisy, "MTT forward", "full KL", 1.5)
    assert low < 0 < high and stats.verdict(diff, low, high, seeds).startswith("tie")
    assert stats.paired_difference(clear, "full KL", "MTT forward", 1.5)[0] == pytest.approx(0.05)
    assert stats.verdict(*stats.paired_difference(clear, "MTT forward", "full KL", 2.5)).startswith("not comparable")
    short = {**clear, ("full KL", 1.0): runs(0.2, 0.02, seeds=4)}
    assert stats.paired_difference(short, "MTT forward", "full KL", 1.5)[3] == 4


def tiny_task(steps, batch_size=2):
    """cfg, TaskData of the addition task on DigitTokenizer and tiny_llama (its top 2 layers adapted)."""
    cfg = experiment.config_for("tiny", steps=steps, batch_size=batch_size, adapted_layers=2)
    digits = {"retention": [int(c) for c in "31415926535897932384626433832795" * 8]}
    return cfg, tasks.make_task("addition", DigitTokenizer(), cfg, digits), tiny_llama()


@pytest.mark.parametrize("method", ["kl", "mtt"])
def test_a_forgetting_budget_moves_lam_by_the_clipped_controller_step(method):
    """KLBudget after every step, horizon steps / 30 (at least 1): the first step's divergence is 0 (the
    adapter starts at the base), so lam shrinks by 0.2 / horizon; then a budget far below the divergence
    grows it by that much a step, one far above shrinks it."""
    cfg, data, top = tiny_task(steps=5)
    _, below = training.train_adapter(top, data, cfg, "lora", method, 1.0, "forward", 0, target_kl=1e-9)
    _, above = training.train_adapter(top, data, cfg, "lora", method, 1.0, "forward", 0, target_kl=100.0)
    _, fixed = training.train_adapter(top, data, cfg, "lora", method, 1.0, "forward", 0)
    assert below == pytest.approx(0.8 * 1.2**4) and above == pytest.approx(0.8**5) and fixed == 1.0
    assert training.budget_horizon(300) == 10.0 and training.budget_horizon(50) == pytest.approx(50 / 30)
    assert training.budget_horizon(5) == 1.0  # KLBudget's least horizon


def test_an_adapter_trains_at_its_own_learning_rate_unless_the_command_line_sets_one(monkeypatch):
    """adapter_lrs gives one adapter its own AdamW learning rate (the far preset's RandLoRA); --lr sets every one's."""
    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: (tiny_llama(), DigitTokenizer()))
    monkeypatch.setattr(experiment, "RETENTION_TEXTS", {"retention": lambda: "2718281828459045" * 40,
                                                        "kjv": lambda: "1618033988749894" * 40})
    learning_rates = []
    adamw = torch.optim.AdamW

    def recording(params, lr, **kwargs):
        learning_rates.append(lr)
        return adamw(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    cfg = experiment.config_for("tiny", adapters=("lora", "dora"), adapter_lrs={"dora": 0.05}, methods=("ce",),
                                adapted_layers=2)
    experiment.run_experiment(cfg, log=lambda line: None)
    assert learning_rates == [2e-3, 0.05]
    assert experiment.config_for("far").adapter_lrs == {"randlora": 1e-4, "sinelora": 1e-4}
    assert experiment.config_for("far", lr=0.01).adapter_lrs == {}
    assert experiment.config_for("far", lr=0.01, adapter_lrs={"dora": 0.1}).adapter_lrs == {"dora": 0.1}


def test_each_curve_is_compared_with_its_full_kl_labelled_position_and_fixed_lam_twins():
    names = {"CE only", "full KL", "MTT forward", "MTT reverse", "MTT forward, all positions",
             "full KL, all positions", "MTT forward, budget", "MTT forward T=2"}
    assert stats.compared_pairs(names) == [
        ("MTT forward", "full KL"), ("MTT forward, all positions", "full KL, all positions"),
        ("MTT reverse", "full KL"), ("MTT forward, all positions", "MTT forward"),
        ("full KL, all positions", "full KL"), ("MTT forward, budget", "MTT forward")]
    assert stats.compared_pairs({"CE only", "MTT forward"}) == []


def test_budget_runs_are_planned_named_and_summarized_as_their_own_curve():
    cfg = experiment.config_for("tiny", methods=("ce", "mtt"), lams=(3.0,), target_kls=(0.02,))
    assert experiment.planned_runs(cfg) == [("lora", "ce", 0.0, "", 0, 0.0), ("lora", "mtt", 3.0, "forward", 0, 0.0),
                                            ("lora", "mtt", training.BUDGET_LAM, "forward", 0, 0.02)]
    row = dict(task="addition2", adapter="lora", method="mtt", direction="forward", kl_positions="labels", lam=1.0,
               target_kl=0.02, temperature=1.0, seed=2.0)
    assert experiment.run_name(row) == "addition2-lora-mtt-forward-labels-lam1-budget0.02-T1-seed2"
    assert experiment.run_name(dict(row, target_kl=0.0)) == "addition2-lora-mtt-forward-labels-lam1-T1-seed2"
    scores = dict(task_ce=1.0, task_acc=0.5, exact_match=0.1, retention_ppl=30.0, retention_kl=0.1)
    rows = [dict(row, method="base", adapter="", target_kl=0.0, final_lam=0.0, **scores),
            dict(row, method="ce", target_kl=0.0, final_lam=0.0, **scores),
            dict(row, final_lam=4.0, **scores), dict(row, seed=1.0, final_lam=6.0, **scores)]
    assert "| MTT forward, budget | 0.02, 5 | 2 | 1.000 ± 0.000 |" in summary.summarize(rows)


def test_resume_scores_finished_runs_again_on_a_new_retention_length(tmp_path, monkeypatch):
    """--resume with another --retention-tokens: every run with a saved adapter gets the scores a fresh run
    at that length gets, its task scores unchanged; one whose adapter is gone is kept as it was."""
    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: (tiny_llama(), DigitTokenizer()))
    texts = {"retention": lambda: "2718281828459045" * 40, "kjv": lambda: "1618033988749894" * 40}
    monkeypatch.setattr(experiment, "RETENTION_TEXTS", texts)
    grid = dict(adapted_layers=2, methods=("ce", "mtt"), target_kls=(0.05,))
    quiet = lambda line: None  # noqa: E731
    first = experiment.run_experiment(experiment.config_for("tiny", retention_tokens=128, **grid), str(tmp_path / "a"),
                                      log=quiet)
    fresh = experiment.run_experiment(experiment.config_for("tiny", retention_tokens=320, **grid), str(tmp_path / "b"),
                                      log=quiet)
    gone = first[-1]
    import shutil

    shutil.rmtree(tmp_path / "a" / "adapters" / experiment.run_name(gone))
    lines = []
    again = experiment.run_experiment(experiment.config_for("tiny", retention_tokens=320, **grid), str(tmp_path / "a"),
                                      resume=True, log=lines.append)
    assert [r["method"] for r in again] == ["base", "ce", "mtt", "mtt"] and again[-1]["target_kl"] == 0.05
    assert sum("scored again on 320 tokens" in line for line in lines) == 3
    assert sum("kept: no saved adapter" in line for line in lines) == 1
    for before, after, new in zip(first[:-1], again[:-1], fresh[:-1]):
        assert after["retention_tokens"] == 320 and after["task_ce"] == before["task_ce"]
        for column in ("retention_kl", "retention_ppl", "kjv_kl", "kjv_ppl"):
            assert after[column] == pytest.approx(new[column], rel=1e-5, abs=1e-7), column
        assert after["method"] == "base" or after["retention_kl"] != pytest.approx(before["retention_kl"], rel=1e-3)
    assert again[-1]["retention_tokens"] == 128 and again[-1]["retention_kl"] == first[-1]["retention_kl"]
    assert experiment.read_csv(str(tmp_path / "a" / "results.csv"))[1]["retention_tokens"] == 320
    with pytest.raises(experiment.UsageError, match="--retention-tokens: at most 640"):
        experiment.run_experiment(experiment.config_for("tiny", retention_tokens=641, **grid), log=quiet)


def test_the_base_of_smollm2_size_gets_a_fingerprint():
    """GridBaseCache names its folder by the base's fingerprint: a tensor of SmolLM2's embedding size (49152 x 576,
    past 2**24 entries, where fp32 sample indices round beyond the end) is sampled within bounds, last entry kept."""
    from fastmtt.base_cache import fingerprint

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(49152 * 576, dtype=torch.uint8), requires_grad=False)
    before = fingerprint(module)["digest"]
    module.weight.data[-1] = 1
    assert fingerprint(module)["digest"] != before


class LiveBase:
    """experiment.GridBaseCache's stand-in for the live base pass: no cache (training and scoring run the base)."""

    def __init__(self, base_model, folder, task):
        pass

    def training(self, data, cfg):
        return None

    retention = training


def test_a_grid_reads_the_base_from_one_cache_and_scores_as_the_live_base_pass(tmp_path, monkeypatch):
    """One BaseCache per task (OUT/base_cache/<task>-<fingerprint>), built by the first run needing each set of
    texts (each retention text: the first scored run; the training examples: the first full-KL or MTT run, none
    for CE only), read by every later run and by a resumed grid; results.csv as with the live base pass."""
    from fastmtt import BaseCache

    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: (tiny_llama(), DigitTokenizer()))
    digits = [torch.randint(0, 10, (700,), generator=torch.Generator().manual_seed(seed)).tolist() for seed in (1, 2)]
    texts = ["".join(map(str, text)) for text in digits]  # no window twice, so the cache holds 4 windows a text
    monkeypatch.setattr(experiment, "RETENTION_TEXTS", {"retention": lambda: texts[0], "kjv": lambda: texts[1]})
    builds, reads = [], []
    build, base_hidden = BaseCache.build.__func__, BaseCache.base_hidden
    monkeypatch.setattr(BaseCache, "build", classmethod(lambda cls, model, examples, path, **kwargs: builds.append(
        path) or build(cls, model, examples, path, **kwargs)))
    monkeypatch.setattr(BaseCache, "base_hidden", lambda self, *args, **kwargs: reads.append(1) or base_hidden(
        self, *args, **kwargs))
    cfg = experiment.config_for("tiny", methods=("ce", "kl", "mtt"), seeds=(0, 1), kl_positions="all",
                                adapted_layers=2)
    quiet = lambda line: None  # noqa: E731
    cached = experiment.run_experiment(cfg, str(tmp_path / "cached"), log=quiet)
    (folder,) = (tmp_path / "cached" / "base_cache").iterdir()
    assert folder.name.startswith("addition-") and builds == [str(folder)] * 3  # retention, kjv, then training
    assert len(BaseCache.open(folder)) == 4 + 2 * 4  # 2 steps of 2 examples, 4 windows of 64 tokens per text
    assert len(reads) == 4 * cfg.steps + 6 * 2  # each step of the 4 regularized runs, each text of the 6 scored
    monkeypatch.setattr(experiment, "GridBaseCache", LiveBase)
    live = experiment.run_experiment(cfg, str(tmp_path / "live"), log=quiet)
    assert not (tmp_path / "live" / "base_cache").exists() and len(reads) == 4 * cfg.steps + 6 * 2
    untimed = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert untimed(cached) == untimed(live)  # bit for bit in fp32
    assert all(row["retention_kl"] > 1e-6 and row["kjv_kl"] > 1e-6 for row in cached if row["method"] != "base")

    monkeypatch.setattr(experiment, "GridBaseCache", training.GridBaseCache)
    shards = sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    experiment.write_csv(cached[:-1], str(tmp_path / "cached" / "results.csv"))  # the last run to do again
    resumed = experiment.run_experiment(cfg, str(tmp_path / "cached"), resume=True, log=quiet)
    assert untimed(resumed[-1:]) == untimed(cached[-1:]) and len(builds) == 6
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")) == shards  # nothing new
    experiment.run_experiment(dataclasses.replace(cfg, methods=("ce",), seeds=(0,)), str(tmp_path / "ce"), log=quiet)
    assert len(BaseCache.open(next((tmp_path / "ce" / "base_cache").iterdir()))) == 2 * 4  # retention texts only


def test_every_position_is_the_labelled_objective_on_a_fully_labelled_task_and_its_rows_say_so(monkeypatch):
    """FULLY_LABELLED_TASKS are those whose every predicted position has a label; there kl_positions="all"
    trains, and records, the labelled objective (no duplicate runs)."""
    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: (tiny_llama(), DigitTokenizer()))
    monkeypatch.setattr(tasks, "license_text", lambda: "1414213562373095" * 40)
    monkeypatch.setattr(experiment, "RETENTION_TEXTS", {"retention": lambda: "2718281828459045" * 40,
                                                        "kjv": lambda: "1618033988749894" * 40})
    cfg = experiment.config_for("tiny", tasks=experiment.TASKS, methods=("kl",), kl_positions="all",
                                adapted_layers=2)
    for task in experiment.TASKS:
        data = tasks.make_task(task, DigitTokenizer(), cfg, {"retention": [1, 2] * 200})
        train = data.collate(data.train)
        labelled, attended = predicted_positions(train["labels"], train["attention_mask"], -100)
        assert torch.equal(labelled, attended) == (task in experiment.FULLY_LABELLED_TASKS), task
    positions = []
    build_objective = training.build_objective
    monkeypatch.setattr(training, "build_objective", lambda cfg, *args: positions.append(cfg.kl_positions) or
                        build_objective(cfg, *args))
    rows = experiment.run_experiment(dataclasses.replace(cfg, tasks=("addition", "license")), log=lambda line: None)
    assert {(r["task"], r["kl_positions"]) for r in rows if r["method"] == "kl"} == {("addition", "all"),
                                                                                   ("license", "labels")}
    assert positions == ["all", "labels"]  # one objective per run


def test_a_task_trains_its_own_steps_unless_the_command_line_sets_them(monkeypatch):
    """task_steps gives one task its own step count (the far preset's near task); --steps sets every task's."""
    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: (tiny_llama(), DigitTokenizer()))
    monkeypatch.setattr(experiment, "RETENTION_TEXTS", {"retention": lambda: "2718281828459045" * 40,
                                                        "kjv": lambda: "1618033988749894" * 40})
    trained = []
    train_adapter = experiment.train_adapter

    def recording(top, data, cfg, *args, **kwargs):
        trained.append((data.name, cfg.steps, len(data.train)))
        return train_adapter(top, data, cfg, *args, **kwargs)

    monkeypatch.setattr(experiment, "train_adapter", recording)
    cfg = experiment.config_for("tiny", tasks=("addition", "addition2"), task_steps={"addition2": 3}, methods=("ce",),
                                adapted_layers=2)
    experiment.run_experiment(cfg, log=lambda line: None)
    assert trained == [("addition", 2, 4), ("addition2", 3, 6)]  # batch 2
    assert experiment.config_for("far").task_steps == {"license": 50} and experiment.config_for("far").steps == 300
    assert experiment.config_for("far", steps=7).task_steps == {}
    assert experiment.config_for("far", steps=7, task_steps={"license": 9}).task_steps == {"license": 9}


def test_one_setting_on_two_tasks_reports_the_forgetting_removed_the_gain_kept_and_the_default_rule():
    def row(task, method, lam, task_ce, kl, target_kl=0.0, acc=0.5, exact=0.1):
        return dict(task=task, adapter="" if method == "base" else "lora", method=method,
                    direction="forward" if method == "mtt" else "", kl_positions="labels", lam=lam,
                    target_kl=target_kl, final_lam=lam, temperature=1.0, seed=0.0, task_ce=task_ce, task_acc=acc,
                    exact_match=exact, retention_ppl=30.0, retention_kl=kl)

    rows = [row("addition2", "base", 0.0, 5.0, 0.0, exact=0.0), row("addition2", "ce", 0.0, 1.0, 0.4, exact=0.5),
            row("addition2", "mtt", 3.0, 2.0, 0.1, exact=0.4),
            row("addition2", "mtt", 1.0, 1.5, 0.3, target_kl=0.02, exact=0.44),
            row("addition2", "mtt", 0.3, 1.2, 0.3, exact=0.46), row("addition2", "kl", 0.3, 1.2, 0.3, exact=0.44),
            row("addition2", "mtt", 0.1, 1.0, 0.35, exact=0.5),
            row("license", "base", 0.0, 4.0, 0.0, acc=0.2), row("license", "ce", 0.0, 3.0, 0.8, acc=0.4),
            row("license", "mtt", 3.0, 3.5, 0.6, acc=0.3), row("license", "mtt", 0.3, 3.05, 0.7, acc=0.39),
            row("license", "kl", 0.3, 3.0, 0.7, acc=0.4)]
    rows = [dict(r, seed=float(seed)) for r in rows for seed in ([0] if r["method"] == "base" else range(3))]
    rows += [dict(row(task, "mtt", 0.5, 1.0, 0.3, acc=0.5, exact=0.5), seed=float(seed))  # 2 seeds: not a default
             for task in ("addition2", "license") for seed in range(2)]
    rows += [dict(row("addition2", "mtt", lam, 1.0, 0.1, exact=0.5), kl_positions="all", seed=float(seed))
             for lam in (0.3, 10.0) for seed in range(3)]  # license (fully labelled) runs it as its labelled twin
    rows += [dict(row("addition2", "kl", 3.0, 1.0, 0.1, exact=0.5), temperature=2.0, seed=float(seed))
             for seed in range(3)]  # a curve run on one task only: no default
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    by_task = {task: points for (task, _), points in stats.grouped(rows).items() if task in base}
    assert stats.gains_kept(by_task["addition2"][("MTT forward", 3.0)], by_task["addition2"][("CE only", 0.0)],
                                 base["addition2"]) == pytest.approx(dict(task_ce=0.75, exact_match=0.8))
    lines = summary.across_tasks(stats.grouped(rows), base)
    assert "| MTT forward | 3 | 75% / 75% (75%) | 25% / 50% (50%) |" in lines
    assert "| MTT forward, budget | 0.02 | 25% / 88% (88%) | - |" in lines
    assert "| MTT forward, all positions | 0.3 | 75% / 100% (100%) | 13% / 95% (95%) |" in lines
    assert "| MTT forward, all positions | 10 | 75% / 100% (100%) | - |" in lines  # license did not run lam 10
    assert "| full KL T=2 | 3 | 75% / 100% (100%) | - |" in lines
    # MTT lam 0.3 keeps 95% / 92% (exact) on addition2 and 95% / 95% (acc) on license; lam 0.1 ran on one task,
    # lam 0.5 with 2 seeds; full KL lam 0.3 keeps 88% of the exact match
    assert stats.largest_lam_keeping(by_task, base) == {"MTT forward": 0.3, "full KL": pytest.approx(math.nan,
                                                                                                       nan_ok=True)}
    assert lines[-1].endswith("every task: MTT forward 0.3, MTT forward, all positions 0.3, full KL none.")
    license = [r for r in rows if r["task"] == "license"]
    assert summary.across_tasks(stats.grouped(license), base) == []


def test_a_setting_transfers_where_it_does_the_same_share_on_both_tasks():
    """transfer_gaps: the share of CE only's forgetting a setting removes, and of its task-CE gain it keeps, on
    the first task minus the second, with seed-bootstrap intervals; settings with fewer than MIN_SEEDS seeds on
    a task are left out."""
    def row(task, method, lam, kl, seed, target_kl=0.0, kjv=math.nan, task_ce=1.0):
        return dict(task=task, adapter="" if method == "base" else "lora", method=method,
                    direction="forward" if method == "mtt" else "", kl_positions="labels", lam=lam,
                    target_kl=target_kl, final_lam=lam, temperature=1.0, seed=float(seed), task_ce=task_ce,
                    task_acc=0.5, exact_match=0.5, retention_ppl=30.0, retention_kl=kl, kjv_kl=kjv)

    rows = [row("addition2", "base", 0.0, 0.0, 0, task_ce=5.0), row("license", "base", 0.0, 0.0, 0, task_ce=4.0)]
    rows += [row("addition2", "ce", 0.0, 0.4, s, kjv=0.2) for s in range(3)]
    rows += [row("license", "ce", 0.0, 0.8, s, kjv=0.4) for s in range(3)]
    rows += [row("addition2", "mtt", 1.0, kl, s, kjv=0.1, task_ce=3.0)  # removes 50%, keeps 50% of the gain
             for s, kl in enumerate((0.1, 0.2, 0.3))]
    rows += [row("license", "mtt", 1.0, 0.6, s, kjv=0.2, task_ce=3.25) for s in range(3)]  # 25%, 25%
    rows += [row(task, "mtt", 1.0, 0.1, s, target_kl=0.05, kjv=0.1) for task in ("addition2", "license")
             for s in range(3)]
    rows += [row(task, "kl", 1.0, 0.1, s) for task in ("addition2", "license") for s in range(2)]  # 2 seeds
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    points = [[r for r in rows if (r["task"], (r["method"], r["target_kl"])) == key]
              for key in itertools.product(("addition2", "license"), (("ce", 0.0), ("mtt", 0.0)))]
    gap, low, high = stats.kept_gap(*points, "retention_kl")  # 50% of the forgetting left minus 75%
    assert gap == pytest.approx(-0.25) and -0.5 <= low < -0.25 < high <= 0.0
    assert stats.kept_gap(*points, "task_ce", 5.0, 4.0) == pytest.approx((0.25, 0.25, 0.25))
    lines = summary.transfer_gaps(rows, base)
    assert lines[1] == ("Exploratory: lora, does one setting transfer? On addition2 minus on license: the share "
                        "of CE only's forgetting removed on each text and of its task-CE gain kept, 90% "
                        "seed-bootstrap interval:")
    assert lines[3] == "| method | lam (budget: target_kl) | Python prose: removed | KJV: removed | task CE: kept |"
    assert lines[5].startswith("| MTT forward | 1 | +25% [")
    assert lines[5].endswith("| +0% [+0%, +0%] | +25% [+25%, +25%] |")
    # the budget removes 75% / 50% (Python prose / KJV) of the forgetting on addition2, 87.5% / 75% on license
    assert lines[6] == "| MTT forward, budget | 0.05 | -12% [-12%, -12%] | -25% [-25%, -25%] | +0% [+0%, +0%] |"
    assert len(lines) == 7  # full KL: two seeds
    assert summary.transfer_gaps([r for r in rows if r["task"] == "license"], base) == []


def problems_of(examples):
    """The (a, b) of addition examples on DigitTokenizer."""
    texts = ["".join("0123456789+="[t] for t in e["input_ids"] if t < 12).split("=")[0] for e in examples]
    return [tuple(int(n) for n in text.split("+")) for text in texts]


def test_held_out_addition_problems_are_new_swaps_included():
    """Scored and validation problems are never training problems, nor b + a of one, nor each other's; drawn
    from one stream without that rule (as the committed far runs were) they would overlap."""
    cfg = experiment.config_for("tiny", steps=400, batch_size=8, task_eval_examples=300)  # 3200 of 8100 pairs
    data = tasks.make_task("addition2", DigitTokenizer(), cfg, {})
    train = problems_of(data.train)
    scored, validation = (problems_of([dict(input_ids=row.tolist()) for batch in batches for row in batch["input_ids"]])
                          for batches in (data.task_eval, data.validation))
    assert len(train) == 3200 and len(scored) == len(validation) == 300
    seen = {tasks.unordered(p) for p in train}
    assert not seen & {tasks.unordered(p) for p in scored + validation}
    assert not {tasks.unordered(p) for p in scored} & {tasks.unordered(p) for p in validation}
    assert data.train_overlap == 0 == tasks.train_overlap(train, scored)
    generator = torch.Generator().manual_seed(0)
    assert tasks.train_overlap(train, tasks.addition_problems(300, generator, 2)) > 100  # about 45% of 300
    assert tasks.train_overlap([(12, 34)], [(34, 12), (12, 34), (12, 43)]) == 2
    with pytest.raises(ValueError, match="count: 6 new 1-digit problems asked for, 5 left"):
        tasks.addition_problems(6, generator, 1, exclude=set(sorted((a, b) for a in range(1, 10)
                                                                     for b in range(a, 10))[:40]))  # of 45


def test_the_committed_far_runs_record_how_many_scored_problems_were_training_ones():
    """docs/experiment/far/results.csv predates the rule above: its addition2 rows say 55 of 128 (swaps
    counted; 32 without), the overlap of its draw (2400 training problems, then 128 from the same stream)."""
    from tests.utils import ROOT

    generator = torch.Generator().manual_seed(1234)
    train, scored = tasks.addition_problems(2400, generator, 2), tasks.addition_problems(128, generator, 2)
    assert tasks.train_overlap(train, scored) == 55 and sum(p in set(train) for p in scored) == 32
    rows = experiment.read_csv(str(ROOT / "docs" / "experiment" / "far" / "results.csv"))
    assert {r["train_overlap"] for r in rows if r["task"] == "addition2"} == {55.0}
    assert all(math.isnan(r["train_overlap"]) for r in rows if r["task"] == "license")  # not recorded


class PositionTokenizer:
    """Each character's token is its position in the text: a window's tokens say where it lies."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


def test_the_license_text_trains_validates_and_scores_apart(monkeypatch):
    monkeypatch.setattr(tasks, "license_text", lambda: "x" * 1000)
    cfg = experiment.config_for("tiny", steps=50, batch_size=8, task_eval_examples=100)
    data = tasks.make_task("license", PositionTokenizer(), cfg, {})
    train = [t for example in data.train for t in example["input_ids"]]
    validation, scored = ([t for batch in batches for t in batch["input_ids"].flatten().tolist()]
                          for batches in (data.validation, data.task_eval))
    assert len(data.train) == 400 and max(train) < 700 and min(validation) >= 700 and max(validation) < 800
    assert min(scored) >= 800 and len(scored) == 12 * 16 and len(validation) == 6 * 16


def test_the_step_count_is_chosen_on_the_validation_split():
    cfg, data, model = tiny_task(steps=3)
    curve = training.validation_curve(model, data, cfg, checkpoints=(1, 3), seeds=(0,))
    trained, _ = training.train_adapter(model, data, cfg, "lora", "ce", 0.0, "", 0)
    assert sorted(curve) == [1, 3] and curve[1] != curve[3]
    assert curve[3] == pytest.approx(evaluate_lm(trained, data.validation, with_kl=False)["ce"], rel=1e-6)
    assert curve[3] != pytest.approx(evaluate_lm(trained, data.task_eval, with_kl=False)["ce"], rel=1e-6)
    with pytest.raises(ValueError, match="checkpoints: at most cfg.steps = 3"):
        training.validation_curve(model, data, cfg, checkpoints=(4,), seeds=(0,))


def test_resuming_into_runs_scored_on_other_held_out_examples_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: (tiny_llama(), DigitTokenizer()))
    monkeypatch.setattr(experiment, "RETENTION_TEXTS", {"retention": lambda: "2718281828459045" * 40,
                                                        "kjv": lambda: "1618033988749894" * 40})
    cfg = experiment.config_for("tiny", methods=("ce",), adapted_layers=2)
    rows = experiment.run_experiment(cfg, str(tmp_path), log=lambda line: None)
    assert [r["train_overlap"] for r in rows] == [0, 0]
    experiment.write_csv([dict(r, train_overlap=55) for r in rows], str(tmp_path / "results.csv"))
    with pytest.raises(experiment.UsageError, match="holds runs of addition scored on other held-out examples "
                                                     r"\(train_overlap 55, now 0\)"):
        experiment.run_experiment(cfg, str(tmp_path), resume=True, log=lambda line: None)


def committed_far_runs():
    from tests.utils import ROOT

    return experiment.read_csv(str(ROOT / "docs" / "experiment" / "far" / "results.csv"))


LORA_CUT = "-0.0615 [-0.0843, -0.0387]"  # experiments.md: LoRA's far task on the other adapters' lams only


def test_the_other_adapters_sparse_grid_widens_the_gap():
    """LoRA's far task cut to lam 1, 3 and 10 (DoRA's, SineLoRA's and RandLoRA's grid): MTT minus full KL at 90%
    of CE only's task-CE gain is about twice the full grid's -0.0286, as experiments.md says."""
    rows = [r for r in committed_far_runs() if r["task"] == "addition2" and r["adapter"] in ("lora", "")
            and (r["method"] in ("base", "ce") or r["lam"] in (1.0, 3.0, 10.0) and r["kl_positions"] == "labels"
                 and r["target_kl"] == 0)]
    base = next(r for r in rows if r["method"] == "base")["task_ce"]
    ce_only = stats.grouped(rows)[("addition2", "lora")][("CE only", 0.0)]["task_ce"][0]
    diff, low, high, seeds = stats.paired_difference(stats.runs_by_point(rows)[("addition2", "lora")], "MTT forward",
                                                     "full KL", base - 0.9 * (base - ce_only))
    assert f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]" == LORA_CUT and seeds == 3


def test_the_numbers_of_the_answer_come_from_the_summary():
    """Every interval and every mean ± std that README's Results paragraph and experiments.md's "The answer"
    quote is in docs/experiment/far/summary.md as written there (LORA_CUT: computed by its own test)."""
    from tests.utils import ROOT

    summary_text = (ROOT / "docs" / "experiment" / "far" / "summary.md").read_text()
    page = (ROOT / "docs" / "experiments.md").read_text()
    readme = (ROOT / "README.md").read_text()
    quoted = [page[page.index("### The answer"):page.index("### The 5-seed reruns")],
              readme[readme.index("**On a real model**"):readme.index("## Documentation")]]
    numbers = [re.findall(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]|\d+\.\d{3,4} ± \d+\.\d{3,4}",
                          " ".join(text.split())) for text in quoted]
    assert len(numbers[0]) > 30 and len(numbers[1]) > 5
    missing = [n for n in itertools.chain(*numbers) if n not in summary_text and n != LORA_CUT]
    assert not missing, missing


def test_the_rerun_plan_has_five_seeds_and_five_lams_per_regularizer_at_the_default_positions():
    from tests.utils import ROOT

    script = (ROOT / "docs" / "experiment" / "disjoint" / "run_disjoint.sh").read_text()
    assert 'SEEDS=${SEEDS:-0 1 2 3 4}' in script and "--kl-positions all" in script and "--resume" in script
    lams = {}
    for task, methods, values in re.findall(r"^run --tasks (\S+)(?: --steps \S+)? --methods ([a-z ]+?)(?: --lams "
                                            r"([\d. ]+))?$", script, flags=re.M):
        for method in methods.split():
            lams.setdefault((task, method), set()).update(float(v) for v in values.split())
    assert set(lams) == {(task, method) for task in ("addition2", "license") for method in ("ce", "kl", "mtt")}
    assert all(len(values) >= 5 for (task, method), values in lams.items() if method != "ce")
    assert {0.5, 0.7, 1.0} <= lams[("addition2", "kl")] and {1.0, 2.0, 3.0, 5.0} <= lams[("addition2", "mtt")]


def test_exact_match_counts_the_sequences_with_every_predicted_token_right():
    """evaluate_lm's exact: a sequence counts where the argmax is right at each of its labelled positions."""
    class Fixed(torch.nn.Module):
        """Logits that put the most mass on token (position + 1) mod 5 at every position."""

        def forward(self, input_ids, attention_mask=None):
            positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            return types.SimpleNamespace(logits=torch.nn.functional.one_hot((positions + 1) % 5, 5).float())

    right, wrong_once = [0, 1, 2, 3], [0, 1, 4, 3]  # token t + 1 follows t, but for the 4 at position 2
    batch = PadCollator(0)([dict(input_ids=right, labels=[-100, 1, 2, 3]),
                            dict(input_ids=wrong_once, labels=[-100, 1, 4, 3]),
                            dict(input_ids=wrong_once, labels=[-100, 1, -100, -100])])  # its wrong token unlabelled
    metrics = evaluate_lm(Fixed(), [batch], with_kl=False)
    assert metrics["exact"] == pytest.approx(2 / 3) and metrics["acc"] == pytest.approx(6 / 7)


def test_select_steps_returns_the_checkpoint_of_least_validation_ce(monkeypatch):
    monkeypatch.setattr(experiment, "load_smollm2", lambda *args: (tiny_llama(), DigitTokenizer()))
    curves = []
    validation_curve = experiment.validation_curve
    monkeypatch.setattr(experiment, "validation_curve",
                        lambda *args: curves.append(validation_curve(*args)) or curves[-1])
    lines = []
    best = experiment.select_steps("addition", (1, 2), (0,), preset="tiny", log=lines.append, adapted_layers=2)
    assert best == min(curves[0], key=curves[0].get) and len(lines) == 2
    assert lines[0].startswith("addition: CE only after 1 steps: validation task CE ")
