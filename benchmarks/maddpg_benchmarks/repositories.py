"""Model repositories for benchmarks: a freshly initialised policy on the real env layout, and views of a repository
that differ only in their serving settings or in the graph they serve.

Speed does not depend on whether the weights are trained, so benchmarks never need the committed model: they export
an untrained policy of the trained architecture (17 x 52 -> 17 x 3, hidden 256) through the project's own pipeline.
Views symlink the version directories and write configs through :func:`maddpg_export.triton_config.render_configs`,
the one writer of configs; the source repository is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from maddpg_core.errors import RepositoryError
from maddpg_core.layout import DEFAULT_MODEL_NAME, PolicyLayout

Say = Callable[[str], None]
# The trained architecture (configs/ and docs/model-card.md): what the served model really computes.
TRAINED_HIDDEN = (256, 256)
# A week is enough to derive the env layout and observation statistics; the layout is the full dataset's.
LAYOUT_WINDOW = (0, 167)


@dataclass(frozen=True)
class BenchmarkRepository:
    repository: Path
    layout: PolicyLayout
    model: str = DEFAULT_MODEL_NAME
    checkpoint: Path | None = None  # the policy behind it, when the benchmark built it (graph-form comparison)

    @property
    def onnx_path(self) -> Path:
        from maddpg_client.local_policy import resolve_model_file

        return resolve_model_file(self.repository, self.model)


def build_repository(workdir: Path, *, hidden: tuple[int, ...] = TRAINED_HIDDEN, seed: int = 0,
                     say: Say = lambda _: None) -> BenchmarkRepository:
    """Export an untrained policy on the real env layout into ``workdir/model_repository`` (needs CityLearn data)."""
    from maddpg_evaluation.citylearn_env import DEFAULT_DATASET, EnvSpec
    from maddpg_export.pipeline import export_checkpoint
    from maddpg_training.bootstrap import initial_checkpoint
    from maddpg_training.checkpoint import save_checkpoint
    from maddpg_training.networks import ActorSpec

    say(f"building a fresh policy on the {DEFAULT_DATASET} layout (hidden {list(hidden)})")
    checkpoint = initial_checkpoint(EnvSpec(DEFAULT_DATASET, *LAYOUT_WINDOW), ActorSpec(tuple(hidden)), seed=seed)
    path = save_checkpoint(workdir / "policy.pt", checkpoint)
    say("exporting it (ONNX, validated) into a temporary model repository")
    result = export_checkpoint(path, workdir / "model_repository")
    return BenchmarkRepository(result.model_dir.parent, checkpoint.layout, result.model_dir.name, path)


def open_repository(repository: Path, model: str = DEFAULT_MODEL_NAME) -> BenchmarkRepository:
    """A user's repository (``bench --repository``); its layout comes from the model config."""
    from maddpg_export.repository import ModelRepository

    repo = ModelRepository(repository)
    layout = repo.served_layout(model)
    if layout is None or not repo.versions(model):
        raise RepositoryError(f"{repository} holds no exported model {model!r}: pass a repository written by "
                              f"`maddpg-citylearn export`, or leave out --repository to benchmark a fresh policy")
    return BenchmarkRepository(Path(repository), layout, model)


def settings_view(source: BenchmarkRepository, settings, workdir: Path, *, onnx_file: Path | None = None) -> Path:
    """A repository under ``workdir`` serving ``source``'s newest version with ``settings`` (a ``ServingSettings``).

    With ``onnx_file`` that version serves another graph of the same interface (the per-agent form).
    """
    from maddpg_export.triton_config import render_configs

    view = Path(workdir)
    model_dir = view / source.model
    model_dir.mkdir(parents=True)
    newest = source.onnx_path.parent
    target = model_dir / newest.name
    if onnx_file is None:
        target.symlink_to(newest.resolve())
    else:
        target.mkdir()
        for entry in newest.iterdir():
            if entry.name != "model.onnx":
                (target / entry.name).symlink_to(entry.resolve())
        (target / "model.onnx").symlink_to(Path(onnx_file).resolve())
    for relative, text in render_configs(source.layout, source.model, settings).items():
        path = model_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return view


# The ServingSettings field that sizes the instance group each backend's variant runs.
INSTANCES_KNOB = {"onnxruntime": "cpu_instances", "python": "local_instances"}


def describe_settings(settings, backend: str) -> str:
    """``onnxruntime backend, 2 instance(s), max_queue_delay 0 us, ORT intra-op threads 1, no queue policy``."""
    policy = ("no queue policy" if not (settings.queue_timeout_us or settings.max_queue_size) else
              f"queue policy (timeout {settings.queue_timeout_us / 1000:g} ms, at most {settings.max_queue_size})")
    return (f"{backend} backend, {getattr(settings, INSTANCES_KNOB[backend])} instance(s), max_queue_delay "
            f"{settings.max_queue_delay_us} us, ORT intra-op threads {settings.onnx_intra_op_threads}, {policy}")
