"""What the README and `--help` tell a newcomer is so: the commands, defaults and options they name exist and do that.

(The sample answer's model_version is checked against a real server in test_onnxruntime_backend.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from maddpg_ops.cli import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()


def help_of(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def section(title: str) -> str:
    return README.split(f"## {title}")[1].split("\n## ")[0]


def test_evaluate_help_lists_every_reference_controller_it_runs():
    from maddpg_evaluation.evaluation import REFERENCE_CONTROLLERS

    baselines = help_of("evaluate").split("--baselines / --no-baselines")[1].split("[default")[0]
    assert set(REFERENCE_CONTROLLERS) == {"zero_actions", "basic_battery_rbc", "charge_on_arrival"}
    for name in ("zero actions", "BasicBatteryRBC", "charge on arrival"):
        assert name in baselines


def test_bench_writes_to_reports_by_default_never_over_the_committed_page():
    assert "[default: reports/bench]" in help_of("bench")


def test_section_2_says_where_maddpg_citylearn_comes_from_before_using_it():
    serve = section("2. Serve the policy on your machine")
    first_use = serve.index("maddpg-citylearn serve")
    assert "source .venv/bin/activate" in serve[:first_use] or ".venv/bin/maddpg-citylearn" in serve[:first_use]


def test_section_2_shows_the_layout_parameter_it_points_to():
    serve = section("2. Serve the policy on your machine")
    config_line = next(line for line in serve.splitlines() if "/config" in line and line.startswith("curl"))
    assert "| head" not in config_line and "parameters" in config_line


def test_every_command_that_builds_the_env_is_told_where_the_dataset_is():
    """Outside make, CityLearn must be pointed at the local copy: said before section 2's first env command."""
    before_first_env_command = README.split("maddpg-citylearn evaluate")[0]
    assert "CITYLEARN_LOCAL_DATASETS_PATH" in before_first_env_command
    assert "CITYLEARN_OFFLINE" in before_first_env_command


def test_examples_that_need_a_checkpoint_say_how_to_get_one():
    for match in re.finditer(r"runs/ctde/best\.pt", README):
        surrounding = README[max(0, match.start() - 600): match.end() + 600]
        assert "train" in surrounding, surrounding
