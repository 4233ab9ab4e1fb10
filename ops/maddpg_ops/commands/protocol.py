"""``maddpg-citylearn protocol``: train each recipe on the months around a held-out fold, score it on that fold."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("protocol")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default="configs/protocol.toml",
              show_default=True, help="The protocol: folds, arms (recipes), seeds, comparisons (TOML).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/protocol", show_default=True,
              help="Where runs and OUT/protocol.json (the file's `summary`) go. Finished runs there are not trained again.")
@click.option("--fold", "folds", multiple=True, help="Only this fold (repeatable; default: all).")
@click.option("--arm", "arms", multiple=True, help="Only this arm (repeatable; default: all).")
@click.option("--seed", "seeds", type=int, multiple=True, help="Only this training seed (repeatable; default: all).")
@click.option("--summarise-only", is_flag=True, help="Train nothing: re-read the finished runs and summarise.")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False), default=None,
              help="Also write the summary's tables (the model card's) to this file.")
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
def protocol(config_file, out_dir, folds, arms, seeds, summarise_only, markdown_file, progress):
    """Held-out months, several seeds, the noise floor: the evaluation a reviewer accepts.

    \b
    For every fold (test months, training months around them with a week's gap), arm (a recipe: training settings
    over the shipped defaults) and seed, `train` runs on the training months and its final policy is scored,
    deterministically, on the test months: on the env as published and on more env seeds (the same weights
    rescored), beside charge on arrival and the teacher's own actions on the same months. Arms are compared seed
    by seed: one is better where it wins on at least 2 of 3 seeds by more than the noise floor, the largest spread
    over env seeds of the difference between two runs of one seed (both arms meet the same cars; the single
    score's floor, larger, is reported beside it with its verdicts).
    An arm with `start_from = "ARM"` resumes that arm's run of the same seed (e.g. fine-tuning its clone).

    \b
    A full-year planner pass in the cache (a `train` run over the whole year writes it) labels every fold.
    Continue an interrupted protocol by running the same command; split it across processes with --arm/--fold.
    Add a seed to `env_seed_runs` and run again: its finished runs are rescored, not trained again (runs not
    finished yet are trained as usual: pass --arm/--seed to rescore only).

    \b
    Example:
      maddpg-citylearn protocol --arm local --arm district --markdown docs/model-card/protocol.md
    """
    from maddpg_training.protocol import Protocol, markdown, run_protocol, summarise

    plan = Protocol.load(config_file)
    out = Path(out_dir)
    if summarise_only:
        summary = summarise(plan, out)
    else:
        summary = run_protocol(plan, out, folds=list(folds) or None, arms=list(arms) or None,
                               seeds=list(seeds) or None, progress=progress)
    text = markdown(summary)
    click.echo(text)
    if markdown_file:
        Path(markdown_file).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_file).write_text(text + "\n")
    click.echo(f"summary: {out / plan.summary}")
