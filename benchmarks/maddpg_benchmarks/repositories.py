"""What the benchmarks serve: a freshly initialised policy on the real env layout (speed does not depend on the
weights, so the committed model is never needed), or a user's repository; views of it that differ only in their
serving settings (configs written by :func:`maddpg_export.triton_config.render_configs`, the one writer of configs;
the source is never modified); and the figures of the served graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from maddpg_core.errors import RepositoryError
from maddpg_core.layout import DEFAULT_MODEL_NAME, PolicyLayout

# The ServingSettings field that sizes the instance group each backend's variant runs.
INSTANCES_KNOB = {"onnxruntime": "cpu_instances", "python": "local_instances"}


@dataclass(frozen=True)
class BenchmarkRepository:
    repository: Path
    layout: PolicyLayout
    model: str = DEFAULT_MODEL_NAME
    checkpoint: Path | None = None  # the policy behind it, when the benchmark built it

    @property
    def onnx_path(self) -> Path:
        from maddpg_client.local_policy import resolve_model_file

        return resolve_model_file(self.repository, self.model)


def build_repository(workdir: Path, say: Callable[[str], None] = lambda _: None) -> BenchmarkRepository:
    """Export an untrained policy of the trained architecture (hidden 256-256) on the real env layout into
    ``workdir/model_repository`` (needs CityLearn data; a week is enough for the layout and observation statistics)."""
    from maddpg_evaluation.citylearn_env import DEFAULT_DATASET, EnvSpec
    from maddpg_export.pipeline import export_checkpoint
    from maddpg_training.bootstrap import initial_checkpoint
    from maddpg_training.checkpoint import save_checkpoint
    from maddpg_training.networks import ActorSpec

    say(f"building a fresh policy on the {DEFAULT_DATASET} layout (hidden [256, 256])")
    checkpoint = initial_checkpoint(EnvSpec(DEFAULT_DATASET, 0, 167), ActorSpec((256, 256)), seed=0)
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


def settings_view(source: BenchmarkRepository, settings, workdir: Path) -> Path:
    """A repository under ``workdir`` serving ``source``'s newest version with ``settings`` (a ``ServingSettings``)."""
    from maddpg_export.triton_config import render_configs

    model_dir = Path(workdir) / source.model
    model_dir.mkdir(parents=True)
    (model_dir / source.onnx_path.parent.name).symlink_to(source.onnx_path.parent.resolve())
    for relative, text in render_configs(source.layout, source.model, settings).items():
        (model_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / relative).write_text(text)
    return Path(workdir)


def describe_settings(settings, backend: str) -> str:
    """``onnxruntime backend, 2 instance(s), max_queue_delay 0 us, ORT intra-op threads 1, no queue policy``."""
    policy = ("no queue policy" if not (settings.queue_timeout_us or settings.max_queue_size) else
              f"queue policy (timeout {settings.queue_timeout_us / 1000:g} ms, at most {settings.max_queue_size})")
    return (f"{backend} backend, {getattr(settings, INSTANCES_KNOB[backend])} instance(s), max_queue_delay "
            f"{settings.max_queue_delay_us} us, ORT intra-op threads {settings.onnx_intra_op_threads}, {policy}")


def model_figures(source: BenchmarkRepository, repository: str) -> dict:
    """The served graph's figures for the report: each layer's (inputs, outputs) read from the stacked graph's MatMul
    weights (``[agents, in, out]``), hidden sizes, FLOPs per agent decision (two per multiply-add), node count."""
    import onnx

    graph = onnx.load(str(source.onnx_path), load_external_data=False).graph
    weights = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    widths = []
    for node in graph.node:
        dims = [weights[name] for name in node.input if len(weights.get(name, ())) >= 2]
        if node.op_type == "MatMul" and dims:
            widths.append((dims[0][-2], dims[0][-1]))
    layout = source.layout
    return {"layout": f"{layout.n_agents} x {layout.obs_width} -> {layout.n_agents} x {layout.action_width}",
            "agents": layout.n_agents, "repository": repository, "graph_nodes": len(graph.node), "layer_widths": widths,
            "hidden": [outputs for _, outputs in widths[:-1]],
            "flops_per_decision": sum(2 * inputs * outputs for inputs, outputs in widths)}
