"""The layering of docs/architecture.md, checked on the imports (no import cycle among them); the Example: blocks
of the public docstrings run."""
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


def module_files():
    """{module name: file} of every module of fastmtt/ and kernels/ (installed as fastmtt.kernels)."""
    files = {}
    for package, folder in (("fastmtt", ROOT / "fastmtt"), ("fastmtt.kernels", ROOT / "kernels")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            files[".".join((package, *parts[:-1], *(() if parts[-1] == "__init__" else parts[-1:])))] = path
    return files


def import_graph():
    """{module: the fastmtt modules it imports}, at the top or inside a function, a package's `__init__` only
    where the package itself is imported (`from fastmtt import partials` is fastmtt.partials)."""
    files = module_files()

    def resolve(name):
        while name not in files and "." in name:
            name = name.rpartition(".")[0]
        return name if name in files else None

    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not node.level, f"{path}: a relative import"
                names = (f"{node.module}.{alias.name}" for alias in node.names)
                targets.update(resolve(name) if name in files else resolve(node.module) for name in names)
            elif isinstance(node, ast.Import):
                targets.update(resolve(alias.name) for alias in node.names)
        graph[module] = {target for target in targets if target and target != module}
    return graph


def import_cycles(graph):
    """Every cycle of `graph` found by a depth-first walk, each as the list of its modules."""
    cycles, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_compatibility_names():
    """Names that moved (to fastmtt.reduction, fastmtt.rows) are imported from their home only."""
    import fastmtt.parallel
    import fastmtt.pytorch.mtt_loss
    import fastmtt.reference

    assert not hasattr(fastmtt.reference, "MTTOutput")
    assert not hasattr(fastmtt.pytorch.mtt_loss, "accumulator_dtype")
    assert not any(hasattr(fastmtt.parallel.VocabParallel, name) for name in ("rows_fn", "row_function"))


SHARED = ("fastmtt.partials", "fastmtt.parallel", "fastmtt.reduction", "fastmtt.options", "fastmtt.head",
          "fastmtt._checks", "fastmtt._dispatch")


def test_the_shared_layer_imports_only_itself():
    graph = import_graph()
    assert {module: sorted(graph[module] - set(SHARED)) for module in SHARED if graph[module] - set(SHARED)} == {}


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_fastmtt_or_kernels():
    graph = import_graph()
    assert {"fastmtt.ops.mtt_loss", "fastmtt.kernels.mtt_loss", "fastmtt.rows"} <= set(graph)
    assert "fastmtt.kernels.mtt_loss" in graph["fastmtt.rows"]  # an import inside a function counts
    assert [" -> ".join(cycle) for cycle in import_cycles(graph)] == []


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
