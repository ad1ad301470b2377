"""The signatures the docs write against `inspect.signature`: docs/api.md gives every keyword of every public
callable with its default; README's "The ops" block (complete where it elides nothing) and the `Args:` sections
of the docstrings give no parameter or default the code does not have."""
import ast
import importlib
import inspect
import re

import pytest

from tests.utils import ROOT

# name as the docs write it -> "module:attribute"
PUBLIC_CALLABLES = {
    "fastmtt.MTTOptions": "fastmtt.options:MTTOptions",
    "fastmtt.mtt_loss": "fastmtt.ops.mtt_loss:mtt_loss",
    "fastmtt.MTTLoss": "fastmtt.ops.mtt_loss:MTTLoss",
    "fastmtt.ops.mtt_loss.mtt_loss_with_options": "fastmtt.ops.mtt_loss:mtt_loss_with_options",
    "fastmtt.fused_linear_mtt_loss": "fastmtt.ops.fused_linear_mtt_loss:fused_linear_mtt_loss",
    "fastmtt.FusedLinearMTTLoss": "fastmtt.ops.fused_linear_mtt_loss:FusedLinearMTTLoss",
    "fastmtt.ops.fused_linear_mtt_loss.fused_linear_mtt_loss_with_options":
        "fastmtt.ops.fused_linear_mtt_loss:fused_linear_mtt_loss_with_options",
    "fastmtt.head.LinearHead": "fastmtt.head:LinearHead",
    "fastmtt.lora_linear": "fastmtt.ops.lora_linear:lora_linear",
    "fastmtt.peft.patch_lora": "fastmtt.peft:patch_lora",
    "fastmtt.peft.unpatch_lora": "fastmtt.peft:unpatch_lora",
    "fastmtt.MTTObjective": "fastmtt.objective:MTTObjective",
    "fastmtt.objective.KLBudget": "fastmtt.objective:KLBudget",
    "fastmtt.BaseCache.build": "fastmtt.base_cache:BaseCache.build",
    "fastmtt.BaseCache.open": "fastmtt.base_cache:BaseCache.open",
    "fastmtt.sine_lora.load_sine_lora": "fastmtt.sine_lora:load_sine_lora",
    "fastmtt.trainer.PadCollator": "fastmtt.trainer:PadCollator",
    "fastmtt.VocabParallel": "fastmtt.parallel:VocabParallel",
    "fastmtt.reference.mtt_loss": "fastmtt.reference:mtt_loss",
    "fastmtt.reference.fused_linear_mtt_loss": "fastmtt.reference:fused_linear_mtt_loss",
    "fastmtt.reference.masked_kl_rows": "fastmtt.reference:masked_kl_rows",
    "fastmtt.reference.cross_entropy_rows": "fastmtt.reference:cross_entropy_rows",
    "fastmtt.reference.linear_logits": "fastmtt.reference:linear_logits",
}


def resolve(target):
    module, name = target.split(":")
    value = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value


def parameters(target):
    """{name: default (inspect.Parameter.empty where none)} of a callable (a class: its __init__), *args and
    **kwargs left out."""
    signature = inspect.signature(resolve(target))
    return {name: p.default for name, p in signature.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def written_calls(text, name):
    """The argument lists written after each `name(` in text (up to the matching parenthesis)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        if match.start() and (text[match.start() - 1].isalnum() or text[match.start() - 1] in "._"):
            continue
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        calls.append(text[match.end():end - 1])
    return calls


def written_arguments(call):
    """[(name, default text or None)] of an argument list as written: `a`, `*`, `b=1.0`, `<...>` and `...`."""
    arguments, depth, current = [], 0, ""
    for char in call + ",":
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            arguments.append(current.strip())
            current = ""
        else:
            current += char
    pairs = []
    for argument in filter(None, arguments):
        name, _, default = argument.partition("=")
        if re.fullmatch(r"\w+", name.strip()):
            pairs.append((name.strip(), default.strip() or None))
    return pairs


def same_default(written, default):
    """Whether the default as written is the signature's: an equal literal (10 for 10.0, not 1 for True), or
    DEFAULT_LAM."""
    if not is_literal(written):
        return written == "DEFAULT_LAM" and default == 0.3
    value = ast.literal_eval(written)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, default))
    return value == default and (numbers or type(value) is type(default))


def text_blocks(path):
    """The ```text blocks of a markdown file, comments out."""
    return re.sub(r"#[^\n]*", "", "\n".join(re.findall(r"```text\n(.*?)```", path.read_text(), flags=re.S)))


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLABLES))
def test_api_md_gives_every_keyword_with_its_default(name):
    calls = written_calls(text_blocks(ROOT / "docs" / "api.md"), name)
    assert calls, f"docs/api.md has no signature of {name}"
    written = dict(written_arguments(calls[0]))
    for parameter, default in parameters(PUBLIC_CALLABLES[name]).items():
        assert parameter in written, f"docs/api.md: {name} leaves out {parameter}"
        if default is inspect.Parameter.empty:
            assert written[parameter] is None, f"docs/api.md: {name}({parameter}=...) has no default"
        else:
            assert written[parameter] is not None and same_default(written[parameter], default), (
                f"docs/api.md: {name}({parameter}={written[parameter]}), the default is {default!r}")
    assert set(written) <= set(parameters(PUBLIC_CALLABLES[name])) | {"option_kwargs"}, name


def test_readme_ops_block_writes_only_real_keywords_and_defaults():
    block = text_blocks(ROOT / "README.md")
    checked = 0
    for name, target in PUBLIC_CALLABLES.items():
        actual = parameters(target)
        for call in written_calls(block, name):
            if "..." not in call and "<" not in call:  # a signature that elides nothing gives every parameter
                assert set(actual) <= {p for p, _ in written_arguments(call)}, f"README: {name} leaves out some"
            for parameter, written in written_arguments(call):
                checked += 1
                assert parameter in actual, f"README: {name} has no parameter {parameter}"
                if written is not None:
                    assert same_default(written, actual[parameter]), (
                        f"README: {name}({parameter}={written}), the default is {actual[parameter]!r}")
    assert checked > 30


def docstring_defaults(doc):
    """[(names, written defaults)] from the `Args:` entries of a docstring that state a default: "name: ...
    (default X)", "Default X." or, for several names, "(defaults X, Y, ...)"."""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    args = re.split(r"\n\s*(?:Returns|Raises|Example|Attributes):", args)[0]
    entries = re.findall(r"^ {4,8}([\w, ]+?): (.*?)(?=^ {4,8}[\w, ]+?: |\Z)", args, flags=re.S | re.M)
    found = []
    for names, text in entries:
        text = " ".join(text.split())
        several = re.search(r"\(defaults ([^)]*)\)", text)
        if several:
            found.append(([n.strip() for n in names.split(",")], [v.strip() for v in several.group(1).split(",")]))
            continue
        one = re.search(r"[(\s]default:? ([^,;:)\s]+)", text, flags=re.I)
        if one and "," not in names:
            found.append(([names.strip()], [one.group(1).rstrip(".")]))
    return found


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLABLES))
def test_docstrings_state_the_defaults_of_the_signature(name):
    actual = parameters(PUBLIC_CALLABLES[name])
    for names, written in docstring_defaults(inspect.getdoc(resolve(PUBLIC_CALLABLES[name])) or ""):
        for parameter, value in zip(names, written):
            if parameter not in actual or not is_literal(value):
                continue  # a field of something else, or a default in words (DEFAULT_LAM, "the world")
            assert same_default(value, actual[parameter]), (
                f"{name} docstring: {parameter} default {value}, the signature says {actual[parameter]!r}")


def is_literal(text):
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return False
    return True


def test_docstring_defaults_are_read():
    from fastmtt.ops.mtt_loss import mtt_loss

    read = docstring_defaults(mtt_loss.__doc__)
    assert (["return_components"], ["False"]) in read
    assert any("temperature" in names for names, _ in read)
