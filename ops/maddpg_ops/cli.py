"""The ``maddpg-citylearn`` command line: one click group whose subcommands load lazily.

Each subcommand lives in ``maddpg_ops.commands.<module>`` and imports its heavy dependencies (torch, onnx, citylearn)
only when it runs, so ``--help`` is instant and a client-only install can still use the client-side commands.
Errors the user can fix (:class:`MaddpgCitylearnError`) become one ``Error: ...`` line and exit status 1.
"""

from __future__ import annotations

import importlib
import logging

import click

from maddpg_core.errors import MaddpgCitylearnError

# name -> (module in maddpg_ops.commands, attribute, one-line help shown by `maddpg-citylearn --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("train", "train", "Train the cooperative MADDPG (CTDE, team reward) on CityLearn."),
    "protocol": ("protocol", "protocol", "Held-out months, several seeds, the noise floor: does a recipe beat another?"),
    "plot-training": ("plot_training", "plot_training", "Draw what a training run wrote to its metrics.jsonl."),
    "export": ("export", "export", "Export a checkpoint to a validated ONNX model version in a Triton repository."),
    "serve": ("serve", "serve", "Serve a model repository with the local tritonserver (no cluster needed)."),
    "evaluate": ("evaluate", "evaluate", "Run a policy (served or local) through CityLearn: KPIs, parity, plots."),
    "plan": ("plan", "plan", "Replay the perfect-foresight LP planner in CityLearn: the best any controller could do."),
    "deploy": ("deploy", "deploy", "Deploy to Kubernetes and operate it (apply, status, logs, test, ...)."),
    "bench": ("bench", "bench", "Benchmark served inference against the alternatives."),
}


class ProgressFormatter(logging.Formatter):
    """``... message`` for progress (INFO), ``Warning: message`` above it; time and logger name only when debugging."""

    def __init__(self, detailed: bool = False):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
        self.detailed = detailed

    def format(self, record: logging.LogRecord) -> str:
        if self.detailed:
            return super().format(record)
        prefix = "... " if record.levelno <= logging.INFO else f"{record.levelname.capitalize()}: "
        return prefix + record.getMessage()


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[name]
        try:
            module = importlib.import_module(f"maddpg_ops.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("maddpg_ops.commands"):
                return None  # command not shipped in this build
            raise click.ClickException(
                f"`{name}` needs the Python package {exc.name!r}, which is not installed: "
                f"pip install 'maddpg-citylearn[all]' (see README)"
            ) from exc
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table above: listing commands must not import torch.
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MaddpgCitylearnError as exc:
            raise click.ClickException(str(exc)) from exc
        except ModuleNotFoundError as exc:
            # The base install is the client; commands that train, export or step the env need an extra.
            name = ctx.invoked_subcommand or "this command"
            raise click.ClickException(
                f"`{name}` needs the Python package {exc.name!r}, which is not installed: "
                f"pip install 'maddpg-citylearn[all]' (see README, Install)"
            ) from exc


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, envvar="MADDPG_CITYLEARN_LOG_LEVEL", help="Verbosity of log messages (stderr).")
@click.version_option(package_name="maddpg-citylearn")
def cli(log_level: str) -> None:
    """Cooperative MADDPG controllers for CityLearn districts, from training to Triton on Kubernetes.

    \b
    Typical flow:
      maddpg-citylearn train  --out runs/ctde            # learn (CTDE, team reward)
      maddpg-citylearn export runs/ctde/final.pt         # -> model_repository/maddpg_ctde/<version>/
      maddpg-citylearn serve                             # local tritonserver on :8000/:8001/:8002
      maddpg-citylearn evaluate --url localhost:8000     # KPIs and parity in the CityLearn env
      maddpg-citylearn deploy apply --overlay gpu        # Kubernetes
    """
    # One channel for progress and warnings: every package logs, the CLI shows it on stderr.
    level = getattr(logging, log_level.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(ProgressFormatter(detailed=log_level == "debug"))
    handler.addFilter(quiet_libraries)
    logging.basicConfig(level=max(level, logging.WARNING), handlers=[handler])
    for package in PACKAGES:
        logging.getLogger(package).setLevel(level)
    # CityLearn and the ONNX exporter log a lot at INFO; keep our own messages readable.
    for noisy in ("citylearn", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))


# This project's import packages: their progress messages are what --log-level controls.
PACKAGES = ("maddpg_core", "maddpg_client", "maddpg_evaluation", "maddpg_training", "maddpg_export",
            "maddpg_serving", "maddpg_benchmarks", "maddpg_ops")


def quiet_libraries(record: logging.LogRecord) -> bool:
    """CityLearn logs its INFO chatter on the root logger, and sets the root's level itself when it loads a dataset:
    below WARNING, only this project's own messages pass (all of them with --log-level debug)."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in PACKAGES or \
        logging.getLogger(PACKAGES[0]).level <= logging.DEBUG


def main() -> None:
    cli(prog_name="maddpg-citylearn")


if __name__ == "__main__":
    main()
