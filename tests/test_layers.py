"""The packages' layers, as pyproject.toml's import-linter contracts state them, hold in the code.

Bottom to top: maddpg_core <- maddpg_client <- maddpg_evaluation <- maddpg_training <- maddpg_export <- maddpg_serving
<- maddpg_benchmarks <- maddpg_ops; the thin client imports neither torch, onnx nor citylearn. Imports inside
functions count too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(config: Path = REPO_ROOT / "pyproject.toml") -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: `make setup` installs import-linter with the test extra")
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_every_import_points_down_the_layers():
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_an_import_against_the_layers_is_caught(tmp_path):
    # The same contracts, on a copy of the code where the core imports the client: the checker must refuse it.
    copy = tmp_path / "copy"
    for package in ("core", "clients"):
        shutil.copytree(REPO_ROOT / package, copy / package)
    bad = copy / "core" / "maddpg_core" / "upward.py"
    bad.write_text("from maddpg_client import TritonPolicy  # an upward import\n")
    config = tmp_path / "contracts.toml"
    config.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_packages = ["maddpg_core", "maddpg_client"]
        [[tool.importlinter.contracts]]
        name = "layers"
        type = "layers"
        layers = ["maddpg_client", "maddpg_core"]
    """))
    result = subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], capture_output=True,
                            text=True, timeout=300,
                            env={"PYTHONPATH": f"{copy / 'core'}:{copy / 'clients'}", "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "maddpg_core.upward -> maddpg_client" in result.stdout


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff), "check", "--output-format", "concise", "."], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
