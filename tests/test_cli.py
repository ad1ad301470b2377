"""The `fastmtt` command line: finetune end to end on a tiny local model, one-line user errors found before any
model loads, the demo's arguments, and a quick start-up (no torch for --help) without stray warnings."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmtt.apps.cli import main
from fastmtt.apps.evaluation import format_kl
from tests.utils import tiny_llama

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a cat dog sat ran on under mat log and then".split()


def save_tiny_model(directory, with_tokenizer=True):
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    tiny_llama(vocab_size=len(vocab), pad_token_id=0, eos_token_id=2, bos_token_id=2).save_pretrained(directory)
    if with_tokenizer:
        core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                             eos_token="[EOS]").save_pretrained(directory)
    return directory


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.mark.parametrize("kl_positions", ["labels", "all"])
def test_finetune_text_data_reports_forgetting(tmp_path, capsys, kl_positions):
    model_dir = save_tiny_model(tmp_path / "model")
    capsys.readouterr()  # saving the model may draw a progress bar
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "the cat sat on the mat"}, {"text": "a dog ran under a log"},
                                                   {"prompt": "the cat", "completion": "sat on the log"}] * 2)
    retain = write_jsonl(tmp_path / "retain.jsonl", [{"text": "the dog sat and then the cat ran"}] * 3)
    out = tmp_path / "adapter"
    assert main(["finetune", "--model", str(model_dir), "--data", data, "--retain", retain, "--out", str(out),
                 "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--lam", "0.5",
                 "--device", "cpu", "--kl-positions", kl_positions]) == 0
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["retain_before"], metrics["retain_after"]
    assert before["kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA adapter is the base model
    assert after["kl_to_base"] > 1e-5 and after["ppl"] != pytest.approx(before["ppl"])
    assert before["tokens"] == 3 * 8  # 8 words + EOS per line: 9 tokens, the last 8 predicted
    assert all(entry["ce"] > 0 and entry["kl"] >= 0 for entry in metrics["train_log"]) and metrics["train_log"]
    captured = capsys.readouterr()
    assert f"KL(base || adapted) {format_kl(after['kl_to_base'])} nats/token" in captured.out
    assert "\r" not in captured.out + captured.err and "it/s" not in captured.err  # stderr is no terminal: no bars


def test_kl_keeps_significant_digits():
    assert [format_kl(v) for v in (0.0, 1.05e-6, -2.5e-4, 0.0012345, 0.87204, 12.5)] == [
        "0", "1.050e-06", "-2.500e-04", "0.001234", "0.872", "12.5"]


def test_finetune_pretokenized_data_without_tokenizer(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model", with_tokenizer=False)
    data = write_jsonl(tmp_path / "train.jsonl", [{"input_ids": [3, 4, 5, 6, 7, 8]},
                                                   {"input_ids": [3, 9, 10], "labels": [-100, 9, 10]}])
    out = tmp_path / "adapter"
    assert main(["finetune", "--model", str(model_dir), "--data", data, "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--target-modules", "q_proj", "v_proj"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert main(["finetune", "--model", str(model_dir), "--data", data, "--out", str(out), "--device", "cpu",
                 "--target-modules", "no_such_layer"]) == 2
    assert "Target modules {'no_such_layer'} not found" in capsys.readouterr().err
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    assert main(["finetune", "--model", str(no_weights), "--data", data, "--out", str(out), "--device", "cpu"]) == 2
    assert f"--model: cannot load a causal LM from {no_weights}" in capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails a test that loads model weights: user errors must be found before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def cli_error(capsys, *argv):
    """Run `fastmtt argv`; expect exit status 2 (returned, or argparse's SystemExit), nothing on stdout, and
    return the one-line error message."""
    try:
        status = main(list(argv))
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def finetune_error(capsys, *argv):
    """Run `fastmtt finetune argv`; expect exit status 2 and return its one-line error message."""
    return cli_error(capsys, "finetune", *argv)


def test_finetune_user_errors_are_one_line_before_loading_the_model(tmp_path, capsys, no_model_loading):
    model = str(save_tiny_model(tmp_path / "model"))
    bare_model = str(save_tiny_model(tmp_path / "bare", with_tokenizer=False))
    good = write_jsonl(tmp_path / "good.jsonl", [{"input_ids": [3, 4, 5]}])
    common = ["--out", str(tmp_path / "out"), "--device", "cpu"]
    capsys.readouterr()  # saving the models may draw progress bars
    run = lambda *argv: finetune_error(capsys, *argv, *common)  # noqa: E731

    assert "--model: no such directory: does-not-exist" in run("--model", "does-not-exist", "--data", good)
    assert "no config.json" in run("--model", str(tmp_path), "--data", good)
    assert "--data: no such file: nope.jsonl" in run("--model", model, "--data", "nope.jsonl")
    assert "--retain: no such file" in run("--model", model, "--data", good, "--retain", "gone.jsonl")
    assert "argument --lam: must be in [0, 1e6], got -1" in run("--model", model, "--data", good, "--lam", "-1")
    assert "argument --temperature: must be in [0.01, 100], got 0" in run(
        "--model", model, "--data", good, "--temperature", "0")

    (tmp_path / "broken.jsonl").write_text('{"input_ids": [3, 4]}\n\n{"input_ids": [3, 4,}\n')
    error = run("--model", model, "--data", str(tmp_path / "broken.jsonl"))
    assert f"{tmp_path / 'broken.jsonl'} line 3: not valid JSON" in error
    outside = write_jsonl(tmp_path / "outside.jsonl", [{"input_ids": [3, 4]}, {"input_ids": [3, 99, 4]}])
    assert f"{outside} line 2: token id 99 is outside the model's vocabulary [0, 15)" in run(
        "--model", model, "--data", outside)
    bad_label = write_jsonl(tmp_path / "label.jsonl", [{"input_ids": [3, 4], "labels": [-100, -5]}])
    assert "line 1: token id -5 is outside" in run("--model", model, "--data", bad_label)
    assert 'retain.jsonl line 1: unknown key "words"' in run(
        "--model", model, "--data", good, "--retain", write_jsonl(tmp_path / "retain.jsonl", [{"words": "cat"}]))
    assert "retain.jsonl line 1: expected keys" in run(
        "--model", model, "--data", good, "--retain", write_jsonl(tmp_path / "retain.jsonl", [{}]))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat"}])
    assert "line 1: text records need a tokenizer" in run("--model", bare_model, "--data", text)
    assert "no JSON lines" in run("--model", model, "--data", write_jsonl(tmp_path / "empty.jsonl", []))


def test_argument_errors_are_one_line(tmp_path, capsys):
    for argv in (["finetune", "--model", "m", "--data", "d", "--out", "o", "--lora-r", "0"],
                 ["finetune", "--model", "m", "--data", "d", "--out", "o", "--lr", "fast"],
                 ["demo", "--shift", "1.5"], ["demo", "--threads", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error: argument" in err, argv
    assert "argument --lams: must be in [0, 1e6], got nan" in cli_error(capsys, "demo", "--lams", "1", "nan")
    (tmp_path / "file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "--out: " in capsys.readouterr().err
    assert main(["compile-check"]) == 2  # the tests run Triton's interpreter
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err


BAD_RECORDS = [  # (JSONL line, expected message): each once silently accepted or a traceback
    ('{"input_ids": "567"}', '"input_ids" must be a list of integer token ids, got "567"'),  # became [5, 6, 7]
    ('{"input_ids": [3.7, 4.2, 5]}', '"input_ids" must be a list of integer token ids, got [3.7, 4.2, 5]'),
    ('{"input_ids": [true, false, 3]}', '"input_ids" must be a list of integer token ids, got [true, false, 3]'),
    ('{"input_ids": [3, 4], "labels": [-100, 4.0]}', '"labels" must be a list of integer token ids'),
    ('{"input_ids": [3, 4, 5], "labels": [-100, -100, -100]}', "no token to predict: every label is -100"),
    ('{"text": 123}', '"text" must be a string, got 123'),
    ('{"text": null}', '"text" must be a string, got null'),
    ('{"prompt": ["the"], "completion": "cat"}', '"prompt" must be a string, got ["the"]'),
    ('{"prompt": "the cat sat on the", "completion": "mat"}', "or lies past --max-length 4"),
    (b'{"input_ids": [3, 4]}\n{"text": "caf\xe9"}', "line 2: not UTF-8 text (byte 0xe9 at column 14)"),
    # a typo for "labels" once trained on every token; a record of two formats silently used "text"
    (b'{"input_ids": [3, 4]}\n\n{"input_ids": [3, 4, 5], "label": [-100, -100, 5]}',
     'line 3: unknown key "label" (did you mean "labels"?)'),
    ('{"text": "the cat", "prompt": "the", "completion": "cat"}',
     'line 1: ambiguous record: it has "text" and "completion"/"prompt"; give one format per record'),
    ('{"input_ids": [3, 4], "text": "the cat"}', 'line 1: ambiguous record: it has "input_ids" and "text"'),
    ('{"prompt": "the cat"}', 'line 1: a prompt/completion record needs "completion" too'),
    ('{"text": "the cat", "source": "web"}', 'line 1: unknown key "source"; a record has "input_ids"'),
    ('{"input_ids": [3, 4, 5], "attention_mask": [0, 1, 1]}', 'line 1: "attention_mask" must be all 1, as long as'),
    ('{"input_ids": [3, 4, 5], "attention_mask": [1, 1]}', 'line 1: "attention_mask" must be all 1, as long as'),
]


@pytest.mark.parametrize("line, message", BAD_RECORDS, ids=range(len(BAD_RECORDS)))
def test_bad_records_are_one_line_errors(tmp_path, capsys, no_model_loading, line, message):
    model = str(save_tiny_model(tmp_path / "model"))
    data = tmp_path / "data.jsonl"
    data.write_bytes(line if isinstance(line, bytes) else line.encode() + b"\n")
    capsys.readouterr()
    error = finetune_error(capsys, "--model", model, "--data", str(data), "--out", str(tmp_path / "out"), "--device",
                           "cpu", "--max-length", "4")
    assert f"{data}" in error and message in error
    assert not (tmp_path / "out").exists()


BAD_FLAGS = [  # (flags, expected message): each once a NaN adapter, a traceback, or a silent success
    (["--lam", "inf"], "argument --lam: must be in [0, 1e6], got inf"),
    (["--lam", "1e300"], "argument --lam: must be in [0, 1e6], got 1e300"),
    (["--lr", "inf"], "argument --lr: must be in (0, 1], got inf"),
    (["--temperature", "inf"], "argument --temperature: must be in [0.01, 100], got inf"),
    (["--epochs", "inf"], "argument --epochs: must be in (0, 1e6], got inf"),
    (["--lora-dropout", "nan"], "argument --lora-dropout: must be in [0, 1), got nan"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**32 - 1], got -1"),
    (["--seed", str(2**40)], f"argument --seed: must be an integer in [0, 2**32 - 1], got {2**40}"),
    (["--lora-r", "1000000000"], "argument --lora-r: must be an integer in [1, 65536], got 1000000000"),
    (["--lora-r", "17"], "--lora-r: 17 exceeds the model's hidden size 16"),
    (["--lora-alpha", str(10**12)], "argument --lora-alpha: must be an integer in [1, 65536]"),
    (["--max-steps", "0"], "argument --max-steps: must be -1 or a positive integer, got 0"),
    (["--device", "meta"], "--device meta: not a device to run on"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_bad_numbers_and_devices_are_one_line_errors(tmp_path, capsys, no_model_loading, flags, message):
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    capsys.readouterr()
    assert message in finetune_error(capsys, "--model", model, "--data", data, "--out", str(tmp_path / "out"),
                                     "--device", "cpu", *flags)
    assert not (tmp_path / "out").exists()


def test_a_bad_config_json_is_a_one_line_error(tmp_path, capsys, no_model_loading):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    for name, config in [("malformed", "{not json"), ("unknown", '{"model_type": "no-such-model"}'), ("empty", "{}")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        assert f"--model: cannot read {tmp_path / name / 'config.json'}: " in finetune_error(
            capsys, "--model", str(tmp_path / name), "--data", data, "--out", str(tmp_path / "out"), "--device", "cpu")
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_cannot_be_made_is_found_first(tmp_path, capsys, no_model_loading):
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "adapter"
    capsys.readouterr()
    assert f"--out: cannot write the adapter to {out} ({tmp_path / 'file'}: not a folder)" in finetune_error(
        capsys, "--model", model, "--data", data, "--out", str(out), "--device", "cpu")


def test_a_diverged_run_saves_no_adapter(tmp_path, capsys, monkeypatch):
    from fastmtt.trainer import MTTTrainer

    def diverge(trainer, *args, **kwargs):
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data.fill_(float("nan"))

    monkeypatch.setattr(MTTTrainer, "train", diverge)
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    capsys.readouterr()
    assert "training diverged: the adapter has NaN or infinite weights, nothing saved" in finetune_error(
        capsys, "--model", model, "--data", data, "--out", str(tmp_path / "out"), "--device", "cpu")
    assert list((tmp_path / "out").iterdir()) == []


DEMO_ERRORS = [
    (["--lams", "inf"], "argument --lams: must be in [0, 1e6], got inf"),
    (["--lams", "1", "1e300"], "argument --lams: must be in [0, 1e6], got 1e300"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**32 - 1], got -1"),
    (["--threads", str(2**40)], f"argument --threads: must be an integer in [1, 1024], got {2**40}"),
    (["--device", "meta"], "--device meta: not a device to run on"),
    (["--out", "{file}/demo"], "--out: cannot write results.csv and frontier.png to {file}/demo"),
]


@pytest.mark.parametrize("flags, message", DEMO_ERRORS, ids=[" ".join(flags) for flags, _ in DEMO_ERRORS])
def test_demo_argument_errors(tmp_path, capsys, monkeypatch, flags, message):
    import fastmtt.apps.demo

    monkeypatch.setattr(fastmtt.apps.demo, "run_demo", lambda *args, **kwargs: pytest.fail("the demo ran"))
    (tmp_path / "file").write_text("")
    flags = [flag.format(file=tmp_path / "file") for flag in flags]
    assert message.format(file=tmp_path / "file") in cli_error(capsys, "demo", "--device", "cpu", *flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys, no_model_loading):
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4]}])
    capsys.readouterr()
    error = finetune_error(capsys, "--model", model, "--data", data, "--out", str(tmp_path / "o"), "--device", "cuda")
    assert "--device cuda: CUDA is not available on this machine" in error
    assert main(["demo", "--device", "cuda:0"]) == 2 and "CUDA is not available" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from fastmtt.apps import UsageError

    argv = ["finetune", "--model", "does-not-exist", "--data", "x", "--out", str(tmp_path)]
    with pytest.raises(UsageError, match="--data: no such file"):
        main(["--debug", *argv])
    monkeypatch.setenv("FASTMTT_DEBUG", "1")
    with pytest.raises(UsageError):
        main(argv)


def test_command_line_error_in_a_fresh_process(tmp_path):
    """The installed entry point: exit status 2, one line on stderr, no traceback, no hub lookups."""
    result = subprocess.run([sys.executable, "-m", "fastmtt", "finetune", "--model", "./does-not-exist", "--data",
                             write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4]}]), "--out", str(tmp_path / "o"),
                             "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "fastmtt finetune: error: --model: no such directory: ./does-not-exist " \
                            "(give a local Hugging Face model directory)\n"


@pytest.mark.parametrize("code", ["import fastmtt.apps.cli", "import fastmtt; fastmtt.MTTOptions(lam=2.0)",
                                  "from fastmtt.apps.cli import main; main(['--help'])"])
def test_help_and_package_import_do_not_import_torch(code):
    probe = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_public_names_load_on_first_use():
    import fastmtt

    assert fastmtt.mtt_loss.__module__ == "fastmtt.ops.mtt_loss"
    assert fastmtt.DEFAULT_LAM == fastmtt.MTTOptions().lam
    assert set(fastmtt.__all__) <= set(dir(fastmtt))
    assert all(getattr(fastmtt, name) is not None for name in fastmtt.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(fastmtt, "no_such_name")  # noqa: B009


def test_demo_arguments_reach_run_demo(tmp_path, monkeypatch):
    import fastmtt.apps.demo

    calls, threads = [], []
    monkeypatch.setattr(fastmtt.apps.demo, "run_demo", lambda cfg, **kwargs: calls.append((cfg, kwargs)))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu", "--lams", "0.5", "2",
                 "--directions", "forward", "reverse", "--shift", "0.7", "--seed", "3", "--no-progress"]) == 0
    ((cfg, kwargs),) = calls
    assert cfg == fastmtt.apps.demo.config_for("quick", lams=(0.5, 2.0), directions=("forward", "reverse"), shift=0.7,
                                               seed=3)
    assert kwargs == dict(out_dir=str(tmp_path), device="cpu", progress=False)
    assert main(["demo", "--preset", "tiny", "--threads", "2"]) == 0
    assert calls[1][0] == fastmtt.apps.demo.config_for("tiny")
    assert threads == [1, 2] and calls[1][1]["progress"] is True and calls[1][1]["out_dir"] == "fastmtt-demo"


def test_interpreted_kernels_print_no_numpy_warnings():
    """Padded vocabulary (-inf) makes the interpreter compute -inf - -inf in discarded lanes: no RuntimeWarning."""
    probe = """
import torch, fastmtt
logits, base = torch.randn(4, 40), torch.randn(4, 40)
logits[:, -8:] = base[:, -8:] = float("-inf")
loss = fastmtt.mtt_loss(logits.requires_grad_(), base, torch.randint(32, (4,)), backend="triton")
loss.backward()
assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="default")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr


def test_perplexity_of_a_diverged_model_is_infinite_not_an_overflow():
    from types import SimpleNamespace

    from fastmtt.apps.evaluation import evaluate_lm

    class Diverged(torch.nn.Module):
        def forward(self, input_ids, **_):  # the target logit 1000 nats below the others
            logits = torch.zeros(*input_ids.shape, 5)
            logits.scatter_(-1, input_ids.roll(-1, 1)[..., None], -1000.0)
            return SimpleNamespace(logits=logits)

    ids = torch.tensor([[1, 2, 3, 4]])
    metrics = evaluate_lm(Diverged(), [dict(input_ids=ids, labels=ids)], with_kl=False)
    assert metrics["ce"] > 709 and metrics["ppl"] == float("inf")


def test_held_out_metrics_ignore_the_prediction_made_from_a_pad():
    """Left padding: the last pad's row predicts the first real token; evaluate_lm counts only rows where
    both positions are attended, so padding leaves the metrics unchanged."""
    from fastmtt.apps.evaluation import evaluate_lm
    from tests.utils import tiny_llama

    model = tiny_llama(seed=3)
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    plain = evaluate_lm(model, [dict(input_ids=ids, labels=ids)], with_kl=False)
    left = evaluate_lm(model, [dict(input_ids=padded, labels=padded, attention_mask=mask)], with_kl=False)
    assert left["tokens"] == plain["tokens"] == 4
    assert left["ce"] == pytest.approx(plain["ce"], rel=1e-4)


def test_an_option_error_about_two_flags_names_both():
    from fastmtt.apps import UsageError
    from fastmtt.apps.arguments import check_options

    with pytest.raises(UsageError, match=r"^--lam/--temperature: lam \* temperature\*\*2 must be"):
        check_options(lam=1e300, temperature=1.0)


def test_the_apps_import_the_command_line_never_and_finetune_has_no_moved_names():
    """cli.py imports the apps (downward); no app imports cli.py back; PadCollator lives in fastmtt.trainer only."""
    import ast

    import fastmtt.apps.finetune
    from tests.utils import ROOT

    for path in (ROOT / "fastmtt" / "apps").glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # at the top or inside a function
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        assert "fastmtt.apps.cli" not in imported or path.name == "cli.py", path.name
    assert not hasattr(fastmtt.apps.finetune, "PadCollator")


def test_records_left_without_labels_are_dropped_with_a_count(tmp_path, capsys, monkeypatch):
    """--max-length 4 cuts the first completion off entirely: the record once trained with no label at all."""
    from fastmtt.trainer import MTTTrainer

    trained = []
    monkeypatch.setattr(MTTTrainer, "train", lambda trainer, *a, **k: trained.extend(trainer.train_dataset))
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat sat on the", "completion": "mat"},
                                              {"text": "the cat sat"},
                                              {"input_ids": [3, 4, 5], "labels": [3, 4, 5], "attention_mask": [1] * 3},
                                              {"input_ids": [3, 4, 5], "labels": [-100, -100, -100]}])
    capsys.readouterr()
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--max-length", "4"]) == 0
    assert f"{data}: dropped 2 of 4 records with no token to predict" in capsys.readouterr().out
    assert [example["input_ids"] for example in trained] == [[3, 5, 7, 2], [3, 4, 5]]  # "the cat sat" + EOS
    assert all(any(label != -100 for label in example["labels"][1:]) for example in trained)


def test_lora_dropout_on_the_output_head_is_found_before_loading(tmp_path, capsys, no_model_loading):
    """--lora-dropout applies to every target; the fused head has none: once a 61-line traceback after loading."""
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    capsys.readouterr()
    run = lambda *flags: finetune_error(capsys, "--model", model, "--data", data, "--out",  # noqa: E731
                                        str(tmp_path / "out"), "--device", "cpu", *flags)
    assert ("--target-modules/--lora-dropout: the output head lm_head is a target, and the fused MTT loss applies no "
            "dropout to it: leave lm_head out of --target-modules, or give --lora-dropout 0") in run(
        "--lora-dropout", "0.1", "--target-modules", "lm_head", "q_proj")
    assert "Target modules {'no_such_layer'} not found" in run("--target-modules", "no_such_layer")
    long = write_jsonl(tmp_path / "long.jsonl", [{"input_ids": [3, 4]}, {"input_ids": [3] * 40}])
    assert f"--max-length: {long} line 2 keeps 40 tokens, more than the model's 32 positions (give --max-length 32)" \
        in finetune_error(capsys, "--model", model, "--data", long, "--out", str(tmp_path / "out"), "--device", "cpu")
    assert not (tmp_path / "out").exists()


def test_the_output_head_trains_without_dropout(tmp_path, capsys):
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5, 6]}] * 2)
    out = tmp_path / "out"
    assert main(["finetune", "--model", model, "--data", data, "--out", str(out), "--device", "cpu", "--max-steps", "1",
                 "--target-modules", "lm_head", "q_proj"]) == 0
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == ["lm_head", "q_proj"]


@pytest.mark.parametrize("fault, status, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), 2,
     "fastmtt finetune: error: out of memory on cpu (CUDA out of memory. Tried to allocate 2.00 GiB): lower "
     "--batch-size or --max-length"),
    (RuntimeError("something broke\nin detail"), 1,
     "fastmtt finetune: internal error: RuntimeError: something broke (fastmtt --debug finetune ... shows"),
    (KeyboardInterrupt(), 130, "fastmtt finetune: interrupted"),
], ids=["out-of-memory", "internal", "interrupted"])
def test_faults_during_training_are_one_line(tmp_path, capsys, monkeypatch, fault, status, message):
    from fastmtt.trainer import MTTTrainer

    def fail(trainer, *args, **kwargs):
        raise fault

    monkeypatch.setattr(MTTTrainer, "train", fail)
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    capsys.readouterr()
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "out"), "--device", "cpu"]) \
        == status
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    from fastmtt.apps import UsageError

    with pytest.raises((type(fault), UsageError)):  # --debug: the exception itself (out of memory: as a UsageError)
        main(["--debug", "finetune", "--model", model, "--data", data, "--out", str(tmp_path / "out"), "--device",
              "cpu"])


def test_target_modules_all_linear_given_explicitly_is_the_default(tmp_path, capsys, monkeypatch):
    from fastmtt.trainer import MTTTrainer

    monkeypatch.setattr(MTTTrainer, "train", lambda trainer, *args, **kwargs: None)
    model = str(save_tiny_model(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    targets = []
    for flags in ([], ["--target-modules", "all-linear"]):
        out = tmp_path / f"out{len(flags)}"
        assert main(["finetune", "--model", model, "--data", data, "--out", str(out), "--device", "cpu", *flags]) == 0
        saved = json.loads((out / "adapter_config.json").read_text())["target_modules"]
        targets.append(sorted(name.rsplit(".", 1)[-1] for name in saved))
    assert targets[0] == targets[1] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_a_head_the_loss_cannot_serve_is_found_before_loading(tmp_path, capsys, no_model_loading):
    """A config that scales the logits (Cohere's logit_scale): once found only at the first training step."""
    model = save_tiny_model(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "logit_scale": 0.5}))
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    capsys.readouterr()
    assert f"--model: {model}: LlamaForCausalLM scales its logits (config.logit_scale=0.5)" in finetune_error(
        capsys, "--model", str(model), "--data", data, "--out", str(tmp_path / "out"), "--device", "cpu")
