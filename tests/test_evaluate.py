"""Validation in the env: the served policy is the exported one, step for step, KPI for KPI; reports; bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import maddpg_evaluation.evaluation as evaluation_module
from maddpg_client.metrics import scrape, scrape_settled
from maddpg_evaluation.citylearn_env import EnvSpec
from maddpg_evaluation.evaluation import evaluate_policy, local_factory, triton_factory
from maddpg_evaluation.kpis import DISTRICT_KPIS
from maddpg_ops.cli import cli
from maddpg_serving.local_triton import LocalTritonServer
from maddpg_serving.processes import reserve_ports

pytestmark = [pytest.mark.triton, pytest.mark.citylearn]
MODEL = "maddpg_ctde"
TWO_WEEKS = (0, 335)


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
    assert report["throughput"]["server"]["requests"] == 167  # settled: every step counted, nothing else
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


def test_the_plot_draws_the_episodes_loads_and_kpis(week_spec, exported_repository, tmp_path):
    from maddpg_client.local_policy import LocalPolicy
    from maddpg_evaluation.report import COLUMN_NAMES, plot_report

    layout = LocalPolicy(exported_repository).layout
    report = evaluate_policy(lambda: DaytimeCharging(layout), week_spec, progress=False)
    policy, zero = report.policy.district_load, report.baselines["zero_actions"].district_load
    assert policy.shape == zero.shape == (167,)
    assert np.abs(policy - zero).max() > 5.0, "17 batteries charging at half power move the district load"
    drawn = plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The lines are what a reader looks for in the loads the env recorded: each day's peak over the window, and the
    # hours of the week around the policy's all-time peak, policy against no control.
    label = report.policy_label
    np.testing.assert_array_equal(drawn["daily_peaks"][label], [policy[i:i + 24].max() for i in range(0, 167, 24)])
    np.testing.assert_array_equal(drawn["daily_peaks"]["no control (zero actions)"],
                                  [zero[i:i + 24].max() for i in range(0, 167, 24)])
    week = drawn["peak_week"][label]
    assert len(week) == 167 and week.max() == policy.max()  # a one-week window is its own peak week
    np.testing.assert_array_equal(drawn["peak_week"]["no control (zero actions)"], zero)
    # The bars are each controller's KPIs, in the order of the axis labels...
    names = {"policy": label, **{name: COLUMN_NAMES[name] for name in report.baselines}}
    for name, result in {"policy": report.policy, **report.baselines}.items():
        expected = [result.kpis.get(kpi, math.nan) for kpi in DISTRICT_KPIS]
        np.testing.assert_allclose(drawn["kpis"][names[name]], expected, equal_nan=True)
        # ... and cost and carbon relative to charge on arrival, the comparison that is fair to charging the cars.
        relative = report.relative_to_charge_on_arrival(result)
        np.testing.assert_allclose(drawn["relative"][names[name]],
                                   [relative["cost_total"], relative["carbon_emissions_total"]])
    np.testing.assert_allclose(drawn["relative"]["charge on arrival"], [1.0, 1.0])


def test_the_peak_week_is_the_week_around_the_all_time_peak():
    from maddpg_evaluation.report import daily_peaks, peak_week

    load = np.zeros(1000)
    load[700] = 5.0
    assert peak_week(load) == slice(616, 784) and peak_week(load[:100]) == slice(0, 100)
    load[990] = 9.0
    assert peak_week(load) == slice(832, 1000)  # near the end: the last week, still 168 h
    np.testing.assert_array_equal(daily_peaks(np.arange(50.0)), [23.0, 47.0, 49.0])  # the last day may be short


def test_many_simulators_at_once_step_the_whole_window_and_batch_on_the_server(triton_server, week_spec, local_run):
    """What the server and the env report, not how fast: no rates compared (the machine may be busy)."""
    four = evaluate_policy(triton_factory(triton_server.http_url, "http", MODEL), week_spec, baselines=False,
                           envs=4, metrics_url=triton_server.metrics_url, model=MODEL, progress=False)
    assert four.throughput["envs"] == 4
    assert four.throughput["steps_per_simulator"] == [167, 167, 167, 167]  # every simulator stepped the whole window
    assert four.throughput["server"]["requests"] == 4 * 167  # Triton counted each of their requests (settled read)
    assert four.throughput["server"]["failures"] == 0
    # Simulators stepping in lockstep ask at the same moment: the dynamic batcher merged some of their requests.
    assert four.throughput["average_batch_size"] > 1.0
    # Every simulator saw the same deterministic episode as the in-process policy.
    assert four.policy.kpis == pytest.approx(local_run.policy.kpis)


@pytest.fixture()
def no_stepping(monkeypatch):
    """A tripwire: these refusals must come before any episode is stepped (the long part of a run)."""
    def stepped(*args, **kwargs):
        raise AssertionError("an episode was stepped before the bad input was refused")

    monkeypatch.setattr(evaluation_module, "run_episode", stepped)


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
def test_bad_env_options_fail_before_any_stepping_with_one_clear_line(args, message, exported_repository, no_stepping):
    result = CliRunner().invoke(cli, ["evaluate", "--local", str(exported_repository), *args, "--no-progress"])
    assert result.exit_code != 0
    assert message in _error(result)


def test_an_env_that_does_not_fit_the_served_model_is_refused_before_stepping(triton_server, schema_path, tmp_path,
                                                                              no_stepping):
    schema = json.loads(schema_path.read_text())
    schema["root_directory"] = str(schema_path.parent)
    for name in list(schema["buildings"])[-1:]:
        schema["buildings"][name]["include"] = False  # a 16-building district
    other = tmp_path / "schema.json"
    other.write_text(json.dumps(schema))
    result = CliRunner().invoke(cli, ["evaluate", "--url", triton_server.http_url, "--schema", str(other),
                                      "--start", "0", "--end", "167", "--no-progress"])
    assert result.exit_code != 0
    assert "the env has 16 buildings, the model was trained on 17" in _error(result)


def test_exactly_one_policy_source_is_required():
    result = CliRunner().invoke(cli, ["evaluate", "--start", "0", "--end", "10"])
    assert result.exit_code == 2 and "exactly one of --url, --local or --serve" in result.output


def test_windows_are_checked_against_the_dataset_length(schema_path):
    assert EnvSpec(schema=str(schema_path), start=0, end=8759).check_window() == (0, 8759)
    with pytest.raises(Exception, match="8760 time steps"):
        EnvSpec(schema=str(schema_path), start=0, end=8760).check_window()


# --- a server that goes away mid-episode ------------------------------------------------------------------------------
@pytest.fixture()
def own_server(exported_repository, local_server):
    """A server of this test's own, to stop and start again (exit timeout 0: it stops at once, like a crash)."""
    with local_server(exported_repository, exit_timeout_s=0) as server:
        yield server


class StopMidway(threading.Thread):
    """Stops ``server`` once its own counters show ``after_requests`` answered inferences; starts it again (same
    ports) unless ``come_back`` is false. Triggered by what the server did, not by a delay, so it lands mid-run.

    Start it before the run, on a server nobody else calls: what the counters hold then (the model's warm-up
    requests) is what a freshly started server counts before any client.
    """

    def __init__(self, server: LocalTritonServer, after_requests: int, come_back: bool = True):
        super().__init__(daemon=True)
        self.server, self.after_requests, self.come_back = server, after_requests, come_back
        self.stopped_at: float | None = None
        self.ready_at: float | None = None
        self.error: BaseException | None = None
        self.fresh_count = scrape(server.metrics_url, MODEL).request_success

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 120
            while scrape(self.server.metrics_url, MODEL).request_success < self.fresh_count + self.after_requests:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the run never reached {self.after_requests} requests")
                time.sleep(0.01)
            self.stopped_at = time.monotonic()
            self.server.stop()
            if self.come_back:
                self.server.start(timeout=120)
                self.ready_at = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def evaluate_cli(server, schema_path, out, *extra: str):
    return CliRunner().invoke(cli, ["evaluate", "--url", server.http_url, "--metrics-url", server.metrics_url,
                                    "--schema", str(schema_path), "--start", str(TWO_WEEKS[0]), "--end",
                                    str(TWO_WEEKS[1]), "--no-baselines", "--out", str(out), "--no-progress", *extra])


def test_evaluate_rides_out_a_server_restart_mid_episode_with_the_same_results(
        own_server, schema_path, exported_repository, tmp_path, caplog):
    caplog.set_level("WARNING", logger="maddpg_evaluation")
    steps = TWO_WEEKS[1] - TWO_WEEKS[0]
    restart = StopMidway(own_server, after_requests=100)
    restart.start()
    result = evaluate_cli(own_server, schema_path, tmp_path / "report", "--reference-onnx", str(exported_repository))
    restart.join(timeout=180)
    assert restart.error is None, restart.error
    assert restart.ready_at is not None, "the server was not restarted"
    assert result.exit_code == 0, result.output
    # The restarted process answered the rest of the window: some steps, not all (its counters start from zero).
    # (Of the 100 requests before the stop, one is the run's own probe of the metrics endpoint.)
    served_after_restart = scrape_settled(own_server.metrics_url, MODEL).request_success - restart.fresh_count
    assert 0 < served_after_restart <= steps - 99
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["env"]["steps"] == steps
    # Every action, before and after the restart, is the exported model's for that step's observations...
    assert report["parity"]["ok"] is True and report["parity"]["max_abs_diff"] <= 1e-6
    # ... so the episode is the uninterrupted one: the same KPIs as the in-process policy on the same window.
    spec = EnvSpec(schema=str(schema_path), start=TWO_WEEKS[0], end=TWO_WEEKS[1])
    uninterrupted = evaluate_policy(local_factory(str(exported_repository), MODEL), spec, baselines=False,
                                    progress=False)
    for kpi in DISTRICT_KPIS:
        assert report["results"]["policy"]["kpis"][kpi] == pytest.approx(uninterrupted.policy.kpis[kpi], abs=1e-9)
    # Counters across a restart mean nothing: the run says what it saw instead of reporting them.
    assert "server" not in report["throughput"]
    assert "the server went away during the run" in caplog.text and "started again from zero" in caplog.text
    print(f"restart: server stopped and ready again in {restart.ready_at - restart.stopped_at:.1f} s")


def test_a_server_that_stays_down_ends_evaluate_with_one_line_and_no_report(own_server, schema_path, tmp_path):
    steps = TWO_WEEKS[1] - TWO_WEEKS[0]
    out = tmp_path / "report"
    stop = StopMidway(own_server, after_requests=50, come_back=False)
    stop.start()
    result = evaluate_cli(own_server, schema_path, out, "--retry-seconds", "2")
    stop.join(timeout=60)
    assert stop.error is None, stop.error
    assert result.exit_code == 1
    line = _error(result)
    step = int(line.split("failed at step ")[1].split()[0])
    assert 50 <= step <= steps and f"of {steps}" in line, line  # the 50th may have run, its answer lost
    assert "gave up after" in line and "is tritonserver running" in line and "no report was written" in line
    assert not (out / "report.json").exists() and not (out / "report.png").exists()



# --- `evaluate --url` pointed at the wrong thing: one line naming the cause, before the env is built -----------------
@pytest.fixture()
def no_env(monkeypatch):
    """A tripwire: a server that cannot serve must be reported before the env (seconds to build) is built."""
    def build(self):
        raise AssertionError("the env was built before the server was checked")

    monkeypatch.setattr(EnvSpec, "build", build)


def evaluate_url(url: str, *extra: str):
    return CliRunner().invoke(cli, ["evaluate", "--url", url, "--start", "0", "--end", "23", "--no-baselines",
                                    "--no-progress", *extra])


@pytest.mark.parametrize("case", ["nothing listening", "http to the grpc port", "grpc to the http port",
                                  "the metrics port", "unknown model"])
def test_evaluate_url_names_what_is_wrong_in_one_line(case, triton_server, no_env, tmp_path):
    url, extra, cause = {
        "nothing listening": (f"127.0.0.1:{reserve_ports(1)[0]}", ["--ready-timeout", "1"], "connection refused"),
        "http to the grpc port": (triton_server.grpc_url, [], "speaks gRPC, not HTTP"),
        "grpc to the http port": (triton_server.http_url, ["--protocol", "grpc"], "speaks HTTP, not gRPC"),
        "the metrics port": (f"127.0.0.1:{triton_server.ports.metrics}", [], "metrics port"),
        "unknown model": (triton_server.http_url, ["--model", "no_such_model"], "does not serve 'no_such_model'"),
    }[case]
    result = evaluate_url(url, "--out", str(tmp_path / "out"), *extra)
    assert result.exit_code == 1
    line = _error(result)
    assert cause in line and "no report was written" in line
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# --- what report.json says it evaluated -------------------------------------------------------------------------------
def test_report_json_names_the_model_version_variant_backend_and_onnx_digest(exported_repository, schema_path,
                                                                             tmp_path):
    served = exported_repository / MODEL / "1" / "model.onnx"
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    window = ["--schema", str(schema_path), "--start", "0", "--end", "23", "--no-baselines", "--no-progress"]
    for how, out in ((["--serve", str(exported_repository)], "served"), (["--local", str(exported_repository)], "local")):
        result = CliRunner().invoke(cli, ["evaluate", *how, *window, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        model = json.loads((tmp_path / out / "report.json").read_text())["model"]
        assert model["name"] == MODEL and model["version"] == "1"
        assert model["onnx_sha256"] == digest and Path(model["onnx_file"]).resolve() == served.resolve()
        assert model["source"]["kind"] == "maddpg-ctde"  # where the graph came from: the layout's own record
        if out == "served":
            # The variant and backend the local server ran (the onnxruntime backend where built, as `serve` does).
            assert (model["config_variant"], model["backend"]) in {("cpu", "onnxruntime"), ("local", "python")}
            assert model["server"].startswith("Triton 2.51.0 at http://127.0.0.1:")
        else:
            assert model["backend"] == "onnxruntime (in process)" and model["config_variant"] is None
        assert f"{MODEL} v1" in result.output  # the table's column, as the plot's legend, names the model


def test_a_served_model_without_local_files_is_named_and_says_why_it_has_no_digest(triton_server, schema_path,
                                                                                   tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--url", triton_server.grpc_url, "--protocol", "grpc",
                                      "--schema", str(schema_path), "--start", "0", "--end", "23", "--no-baselines",
                                      "--no-progress", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    model = json.loads((tmp_path / "report.json").read_text())["model"]
    assert (model["name"], model["version"]) == (MODEL, "1")
    assert model["backend"] == triton_server.served_backend
    assert model["config_variant"] == {"onnxruntime": "cpu", "python": "local"}[triton_server.served_backend]
    assert model["onnx_sha256"] is None and any("no model.onnx digest" in note for note in model["notes"])


# --- batch statistics from this server's own metrics endpoint ---------------------------------------------------------
def ports_with_metrics_at(offset: int):
    """Free ports for a server whose HTTP port is `offset` below a port that is also free (Triton's own layout)."""
    from maddpg_serving.server_config import TritonPorts

    for _ in range(100):
        http, grpc, metrics = reserve_ports(3)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", http + offset))
            except OSError:
                continue
        if http + offset not in (grpc, metrics):
            return TritonPorts(http, grpc, metrics), http + offset
    raise AssertionError("no free port pair found")


def test_evaluate_reads_batch_statistics_from_its_own_servers_metrics_not_a_neighbours(
        exported_repository, schema_path, local_server, tmp_path, caplog):
    """The server under test has its metrics on some port; another server listens where a guess would look (the
    HTTP port + 2). The run must not take the neighbour's counters for its own, and must not guess a restart."""
    from maddpg_serving.server_config import TritonPorts

    caplog.set_level("INFO", logger="maddpg_evaluation")
    ports, guessed = ports_with_metrics_at(2)
    neighbour_ports = TritonPorts(*reserve_ports(2), guessed)
    with local_server(exported_repository, ports=neighbour_ports), local_server(exported_repository, ports=ports):
        result = evaluate_url(f"127.0.0.1:{ports.http}", "--schema", str(schema_path), "--out", str(tmp_path / "a"))
        assert result.exit_code == 0, result.output
        throughput = json.loads((tmp_path / "a" / "report.json").read_text())["throughput"]
        assert "server" not in throughput and "average_batch_size" not in throughput
        assert f"http://127.0.0.1:{guessed}/metrics does not count its requests" in caplog.text
        assert "pass --metrics-url" in caplog.text and "restart" not in caplog.text
    # The server's metrics where Triton's layout puts them (HTTP + 2) are found, and count exactly this run.
    ports, _ = ports_with_metrics_at(2)
    ports = TritonPorts(ports.http, ports.grpc, ports.http + 2)
    with local_server(exported_repository, ports=ports):
        result = evaluate_url(f"127.0.0.1:{ports.http}", "--schema", str(schema_path), "--out", str(tmp_path / "b"))
        assert result.exit_code == 0, result.output
        throughput = json.loads((tmp_path / "b" / "report.json").read_text())["throughput"]
        assert throughput["metrics_url"] == f"http://127.0.0.1:{ports.metrics}/metrics"
        assert throughput["server"]["requests"] == 23


def test_an_explicit_metrics_url_of_another_server_is_refused_before_stepping(
        triton_server, exported_repository, local_server, schema_path, no_stepping):
    with local_server(exported_repository, backend="python") as other:
        result = evaluate_url(triton_server.http_url, "--schema", str(schema_path), "--metrics-url", other.metrics_url)
    assert result.exit_code == 1
    assert "--metrics-url is not the metrics endpoint of" in _error(result)


# --- one line instead of a traceback ----------------------------------------------------------------------------------
def test_a_corrupt_model_onnx_is_one_line(exported_repository, tmp_path, no_stepping):
    broken = tmp_path / MODEL / "1"
    broken.mkdir(parents=True)
    data = (exported_repository / MODEL / "1" / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(cli, ["evaluate", "--local", str(tmp_path), "--start", "0", "--end", "23"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = _error(result)
    assert f"{broken / 'model.onnx'} is not a model onnxruntime can load (InvalidProtobuf" in line
    assert "export the model again" in line


def test_a_dataset_name_typo_online_is_one_line_with_the_likely_name(exported_repository, monkeypatch, no_stepping):
    """Without CITYLEARN_OFFLINE: here (no internet) the download is known impossible at once; with internet,
    CityLearn refuses the unknown name itself. Either way one line, naming the dataset it probably meant."""
    monkeypatch.delenv("CITYLEARN_OFFLINE")
    result = CliRunner().invoke(cli, ["evaluate", "--local", str(exported_repository), "--dataset",
                                      "citylearn_challenge_2022_phase_all_plus_evz", "--no-baselines"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "did you mean 'citylearn_challenge_2022_phase_all_plus_evs'?" in _error(result)


def test_a_dataset_that_cannot_be_downloaded_fails_at_once_saying_how_to_point_at_a_copy(
        exported_repository, monkeypatch, tmp_path, no_stepping):
    import maddpg_evaluation.citylearn_env as citylearn_env

    monkeypatch.delenv("CITYLEARN_OFFLINE")
    monkeypatch.setenv("CITYLEARN_LOCAL_DATASETS_PATH", str(tmp_path))  # an empty folder: no copy here
    # Where CityLearn would download from: a closed port stands for a machine without internet.
    monkeypatch.setattr(citylearn_env, "DOWNLOAD_PROBE_URL", f"http://127.0.0.1:{reserve_ports(1)[0]}/")
    citylearn_env.download_blocked.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["evaluate", "--local", str(exported_repository), "--dataset",
                                          "not_a_dataset_anyone_has", "--no-baselines"])
    finally:
        citylearn_env.download_blocked.cache_clear()
    assert result.exit_code == 1
    line = _error(result)
    assert "'not_a_dataset_anyone_has' is not on this machine" in line and "cannot download it" in line
    assert "refused" in line and "CITYLEARN_LOCAL_DATASETS_PATH" in line and "CITYLEARN_OFFLINE=1" in line


def test_without_any_setting_the_dataset_copy_beside_the_checkout_is_found(exported_repository, schema_path, tmp_path):
    """A newcomer runs a command outside make, in a clone with ../shared beside it, no variable set."""
    clone = tmp_path / "work" / "clone"
    clone.mkdir(parents=True)
    datasets = tmp_path / "work" / "shared" / "citylearn" / "datasets"
    datasets.mkdir(parents=True)
    (datasets / schema_path.parent.name).symlink_to(schema_path.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYLEARN_")}
    result = subprocess.run([sys.executable, "-m", "maddpg_ops.cli", "evaluate", "--local", str(exported_repository),
                             "--start", "0", "--end", "23", "--no-baselines", "--no-progress", "--out", "report"],
                            cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"CityLearn datasets: using the copy in {datasets}" in result.stderr
    schema = json.loads((clone / "report" / "report.json").read_text())["env"]["schema"]
    assert schema == str(datasets / schema_path.parent.name / "schema.json")
