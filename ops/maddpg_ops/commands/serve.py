"""``maddpg-citylearn serve``: the model repository behind a real tritonserver on this machine (no Docker, no cluster)."""

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
              help="Model instances (parallel executions). Default: as in configs/local.pbtxt.")
@click.option("--config-name", default="local", show_default=True,
              help="Config variant (configs/<name>.pbtxt). The bundled server only has the python backend: `local`.")
@click.option("--ready-timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for /v2/health/ready before giving up.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Write the server's own log here (default: a temp file, shown on failure).")
def serve(repository, host, http_port, grpc_port, metrics_port, instances, config_name, ready_timeout, log_file):
    """Serve REPOSITORY with the tritonserver bundled in nvidia-pytriton until Ctrl-C.

    \b
    Starts the real Triton server (python backend running each version's model.onnx with onnxruntime), waits until
    it is ready, prints the HTTP, gRPC and metrics endpoints, and stops cleanly on Ctrl-C or SIGTERM. A busy port or
    a broken repository ends with one error line and a non-zero exit.

    \b
    Try it:
      curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{http_code}\\n'
      maddpg-citylearn evaluate --url localhost:8000 --start 0 --end 167
    """
    from pathlib import Path

    from maddpg_serving.local_triton import LocalTritonServer, TritonPorts

    server = LocalTritonServer(
        Path(repository), ports=TritonPorts(http_port, grpc_port, metrics_port), host=host, config_name=config_name,
        instances=instances, stdout_path=Path(log_file) if log_file else None,
    )
    stop = threading.Event()

    def request_stop(signum, _frame):
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"starting tritonserver on {repository} (config variant `{config_name}`) ...", err=True)
        server.start(timeout=ready_timeout)
        click.echo(f"ready: HTTP http://{server.http_url}   gRPC {server.grpc_url}   metrics {server.metrics_url}")
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
