"""The layering of docs/architecture.md, checked on the imports; the names that moved still import from where
they were; the Example: blocks of the public docstrings run."""
import ast
import doctest

import pytest
import torch

from tests.utils import ROOT


def imported_modules(path):
    """Every fastmtt module a file imports (at the top or inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("fastmtt")}


def library_files():
    """fastmtt's modules but the apps and `python -m fastmtt` (the command line)."""
    return [path for path in (ROOT / "fastmtt").rglob("*.py")
            if "apps" not in path.relative_to(ROOT).parts and path.name != "__main__.py"]


def test_the_library_never_imports_the_apps():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith("fastmtt.apps"))
                 for p in library_files() + list((ROOT / "kernels").glob("*.py"))}
    assert not {path: names for path, names in offenders.items() if names}


def test_the_statistics_layout_imports_no_implementation():
    assert imported_modules(ROOT / "fastmtt" / "partials.py") == set()


@pytest.mark.parametrize("path", sorted((ROOT / "fastmtt" / "pytorch").glob("*.py")), ids=lambda p: p.name)
def test_pytorch_implementations_import_neither_ops_nor_kernels(path):
    upward = [m for m in imported_modules(path) if m.startswith(("fastmtt.ops", "fastmtt.kernels", "fastmtt.objective",
                                                                 "fastmtt.trainer", "fastmtt.peft"))]
    assert not upward


def test_moved_names_import_from_where_they_were():
    import fastmtt
    import fastmtt.pytorch.mtt_loss
    import fastmtt.reduction
    import fastmtt.reference

    assert fastmtt.reference.MTTOutput is fastmtt.MTTOutput is fastmtt.reduction.MTTOutput
    assert fastmtt.pytorch.mtt_loss.accumulator_dtype is fastmtt.reduction.accumulator_dtype


def test_vocab_parallel_rows_fn_is_row_function_of_the_backend(monkeypatch):
    import fastmtt.ops.mtt_loss as op
    from fastmtt import VocabParallel

    split = VocabParallel(0, 4)
    seen = []
    monkeypatch.setattr(VocabParallel, "row_function", lambda self, implementations: seen.append(implementations))
    split.rows_fn("torch")
    assert seen == [op.row_implementations("torch")]
def public_objects():
    import fastmtt
    import fastmtt.trainer

    objects = {name: getattr(fastmtt, name) for name in fastmtt.__all__ if name != "DEFAULT_LAM"}
    objects["PadCollator"] = fastmtt.trainer.PadCollator
    return objects


@pytest.mark.parametrize("name", sorted(public_objects()))
def test_public_docstrings_say_args_returns_and_example(name):
    doc = public_objects()[name].__doc__
    assert "Example:" in doc and ("Args:" in doc or "Attributes:" in doc)
    if isinstance(public_objects()[name], type):
        return
    assert "Returns:" in doc


@pytest.mark.parametrize("name", sorted(public_objects()))
def test_public_examples_run(name):
    torch.manual_seed(0)
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(public_objects()[name], name, globs={"torch": torch}) if t.examples]
    assert tests, f"{name}: no Example: to run"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{name}: {runner.failures} failing example lines"
