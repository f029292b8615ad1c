"""`scripts/setup.sh` on a new machine: pip shows what it installs (no `-q` silence), a machine without a GPU is told
about the CPU build of PyTorch (MLCD_VL_TORCH), and the editable install is a plain .pth without setuptools'
"Editable installation" warning box."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the venv's python: torch is missing, and every pip call is recorded instead of run.
if [ "$1" = "-c" ]; then exit 1; fi
echo "$*" >> "$(dirname "$0")/../calls.txt"
"""


def test_setup_shows_what_pip_installs_and_names_the_cpu_build(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    env = dict(os.environ, MLCD_VL_VENV=str(venv))
    for name in ("MLCD_VL_TORCH", "MLCD_VL_EXTRAS"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (venv / "calls.txt").read_text().splitlines()
    assert calls == ["-m pip install torch==2.14.1 torchvision==0.29.1", "-m pip install -e .[dev]"]
    assert "[setup] installing PyTorch: torch==2.14.1 torchvision==0.29.1" in done.stdout
    if shutil.which("nvidia-smi") is None:
        assert 'MLCD_VL_TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"' \
            in done.stdout
    env["MLCD_VL_TORCH"] = "torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu"
    (venv / ".mlcd-vl-installed").unlink()
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup.sh")], env=env, check=True, capture_output=True,
                   timeout=60)
    assert (venv / "calls.txt").read_text().splitlines()[2] == \
        "-m pip install torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu"


def test_editable_install_is_a_plain_pth_without_a_warning_box(tmp_path):
    """setuptools' PEP 660 build, as `pip install -e .` runs it: our layout gets the .pth strategy, which prints
    no "Editable installation" box (the import-hook strategy of a non-simple layout prints one every time)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"pyproject.toml's build needs setuptools>=77; this environment has {setuptools.__version__}")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, project / name)
    shutil.copytree(REPO_ROOT / "mlcd_vl", project / "mlcd_vl", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_editable(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-W", "default", "-c", code, str(tmp_path / "wheel")], cwd=project,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Editable installation" not in done.stderr and "*****" not in done.stderr, done.stderr[-3000:]
    wheel = zipfile.ZipFile(tmp_path / "wheel" / done.stdout.strip().splitlines()[-1])
    pth = [name for name in wheel.namelist() if name.endswith(".pth")]
    assert len(pth) == 1 and not [name for name in wheel.namelist() if name.endswith("_finder.py")]
    assert wheel.read(pth[0]).decode().strip() == str(project)
