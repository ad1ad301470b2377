"""fastmtt/_checkout.py: from a checkout's root, `import kernels` after `import fastmtt` finds the installed
top-level `kernels` package (Hugging Face's), not the root's kernels/ folder (fastmtt.kernels)."""
import os
import subprocess
import sys

import pytest

from tests.utils import ROOT


@pytest.mark.parametrize("import_fastmtt_first", [True, False])
def test_installed_kernels_package_wins_over_the_checkout_root(tmp_path, import_fastmtt_first):
    installed = tmp_path / "site" / "kernels"  # stands in for Hugging Face's package
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    probe = ("import fastmtt\n" if import_fastmtt_first else "") + "import kernels; print(kernels.__file__)"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = result.stdout.strip()
    assert found == str((installed / "__init__.py") if import_fastmtt_first else ROOT / "kernels" / "__init__.py")
