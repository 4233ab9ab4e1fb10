"""``maddpg-citylearn deploy``: the seed's deploy-k8s.ps1 actions (apply, status, logs, test, port-forward, delete) on
the kustomize overlays in ``k8s/``, plus ``render`` for the install bundle ``k8s/maddpg-citylearn.yaml``.

Every cluster action checks first that kubectl exists and that a cluster answers (see :mod:`maddpg_ops.kubernetes`),
so a missing tool or a stopped Docker Desktop is one ``Error:`` line within seconds.
"""

from __future__ import annotations

import functools
import socket
import tempfile
import time
from pathlib import Path

import click

from maddpg_core.errors import DeployError

from .. import kubernetes as k8s
from ..options import model_option

OVERLAY_HELP = "Which kustomization: base (CPU, Docker Desktop), gpu (GPU nodes) or production (k8s/overlays/...)."


def cluster_options(command):
    """--overlay, --namespace, --context and --k8s-dir, shared by every subcommand that talks to a cluster."""

    @click.option("--overlay", type=click.Choice(list(k8s.OVERLAYS)), default="base", show_default=True,
                  help=OVERLAY_HELP)
    @click.option("--namespace", "-n", metavar="NAME", default=None,
                  help="Namespace. Default: the overlay's own (production: maddpg-citylearn), else the context's.")
    @click.option("--context", metavar="NAME", default=None, help="kubeconfig context. Default: the current one.")
    @click.option("--k8s-dir", metavar="DIR", default=None, type=click.Path(file_okay=False),
                  help="The repository's k8s/ folder. Default: ./k8s, else the source checkout's.")
    @functools.wraps(command)
    def wrapper(overlay, namespace, context, k8s_dir, **kwargs):
        target = Target.resolve(overlay, namespace, context, k8s_dir)
        return command(target, **kwargs)

    return wrapper


class Target:
    """One overlay on one cluster: the directory to apply and, looked up on first use, the kubectl to call
    (`deploy test --url` needs neither kubectl nor a cluster)."""

    def __init__(self, overlay: str, directory: Path, namespace: str | None, context: str | None):
        self.overlay, self.directory, self._namespace, self._context = overlay, directory, namespace, context
        self._kubectl: k8s.Kubectl | None = None

    @classmethod
    def resolve(cls, overlay: str, namespace: str | None, context: str | None, k8s_dir: str | None) -> "Target":
        return cls(overlay, k8s.overlay_dir(k8s.find_k8s_dir(k8s_dir), overlay), namespace, context)

    @property
    def kubectl(self) -> k8s.Kubectl:
        if self._kubectl is None:
            kubectl = k8s.Kubectl(context=self._context)
            # Production pins its namespace in the manifests; follow it so status/logs look where apply put things.
            kubectl.namespace = self._namespace or k8s.rendered_namespace(kubectl.render_objects(self.directory))
            self._kubectl = kubectl
        return self._kubectl

    @property
    def where(self) -> str:
        return f"namespace {self.kubectl.namespace}" if self.kubectl.namespace else "the context's namespace"


@click.group("deploy", context_settings={"help_option_names": ["-h", "--help"]})
def deploy() -> None:
    """Deploy the Triton server to Kubernetes and operate it (needs kubectl: pip install 'maddpg-citylearn[k8s]').

    \b
    Overlays (k8s/): base = CPU, Docker Desktop (LoadBalancer on localhost:8000); gpu = one NVIDIA GPU per pod;
    production = own namespace, TLS, private registry, monitoring (needs the Prometheus Operator CRDs).

    \b
    Typical session (Docker Desktop):
      docker build -t maddpg-citylearn-model:0.1.0 -f k8s/model-image/Dockerfile model_repository
      maddpg-citylearn deploy apply                  # kubectl apply -k k8s/base, then wait for the rollout
      maddpg-citylearn deploy status                 # deployment, pods, services, HPA, PDB
      maddpg-citylearn deploy test                   # readiness + one inference through a port-forward
      maddpg-citylearn deploy port-forward           # localhost:8000 (HTTP), :8001 (gRPC), :8002 (metrics)
      maddpg-citylearn deploy logs                   # follow the Triton logs of every pod
      maddpg-citylearn deploy delete --yes
    Full guide: docs/kubernetes.md.
    """


@deploy.command("apply")
@cluster_options
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the rollout to finish.")
@click.option("--timeout", type=click.IntRange(min=1), default=300, show_default=True, metavar="SECONDS",
              help="How long to wait for the rollout.")
def apply(target: Target, wait: bool, timeout: int) -> None:
    """Apply an overlay (kubectl apply -k) and wait until every replica is ready."""
    kubectl = target.kubectl
    kubectl.ensure_cluster()
    result = kubectl.run(k8s.apply_args(target.directory), what=f"kubectl apply -k {target.directory}")
    click.echo(result.stdout.rstrip())
    if not wait:
        return
    click.echo(f"... waiting up to {timeout} s for deployment/{k8s.DEPLOYMENT} in {target.where}", err=True)
    rollout = kubectl.try_run(k8s.rollout_args(timeout))
    if rollout.returncode != 0:
        raise DeployError(f"deployment/{k8s.DEPLOYMENT} did not become ready within {timeout} s"
                          f"{_pod_problems(kubectl)}; see `maddpg-citylearn deploy status` and `... deploy logs`")
    click.echo(rollout.stdout.rstrip())


@deploy.command("status")
@cluster_options
def status(target: Target) -> None:
    """Show the deployment, its pods, services, HPA and PDB (kubectl get -l app=maddpg-citylearn)."""
    target.kubectl.ensure_cluster()
    result = target.kubectl.run(k8s.status_args(), what="kubectl get")
    click.echo(result.stdout.rstrip() or f"nothing labelled {k8s.APP_LABEL} in {target.where}: run `deploy apply`")


@deploy.command("logs")
@cluster_options
@click.option("--follow/--no-follow", "-f", default=True, show_default=True, help="Keep streaming new lines.")
@click.option("--tail", type=int, default=100, show_default=True, help="Lines of history per pod (-1: all).")
@click.option("--since", metavar="DURATION", default=None, help="Only lines newer than this (e.g. 10m, 1h).")
def logs(target: Target, follow: bool, tail: int, since: str | None) -> None:
    """Triton logs of every pod (kubectl logs -l app=maddpg-citylearn), prefixed with the pod name."""
    target.kubectl.ensure_cluster()
    code = target.kubectl.stream(k8s.logs_args(follow=follow, tail=tail, since=since))
    if code != 0:
        raise DeployError(f"kubectl logs ended with status {code} (no pods? see `maddpg-citylearn deploy status`)")


@deploy.command("port-forward")
@cluster_options
@click.option("--http-port", type=int, default=8000, show_default=True, help="Local port for HTTP (service port 80).")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="Local port for gRPC.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Local port for Prometheus metrics.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Local address to listen on.")
def port_forward(target: Target, http_port: int, grpc_port: int, metrics_port: int, address: str) -> None:
    """Forward svc/maddpg-citylearn-service to this machine until Ctrl-C (HTTP 8000:80, gRPC 8001, metrics 8002)."""
    target.kubectl.ensure_cluster()
    click.echo(f"HTTP http://{address}:{http_port}  gRPC {address}:{grpc_port}  "
               f"metrics http://{address}:{metrics_port}/metrics  (Ctrl-C stops)", err=True)
    code = target.kubectl.stream(
        k8s.port_forward_args(address, [f"{http_port}:80", f"{grpc_port}:8001", f"{metrics_port}:8002"]))
    if code != 0:
        raise DeployError(f"kubectl port-forward ended with status {code} (service missing, no ready pod, or a "
                          f"local port in use: choose others with --http-port/--grpc-port/--metrics-port)")


@deploy.command("delete")
@cluster_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def delete(target: Target, yes: bool) -> None:
    """Delete everything the overlay created (kubectl delete -k)."""
    target.kubectl.ensure_cluster()
    if not yes:
        click.confirm(f"Delete the {target.overlay} deployment of maddpg-citylearn in {target.where}?", abort=True)
    result = target.kubectl.run(k8s.delete_args(target.directory), what=f"kubectl delete -k {target.directory}")
    click.echo(result.stdout.rstrip() or "nothing to delete")


@deploy.command("test")
@cluster_options
@click.option("--url", metavar="HOST:PORT", default=None,
              help="Test this endpoint instead of port-forwarding to the cluster (e.g. the LoadBalancer "
                   "localhost:8000, or an Ingress host).")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@model_option
@click.option("--timeout", type=click.IntRange(min=1), default=120, show_default=True, metavar="SECONDS",
              help="How long to wait for the rollout and for the model to be ready.")
def test(target: Target, url: str | None, protocol: str, model_name: str, timeout: int) -> None:
    """Wait until the server is ready, then run one inference through the Python client.

    Without --url it waits for the rollout, port-forwards svc/maddpg-citylearn-service to a free local port for the
    duration of the test, and stops the forward afterwards.
    """
    if url:
        _smoke_test(url, protocol, model_name, timeout)
        return
    kubectl = target.kubectl
    kubectl.ensure_cluster()
    rollout = kubectl.try_run(k8s.rollout_args(timeout))
    if rollout.returncode != 0:
        raise DeployError(f"deployment/{k8s.DEPLOYMENT} in {target.where} is not ready: "
                          f"{k8s.last_line(rollout.stderr) or 'rollout not finished'}{_pod_problems(kubectl)}")
    service_port = 80 if protocol == "http" else 8001
    with PortForward(kubectl, service_port) as local_port:
        _smoke_test(f"127.0.0.1:{local_port}", protocol, model_name, timeout)


@deploy.command("render")
@click.option("--overlay", type=click.Choice(list(k8s.OVERLAYS)), default="base", show_default=True,
              help=OVERLAY_HELP)
@click.option("--output", "-o", metavar="PATH", default=None,
              help="Where to write. Default: k8s/maddpg-citylearn.yaml for base, stdout for the others; - is stdout.")
@click.option("--check", is_flag=True, help="Write nothing; fail if the output file differs from a fresh render.")
@click.option("--k8s-dir", metavar="DIR", default=None, type=click.Path(file_okay=False),
              help="The repository's k8s/ folder. Default: ./k8s, else the source checkout's.")
def render(overlay: str, output: str | None, check: bool, k8s_dir: str | None) -> None:
    """Render an overlay offline (kubectl kustomize). For base, (re)write the install bundle k8s/maddpg-citylearn.yaml
    that `kubectl apply -f k8s/` applies on a cluster without CRDs."""
    root = k8s.find_k8s_dir(k8s_dir)
    kubectl = k8s.Kubectl()
    if overlay == "base":
        text = k8s.bundle_text(kubectl, root)
        output = output or str(root / k8s.BUNDLE_NAME)
    else:
        text = kubectl.kustomize(k8s.overlay_dir(root, overlay))
        output = output or "-"
    if output == "-":
        if check:
            raise click.UsageError("--check compares with a file: give --output PATH")
        click.echo(text, nl=False)
        return
    path = Path(output)
    if check:
        if not path.is_file() or path.read_text() != text:
            raise DeployError(f"{path} is not the current render of {overlay}: run `maddpg-citylearn deploy render"
                              f"{'' if overlay == 'base' else ' --overlay ' + overlay + ' --output ' + output}`")
        click.echo(f"{path} is current")
        return
    path.write_text(text)
    click.echo(f"wrote {path} ({text.count(chr(10) + '---') + 1} objects)")


# --- helpers ----------------------------------------------------------------------------------------------------------
def _smoke_test(url: str, protocol: str, model_name: str, timeout: int) -> None:
    import numpy as np

    from maddpg_client.triton_policy import TritonPolicy

    policy = TritonPolicy(url=url, protocol=protocol, model=model_name)
    try:
        policy.wait_until_ready(timeout=timeout)
        layout = policy.layout
        observations = np.zeros(layout.observation_shape, np.float32)
        started = time.perf_counter()
        actions = policy.act(observations)
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        policy.close()
    if actions.shape != layout.action_shape or not np.isfinite(actions).all():
        raise DeployError(f"{model_name} at {url} answered actions of shape {actions.shape} (expected "
                          f"{layout.action_shape}, all finite): the served model is broken")
    low, high = layout.action_bounds()
    if ((actions < low) | (actions > high)).any():
        raise DeployError(f"{model_name} at {url} answered actions outside their bounds: the served model is broken")
    click.echo(f"ready: {protocol}://{url} serves {model_name} ({layout.n_agents} agents); one inference of "
               f"{list(layout.observation_shape)} zeros -> actions {list(actions.shape)} in {elapsed_ms:.1f} ms, "
               f"finite and within bounds")


class PortForward:
    """``kubectl port-forward svc/maddpg-citylearn-service LOCAL:PORT`` for the duration of a ``with`` block."""

    def __init__(self, kubectl: k8s.Kubectl, service_port: int, start_timeout: float = 20.0):
        self.kubectl, self.service_port, self.start_timeout = kubectl, service_port, start_timeout
        self.process = None
        self._stderr = tempfile.TemporaryFile(mode="w+")

    def __enter__(self) -> int:
        from maddpg_serving.processes import reserve_ports

        [local_port] = reserve_ports(1)
        self.process = self.kubectl.popen(
            k8s.port_forward_args("127.0.0.1", [f"{local_port}:{self.service_port}"]), stderr=self._stderr)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._stderr.seek(0)
                reason = k8s.last_line(self._stderr.read())
                self.__exit__()
                raise DeployError(f"kubectl port-forward to svc/{k8s.SERVICE} failed: {reason or 'it exited'}")
            try:
                with socket.create_connection(("127.0.0.1", local_port), timeout=0.5):
                    return local_port
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise DeployError(f"kubectl port-forward to svc/{k8s.SERVICE} did not listen within {self.start_timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            from maddpg_serving.processes import stop_group

            stop_group(self.process, timeout=5.0, name="kubectl port-forward")
            self.process = None
        self._stderr.close()


def _pod_problems(kubectl: k8s.Kubectl) -> str:
    """Why pods are not ready, in words ('' when nothing specific is known): the first thing a user needs to see."""
    problems = k8s.pod_problems(kubectl)
    if not problems:
        return ""
    text = "; ".join(problems)
    if any("ImagePull" in p or "ErrImageNeverPull" in p for p in problems):
        text += (" (build and publish the model image: docs/kubernetes.md, \"Build the model image\"; on Docker "
                 "Desktop `docker build -t maddpg-citylearn-model:0.1.0 -f k8s/model-image/Dockerfile "
                 "model_repository`)")
    return f": {text}"
