"""``maddpg-citylearn plot-training RUN``: a picture of what a training run wrote to its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("plot-training")
@click.argument("run", type=click.Path(exists=True))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Where the PNG goes. Default: RUN/training.png.")
def plot_training(run, out_file):
    """Draw RUN/metrics.jsonl (RUN: a train --out folder, or the file): critic loss and TD error, Q against its
    target, the actor's loss terms, and the deterministic evaluations per episode."""
    from maddpg_core.errors import MaddpgCitylearnError
    from maddpg_training.trace import TRACE_FILE, plot_trace, read_trace

    run = Path(run)
    source = run / TRACE_FILE if run.is_dir() else run
    if not source.is_file():
        raise MaddpgCitylearnError(f"{source} does not exist: pass a folder written by `maddpg-citylearn train`")
    records = read_trace(source)
    if not records:
        raise MaddpgCitylearnError(f"{source} holds no records yet")
    path = plot_trace(records, Path(out_file) if out_file else source.parent / "training.png", title=str(source.parent))
    click.echo(f"{len(records)} records -> {path}")
