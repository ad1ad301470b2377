"""From the checkout's root (on sys.path first, as for `python -c`, scripts and shells started there) an installed
top-level `kernels` package (Hugging Face's, which transformers >= 5.25 imports) wins over the root's kernels/,
whatever the import order: kernels/ is a namespace portion, installed as fastmtt.kernels (setup.py)."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from tests.utils import ROOT

STAND_IN = '''"""Stands in for Hugging Face's `kernels`: every other name is an object that accepts anything."""
__version__ = "0.0.1"  # read where no distribution metadata says it (transformers 5.17)


class Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) else self  # a decorator returns what it decorates

    def __getattr__(self, name):
        return self


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Anything()
'''


def kernels_found_in_the_checkout_root(probe, pythonpath=None):
    """The file of the `kernels` module that `python -c probe` imports, run in the checkout's root."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, "-c", probe + "; import kernels; print(kernels.__file__)"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("probe", ["import peft", "import transformers; transformers.AutoModelForCausalLM",
                                   "import fastmtt.kernels.mtt_loss, peft", "import kernels, fastmtt.kernels.mtt_loss"])
def test_an_installed_kernels_package_wins_over_the_checkout_root(tmp_path, probe):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(STAND_IN)
    assert kernels_found_in_the_checkout_root(probe, pythonpath=tmp_path) == str(tmp_path / "kernels" / "__init__.py")


def test_peft_and_transformers_import_in_the_checkout_root_with_hugging_faces_kernels():
    version = tuple(int(part) for part in importlib.metadata.version("transformers").split(".")[:2])
    if version < (5, 25):
        pytest.skip(f"transformers {version} does not import Hugging Face's kernels package")
    found = kernels_found_in_the_checkout_root("import peft, transformers; transformers.AutoModelForCausalLM")
    assert found == str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
