"""Test setup: Triton kernels run in Triton's CPU interpreter (must be set before any @triton.jit runs), and
tests marked `cuda` are skipped without a GPU. Shared helpers live in tests/utils.py.

The repository root (on sys.path for `tests.utils`) holds `kernels/`, installed as `fastmtt.kernels`; from the
root it would shadow Hugging Face's top-level `kernels` package, which transformers >= 5.25 requires and
imports. So Hugging Face's is imported here first, from the installed packages (where it is installed), and
subprocesses (`python -m ...`) do not put their working directory first (PYTHONSAFEPATH)."""
import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("PYTHONSAFEPATH", "1")

import pytest
import torch


def _import_installed_kernels_package():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = sys.path[:]
    sys.path[:] = [p for p in path if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers does not import it either
        pass
    finally:
        sys.path[:] = path


_import_installed_kernels_package()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread, restored afterwards (tiny models: on a shared 2-core machine a second thread mostly
    waits). Test files that want it everywhere say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
