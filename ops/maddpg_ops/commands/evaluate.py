"""``maddpg-citylearn evaluate``: run a served or local policy through CityLearn, with KPIs, parity and a picture."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import click

from ..options import env_options, env_spec_from, model_option


@click.command("evaluate")
@click.option("--url", default=None, metavar="HOST:PORT", help="A running Triton server (HTTP :8000 or gRPC :8001).")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("--local", "local_repository", type=click.Path(exists=True), default=None, metavar="REPO",
              help="No server: run model.onnx from this repository (or model dir / file) in process.")
@click.option("--serve", "serve_repository", type=click.Path(exists=True, file_okay=False), default=None,
              metavar="REPO", help="Start the local tritonserver on REPO for this run (free ports), evaluate through "
                                   "it, stop it afterwards.")
@model_option
@env_options()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/evaluate", show_default=True,
              help="Where report.json and report.png go.")
@click.option("--reference-onnx", type=click.Path(exists=True), default=None, metavar="REPO",
              help="Step this model.onnx (in process) in lockstep and record the action difference (parity).")
@click.option("--reference-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None, metavar="CKPT",
              help="Step the checkpoint's torch actors in lockstep instead (needs torch).")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also run zero actions, BasicBatteryRBC and charge on arrival on the same window.")
@click.option("--envs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Simulators running at once against the server (one process each): exercises dynamic batching.")
@click.option("--metrics-url", default=None, metavar="URL",
              help="Triton metrics endpoint for batch statistics. Default: found from --url (the port two above the "
                   "HTTP port, one above the gRPC port, then 8002), used only if it counts this server's requests.")
@click.option("--ready-timeout", type=click.FloatRange(min=0), default=5.0, show_default=True, metavar="SECONDS",
              help="How long --url may take to be ready (a server still starting). Nothing listening is reported "
                   "after it; the wrong protocol or an unknown --model at once.")
@click.option("--retry-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="How long a step waits for a server that went away or is overloaded (retried with backoff) "
                   "before the run ends without a report.")
@click.option("--progress/--no-progress", default=True)
def evaluate(url, protocol, local_repository, serve_repository, model_name, schema, dataset, start, end, out_dir,
             reference_onnx, reference_checkpoint, baselines, envs, metrics_url, ready_timeout, retry_seconds, progress):
    """Validate a policy in the CityLearn env and report its KPIs.

    \b
    Pick the policy with exactly one of --url (a running Triton), --local (model.onnx in process) or --serve
    (starts the local tritonserver for the run). It is stepped deterministically through the window; the report has
    the model's name, version, config variant, backend and model.onnx digest, the district KPIs of env.evaluate()
    (ratios to no control), EV and appliance service levels, the same figures for zero actions, BasicBatteryRBC and
    charge on arrival, parity against a reference, ms per step, and a plot.

    \b
    A server that restarts during the run is waited for (--retry-seconds) and the run goes on where it was; one that
    stays away ends the run with one error line and no report.

    \b
    Examples:
      maddpg-citylearn evaluate --serve model_repository --start 0 --end 167
      maddpg-citylearn evaluate --url localhost:8001 --protocol grpc --reference-onnx model_repository
      maddpg-citylearn evaluate --url localhost:8000 --envs 4 --no-baselines
    """
    from maddpg_client.triton_policy import RetryPolicy
    from maddpg_core.errors import PolicyError
    from maddpg_evaluation.evaluation import evaluate_policy, local_factory, triton_factory
    from maddpg_evaluation.report import format_table, write_evaluation_report

    chosen = [o for o in (url, local_repository, serve_repository) if o]
    if len(chosen) != 1:
        raise click.UsageError("pick the policy with exactly one of --url, --local or --serve")
    if reference_onnx and reference_checkpoint:
        raise click.UsageError("pass at most one of --reference-onnx and --reference-checkpoint")
    spec = env_spec_from(schema, dataset, start, end)
    spec.check_window()  # before starting any server

    from maddpg_evaluation.evaluation import PARITY_TOLERANCE, TORCH_PARITY_TOLERANCE

    reference, reference_name, tolerance = None, None, PARITY_TOLERANCE
    if reference_checkpoint:
        from maddpg_training.torch_policy import TorchPolicy

        reference, reference_name = partial(TorchPolicy.from_checkpoint, reference_checkpoint), f"torch {reference_checkpoint}"
        tolerance = TORCH_PARITY_TOLERANCE
    elif reference_onnx or serve_repository:
        path = reference_onnx or serve_repository
        reference, reference_name = local_factory(path, model_name), f"onnxruntime {path}"

    metrics_optional = metrics_url is None  # a found endpoint may not exist; an explicit one must
    config_variant, model_files = None, reference_onnx
    with contextlib.ExitStack() as stack:
        if serve_repository:
            from maddpg_serving.local_triton import LocalTritonServer, free_ports

            server = LocalTritonServer(Path(serve_repository), ports=free_ports())
            running, config_variant = server.resolve()
            click.echo(f"starting the local tritonserver on {serve_repository} ({running} backend, config variant "
                       f"`{config_variant}`) ...", err=True)
            stack.enter_context(server)
            url = server.http_url if protocol == "http" else server.grpc_url
            metrics_url, model_files = metrics_url or server.metrics_url, serve_repository
        if url:
            policy = triton_factory(url, protocol, model_name, RetryPolicy.for_seconds(retry_seconds),
                                    ready_timeout=ready_timeout)
            name = f"served by Triton over {protocol}"
        else:
            policy, name, model_files = local_factory(local_repository, model_name), "onnxruntime in process", None
        try:
            report = evaluate_policy(policy, spec, policy_name=name, reference=reference, reference_name=reference_name,
                                     parity_tolerance=tolerance, baselines=baselines, envs=envs,
                                     metrics_url=metrics_url, metrics_optional=metrics_optional, model=model_name,
                                     progress=progress, config_variant=config_variant, model_files=model_files)
        except PolicyError as exc:  # nothing is written: a report must never look complete when the run was not
            raise click.ClickException(f"{exc}; no report was written to {out_dir}") from exc
    paths = write_evaluation_report(report, out_dir)
    click.echo(format_table(report))
    click.echo(f"\nreport: {paths['json']}\nplot:   {paths['plot']}")
    if report.parity_ok is False:
        raise click.ClickException("the served actions differ from the reference: this is not the same policy")
