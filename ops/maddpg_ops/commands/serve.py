"""``maddpg-citylearn serve``: the model repository behind a real tritonserver on this machine (no Docker, no cluster).

How the local server is started, its two backends, logs, ports and shared memory: docs/operations.md."""

from __future__ import annotations

import signal
import threading

import click

from ..options import repository_option


@click.command("serve")
@repository_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--instances", type=click.IntRange(1, 64), default=None,
              help="Model instances (parallel executions). Default: as in the served config variant "
                   "(configs/cpu.pbtxt on the onnxruntime backend, configs/local.pbtxt on the python backend).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "python"]), default="auto", show_default=True,
              help="Triton's onnxruntime backend (built by `make setup`; serves configs/cpu.pbtxt, as Kubernetes "
                   "does) or the python backend (configs/local.pbtxt). auto: onnxruntime when it is built.")
@click.option("--config-name", default=None,
              help="Config variant configs/<name>.pbtxt (`default`: config.pbtxt). [default: cpu for onnxruntime, "
                   "local for python]")
@click.option("--ready-timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for /v2/health/ready before giving up.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Write the server's own log here (default: a temp file, shown on failure).")
def serve(repository, host, http_port, grpc_port, metrics_port, instances, backend, config_name, ready_timeout,
          log_file):
    """Serve REPOSITORY with the tritonserver bundled in nvidia-pytriton until Ctrl-C.

    \b
    Starts the real Triton server on Triton's onnxruntime backend (configs/cpu.pbtxt, what Kubernetes' CPU nodes
    serve) when `make setup` has built it, else on the python backend (configs/local.pbtxt: model.py runs the same
    model.onnx with onnxruntime), says which, waits until it is ready, prints the HTTP, gRPC and metrics endpoints,
    and stops cleanly on Ctrl-C or SIGTERM. A busy port, a broken repository or a variant that cannot load here (a
    KIND_GPU config on a host without a GPU) ends with one error line and a non-zero exit.

    \b
    Try it:
      curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{http_code}\\n'
      maddpg-citylearn evaluate --url localhost:8000 --start 0 --end 167
    """
    from pathlib import Path

    from maddpg_serving.local_triton import LocalTritonServer, TritonPorts

    server = LocalTritonServer(
        Path(repository), ports=TritonPorts(http_port, grpc_port, metrics_port), host=host, backend=backend,
        config_name=config_name, instances=instances, stdout_path=Path(log_file) if log_file else None,
    )
    stop = threading.Event()

    def request_stop(signum, _frame):
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        running, variant = server.resolve()
        click.echo(f"starting tritonserver on {repository}: {running} backend, config variant `{variant}` ...",
                   err=True)
        server.start(timeout=ready_timeout)
        click.echo(f"ready: HTTP http://{server.http_url}   gRPC {server.grpc_url}   metrics {server.metrics_url}   "
                   f"({server.describe()})")
        click.echo(f"server log: {server.log_path}", err=True)
        click.echo("press Ctrl-C to stop", err=True)
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                status = server.process.returncode if server.process else "?"
                raise click.ClickException(
                    f"tritonserver exited unexpectedly (status {status}):\n{server.log_summary()}")
        click.echo("stopping tritonserver ...", err=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("stopped", err=True)
