"""Monitoring against a live Prometheus: Debian's ``prometheus`` scrapes the local tritonserver's metrics endpoint the
way the ServiceMonitor tells the Prometheus Operator to (job named after the Service, the endpoint's path and timeout,
the namespace and pod labels the Operator adds), loads the PrometheusRule's groups, and answers the Grafana
dashboard's queries. Real traffic makes the recording rules yield series; a real, bounded flood (127.0.0.1, straight to
Triton as base/gpu pods take it) sends MaddpgCitylearnHighQueueTime pending.

Changed for the test, and only this: the scrape and rule-evaluation intervals are 1 s instead of 15 s / 30 s, so the
test takes seconds, not minutes. Thresholds and ``for:`` durations are the production values: an alert is pending as
soon as its expression holds (firing would take its ``for:``, 10 minutes). Free ports, bounded waits, temp dirs,
stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from maddpg_serving import processes
from maddpg_serving.processes import reserve_ports

pytestmark = [pytest.mark.triton, pytest.mark.k8s]
REPO_ROOT = Path(__file__).resolve().parents[1]
MONITORING = REPO_ROOT / "k8s" / "monitoring"
NAMESPACE = "maddpg-citylearn"  # the production overlay's namespace, as the Operator's relabelling sets it
MODEL = "maddpg_ctde"


def production_objects() -> list[dict]:
    from maddpg_ops import kubernetes as k8s

    return k8s.Kubectl().render_objects(REPO_ROOT / "k8s" / "overlays" / "production")


def scrape_config(objects: list[dict], metrics_port: int) -> dict:
    """The scrape job the Operator generates from the ServiceMonitor, pointed at the local server."""
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    (service,) = [o for o in objects if o["kind"] == "Service" and
                  all(o["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    return {
        "job_name": service["metadata"]["name"],  # a ServiceMonitor's job label defaults to the Service's name
        "metrics_path": endpoint["path"],
        "scheme": endpoint.get("scheme", "http"),
        "scrape_interval": "1s",  # production: endpoint["interval"] (15 s)
        "scrape_timeout": "1s",   # at most the interval
        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"],
                            "labels": {"namespace": NAMESPACE, "pod": "maddpg-citylearn-0",
                                       "service": service["metadata"]["name"], "endpoint": endpoint["port"]}}],
    }


def rule_groups(objects: list[dict]) -> list[dict]:
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    return [{**group, "interval": "1s"} for group in rule["spec"]["groups"]]  # production: 30 s / global default


class Prometheus:
    def __init__(self, workdir: Path, config: dict, groups: list[dict]):
        (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        config = {"global": {"evaluation_interval": "1s"}, "rule_files": [str(workdir / "rules.yaml")],
                  "scrape_configs": [config]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        (self.port,) = reserve_ports(1)
        self.workdir = workdir
        self.process = None

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("prometheus")
        assert binary, "Debian's prometheus is not installed: run `make setup`"
        log = open(self.workdir / "prometheus.log", "wb")
        self.process = processes.start_group(
            [binary, f"--config.file={self.workdir / 'prometheus.yml'}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], output=log)
        log.close()
        processes.wait_ready(self.process, self._ready, timeout)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, what: str, check, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                log = (self.workdir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"{what}: not within {timeout:.0f} s\n{log}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            processes.stop_group(self.process, 10, name="prometheus")
            self.process = None


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The shipped model on the local tritonserver (cpu variant, onnxruntime backend) and a Prometheus scraping it."""
    from maddpg_serving.local_triton import LocalTritonServer, free_ports

    objects = production_objects()
    server = LocalTritonServer(REPO_ROOT / "model_repository", ports=free_ports(), backend="onnxruntime",
                               config_name="cpu")
    server.start(timeout=120)
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), scrape_config(objects, server.ports.metrics),
                            rule_groups(objects))
    try:
        prometheus.start()
        yield server, prometheus, objects
    finally:
        prometheus.stop()
        server.stop()


def traffic(server, requests: int = 200) -> None:
    from maddpg_client import TritonPolicy

    with TritonPolicy(server.http_url, model=MODEL) as policy:
        observations = np.zeros((1, *policy.layout.observation_shape), np.float32)
        for _ in range(requests):
            policy.act(observations)


def recorded(prometheus: Prometheus, record: str) -> list[dict]:
    return [s for s in prometheus.query(f'{record}{{namespace="{NAMESPACE}", model="{MODEL}"}}')
            if np.isfinite(float(s["value"][1]))]


def test_the_target_is_scraped_as_the_service_monitor_says(live):
    server, prometheus, objects = live
    targets = prometheus.wait_for("an up target", lambda: [t for t in prometheus.api("targets")["activeTargets"]
                                                          if t["health"] == "up"])
    assert targets[0]["labels"]["job"] == "maddpg-citylearn-service"
    assert prometheus.query('up{job="maddpg-citylearn-service"}')[0]["value"][1] == "1"


def test_recording_rules_yield_series_from_real_traffic(live):
    server, prometheus, objects = live
    records = [r["record"] for g in rule_groups(objects) for r in g["rules"] if "record" in r]
    assert len(records) == 6
    traffic(server)
    for record in records:
        prometheus.wait_for(record, lambda record=record: recorded(prometheus, record))
    # The figures are what the traffic was: requests/s positive, no failures, one district per execution or more.
    (rate,) = recorded(prometheus, "job_model:nv_inference_requests:rate5m")
    assert float(rate["value"][1]) > 0
    (failures,) = recorded(prometheus, "job_model:nv_inference_request_failure:ratio_rate5m")
    assert float(failures["value"][1]) == 0
    (batch,) = recorded(prometheus, "job_model:nv_inference_batch_size:ratio_rate5m")
    assert float(batch["value"][1]) >= 1


def test_the_dashboards_queries_return_data(live):
    from test_k8s_monitoring import dashboard_of, dashboard_queries

    server, prometheus, objects = live
    traffic(server, 50)
    queries = dashboard_queries(dashboard_of(objects))
    # Grafana substitutes its namespace variable (label_values of up{job=...}) before Prometheus sees a query.
    (namespace,) = prometheus.wait_for("the dashboard's namespace variable", lambda: prometheus.api(
        "label/namespace/values", **{"match[]": 'up{job="maddpg-citylearn-service"}'}))
    assert namespace == NAMESPACE
    for query in queries:
        concrete = query.replace("$namespace", namespace)
        if "nv_gpu_" in query:  # GPU panels: a CPU server exports no GPU metrics, as on CPU nodes
            assert prometheus.query(concrete) == []
            continue
        prometheus.wait_for(f"data for {concrete}", lambda q=concrete: prometheus.query(q))


def scraped_success(prometheus: Prometheus) -> float:
    found = prometheus.query(f'sum(nv_inference_request_success{{namespace="{NAMESPACE}", model="{MODEL}"}})')
    return float(found[0]["value"][1]) if found else -1.0


def test_a_flood_sends_the_queue_time_alert_pending(live):
    """The alert's 5-minute rate needs a sample from before the flood and one from after it. Scrapes may time out
    while the flood holds the CPU (on 2 cores they do), so the test waits for Prometheus itself to have seen the
    server's counters before flooding and again after, instead of assuming a scrape interval is enough."""
    from maddpg_benchmarks.robustness import flood
    from maddpg_client import LocalPolicy
    from maddpg_client.metrics import scrape

    server, prometheus, objects = live
    (alert,) = [r for g in rule_groups(objects) for r in g["rules"] if r.get("alert") == "MaddpgCitylearnHighQueueTime"]
    threshold_us = float(alert["expr"].rsplit(">", 1)[1])

    def state() -> str | None:
        alerts = [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == alert["alert"]]
        return alerts[0]["state"] if alerts else None

    def seen_by_prometheus(what: str, count: float) -> None:
        prometheus.wait_for(what, lambda: scraped_success(prometheus) >= count, timeout=120)

    traffic(server, 20)
    assert state() is None  # quiet while the server keeps up
    before = scrape(server.metrics_url, MODEL)
    seen_by_prometheus("a scrape from before the flood", before.request_success)
    # Bounded: 128 requests of 1,024 districts from 64 threads, straight to Triton (no admission in front). Requests
    # this large queue for far longer than the 100 ms threshold on any CPU host, whatever the earlier traffic in
    # the 5-minute window dilutes it with.
    shape = LocalPolicy(REPO_ROOT / "model_repository").layout.observation_shape
    batches = np.random.default_rng(2).standard_normal((128, 1024, *shape)).astype(np.float32)
    result = flood(server.http_url, "http", batches, concurrency=64, client_timeout_s=120.0, model=MODEL)
    assert result.counts()["ok"] == 128
    after = scrape(server.metrics_url, MODEL)
    flood_queue_us = (after - before).queue_us_per_request
    assert flood_queue_us > 2 * threshold_us, f"the flood queued only {flood_queue_us / 1e3:.0f} ms per request"
    seen_by_prometheus("a scrape from after the flood", after.request_success)

    found = prometheus.wait_for(f"{alert['alert']} pending", lambda: state() if state() in ("pending", "firing") else None)
    assert found == "pending"  # firing only after its `for:` (10 minutes)
    # The recorded queue time that tripped it is over the production threshold (100 ms).
    (queue,) = recorded(prometheus, "job_model:nv_inference_queue_duration_us_per_request:rate5m")
    assert float(queue["value"][1]) > threshold_us
