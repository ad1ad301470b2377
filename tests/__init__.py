"""The tests package. The repository root (on sys.path for `tests.utils`) holds `kernels/`, installed as
`fastmtt.kernels`; from the root it would shadow Hugging Face's top-level `kernels` package, which transformers
>= 5.25 requires and imports. So importing this package (the test process, xdist workers, the gloo tests'
forkserver) first imports Hugging Face's from the installed packages where it is installed, and subprocesses
(`python -m ...`) do not put their working directory first (PYTHONSAFEPATH)."""
import importlib
import os
import sys

os.environ.setdefault("PYTHONSAFEPATH", "1")


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
