"""Every ```python block of README.md runs as written, on tiny local models (seconds, nothing downloaded).

The one substitution: transformers' `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
return a tiny random Llama and a word-level tokenizer, whatever model name a block gives. Each block runs in a
fresh namespace (the README's blocks are self-contained) in a temporary working directory. Blocks that import
trl are skipped when trl is not installed (it is not a dependency).
"""
import pathlib
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
VOCAB = 64


def python_blocks():
    """(first line number, source) of each ```python block."""
    text = README.read_text()
    return [(text[:match.start()].count("\n") + 2, match.group(1))
            for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


BLOCKS = python_blocks()


def tiny_causal_lm(*args, **kwargs):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def tiny_tokenizer(*args, **kwargs):
    words = "zorblat is the capital of quenthia . lies east varn".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{word: i + 3 for i, word in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = tokenizers.normalizers.Lowercase()
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture
def tiny_models(monkeypatch, tmp_path):
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny_causal_lm)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tiny_tokenizer)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only wait for each other on a shared machine
    yield
    torch.set_num_threads(threads)


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 5
    assert "MTTObjective" in BLOCKS[0][1]  # the quick start comes first


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, source, tiny_models, capsys):
    if re.search(r"^from trl |^import trl", source, flags=re.M):
        pytest.importorskip("trl")
        pytest.importorskip("datasets")
    namespace = {"__name__": "__readme__"}
    exec(compile(source, f"README.md:{line}", "exec"), namespace)
    if "for step in range(10)" in source:  # the quick start: ce falls, kl starts at 0 and grows
        steps = re.findall(r"step (\d+): ce ([\d.]+)  kl ([\d.e+-]+)", capsys.readouterr().out)
        assert len(steps) == 10
        ces, kls = [float(ce) for _, ce, _ in steps], [float(kl) for _, _, kl in steps]
        assert ces[-1] < ces[0] and kls[0] == 0 and kls[-1] > 0
