"""An export is not done until it is validated: the ONNX graph must compute what the torch policy computes.

Every check runs; all failures are gathered and raised together (:class:`ExportValidationError`), and the caller writes
nothing. Checks: ``onnx.checker`` (full), the tensor interface (names, dtype, static widths, dynamic batch axis), and
onnxruntime against torch at several batch sizes on the source's reference observations (real env observations for
this project's checkpoints), on random observations and on extreme ones
(NaN, +-inf, +-1e30), where actions must also stay finite, inside each slot's bounds, and exactly 0 in padded slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from maddpg_core.errors import ExportValidationError
from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME, PolicyLayout

BATCH_SIZES = (1, 7, 256, 4096)
TOLERANCE = 1e-5
EXTREME_VALUES = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], dtype=np.float32)


@dataclass
class CaseResult:
    family: str
    batch: int
    max_abs_diff: float


@dataclass
class ValidationReport:
    node_count: int
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.cases), default=float("nan"))


def validation_inputs(reference: np.ndarray, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Three families of ``[batch, agents, obs_width]`` inputs derived from the reference observations."""
    rows = reference[rng.integers(0, len(reference), size=batch)].astype(np.float32)
    low, high = reference.min(axis=0), reference.max(axis=0)
    span = np.maximum(high - low, 1.0)
    random = rng.uniform(low - span, high + span, size=rows.shape).astype(np.float32)
    extreme = rows.copy()
    flat = extreme.reshape(-1)
    count = max(len(EXTREME_VALUES), flat.size // 10)
    positions = rng.choice(flat.size, size=count, replace=False)
    flat[positions] = np.resize(EXTREME_VALUES, count)  # every extreme value appears at least once
    return {"reference": rows, "random": random, "extreme": extreme}


def validate_export(
    model: onnx.ModelProto,
    policy: torch.nn.Module,
    layout: PolicyLayout,
    reference_observations: np.ndarray,
    *,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> ValidationReport:
    failures: list[str] = []
    report = ValidationReport(node_count=len(model.graph.node))

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker raises ValidationError and friends
        failures.append(f"onnx.checker: {str(exc).strip().splitlines()[0]}")
    failures.extend(_interface_failures(model, layout))

    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        failures.append(f"onnxruntime cannot load the graph: {str(exc).strip().splitlines()[0]}")
        raise ExportValidationError(failures) from exc

    low, high = layout.action_bounds()
    padded = ~layout.action_mask()
    rng = np.random.default_rng(seed)
    policy = policy.eval()
    for batch in batch_sizes:
        for family, inputs in validation_inputs(reference_observations, batch, rng).items():
            where = f"{family} observations, batch {batch}"
            try:
                got = session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{where}: onnxruntime failed: {str(exc).strip().splitlines()[0]}")
                continue
            with torch.no_grad():
                expected = policy(torch.from_numpy(inputs)).numpy()
            if got.shape != (batch, *layout.action_shape):
                failures.append(f"{where}: output shape {got.shape}, expected {(batch, *layout.action_shape)}")
                continue
            if not np.isfinite(got).all():
                failures.append(f"{where}: {int((~np.isfinite(got)).sum())} non-finite actions")
                continue
            diff = float(np.abs(got - expected).max())
            report.cases.append(CaseResult(family, batch, diff))
            if not diff <= tolerance:
                failures.append(f"{where}: onnxruntime differs from torch by {diff:.3g} > {tolerance:g}")
            outside = (got < low - 1e-6) | (got > high + 1e-6)
            if outside.any():
                failures.append(f"{where}: {int(outside.sum())} actions outside their slot's bounds")
            if padded.any() and np.abs(got[:, padded]).max() != 0.0:
                failures.append(f"{where}: padded action slots are not 0")
    if failures:
        raise ExportValidationError(failures)
    return report


def _interface_failures(model: onnx.ModelProto, layout: PolicyLayout) -> list[str]:
    failures = []
    expected = {INPUT_NAME: (model.graph.input, layout.observation_shape), OUTPUT_NAME: (model.graph.output, layout.action_shape)}
    for name, (values, shape) in expected.items():
        matches = [v for v in values if v.name == name]
        if len(values) != 1 or not matches:
            failures.append(f"the graph must have exactly one {'input' if values is model.graph.input else 'output'} "
                            f"named {name!r}; it has {[v.name for v in values]}")
            continue
        tensor = matches[0].type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            failures.append(f"{name!r} is {onnx.TensorProto.DataType.Name(tensor.elem_type)}, expected FLOAT")
        dims = tensor.shape.dim
        if len(dims) != 3:
            failures.append(f"{name!r} has rank {len(dims)}, expected 3 ([batch, agents, width])")
            continue
        if dims[0].HasField("dim_value") or not dims[0].dim_param:
            failures.append(f"{name!r} has a fixed batch axis ({dims[0].dim_value}); it must be dynamic")
        static = tuple(d.dim_value for d in dims[1:])
        if static != tuple(shape):
            failures.append(f"{name!r} has dims {list(static)} after the batch axis, expected {list(shape)}")
    return failures
