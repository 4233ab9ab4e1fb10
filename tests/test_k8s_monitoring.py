"""Monitoring without a cluster: the Prometheus Operator objects, the alerting and recording rules, the Grafana
dashboard and the prometheus-adapter rule behind the production HPA.

What is checked, honestly:
* ServiceMonitor / PrometheusRule: against hand-written JSON schemas (below) covering exactly the fields these
  manifests use, with their types and the operator's duration format, and refusing any other field. They are a strict
  subset of the monitoring.coreos.com/v1 CRDs, not the CRDs themselves (no CRD can be installed here).
* Rules: `promtool check rules` (PromQL syntax, rule structure) and `promtool test rules` with a unit test in which
  every alert fires on the traffic that should trigger it and stays silent on healthy traffic.
* Cross-references: the job label the rules select is the one the ServiceMonitor produces (the Service's name);
  every Triton metric the rules, dashboard and adapter use is exported by a real tritonserver.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from maddpg_ops import kubernetes as k8s

pytestmark = pytest.mark.k8s

REPO_ROOT = Path(__file__).resolve().parents[1]
MONITORING = REPO_ROOT / "k8s" / "monitoring"
RULES_TEST = MONITORING / "tests" / "prometheusrule-test.yaml"
ADAPTER_TEST = MONITORING / "tests" / "prometheus-adapter-test.yaml"
ADAPTER_VALUES = MONITORING / "prometheus-adapter-values.yaml"
# GPU series exist only where Triton sees a GPU (the gpu overlay); the local server in the tests has none.
GPU_ONLY_METRICS = {"nv_gpu_utilization"}

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": LABELS,
                   "annotations": LABELS},
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": LABELS, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}


def operator_object(kind: str, spec: dict) -> dict:
    """Schema of a Prometheus Operator object: apiVersion, kind, metadata, and the ``spec`` schema given."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
    }


SERVICE_MONITOR_SCHEMA = operator_object("ServiceMonitor", {
    "type": "object",
    "required": ["selector", "endpoints"],
    "additionalProperties": False,
    "properties": {
        "selector": LABEL_SELECTOR,
        "namespaceSelector": {"type": "object"},
        "jobLabel": {"type": "string"},
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"},
                    "targetPort": {"type": ["string", "integer"]},
                    "path": {"type": "string", "pattern": "^/"},
                    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                    "interval": {"type": "string", "pattern": DURATION},
                    "scrapeTimeout": {"type": "string", "pattern": DURATION},
                    "honorLabels": {"type": "boolean"},
                },
            },
        },
    },
})
RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "properties": {
        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
        "expr": {"type": ["string", "integer"]},
        "for": {"type": "string", "pattern": DURATION},
        "keep_firing_for": {"type": "string", "pattern": DURATION},
        "labels": LABELS,
        "annotations": LABELS,
    },
}
PROMETHEUS_RULE_SCHEMA = operator_object("PrometheusRule", {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "rules"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string", "pattern": DURATION},
                    "rules": {"type": "array", "minItems": 1, "items": RULE},
                },
            },
        },
    },
})
SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA}


# --- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (Debian/Ubuntu; .ci/run does it) or "
                    "download it from https://prometheus.io/download/")
    return path


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return k8s.Kubectl().render_objects(REPO_ROOT / "k8s" / "overlays" / "production")


@pytest.fixture(scope="module")
def monitoring() -> list[dict]:
    return k8s.Kubectl().render_objects(MONITORING)


def only(objects: list[dict], kind: str) -> dict:
    # Production also carries the admission proxy's ConfigMap: the dashboard's is the one Grafana's sidecar loads.
    matches = [o for o in objects if o["kind"] == kind]
    if kind == "ConfigMap":
        matches = [o for o in matches if "grafana_dashboard" in o["metadata"].get("labels", {})]
    (match,) = matches
    return match


def rules_of(objects: list[dict]) -> list[dict]:
    return [rule for group in only(objects, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]]


def dashboard_of(objects: list[dict]) -> dict:
    config_map = only(objects, "ConfigMap")
    (text,) = config_map["data"].values()
    return json.loads(text)


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def adapter_query(matchers: str, group_by: str) -> str:
    """The adapter's metricsQuery with its templates filled in as prometheus-adapter fills them."""
    return adapter_rule()["metricsQuery"].replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by)


def promtool_run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_rule_file(path: Path, rules: list[dict]) -> None:
    path.write_text(yaml.safe_dump({"groups": [{"name": path.stem, "rules": rules}]}, sort_keys=False))


# --- the CRD objects --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["monitoring", "production"])
def test_crd_objects_match_their_schemas(request, source):
    objects = request.getfixturevalue(source)
    checked = set()
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(obj, SCHEMAS[obj["kind"]])
            checked.add(obj["kind"])
    assert checked == set(SCHEMAS)


def test_crd_schemas_refuse_misspelt_fields(monitoring):
    # The schemas are only worth something if they refuse what the operator would silently ignore.
    monitor = json.loads(json.dumps(only(monitoring, "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    rule = json.loads(json.dumps(only(monitoring, "PrometheusRule")))
    rule["spec"]["groups"][1]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)


def test_service_monitor_scrapes_the_metrics_port_of_the_service(production):
    monitor = only(production, "ServiceMonitor")["spec"]
    wanted = monitor["selector"]["matchLabels"]
    selected = [s for s in production if s["kind"] == "Service"
                and all(s["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]
    assert [s["metadata"]["name"] for s in selected] == [k8s.SERVICE]
    (endpoint,) = monitor["endpoints"]
    (port,) = [p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    deployment = next(o for o in production if o["kind"] == "Deployment")
    container_ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert port["targetPort"] == "metrics" and "metrics" in container_ports
    assert "namespaceSelector" not in monitor  # the Service's own namespace, wherever the overlay puts it


def test_rules_select_the_job_the_service_monitor_produces(production):
    # Prometheus Operator names the job after the Service unless spec.jobLabel says otherwise.
    assert "jobLabel" not in only(production, "ServiceMonitor")["spec"]
    jobs = {job for rule in rules_of(production) for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert jobs == {k8s.SERVICE}
    test_jobs = set(re.findall(r'job="([^"]+)"', RULES_TEST.read_text()))
    assert k8s.SERVICE in test_jobs  # the unit tests feed series of that job


# --- promtool ---------------------------------------------------------------------------------------------------------
def test_promtool_accepts_the_rules(promtool, monitoring, tmp_path):
    write_rule_file(tmp_path / "rules.yaml", rules_of(monitoring))
    result = promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_make_every_alert_fire_and_cover_every_recording_rule(promtool, monitoring, tmp_path):
    rules = rules_of(monitoring)
    alerts = {r["alert"] for r in rules if "alert" in r}
    records = {r["record"] for r in rules if "record" in r}
    spec = yaml.safe_load(RULES_TEST.read_text())
    fired = {case["alertname"] for test in spec["tests"] for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    silent = {case["alertname"] for test in spec["tests"] for case in test.get("alert_rule_test", [])
              if case.get("exp_alerts") == []}
    evaluated = {case["expr"] for test in spec["tests"] for case in test.get("promql_expr_test", [])}
    assert fired == alerts, f"alerts no unit test makes fire: {sorted(alerts - fired)}"
    assert silent == alerts, f"alerts never checked silent on healthy traffic: {sorted(alerts - silent)}"
    assert records <= evaluated, f"recording rules without an expected value: {sorted(records - evaluated)}"

    (rule_file,) = spec["rule_files"]
    write_rule_file(tmp_path / rule_file, rules)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    result = promtool_run(promtool, "test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- prometheus-adapter and the production HPA ---------------------------------------------------------------------
def test_adapter_serves_the_metric_the_production_hpa_scales_on(production):
    rule = adapter_rule()
    hpa = only(production, "HorizontalPodAutoscaler")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods["metric"]["name"] == rule["name"]["as"]
    assert pods["target"]["type"] == "AverageValue"
    # The adapter maps the series' namespace and pod labels to the objects the HPA asks about.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    series_metric = rule["seriesQuery"].split("{")[0]
    assert re.fullmatch(rule["name"]["matches"], series_metric)


def test_adapter_query_computes_queue_time_per_request(promtool, tmp_path):
    spec = yaml.safe_load(ADAPTER_TEST.read_text())
    matchers = 'namespace="prod",pod=~"triton-a|triton-b|triton-idle"'  # as documented in the test file
    (rule_file,) = spec["rule_files"]
    write_rule_file(tmp_path / rule_file, [{"record": adapter_rule()["name"]["as"],
                                            "expr": adapter_query(matchers, "pod")}])
    shutil.copy(ADAPTER_TEST, tmp_path / ADAPTER_TEST.name)
    result = promtool_run(promtool, "check", "rules", rule_file, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool_run(promtool, "test", "rules", ADAPTER_TEST.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana dashboard ------------------------------------------------------------------------------------------------
def dashboard_queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_is_loaded_by_grafanas_sidecar(production):
    config_map = only(production, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = dashboard_of(production)
    assert dashboard["uid"] and dashboard["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace"}


def test_dashboard_queries_are_valid_promql_on_recorded_series(promtool, monitoring, tmp_path):
    dashboard = dashboard_of(monitoring)
    queries = dashboard_queries(dashboard)
    assert queries
    # Grafana substitutes its variables before Prometheus sees the query; do the same.
    concrete = [q.replace("$namespace", "prod") for q in queries]
    write_rule_file(tmp_path / "dashboard.yaml",
                    [{"record": f"dashboard:panel_{i}", "expr": q} for i, q in enumerate(concrete)])
    result = promtool_run(promtool, "check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    records = {r["record"] for r in rules_of(monitoring) if "record" in r}
    used = {name for q in queries for name in re.findall(r"job_model:[a-z_]+:[a-z0-9_]+", q)}
    assert used == records, "the dashboard shows every recorded series and only those"


# --- the metrics exist on a real server ------------------------------------------------------------------------------
@pytest.mark.triton
def test_every_triton_metric_used_is_exported_by_tritonserver(monitoring, triton_server):
    texts = [r["expr"] for r in rules_of(monitoring)] + dashboard_queries(dashboard_of(monitoring))
    texts += [adapter_rule()["seriesQuery"], adapter_rule()["metricsQuery"]]
    used = {name for text in texts for name in re.findall(r"(?<![:\w])nv_[a-z_]+", text)}  # not recorded names
    assert "nv_inference_queue_duration_us" in used
    # CPU/GPU metrics appear after Triton's first collection (every --metrics-interval-ms, 2 s by default).
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
            exported = set(re.findall(r"^# TYPE (nv_[a-z_]+) ", response.read().decode(), re.MULTILINE))
        missing = used - exported - GPU_ONLY_METRICS
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"metrics used by the rules/dashboard/adapter that tritonserver does not export: {missing}"
