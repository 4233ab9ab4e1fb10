"""`make demo` installs what the demo needs; `make test` what the tests need; each after the other upgrades correctly.

Read from `make -n` (what make would run, nothing run) against a scratch virtual environment's stamps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
TEST_TOOLS = (".[test]", "torch==", "promtool", "prometheus", "nginx", "perf_analyzer", "-m pytest", "ruff", "checkov",
              "lint-imports")


def would_run(target: str, venv: Path) -> str:
    result = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def stamp(venv: Path, name: str) -> None:
    """What a finished install leaves: a stamp newer than pyproject.toml."""
    path = venv / f".maddpg-citylearn-{name}"
    path.touch()
    later = (REPO_ROOT / "pyproject.toml").stat().st_mtime + 60
    os.utime(path, (max(later, time.time()), max(later, time.time())))


@pytest.fixture
def venv(tmp_path) -> Path:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    return tmp_path / "venv"


def test_demo_installs_the_demo_extra_and_no_test_toolchain(venv):
    commands = would_run("demo", venv)
    assert 'pip install -e ".[demo]"' in commands and "citylearn==3.0.2" in commands
    assert "maddpg-citylearn evaluate --serve model_repository" in commands
    for tool in TEST_TOOLS:
        assert tool not in commands, tool


def test_test_installs_torch_the_test_extra_and_promtool(venv):
    commands = would_run("test", venv)
    assert 'pip install "torch==2.13.0"' in commands and 'pip install -e ".[test]"' in commands
    assert "promtool" in commands and "-m pytest" in commands


def test_demo_then_test_adds_the_test_toolchain_and_test_then_demo_installs_nothing(venv):
    stamp(venv, "demo")
    assert "pip install" not in would_run("demo", venv)
    assert 'pip install -e ".[test]"' in would_run("test", venv)  # the demo's install is not the tests'
    stamp(venv, "full")
    for target in ("test", "demo"):
        commands = would_run(target, venv)
        assert 'pip install -e' not in commands and "torch==" not in commands, target


def test_the_demo_extra_holds_no_torch_and_no_test_tools():
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    demo = set(extras["demo"][0].split("[")[1].rstrip("]").split(","))
    assert demo == {"env", "serve", "local"}
    for extra in demo:
        assert not any(name.startswith(("torch", "pytest", "ruff", "checkov")) for name in extras[extra]), extra
