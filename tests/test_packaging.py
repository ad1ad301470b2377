"""The built wheel, the editable install and the tested floors: every module ships, kernels/ as `fastmtt.kernels`."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import tomllib

from tests.utils import ROOT

# The build backend, used without build isolation (no downloads): setuptools builds wheels without the `wheel`
# package from 70.1 on, which the [test] extra requires (a new virtualenv's own setuptools may be older).
SETUPTOOLS_FLOOR = (70, 1)
PACKAGE_DIRS = {"fastmtt": ROOT / "fastmtt", "fastmtt/kernels": ROOT / "kernels"}  # as setup.py's package_dir
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", ".benchmarks", "demo_out", "out")


def source_modules():
    """Wheel paths of every .py file of the checkout's packages."""
    return {f"{prefix}/{path.relative_to(folder).as_posix()}" for prefix, folder in PACKAGE_DIRS.items()
            for path in folder.rglob("*.py") if "__pycache__" not in path.parts}


def copy_of_the_source(tmp_path):
    """A copy of the checkout: building in it would leave build/ and egg-info behind."""
    version = tuple(int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    assert version >= SETUPTOOLS_FLOOR, f"setuptools {version} cannot build wheels: pip install -e '.[test]'"
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    return source


def pip(*args):
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "-q"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_wheel_ships_every_module_and_imports_from_a_fresh_location(tmp_path):
    source = copy_of_the_source(tmp_path)
    pip("wheel", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source))
    (wheel,) = (tmp_path / "dist").glob("fastmtt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {"fastmtt", wheel.name.split("-py")[0] + ".dist-info"}
    assert source_modules() <= names, sorted(source_modules() - names)  # setup.py lists every package
    assert "fastmtt/apps/data/kjv_ruth_esther_jonah.txt" in names  # package_data

    site = tmp_path / "site"
    pip("install", "--target", str(site), str(wheel))
    installed = sorted(path.name for path in site.iterdir() if not path.name.endswith(".dist-info"))
    assert installed == ["bin", "fastmtt"] and (site / "bin" / "fastmtt").exists()  # no top-level `kernels`
    probe = f"""
import sys
sys.path.insert(0, {str(site)!r})  # -I: no PYTHONPATH, no current directory; the checkout is not importable
import fastmtt, fastmtt.kernels, fastmtt.kernels.mtt_loss, fastmtt.apps.cli, torch
assert fastmtt.__file__.startswith({str(site)!r}) and fastmtt.kernels.__path__[0].startswith({str(site)!r})
logits, base = torch.randn(3, 7), torch.randn(3, 7)
assert fastmtt.mtt_loss(logits, base, torch.tensor([0, 4, 6])) > 0
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_editable_install_imports_the_kernels_from_another_directory(tmp_path):
    source = copy_of_the_source(tmp_path)
    site = tmp_path / "site"
    pip("install", "--no-build-isolation", "--target", str(site), "-e", str(source))
    probe = f"""
import site, sys
site.addsitedir({str(site)!r})  # -S: without this checkout's own editable install, whose finders have the same names
sys.path.append({sysconfig.get_paths()["purelib"]!r})  # torch
import fastmtt.kernels.mtt_loss as kernel, fastmtt.kernels.registry
assert kernel.__file__ == {str(source / "kernels" / "mtt_loss.py")!r}, kernel.__file__
assert fastmtt.__file__ == {str(source / "fastmtt" / "__init__.py")!r}, fastmtt.__file__
"""
    result = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_declared_floor_is_the_version_ci_tests():
    """pyproject.toml's floors (`name>=X`) are what `make test-floors` installs (the Makefile's FLOORS)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = dict(re.findall(r"^([\w-]+)>=([\d.]+)", requirement)[0] for requirement in project["dependencies"]
                  if ">=" in requirement)
    tested = dict(re.findall(r"([\w-]+)==([\d.]+)", re.search(r"^FLOORS = (.*)$", (ROOT / "Makefile").read_text(),
                                                             re.M).group(1)))
    assert set(floors) == {"torch", "triton", "transformers", "peft"}
    assert all(tested[name].split(".")[:len(floor.split("."))] == floor.split(".") for name, floor in floors.items()), \
        (floors, tested)
    assert project["requires-python"].startswith(">=" + ".".join(map(str, sys.version_info[:2])))  # CI's Python
