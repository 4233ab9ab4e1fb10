"""Validation in the env: the served policy is the exported one, step for step, KPI for KPI; reports; bad input."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from click.testing import CliRunner

from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_evaluation.evaluation import evaluate_policy, local_factory, triton_factory
from maddpg_evaluation.kpis import DISTRICT_KPIS
from maddpg_ops.cli import cli

pytestmark = [pytest.mark.triton, pytest.mark.citylearn]
MODEL = "maddpg_ctde"


@pytest.fixture(scope="module")
def local_run(week_spec, exported_repository):
    return evaluate_policy(local_factory(str(exported_repository), MODEL), week_spec, baselines=False, progress=False)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_week_through_triton_equals_the_local_policy_action_for_action_and_kpi_for_kpi(
        protocol, triton_server, exported_repository, week_spec, local_run):
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    report = evaluate_policy(triton_factory(url, protocol, MODEL), week_spec, baselines=False, progress=False,
                      reference=local_factory(str(exported_repository), MODEL), reference_name="onnxruntime")
    assert report.policy.steps == 167
    assert report.policy.parity is not None and len(report.policy.parity) == 167
    assert report.policy.parity_max_abs_diff <= 1e-6 and report.parity_ok
    for kpi in DISTRICT_KPIS:
        assert math.isclose(report.policy.kpis[kpi], local_run.policy.kpis[kpi], rel_tol=0, abs_tol=1e-9), kpi
    for key, value in local_run.policy.service.items():
        assert report.policy.service[key] == pytest.approx(value, abs=1e-9, nan_ok=True)


def test_evaluate_writes_a_report_and_a_picture_that_tells_the_policy_from_the_baseline(
        triton_server, schema_path, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", "--url", triton_server.http_url, "--metrics-url",
                                      triton_server.metrics_url, "--schema", str(schema_path), "--start", "0",
                                      "--end", "167", "--out", str(out), "--reference-onnx",
                                      str(triton_server.repository), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"policy", "zero_actions", "basic_battery_rbc", "charge_on_arrival"}
    assert report["results"]["charge_on_arrival"]["relative_to_charge_on_arrival"]["cost_total"] == 1.0
    for name, figures in report["results"].items():
        assert set(figures["kpis"]) == set(DISTRICT_KPIS), name
        assert "ev_departures_acceptable" in figures["service"] and "appliance_service_level" in figures["service"]
    # Zero actions is the baseline of every ratio.
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in report["results"]["zero_actions"]["kpis"].values() if v is not None)
    assert report["parity"]["max_abs_diff"] <= 1e-6 and report["parity"]["ok"] is True
    assert report["results"]["policy"]["env_ms_per_step"] > 0 and report["results"]["policy"]["inference_ms_per_step"] > 0
    assert report["throughput"]["server"]["requests"] >= 167
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    for words in ("cost", "carbon emissions", "daily peak", "all-time peak", "EV departures", "parity"):
        assert words in result.output


class DaytimeCharging:
    """A policy that visibly moves the batteries: charge from 09:00 to 15:00, discharge otherwise."""

    def __init__(self, layout):
        self.layout = layout
        self.hour = layout.agents[0].observation_names.index("hour")

    def act(self, observations):
        actions = np.zeros(self.layout.action_shape, np.float32)
        actions[:, 0] = 0.5 if 9 <= observations[0, self.hour] <= 15 else -0.5
        return actions


def test_the_served_policy_matches_the_torch_checkpoint_it_was_exported_from(
        triton_server, schema_path, initial_checkpoint_path, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--url", triton_server.grpc_url, "--protocol", "grpc",
                                      "--schema", str(schema_path), "--start", "0", "--end", "167", "--no-baselines",
                                      "--reference-checkpoint", str(initial_checkpoint_path), "--out", str(tmp_path),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    parity = json.loads((tmp_path / "report.json").read_text())["parity"]
    assert parity["reference"].startswith("torch") and parity["tolerance"] == 1e-5
    assert parity["max_abs_diff"] <= 1e-5 and parity["ok"] is True


def test_the_plotted_series_differ_between_policy_and_zero_actions(week_spec, exported_repository, tmp_path):
    from maddpg_client.local_policy import LocalPolicy
    from maddpg_evaluation.report import write_evaluation_report

    layout = LocalPolicy(exported_repository).layout
    report = evaluate_policy(lambda: DaytimeCharging(layout), week_spec, progress=False)
    policy, zero = report.policy.district_load, report.baselines["zero_actions"].district_load
    assert policy.shape == zero.shape == (167,)
    assert np.abs(policy - zero).max() > 5.0, "17 batteries charging at half power move the district load"
    paths = write_evaluation_report(report, tmp_path)
    assert paths["plot"].stat().st_size > 20_000


def test_many_simulators_at_once_raise_the_decision_rate_and_batch_on_the_server(
        triton_server, week_spec):
    def run(envs: int):
        return evaluate_policy(triton_factory(triton_server.http_url, "http", MODEL), week_spec, baselines=False,
                        envs=envs, metrics_url=triton_server.metrics_url, model=MODEL, progress=False)

    one, four = run(1), run(4)
    assert four.throughput["envs"] == 4
    assert four.throughput["district_steps_per_second"] > one.throughput["district_steps_per_second"]
    assert four.throughput["server"]["requests"] == 4 * 167
    assert four.throughput["average_batch_size"] > 1.0
    # Every simulator saw the same deterministic episode.
    assert four.policy.kpis == pytest.approx(one.policy.kpis)


def _error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--schema", "/nonexistent/schema.json"], "does not exist"),
    (["--dataset", "no_such_dataset"], "not available offline"),
    (["--start", "8000", "--end", "9000"], "ends outside the episode"),
    (["--start", "50", "--end", "10"], "need 0 <= --start <= --end"),
])
def test_bad_env_options_fail_fast_with_one_clear_line(args, message, exported_repository):
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["evaluate", "--local", str(exported_repository), *args, "--no-progress"])
    assert result.exit_code != 0
    assert message in _error(result)
    assert time.monotonic() - started < 20


def test_an_env_that_does_not_fit_the_served_model_is_refused_before_stepping(triton_server, schema_path, tmp_path):
    schema = json.loads(schema_path.read_text())
    schema["root_directory"] = str(schema_path.parent)
    for name in list(schema["buildings"])[-1:]:
        schema["buildings"][name]["include"] = False  # a 16-building district
    other = tmp_path / "schema.json"
    other.write_text(json.dumps(schema))
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["evaluate", "--url", triton_server.http_url, "--schema", str(other),
                                      "--start", "0", "--end", "167", "--no-progress"])
    assert result.exit_code != 0
    assert "the env has 16 buildings, the model was trained on 17" in _error(result)
    assert time.monotonic() - started < 20


def test_exactly_one_policy_source_is_required():
    result = CliRunner().invoke(cli, ["evaluate", "--start", "0", "--end", "10"])
    assert result.exit_code == 2 and "exactly one of --url, --local or --serve" in result.output


def test_windows_are_checked_against_the_dataset_length(schema_path):
    assert EnvSpec(schema=str(schema_path), start=0, end=8759).check_window() == (0, 8759)
    with pytest.raises(Exception, match="8760 time steps"):
        EnvSpec(schema=str(schema_path), start=0, end=8760).check_window()
