"""Torch policy -> one self-contained ONNX graph with a dynamic batch axis."""

from __future__ import annotations

import logging
import warnings

import onnx
import torch

from maddpg_core.errors import ExportError
from maddpg_core.layout import INPUT_NAME, LAYOUT_PARAMETER, OUTPUT_NAME, PolicyLayout

OPSET = 18
BATCH_AXIS = "batch"
# The largest batch torch.export is told about; Triton's max_batch_size is far below it.
MAX_BATCH = 1 << 20


def export_onnx(policy: torch.nn.Module, layout: PolicyLayout) -> onnx.ModelProto:
    """Trace ``policy`` (raw observations -> actions) into an in-memory ONNX model.

    The layout is stored in the model's metadata (key ``layout``) so a ``model.onnx`` found on its own still says what
    its rows and slots mean.
    """
    example = torch.zeros((2, *layout.observation_shape), dtype=torch.float32)
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notes are not for users
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter chatter about decompositions; failures still raise
            program = torch.onnx.export(
                policy.eval(),
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"observations": {0: batch}},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,  # one self-contained file: Triton's model.onnx, nothing beside it
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs one message
        raise ExportError(f"torch.onnx.export failed: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        exporter_log.setLevel(level)
    model = program.model_proto
    model.producer_name = "maddpg-citylearn"
    entry = model.metadata_props.add()
    entry.key, entry.value = LAYOUT_PARAMETER, layout.to_json()
    return model

