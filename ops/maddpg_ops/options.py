"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

from maddpg_evaluation.citylearn_env import DEFAULT_DATASET, EnvSpec


def env_options(*, window: bool = True):
    """``--schema PATH | --dataset NAME`` (and ``--start/--end``): which CityLearn env to build."""

    def decorate(command):
        if window:
            command = click.option("--end", type=click.IntRange(min=0), default=None,
                                   help="Last time step of the window (inclusive). Default: end of the dataset.")(command)
            command = click.option("--start", type=click.IntRange(min=0), default=None,
                                   help="First time step of the window. Default: 0.")(command)
        command = click.option("--dataset", metavar="NAME", default=None,
                               help=f"CityLearn dataset name (default {DEFAULT_DATASET}), looked up under "
                                    f"$CITYLEARN_LOCAL_DATASETS_PATH, else ../shared/citylearn/datasets beside the "
                                    f"working directory or the checkout; else CityLearn downloads it.")(command)
        command = click.option("--schema", metavar="PATH", default=None, type=click.Path(dir_okay=True),
                               help="Path of a CityLearn schema.json (or its folder). Wins over --dataset.")(command)
        return command

    return decorate


def env_spec_from(schema, dataset, start=None, end=None, seed=None) -> EnvSpec:
    return EnvSpec.from_options(schema, dataset, start, end, seed)


repository_option = click.option(
    "--repository", "-r", metavar="DIR", default="model_repository", show_default=True,
    type=click.Path(file_okay=False), help="Triton model repository (one folder per model).")
model_option = click.option(
    "--model", "-m", "model_name", metavar="NAME", default="maddpg_ctde", show_default=True,
    help="Model name inside the repository (and on the server).")
