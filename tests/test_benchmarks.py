"""The benchmark harness on real servers: local Triton and the seed-style FastAPI server, through the load driver.

One short run (two levels, sub-second windows, no tuning) is shared by the tests below. They check what a reader of
docs/benchmarks.md relies on: every contender measured (both Triton backends), no errors, counts that add up, ordered
percentiles, Triton's batching read from its metrics, the paced floor measured at the pace the run derived, goals and
stalls computed from the figures, and the report files. No test compares timings: speed goals live in the benchmark's
own report.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from maddpg_benchmarks.load import Level, Payload, ResponseError, Target, measure
from maddpg_benchmarks.report import write_benchmark_report
from maddpg_benchmarks.repositories import open_repository
from maddpg_benchmarks.runner import Bench, BenchOptions, make_payloads

pytestmark = [pytest.mark.triton, pytest.mark.citylearn]
LEVELS = (1, 4)
SERVED = ("triton-http", "triton-grpc", "triton-python-http")  # the default backend (onnxruntime) and the other one
FLOORS = ("onnxruntime-inprocess", "onnxruntime-inprocess-paced", "torch-stacked-inprocess",
          "torch-seed-loop-inprocess")


@pytest.fixture(scope="module")
def run(exported_repository) -> dict:
    options = BenchOptions.quick(repository=exported_repository, levels=LEVELS, duration_s=0.4, warmup_s=0.1,
                                 progress=False, command="pytest tests/test_benchmarks.py")
    return Bench(options).run()


def results(run, target):
    return [r for r in run["results"] if r["target"] == target]


def test_every_contender_is_measured_at_every_level_it_takes(run):
    measured = {(r["target"], r["concurrency"], r["districts"]) for r in run["results"]}
    for concurrency in LEVELS:
        for target in SERVED:
            assert {(target, concurrency, 1), (target, concurrency, 64)} <= measured
        # The seed's API takes one district per request.
        assert ("seed-fastapi", concurrency, 1) in measured
    assert not any(r["target"] == "seed-fastapi" and r["districts"] != 1 for r in run["results"])
    for floor in FLOORS:
        assert (floor, 1, 1) in measured  # one in-process caller
    assert run["backend"] == "onnxruntime" and run["serving_settings"]["variant"] == "configs/cpu.pbtxt"


def test_no_errors_and_counts_add_up(run):
    for r in run["results"]:
        where = f"{r['target']} c{r['concurrency']} x{r['districts']}"
        assert r["errors"] == 0 and r["warmup_errors"] == 0, f"{where}: {r['first_error']}"
        assert r["requests"] > 0 and r["seconds"] > 0, where
        assert math.isclose(r["requests_per_s"], r["requests"] / r["seconds"], rel_tol=1e-9), where
        assert math.isclose(r["decisions_per_s"], r["requests_per_s"] * r["districts"] * r["agents"], rel_tol=1e-9)
        assert r["agents"] == 17


def test_percentiles_are_ordered(run):
    for r in run["results"]:
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"], r


def test_triton_batching_comes_from_its_metrics_and_matches_the_client(run):
    for target in SERVED:
        for r in results(run, target):
            triton = r["triton"]
            # Counters are read just outside the measured window: the server counted exactly what the client did.
            assert triton["requests"] == r["requests"] and triton["failures"] == 0
            assert triton["inferences"] == r["requests"] * r["districts"]
            assert triton["average_batch_size"] >= 1
            # A model execution never merges more rows than the callers can have in flight.
            assert triton["average_batch_size"] <= r["concurrency"] * r["districts"]
    for r in results(run, "seed-fastapi"):
        assert r["triton"] is None and r["server_cpu_cores"] is not None


def test_the_paced_floor_idles_as_long_as_a_served_request_spends_outside_the_model(run):
    served = find_result(run, "triton-http", 1, 1)
    paced = run["paced_floor"]
    expected = served["mean_ms"] - served["triton"]["compute_us_per_request"] / 1000
    assert paced["pause_ms"] == pytest.approx(max(0.0, expected))
    assert paced["served_mean_ms"] == served["mean_ms"]
    floor = find_result(run, "onnxruntime-inprocess-paced", 1, 1)
    assert f"{paced['pause_ms']:.3f} ms pause" in floor["config"] and floor["requests"] > 0


def test_the_model_figures_come_from_the_served_graph(run):
    # The test fixture's policy (conftest: ActorSpec((64, 64))) on the real layout: 17 agents, 52 observations, 3 actions.
    assert [tuple(w) for w in run["model"]["layer_widths"]] == [(52, 64), (64, 64), (64, 3)]
    assert run["model"]["hidden"] == [64, 64] and run["model"]["layout"] == "17 x 52 -> 17 x 3"
    assert run["model"]["flops_per_decision"] == 2 * (52 * 64 + 64 * 64 + 64 * 3)
    assert run["model"]["graph_nodes"] > 0


def test_goals_are_computed_from_the_run(run):
    goals = {g["id"]: g for g in run["goals"]}
    throughput = goals["throughput_c16_http"]
    assert throughput["ratio"] is None and throughput["met"] is False  # concurrency 16 was not in this run
    latency = goals["latency_c1"]
    http, paced = find_result(run, "triton-http", 1, 1), find_result(run, "onnxruntime-inprocess-paced", 1, 1)
    assert latency["ratio"] == pytest.approx(http["p50_ms"] / paced["p50_ms"])
    assert latency["met"] == (latency["ratio"] <= 4)
    tight = find_result(run, "onnxruntime-inprocess", 1, 1)
    assert goals["latency_c1_back_to_back"]["ratio"] == pytest.approx(http["p50_ms"] / tight["p50_ms"])
    stalled = sum(r["stalled"] or 0 for r in run["results"] if r["target"] in ("triton-http", "triton-grpc"))
    assert goals["no_stalls"]["met"] == (stalled == 0) and goals["no_stalls"]["measured"].startswith(f"{stalled} of ")
    batched = goals["batched_http"]
    assert batched["ratio"] > 1  # 64 districts per request beat one per request on any machine
    for goal in run["goals"]:
        assert not goal["goal"].startswith("triton-"), "goals are stated in words"


def test_report_files(run, tmp_path):
    paths = write_benchmark_report(run, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu_model"]
    assert data["command"] == "pytest tests/test_benchmarks.py"
    text = paths["markdown"].read_text()
    for needed in ("## Goals\n", "## Results", "## perf_analyzer beside the driver", "pytest tests/test_benchmarks.py",
                   "| Triton, HTTP |", "| Triton (python backend), HTTP |", "| seed-style FastAPI + torch |",
                   "| in-process onnxruntime |", "| in-process onnxruntime, paced |", "hidden 64-64",
                   "[benchmarks.md](benchmarks.md)"):
        assert needed in text
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perf_analyzer_measures_every_triton_row_beside_the_driver(run):
    perf = run["perf_analyzer"]
    assert perf["version"] == "2.41.0", perf  # installed by `make setup` into .venv/perf_analyzer
    measured = {(r["target"], r["concurrency"], r["districts"]) for r in run["results"]}
    rows = {(p["target"], p["concurrency"], p["districts"]): p for p in perf["rows"]}
    assert set(rows) == {(t, c, d) for t in ("triton-http", "triton-grpc") for c in LEVELS for d in (1, 64)}
    assert set(rows) <= measured
    for row in rows.values():
        assert "error" not in row, row
        assert row["requests_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]


def test_a_wrong_answer_fails_the_level_instead_of_being_timed(triton_server, exported_repository):
    source = open_repository(exported_repository)
    good = make_payloads(source, (1,))[1]
    wrong = Payload(good.observations, good.expected + 0.5, good.action_width, good.action_counts)
    target = Target("triton-http", triton_server.ports.http, model=source.model)
    level = Level(1, 1, duration_s=0.1, warmup_s=0)
    assert measure(target, good, level).latencies_ns.size > 0
    with pytest.raises(ResponseError, match="differs from the in-process model"):
        measure(target, wrong, level)


def find_result(run, target, concurrency, districts):
    found = [r for r in run["results"] if (r["target"], r["concurrency"], r["districts"]) ==
             (target, concurrency, districts)]
    assert len(found) == 1, (target, concurrency, districts)
    return found[0]


def fake_results(p50_ms: float, requests_per_s: float, decisions_per_s: float) -> list[dict]:
    def result(concurrency, districts, requests, p50):  # one second measured, 17 agents
        return {"target": "triton-http", "concurrency": concurrency, "districts": districts, "requests": requests,
                "p50_ms": p50, "p99_ms": p50, "stalled": 0, "requests_per_s": requests,
                "decisions_per_s": requests * districts * 17}

    return [result(1, 1, 100, p50_ms), result(16, 1, int(requests_per_s), 1.0),
            result(16, 64, int(decisions_per_s / 64 / 17), 1.0)]


@pytest.mark.parametrize(("median_ms", "stalled"), [(0.5, 2), (50.0, 0), (150.0, None)])
def test_stalls_are_answers_far_slower_than_their_rows_median(median_ms, stalled):
    from maddpg_benchmarks.load import STALL_MS, Measurement, summarise

    # Many answers at the median, one just inside the threshold, two 500 ms stalls on top of the median.
    latencies_ms = [median_ms] * 20 + [median_ms + STALL_MS - 1, 0.9 * median_ms + 500, median_ms + 501]
    if median_ms == 50:  # a loaded row: a tail of its own, over 400 ms but within 400 ms of the median
        latencies_ms = [median_ms] * 20 + [250, 420, 440]
    # median 150 ms: overloaded on purpose, a stall would not stand out from the tail, so none is counted (None)
    measurement = Measurement(np.asarray([int(v * 1e6) for v in latencies_ms], np.int64), seconds=1.0, span_s=1.0,
                              client_cpu_s=0.1)
    result = summarise("triton-http", Level(1), Payload(np.zeros((1, 17, 52), np.float32)), [measurement])
    assert result["stalled"] == stalled
    assert result["max_ms"] == pytest.approx(max(latencies_ms))


def tuning():
    """benchmarks/tune.py, the opt-in tuning script (not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tune.py"
    spec = importlib.util.spec_from_file_location("maddpg_tune", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_variant_whose_requests_stalled_never_wins():
    tune = tuning()

    def stalling(results, count):
        results[0]["stalled"] = count
        return results

    fast_but_stalls = stalling(fake_results(0.5, 2000, 200_000), 3)
    group = tune.group("queue_policy", "?", {"none": fake_results(1.0, 1000, 108_800), "policy": fast_but_stalls},
                       "none")
    tune.settle([group])
    assert group["kept"] == "none"


@pytest.mark.parametrize(("rival_speedup", "kept"), [(1.05, "delay=0"), (2.0, "delay=100")])
def test_tuning_replaces_the_default_only_beyond_the_runs_own_noise(rival_speedup, kept):
    tune = tuning()
    # The served default ran in two groups and moved by 10% between them: that is this run's noise.
    other = tune.group("instances", "?", {"instances=2": fake_results(1.0, 1100, 108_800)}, "instances=2")
    delay = tune.group("delay", "?", {"delay=0": fake_results(1.0, 1000, 108_800),
                                      "delay=100": fake_results(1.0, 1000 * rival_speedup, 108_800)}, "delay=0")
    assert tune.settle([other, delay]) > 1.0
    assert delay["kept"] == kept
