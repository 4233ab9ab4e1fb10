"""checkpoint -> ONNX -> validation -> new model version. Nothing is written unless every check passed."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from maddpg_core.errors import RepositoryError
from maddpg_core.layout import DEFAULT_MODEL_NAME
from maddpg_evaluation.citylearn_env import EnvSpec

from .onnx_graph import export_onnx
from .repository import ModelRepository
from .sources import PolicySource, load_policy_source
from .triton_config import ServingSettings, render_configs
from .validation import ValidationReport, validate_export

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    model_dir: Path
    version: int
    onnx_path: Path
    input_shape: tuple
    output_shape: tuple
    node_count: int
    size_bytes: int
    max_abs_diff: float
    seconds: float
    source_kind: str
    validation: ValidationReport

    def summary_lines(self) -> list[str]:
        return [
            f"exported {self.source_kind} policy -> {self.onnx_path}",
            f"  version        {self.version} (model directory {self.model_dir})",
            f"  observations   FP32 {list(self.input_shape)}   actions FP32 {list(self.output_shape)}",
            f"  graph          {self.node_count} nodes, {self.size_bytes / 1024:.1f} KiB, dynamic batch axis",
            f"  parity         max |onnxruntime - torch| = {self.max_abs_diff:.2e} over {len(self.validation.cases)} cases",
            f"  time           {self.seconds:.1f} s",
        ]


def export_checkpoint(
    checkpoint: str | os.PathLike,
    repository: str | os.PathLike,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    version: int | None = None,
    force: bool = False,
    settings: ServingSettings = ServingSettings(),
    env_spec: EnvSpec | None = None,
) -> ExportResult:
    started = time.perf_counter()
    repo = ModelRepository(repository)
    repo.check_writable(model_name)  # fail before the slow part
    log.info("loading %s", checkpoint)
    source = load_policy_source(checkpoint, env_spec=env_spec)
    _check_repository_fits(repo, model_name, source)
    repo.check_free(model_name, version, force)

    log.info("tracing the policy into ONNX")
    onnx_model = export_onnx(source.policy, source.layout)
    log.info("validating: onnx.checker, onnxruntime vs torch on %s, random and extreme observations",
             source.reference_description)
    report = validate_export(onnx_model, source.policy, source.layout, source.reference_observations)

    onnx_bytes = onnx_model.SerializeToString()
    files = {
        "model.onnx": onnx_bytes,
        "model.py": resources.files("maddpg_export.python_backend").joinpath("model.py").read_bytes(),
        "layout.json": source.layout.to_json().encode(),  # this version's own layout, for rollback forensics
    }
    configs = render_configs(source.layout, model_name, settings)
    written = repo.write_version(model_name, files, configs, version=version, force=force)
    return ExportResult(
        model_dir=written.model_dir,
        version=written.version,
        onnx_path=written.model_dir / str(written.version) / "model.onnx",
        input_shape=("batch", *source.layout.observation_shape),
        output_shape=("batch", *source.layout.action_shape),
        node_count=report.node_count,
        size_bytes=len(onnx_bytes),
        max_abs_diff=report.max_abs_diff,
        seconds=time.perf_counter() - started,
        source_kind=source.kind,
        validation=report,
    )


def _check_repository_fits(repo: ModelRepository, model_name: str, source: PolicySource) -> None:
    """All versions of one model share one config: a checkpoint with another layout needs another model name."""
    served = repo.served_layout(model_name)
    if served is None:
        return
    if (served.observation_shape, served.action_shape) != (source.layout.observation_shape, source.layout.action_shape):
        raise RepositoryError(
            f"model {model_name} in {repo.root} takes {list(served.observation_shape)} -> {list(served.action_shape)}, "
            f"this checkpoint {list(source.layout.observation_shape)} -> {list(source.layout.action_shape)}: "
            f"export it under another --model NAME"
        )
    if served.building_names != source.layout.building_names:
        raise RepositoryError(
            f"model {model_name} in {repo.root} controls buildings {_short(served.building_names)}, this checkpoint "
            f"{_short(source.layout.building_names)}: export it under another --model NAME"
        )


def _short(names) -> str:
    names = list(names)
    return f"[{', '.join(map(str, names[:3]))}{', ...' if len(names) > 3 else ''}]"

