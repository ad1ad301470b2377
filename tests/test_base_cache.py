"""BaseCache: built once, read back in place of the base pass; cached and live MTT agree in loss and LoRA
gradients whatever the batch layout (padding side, order, packing), under gradient accumulation and DDP."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from fastmtt.base_cache import BaseCache, example_key, fingerprint, row_segments
from fastmtt.objective import MTTObjective
from fastmtt.trainer import MTTTrainer
from tests.utils import (
    ROOT,
    VOCAB,
    assert_parity,
    close_gloo,
    init_gloo,
    launch_gloo,
    tiny_llama,
    tiny_peft,
    trainable_grads,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LAM = 0.7
LENGTHS = (7, 12, 5, 9, 3, 11)


def some_examples(seed=3, lengths=LENGTHS):
    """Token lists of different lengths; the ids 0 and V-1 among them."""
    gen = torch.Generator().manual_seed(seed)
    examples = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    examples[0][2], examples[1][5] = 0, VOCAB - 1
    return examples


def padded(examples, side="right", prompt=2):
    """A padded batch of the examples (pad id 1), labels -100 on the padding and the first `prompt` tokens."""
    length = max(map(len, examples))
    ids = torch.ones(len(examples), length, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, tokens in enumerate(examples):
        where = slice(0, len(tokens)) if side == "right" else slice(length - len(tokens), length)
        ids[b, where], mask[b, where] = torch.tensor(tokens), 1
    labels = ids.masked_fill(mask == 0, -100)
    for b in range(len(examples)):
        labels[b, int((mask[b] == 0).sum()) if side == "left" else 0:][:prompt] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def packed(examples):
    """One row holding the examples back to back: position_ids restart, no attention mask, the first token of
    each example unlabelled (as transformers' DataCollatorWithFlattening)."""
    ids = torch.tensor([t for tokens in examples for t in tokens])[None]
    positions = torch.cat([torch.arange(len(tokens)) for tokens in examples])[None]
    labels = ids.clone()
    labels[positions == 0] = -100
    return dict(input_ids=ids, position_ids=positions, labels=labels)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The cache of some_examples() built in batches of 4 (other groupings than the tests' batches), with
    small shards: several files."""
    return BaseCache.build(tiny_peft(), some_examples(), tmp_path_factory.mktemp("cache"), batch_size=4,
                           shard_bytes=1000, progress=False)


class CountForwards:
    """Counts the decoder forwards of a PEFT model while active."""

    def __init__(self, model):
        self.decoder, self.count = model.get_base_model().model, 0

    def __enter__(self):
        self.handle = self.decoder.register_forward_hook(lambda *args: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def loss_and_grads(objective, batch, model=None):
    model = model or tiny_peft()
    with CountForwards(model) as forwards:
        output = objective(model, **batch)
    output.loss.backward()
    return output, trainable_grads(model), forwards.count


def assert_same_step(live, cached, rtol=1e-6):
    (want, want_grads, live_passes), (got, got_grads, cached_passes) = live, cached
    assert (live_passes, cached_passes) == (2, 1)  # the cache replaces the base pass
    assert want.kl > 1e-3
    for name in ("loss", "ce", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=rtol, atol=0, msg=name)
    assert got_grads.keys() == want_grads.keys() and any("lm_head" in name for name in want_grads)
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=rtol, atol=rtol * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("kl_positions", ["all", "labels"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [4, 1, 5, 0, 3]])
def test_cached_equals_live_padded(cache, kl_positions, side, order):
    batch = padded([some_examples()[i] for i in order], side)
    live = loss_and_grads(MTTObjective(lam=LAM, kl_positions=kl_positions), batch)
    assert_same_step(live, loss_and_grads(MTTObjective(lam=LAM, kl_positions=kl_positions, base_cache=cache), batch))


@pytest.mark.parametrize("kl_positions", ["all", "labels"])
def test_cached_equals_live_packed(cache, kl_positions):
    """Packed rows: each example is found by the positions restarting; transformers' live pass separates
    them the same way (no attention across examples)."""
    examples = some_examples()
    batch = packed([examples[i] for i in (2, 0, 4, 5)])
    assert [len(s) for s in row_segments(batch["input_ids"], None, batch["position_ids"])[0]] == [5, 7, 3, 11]
    live = loss_and_grads(MTTObjective(lam=LAM, kl_positions=kl_positions), batch)
    assert_same_step(live, loss_and_grads(MTTObjective(lam=LAM, kl_positions=kl_positions, base_cache=cache), batch))
    # Each example as it was cached: the states of the example run alone.
    objective = MTTObjective(base_cache=cache)
    states = objective.hidden_states(tiny_peft(), **{k: v for k, v in batch.items() if k != "labels"})[1]
    start = 0
    for i in (2, 0, 4, 5):
        torch.testing.assert_close(states[0, start:start + LENGTHS[i]], cache[some_examples()[i]])
        start += LENGTHS[i]


def test_cached_equals_live_bf16_within_its_rounding(tmp_path):
    """bf16: |cached - fp32| <= |live bf16 - fp32| + tol for the loss and every gradient entry."""
    examples = some_examples()
    bf16_model = lambda: tiny_peft(base=tiny_llama(dtype=torch.bfloat16))  # noqa: E731
    cache = BaseCache.build(bf16_model(), examples, tmp_path, batch_size=4, progress=False)
    assert cache.dtype == torch.bfloat16 and cache[examples[0]].dtype == torch.bfloat16
    batch = padded([examples[i] for i in (3, 0, 5, 1)], "left")
    live = loss_and_grads(MTTObjective(lam=LAM), batch, bf16_model())
    cached = loss_and_grads(MTTObjective(lam=LAM, base_cache=cache), batch, bf16_model())
    truth = loss_and_grads(MTTObjective(lam=LAM), batch, bf16_model().float())
    for name in ("loss", "ce", "kl"):
        assert_parity(name, getattr(cached[0], name), getattr(live[0], name), getattr(truth[0], name), torch.bfloat16)
    for name, grad in truth[1].items():
        assert_parity(name, cached[1][name], live[1][name], grad, torch.bfloat16)


def test_gradient_accumulation_step_with_mtt_base_cache(cache, tmp_path):
    """MTTTrainer(mtt_base_cache=...) with 2 micro-batches of 2 takes the live run's SGD step."""
    from tests.test_trainer import adapter_weights, dataset_of, training_args

    batch = padded([some_examples()[i] for i in (1, 4, 2, 5)])
    weights = []
    for keywords in ({}, dict(mtt_base_cache=cache)):
        model = tiny_peft()
        trainer = MTTTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=2,
                                                             gradient_accumulation_steps=2),
                             train_dataset=dataset_of(batch), mtt_lambda=LAM, **keywords)
        trainer.train()
        weights.append(adapter_weights(model))
    start = adapter_weights(tiny_peft())
    for name, weight in weights[0].items():
        assert not torch.equal(weight, start[name]), name
        torch.testing.assert_close(weights[1][name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_cache_holds_each_examples_base_states(cache, tmp_path):
    """cache[tokens] is the base's final hidden states of the example alone, in the model's dtype, whether
    built from the PEFT model (adapters off), the plain base, token lists or a padded DataLoader batch."""
    examples, model = some_examples(), tiny_peft()
    assert len(cache) == len(examples) and len([n for n in os.listdir(cache.path) if n.startswith("shard")]) == 2
    for tokens in examples:
        with torch.no_grad(), model.disable_adapter():
            want = model.get_base_model().model(input_ids=torch.tensor([tokens])).last_hidden_state[0]
        torch.testing.assert_close(cache[tokens], want, rtol=1e-6, atol=1e-6)
        assert tokens in cache and cache[tokens].dtype == torch.float32
    batches = [padded(examples[:3]), padded(examples[3:], "left")]  # DataLoader batches, both sides, and a repeat
    plain = BaseCache.build(tiny_llama(), batches + [dict(input_ids=torch.tensor(examples[0]))], tmp_path / "p",
                            batch_size=2, progress=False)
    assert plain.fingerprint == cache.fingerprint and sorted(plain.entries) == sorted(cache.entries)
    for tokens in examples:
        torch.testing.assert_close(plain[tokens], cache[tokens], rtol=1e-6, atol=1e-6)
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert index["hidden_size"] == 16 and index["dtype"] == "float32"
    with pytest.raises(KeyError, match=r"3 tokens, starting \[1, 2, 3\]"):
        cache[[1, 2, 3]]


def test_a_batch_example_missing_from_the_cache_is_an_error_naming_it(cache):
    examples = some_examples() + [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    batch = padded([examples[i] for i in (1, 6)], "left")
    with pytest.raises(ValueError, match=r"batch row 1, the example at positions 2\.\.11 \(10 tokens, starting "
                                         r"\[5, 6, 7, 8, 9, 10, 11, 12\] \.\.\.\), is not in the base cache"):
        MTTObjective(base_cache=cache)(tiny_peft(), **batch)


def test_on_miss_compute_runs_the_base_for_missing_examples_and_counts_them(cache):
    examples = some_examples() + [[5, 6, 7, 8, 9, 10], [9, 8, 7]]
    batch = padded([examples[i] for i in (6, 0, 7, 2)])
    computing = BaseCache.open(cache.path, on_miss="compute")
    live = loss_and_grads(MTTObjective(lam=LAM), batch)
    got = loss_and_grads(MTTObjective(lam=LAM, base_cache=computing), batch)
    assert computing.misses == 2 and got[2] == 2  # one live base pass over the rows with misses
    torch.testing.assert_close(got[0].loss, live[0].loss, rtol=1e-6, atol=0)
    for name, grad in live[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("other,message", [
    (lambda: tiny_peft(seed=1), r"another base model \(\d+ weight tensor\(s\) differ, first lm_head\.weight"),
    (lambda: tiny_peft(base=tiny_llama(dtype=torch.float64)), r"another base model \(dtype torch\.float64"),
    (lambda: tiny_peft(base=tiny_llama(rms_norm_eps=1e-3)), r"another base model \(config rms_norm_eps=0\.001"),
])
def test_another_base_model_is_an_error(cache, other, message):
    batch = padded(some_examples()[:2])
    with pytest.raises(ValueError, match=message):
        MTTObjective(base_cache=cache)(other(), **batch)
    with pytest.raises(ValueError, match="holds a base cache of another base model"):
        BaseCache.build(other(), some_examples()[:1], cache.path, progress=False)


def test_the_adapters_and_lora_on_the_head_leave_the_fingerprint_alone():
    base = fingerprint(tiny_llama())
    assert fingerprint(tiny_peft()) == base == fingerprint(tiny_peft(("q_proj", "down_proj"), randomize=True))
    assert fingerprint(tiny_llama(seed=1))["digest"] != base["digest"]


def test_what_a_cache_cannot_reproduce_is_refused(cache):
    batch = padded(some_examples()[:2])
    with pytest.raises(ValueError, match="disable_dropout=False"):
        MTTObjective(base_cache=cache, disable_dropout=False)
    model = tiny_peft()
    model.get_input_embeddings().neftune_noise_alpha = 5.0  # what Trainer(neftune_noise_alpha=5) sets
    with pytest.raises(ValueError, match="NEFTune"):
        MTTObjective(base_cache=cache)(model, **batch)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
        MTTObjective(base_cache=cache, kl_positions="labels")(model, inputs_embeds=embeds, labels=batch["labels"],
                                                              attention_mask=batch["attention_mask"])
    with pytest.raises(TypeError, match="base_cache must be a fastmtt.BaseCache"):
        MTTObjective(base_cache=42)
    assert MTTObjective(base_cache=cache.path).base_cache.entries == cache.entries  # a path opens the cache


KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import tests  # fastmtt first (Hugging Face's `kernels`, not the checkout's)
from fastmtt.base_cache import BaseCache
from tests.test_base_cache import some_examples
from tests.utils import tiny_peft

def examples():  # killed (SIGKILL) when asked for the sixth example: two shards of two are written by then
    for number, example in enumerate(some_examples()):
        if number == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        yield example

BaseCache.build(tiny_peft(), examples(), sys.argv[1], batch_size=2, shard_bytes=1, progress=False)
"""


def test_a_killed_build_resumes_where_it_stopped(tmp_path):
    """Killed (SIGKILL) after two shards, with a half-written shard left over, the cache is unfinished; the
    next build computes only the examples no shard holds and ends with the uninterrupted build's cache."""
    examples, path = some_examples(), tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    shards = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    assert shards == ["shard-r0-00000.safetensors", "shard-r0-00001.safetensors"]
    (path / "shard-r0-00002.safetensors.tmp123").write_bytes(b"half a shard")  # killed while writing
    with pytest.raises(ValueError, match="unfinished .* resume"):
        BaseCache.open(path)
    model = tiny_peft()
    with CountForwards(model) as forwards:
        resumed = BaseCache.build(model, examples, path, batch_size=2, shard_bytes=1, progress=False)
    assert forwards.count == 1  # the last two examples, one batch
    assert not [name for name in os.listdir(path) if ".tmp" in name]
    whole = BaseCache.build(tiny_peft(), examples, tmp_path / "whole", batch_size=2, progress=False)
    assert sorted(resumed.entries) == sorted(whole.entries) == sorted(map(example_key, examples))
    for tokens in examples:
        torch.testing.assert_close(resumed[tokens], whole[tokens], rtol=1e-6, atol=1e-6)
    with CountForwards(model) as forwards:  # a finished cache is extended by the new examples only
        extended = BaseCache.build(model, examples + [[4, 5, 6]], path, batch_size=2, progress=False)
    assert forwards.count == 1 and len(extended) == len(examples) + 1 and [4, 5, 6] in extended
    with pytest.raises(ValueError, match="holds float32 states; this build would add bfloat16 ones"):
        BaseCache.build(model, [[7, 8]], path, dtype=torch.bfloat16, progress=False)


def test_build_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        BaseCache.build(tiny_peft(), some_examples(), tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        BaseCache.build(tiny_peft(), [dict(input_ids=[0.5, 1.0])], tmp_path)
    with pytest.raises(ValueError, match="each example needs input_ids"):
        BaseCache.build(tiny_peft(), [dict(text="hi")], tmp_path)
    with pytest.raises(FileNotFoundError, match="no base cache at"):
        BaseCache.open(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="on_miss must be"):
        BaseCache.open(tmp_path, on_miss="skip")


# --- several processes -------------------------------------------------------------------------------------

def ddp_worker(rank, rendezvous, out_dir):
    """Builds the cache of the four-row batch on 2 ranks (each its own shards), then trains each rank's rows
    with it under DDP."""
    from tests.test_distributed import rank_rows
    from tests.test_trainer import four_examples

    init_gloo(rank, rendezvous)
    batch = four_examples()
    cache = BaseCache.build(tiny_peft(), [batch], f"{out_dir}/cache", batch_size=1, progress=False)
    model = torch.nn.parallel.DistributedDataParallel(tiny_peft())
    with CountForwards(model.module) as forwards:
        output = MTTObjective(lam=LAM, base_cache=cache)(model, **rank_rows(batch, rank))
    output.loss.backward()
    torch.save(dict(output=[t.detach() for t in output], grads=trainable_grads(model.module), forwards=forwards.count,
                    shards=sorted(name for name in os.listdir(cache.path) if name.startswith("shard"))),
               f"{out_dir}/rank{rank}.pt")
    del model, output
    close_gloo()


def test_ddp_build_and_training_with_the_cache(tmp_path):
    from tests.test_distributed import LAM as DISTRIBUTED_LAM
    from tests.test_distributed import assert_global_batch_results

    assert DISTRIBUTED_LAM == LAM
    results = launch_gloo(ddp_worker, tmp_path)
    assert_global_batch_results(results, rtol=1e-6, atol=1e-8)
    for result in results:
        assert result["forwards"] == 1
        assert {name.split("-")[1] for name in result["shards"]} == {"r0", "r1"}  # each rank wrote its own



# --- the command line ---------------------------------------------------------------------------------------

def test_cache_base_then_finetune_with_the_cache_trains_as_without(tmp_path, capsys):
    """`fastmtt cache-base` caches the data finetune trains on; `finetune --base-cache` then takes the steps
    of the run without a cache (same adapter), and builds the cache on first use where there is none."""
    from safetensors.torch import load_file

    from fastmtt.apps.cli import main
    from tests.test_cli import cli_error, save_tiny_model, write_jsonl

    model_dir = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "the cat sat on the mat"}, {"text": "a dog ran under a log"},
                                                   {"prompt": "the cat", "completion": "sat on the log"}] * 2)
    capsys.readouterr()
    assert main(["cache-base", "--model", str(model_dir), "--data", data, "--out", str(tmp_path / "cache"),
                 "--device", "cpu", "--batch-size", "2"]) == 0
    assert "base cache: 3 examples, 21 tokens" in capsys.readouterr().out
    assert len(BaseCache.open(tmp_path / "cache")) == 3
    runs = {}
    for name, flags in (("live", []), ("cached", ["--base-cache", str(tmp_path / "cache")]),
                        ("first use", ["--base-cache", str(tmp_path / "new")])):
        assert main(["finetune", "--model", str(model_dir), "--data", data, "--out", str(tmp_path / name),
                     "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--lam", "0.5", "--device", "cpu",
                     *flags]) == 0
        runs[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    assert "base cache: 3 examples" in capsys.readouterr().out and len(BaseCache.open(tmp_path / "new")) == 3
    for name, weight in runs["live"].items():
        for other in ("cached", "first use"):
            torch.testing.assert_close(runs[other][name], weight, rtol=1e-5, atol=1e-7, msg=f"{other} {name}")
    other_model = save_tiny_model(tmp_path / "other")
    tiny_llama(seed=5, vocab_size=15, pad_token_id=0, eos_token_id=2, bos_token_id=2).save_pretrained(other_model)
    message = cli_error(capsys, "cache-base", "--model", str(other_model), "--data", data, "--out",
                        str(tmp_path / "cache"), "--device", "cpu")
    assert "--out: " in message and "holds a base cache of another base model" in message


def test_cache_base_user_errors_are_one_line_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from tests.test_cli import cli_error, write_jsonl

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("the model was loaded before the error was found"))
    data = write_jsonl(tmp_path / "train.jsonl", [{"input_ids": [3, 4, 5]}])
    (tmp_path / "file").write_text("")
    for flags, message in ((["--data", str(tmp_path / "none.jsonl")], "--data: no such file"),
                           (["--model", str(tmp_path)], "has no config.json"),
                           (["--out", str(tmp_path / "file")], "--out: .* is a file"),
                           (["--dtype", "int8"], "argument --dtype: invalid choice")):
        settings = {"--model": str(tmp_path / "nowhere"), "--data": data, "--out": str(tmp_path / "cache"),
                    **dict(zip(flags[::2], flags[1::2]))}  # the files and folders are checked before --model
        argv = [part for pair in settings.items() for part in pair]
        assert re.search(message, cli_error(capsys, "cache-base", *argv, "--device", "cpu")), message
