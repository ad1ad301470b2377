"""The built wheel, not only the editable install: every module ships, kernels/ as `fastmtt.kernels`."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.utils import ROOT

pytest.importorskip("setuptools")  # the build backend, used without build isolation (no downloads)
PACKAGE_DIRS = {"fastmtt": ROOT / "fastmtt", "fastmtt/kernels": ROOT / "kernels"}  # as setup.py's package_dir
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", ".benchmarks", "demo_out", "out")


def source_modules():
    """Wheel paths of every .py file of the checkout's packages."""
    return {f"{prefix}/{path.relative_to(folder).as_posix()}" for prefix, folder in PACKAGE_DIRS.items()
            for path in folder.rglob("*.py") if "__pycache__" not in path.parts}


def test_wheel_ships_every_module_and_imports_from_a_fresh_location(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info behind
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fastmtt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {"fastmtt", wheel.name.split("-py")[0] + ".dist-info"}
    assert source_modules() <= names, sorted(source_modules() - names)  # setup.py lists every package
    assert "fastmtt/apps/data/kjv_ruth_esther_jonah.txt" in names  # package_data

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    installed = sorted(path.name for path in site.iterdir() if not path.name.endswith(".dist-info"))
    assert installed == ["bin", "fastmtt"] and (site / "bin" / "fastmtt").exists()  # no top-level `kernels`
    probe = f"""
import sys
sys.path.insert(0, {str(site)!r})  # -I: no PYTHONPATH, no current directory; the checkout is not importable
import fastmtt, fastmtt.kernels, fastmtt.kernels.mtt_loss, fastmtt.apps.cli, torch
assert fastmtt.__file__.startswith({str(site)!r}) and fastmtt.kernels.__file__.startswith({str(site)!r})
logits, base = torch.randn(3, 7), torch.randn(3, 7)
assert fastmtt.mtt_loss(logits, base, torch.tensor([0, 4, 6])) > 0
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
