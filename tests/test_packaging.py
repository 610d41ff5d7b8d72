"""The checkout installs and starts however it is installed: wheel, editable, strict editable.

Each mode installs a fresh clone of the working tree into a throwaway venv that
borrows this environment's dependencies (torch, triton, ...) through a .pth file,
then runs `trajinv --help` and imports a kernel module from outside the checkout.
No bare top-level `kernels` (PyPI has one) or `cli` may be installed.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = {"wheel": [], "editable": ["-e"], "strict": ["--config-settings", "editable_mode=strict", "-e"]}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The working tree as a clean copy (what git tracks, uncommitted changes included)."""
    dst = tmp_path_factory.mktemp("src") / "trajinv"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_install_mode_gives_a_working_command_and_kernels(mode, checkout, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                            text=True, check=True).stdout.strip()
    # pip, setuptools and every runtime dependency come from this environment
    Path(target, "zz-deps.pth").write_text(site.getsitepackages()[0] + "\n")
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          *MODES[mode], str(checkout)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([str(venv / "bin" / "trajinv"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "sweep" in res.stdout, res.stderr[-2000:]
    probe = ("import trajinv.kernels.adamw as a, trajinv.kernels.native as n; "
             "assert n.CSRC.joinpath('adamw.cpp').is_file(), n.CSRC; print(a.__file__)")
    res = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for bare in ("kernels", "cli"):
        assert not (Path(target) / bare).exists() and not (Path(target) / f"{bare}.py").exists()
    res = subprocess.run([str(py), "-c", "import kernels"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0  # nothing answers to a bare `kernels` (the PyPI name)
