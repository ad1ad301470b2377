"""`fastmtt finetune` end to end on a tiny local model, and `fastmtt demo` at the tiny preset."""
import json

import pytest
import torch

from fastmtt.apps.cli import main
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


def test_finetune_text_data_reports_forgetting(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "the cat sat on the mat"}, {"text": "a dog ran under a log"},
                                                   {"prompt": "the cat", "completion": "sat on the log"}] * 2)
    retain = write_jsonl(tmp_path / "retain.jsonl", [{"text": "the dog sat and then the cat ran"}] * 3)
    out = tmp_path / "adapter"
    assert main(["finetune", "--model", str(model_dir), "--data", data, "--retain", retain, "--out", str(out),
                 "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--lam", "0.5",
                 "--device", "cpu"]) == 0
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["retain_before"], metrics["retain_after"]
    assert before["kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA adapter is the base model
    assert after["kl_to_base"] > 1e-5 and after["ppl"] != pytest.approx(before["ppl"])
    assert before["tokens"] == 3 * 8  # 8 words + EOS per line: 9 tokens, the last 8 predicted
    assert all(entry["ce"] > 0 and entry["kl"] >= 0 for entry in metrics["train_log"]) and metrics["train_log"]


def test_finetune_pretokenized_data_without_tokenizer(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", with_tokenizer=False)
    data = write_jsonl(tmp_path / "train.jsonl", [{"input_ids": [3, 4, 5, 6, 7, 8]},
                                                   {"input_ids": [3, 9, 10], "labels": [-100, 9, 10]}])
    out = tmp_path / "adapter"
    assert main(["finetune", "--model", str(model_dir), "--data", data, "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--target-modules", "q_proj", "v_proj"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat"}])
    with pytest.raises(ValueError, match="tokenizer"):
        main(["finetune", "--model", str(model_dir), "--data", text, "--out", str(out), "--device", "cpu"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"words": "the cat"}])
    with pytest.raises(ValueError, match="line 1"):
        main(["finetune", "--model", str(model_dir), "--data", bad, "--out", str(out), "--device", "cpu"])


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
