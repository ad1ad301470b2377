"""Test setup: Triton kernels run in Triton's CPU interpreter (must be set before any @triton.jit runs), and
tests marked `cuda` are skipped without a GPU. Shared helpers live in tests/utils.py."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch


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
