"""Packaging glue: kernels/ ships as fastmtt.kernels, never as a top-level `kernels` module.

kernels/ has no __init__.py: from the checkout root it is then a namespace portion, which never shadows an
installed top-level `kernels` (Hugging Face's, which transformers >= 5.25 imports), and fastmtt.kernels is a
namespace subpackage. setuptools' editable finder does not find a namespace subpackage that lives outside its
parent's folder (pypa/setuptools#4943), so an editable install also gets a finder for fastmtt.kernels.
"""
import os

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

KERNELS_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "kernels"))
KERNELS_FINDER = "__editable___fastmtt_kernels_finder"
KERNELS_FINDER_SOURCE = f'''"""fastmtt.kernels of an editable install of fastmtt: the checkout's kernels/ folder."""
import sys
from importlib.machinery import ModuleSpec


class KernelsFinder:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != "fastmtt.kernels":
            return None
        spec = ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [{KERNELS_DIR!r}]
        return spec


if KernelsFinder not in sys.meta_path:
    sys.meta_path.append(KernelsFinder)
'''


class EditableStrategyWithKernels:
    """setuptools' editable strategy (a context manager writing the wheel's files), plus the kernels finder."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.strategy.__exit__(*exc_info)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(f"{KERNELS_FINDER}.py", KERNELS_FINDER_SOURCE)
        wheel.writestr("__editable__.fastmtt_kernels.pth", f"import {KERNELS_FINDER}\n")


class EditableWheelWithKernels(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return EditableStrategyWithKernels(super()._select_strategy(name, tag, build_lib))


setup(
    packages=["fastmtt", "fastmtt.apps", "fastmtt.ops", "fastmtt.pytorch", "fastmtt.kernels"],
    package_dir={"fastmtt": "fastmtt", "fastmtt.kernels": "kernels"},
    package_data={"fastmtt.apps": ["data/*.txt"]},  # the experiment's retention text
    cmdclass={"editable_wheel": EditableWheelWithKernels},
)
