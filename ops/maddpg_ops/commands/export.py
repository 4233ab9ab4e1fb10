"""``maddpg-citylearn export``: checkpoint -> validated ONNX graph -> new version in a Triton model repository."""

from __future__ import annotations

import click

from ..options import env_options, env_spec_from, model_option, repository_option


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=True))
@repository_option
@model_option
@click.option("--version", "-v", type=int, default=None,
              help="Version number to write. Default: one above the newest existing version.")
@click.option("--force", is_flag=True, help="Replace the version given by --version if it exists.")
@env_options(window=False)
def export(checkpoint, repository, model_name, version, force, schema, dataset):
    """Export CHECKPOINT (a .pt written by `train`) into the Triton model repository.

    \b
    One ONNX graph, input `observations` FP32 [batch, agents, obs_width] of raw env values, output `actions` FP32
    [batch, agents, action_width]; sanitising, normalisation, clipping to bounds and padding are inside the graph.
    Before anything is written the graph is checked (onnx.checker) and compared with the torch policy on real,
    random and extreme observations (NaN, +-inf, 1e30) at batch 1, 7, 256 and 4096 (max abs diff <= 1e-5).
    The version is written atomically next to the earlier ones, with three configs: config.pbtxt (GPU + CPU,
    onnxruntime), configs/cpu.pbtxt and configs/local.pbtxt (python backend, for `maddpg-citylearn serve`).

    \b
    Example:
      maddpg-citylearn export runs/ctde/final.pt --repository model_repository
    """
    from maddpg_export.pipeline import export_checkpoint

    env_spec = env_spec_from(schema, dataset) if (schema or dataset) else None
    result = export_checkpoint(checkpoint, repository, model_name=model_name, version=version, force=force,
                               env_spec=env_spec)
    for line in result.summary_lines():
        click.echo(line)
