"""The tests package. The repository root is on sys.path (for `tests.utils`) and holds `kernels/`; importing
fastmtt first imports Hugging Face's top-level `kernels` package from the installed packages
(fastmtt/_checkout.py), in every process that imports `tests` (the test process, xdist workers, the gloo
tests' forkserver); subprocesses (`python -m ...`) do not put their working directory first (PYTHONSAFEPATH)."""
import os

import fastmtt  # noqa: F401

os.environ.setdefault("PYTHONSAFEPATH", "1")
