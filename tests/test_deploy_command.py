"""`maddpg-citylearn deploy`, offline: what a user sees without kubectl, without a cluster, when rendering the install
bundle, and when testing a running server (the session's real tritonserver stands in for the cluster's Service).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from maddpg_ops import kubernetes as k8s
from maddpg_ops.cli import cli
from maddpg_serving.processes import reserve_ports

pytestmark = pytest.mark.k8s

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("apply", "status", "logs", "test", "port-forward", "delete", "render")
CLUSTER_SUBCOMMANDS = {  # what each needs on the command line to reach the cluster check
    "apply": [], "status": [], "logs": ["--no-follow"], "test": [], "port-forward": [], "delete": ["--yes"],
}


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The installed command in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "maddpg_ops.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=timeout)


def error_lines(result) -> list[str]:
    return [line for line in (result.stderr if hasattr(result, "stderr") else result.output).splitlines() if line]


# --- help ------------------------------------------------------------------------------------------------------------
def test_help_lists_the_seed_scripts_actions():
    result = CliRunner().invoke(cli, ["deploy", "--help"])
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1]
    assert [line.split()[0] for line in commands.strip().splitlines()] == sorted(SUBCOMMANDS)
    assert "docs/kubernetes.md" in result.output


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_chooses_an_overlay(subcommand):
    result = CliRunner().invoke(cli, ["deploy", subcommand, "--help"])
    assert result.exit_code == 0
    assert "--overlay [base|gpu|production]" in result.output


def test_an_unknown_overlay_is_refused():
    result = CliRunner().invoke(cli, ["deploy", "status", "--overlay", "staging"])
    assert result.exit_code == 2
    assert "'staging' is not one of 'base', 'gpu', 'production'" in result.output


# --- no kubectl -------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_kubectl(monkeypatch, tmp_path):
    """Neither this environment nor PATH has a kubectl."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(k8s, "BUNDLED_BIN_DIR", empty)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv(k8s.KUBECTL_ENV, raising=False)


@pytest.mark.parametrize("subcommand", ["apply", "status", "logs", "test", "port-forward", "delete", "render"])
def test_missing_kubectl_is_one_actionable_line(no_kubectl, subcommand):
    result = CliRunner().invoke(cli, ["deploy", subcommand])
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert line.startswith("Error: kubectl was not found")
    assert "pip install 'maddpg-citylearn[k8s]'" in line


def test_a_configured_kubectl_that_does_not_exist_is_named(monkeypatch):
    monkeypatch.setenv(k8s.KUBECTL_ENV, "/nowhere/kubectl")
    result = CliRunner().invoke(cli, ["deploy", "status"])
    assert result.exit_code == 1
    assert "/nowhere/kubectl" in result.output and k8s.KUBECTL_ENV in result.output


# --- no cluster -------------------------------------------------------------------------------------------------------
@pytest.fixture
def unreachable_cluster(tmp_path) -> tuple[dict, str]:
    """A kubeconfig whose API server is a closed local port, as when Docker Desktop's Kubernetes is stopped."""
    server = f"https://127.0.0.1:{reserve_ports(1)[0]}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "docker-desktop",
        "clusters": [{"name": "docker-desktop", "cluster": {"server": server}}],
        "users": [{"name": "docker-desktop", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "docker-desktop", "context": {"cluster": "docker-desktop", "user": "docker-desktop"}}],
    }))
    import os

    env = dict(os.environ, KUBECONFIG=str(kubeconfig), KUBECACHEDIR=str(tmp_path / "kube-cache"))
    return env, server


@pytest.mark.parametrize("subcommand", sorted(CLUSTER_SUBCOMMANDS))
def test_unreachable_cluster_fails_fast_with_one_line(unreachable_cluster, subcommand):
    env, server = unreachable_cluster
    # Bounded wait (run_cli's timeout), no timing assert: what shows it failed on the first check is the reason,
    # a refused connection, not a timeout or a rollout that gave up.
    result = run_cli("deploy", subcommand, *CLUSTER_SUBCOMMANDS[subcommand], env=env)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith(f"Error: no Kubernetes cluster reachable at {server} (context 'docker-desktop')")
    assert "refused" in line and "Docker Desktop" in line


def test_a_context_the_kubeconfig_lacks_is_named_not_taken_for_a_missing_cluster(unreachable_cluster):
    env, _ = unreachable_cluster
    result = run_cli("deploy", "status", "--context", "nosuch", env=env)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert "has no context 'nosuch' (it has 'docker-desktop')" in line and "--context" in line
    assert "no Kubernetes cluster" not in line


def test_production_overlay_reports_the_cluster_before_any_crd_problem(unreachable_cluster):
    env, server = unreachable_cluster
    result = run_cli("deploy", "apply", "--overlay", "production", env=env)
    assert result.returncode == 1 and server in result.stderr


def test_every_kubectl_command_line_is_accepted_by_kubectl(unreachable_cluster):
    # Real kubectl parses each command line the subcommands build; reaching "connection refused" proves no flag,
    # resource type or argument was rejected first (kubectl checks those before it calls the server).
    env, server = unreachable_cluster
    base = REPO_ROOT / "k8s" / "base"
    command_lines = [
        k8s.apply_args(base), k8s.delete_args(base), k8s.rollout_args(5), k8s.status_args(), k8s.pods_args(),
        k8s.logs_args(follow=True, tail=100, since="10m"), k8s.logs_args(follow=False, tail=-1, since=None),
        k8s.port_forward_args("127.0.0.1", ["8000:80", "8001:8001", "8002:8002"]),
    ]
    kubectl = k8s.find_kubectl()
    for args in command_lines:
        result = subprocess.run([kubectl, "--namespace=maddpg-citylearn", *args], capture_output=True, text=True,
                                env=env, timeout=30)
        assert result.returncode != 0
        assert "refused" in result.stderr, f"kubectl {' '.join(args)}: {result.stderr.strip()}"


# --- render -----------------------------------------------------------------------------------------------------------
def test_render_writes_the_install_bundle(tmp_path):
    output = tmp_path / "bundle.yaml"
    result = CliRunner().invoke(cli, ["deploy", "render", "--output", str(output)])
    assert result.exit_code == 0, result.output
    text = output.read_text()
    assert text == (REPO_ROOT / "k8s" / k8s.BUNDLE_NAME).read_text()
    objects = [d for d in yaml.safe_load_all(text) if d]
    assert f"wrote {output} ({len(objects)} objects)" in result.output
    assert text.startswith("# Generated by `maddpg-citylearn deploy render`")


def test_render_check_names_the_command_that_fixes_a_stale_bundle(tmp_path):
    stale = tmp_path / "stale.yaml"
    stale.write_text("# an old render\n")
    result = CliRunner().invoke(cli, ["deploy", "render", "--check", "--output", str(stale)])
    assert result.exit_code == 1
    assert "run `maddpg-citylearn deploy render`" in result.output
    assert stale.read_text() == "# an old render\n"
    current = CliRunner().invoke(cli, ["deploy", "render", "--check"])
    assert current.exit_code == 0 and "is current" in current.output


def test_render_prints_other_overlays(tmp_path):
    result = CliRunner().invoke(cli, ["deploy", "render", "--overlay", "production"])
    assert result.exit_code == 0
    objects = [d for d in yaml.safe_load_all(result.output) if d]
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"maddpg-citylearn"}
    assert "ServiceMonitor" in {o["kind"] for o in objects}


# --- test: readiness + one inference through the client ---------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_deploy_test_runs_one_inference_on_a_live_server(triton_server, protocol):
    from maddpg_client.triton_policy import TritonPolicy

    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    with TritonPolicy(url=triton_server.http_url, protocol="http") as policy:
        expected = policy.layout
    result = CliRunner().invoke(cli, ["deploy", "test", "--url", url, "--protocol", protocol, "--timeout", "30"])
    assert result.exit_code == 0, result.output
    assert f"ready: {protocol}://{url} serves maddpg_ctde ({expected.n_agents} agents)" in result.output
    assert f"actions {list(expected.action_shape)}" in result.output
    assert "finite and within bounds" in result.output


@pytest.mark.triton
def test_deploy_test_with_a_url_needs_no_kubectl(no_kubectl, triton_server):
    result = CliRunner().invoke(cli, ["deploy", "test", "--url", triton_server.http_url, "--timeout", "30"])
    assert result.exit_code == 0, result.output
    assert "finite and within bounds" in result.output


def test_deploy_test_on_a_server_that_is_not_there_fails_with_one_line():
    url = f"127.0.0.1:{reserve_ports(1)[0]}"
    result = run_cli("deploy", "test", "--url", url, "--timeout", "2")  # a bounded wait (run_cli's timeout)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith("Error: ") and url in line
