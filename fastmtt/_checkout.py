"""A source checkout's root holds `kernels/`, installed as `fastmtt.kernels`. Where that root is on sys.path
(`python -m fastmtt`, a script or a shell started there, pytest), `import kernels` would find it instead of
Hugging Face's top-level `kernels` package, which transformers >= 5.25 requires and imports. So importing
fastmtt from a checkout whose root is on sys.path imports Hugging Face's package first, from the installed
packages (where it is not installed, transformers does not import it either)."""
import importlib
import os
import sys

CHECKOUT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_installed_kernels_package():
    """Import Hugging Face's `kernels` with the checkout root left out of sys.path; a no-op for an installed
    fastmtt, or when some `kernels` is already imported."""
    if "kernels" in sys.modules or not os.path.isfile(os.path.join(CHECKOUT_ROOT, "kernels", "mtt_loss.py")):
        return
    path = sys.path[:]
    outside = [p for p in path if os.path.abspath(p or os.curdir) != CHECKOUT_ROOT]
    if len(outside) == len(path):
        return
    sys.path[:] = outside
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = path
