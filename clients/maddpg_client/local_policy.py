"""The exported ``model.onnx`` run in process with onnxruntime: the served policy without a server.

Same vocabulary as :class:`~maddpg_client.triton_policy.TritonPolicy` (``layout``, ``act``, ``wait_until_ready``),
so a simulator can switch between the two with one argument. The layout is read from the ONNX metadata that
``maddpg-citylearn export`` writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from maddpg_core.errors import LayoutMismatchError, ModelNotFoundError, PolicyError
from maddpg_core.layout import DEFAULT_MODEL_NAME, INPUT_NAME, LAYOUT_PARAMETER, OUTPUT_NAME, PolicyLayout

from .observations import as_batch


def resolve_model_file(path: str | os.PathLike, model: str = DEFAULT_MODEL_NAME, version: int | None = None) -> Path:
    """A model.onnx path, a version directory, a model directory (newest version) or a repository (+ model name)."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / model, path] if path.is_dir() else []
    for directory in candidates:
        versions = sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
        if version is not None:
            versions = [v for v in versions if v == version]
        for number in versions:
            onnx_file = directory / str(number) / "model.onnx"
            if onnx_file.is_file():
                return onnx_file
        if (directory / "model.onnx").is_file():
            return directory / "model.onnx"
    wanted = f"version {version} of " if version is not None else ""
    raise ModelNotFoundError(
        f"no model.onnx for {wanted}{model!r} under {path}: pass a repository (e.g. model_repository), a model "
        f"directory, a version directory or the model.onnx file itself"
    )


class LocalPolicy:
    def __init__(self, path: str | os.PathLike, model: str = DEFAULT_MODEL_NAME, version: int | None = None, *,
                 threads: int = 1, allow_non_finite: bool = False):
        import onnxruntime as ort

        self.path = resolve_model_file(path, model, version)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises InvalidProtobuf, Fail, InvalidGraph, ...
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
            raise PolicyError(f"{self.path} is not a model onnxruntime can load ({type(exc).__name__}: {reason}): "
                              f"restore the file or export the model again (`maddpg-citylearn export`)") from exc
        metadata = self.session.get_modelmeta().custom_metadata_map
        if LAYOUT_PARAMETER not in metadata:
            raise LayoutMismatchError(f"{self.path} carries no maddpg-citylearn layout in its metadata: re-export it "
                                      f"with `maddpg-citylearn export`")
        self.layout = PolicyLayout.from_json(metadata[LAYOUT_PARAMETER])
        self.allow_non_finite = allow_non_finite

    def wait_until_ready(self, timeout: float = 0.0) -> "LocalPolicy":
        return self  # loaded in the constructor

    def act(self, observations, *, allow_non_finite: bool | None = None) -> np.ndarray:
        """As :meth:`TritonPolicy.act <maddpg_client.triton_policy.TritonPolicy.act>`, in process."""
        allow = self.allow_non_finite if allow_non_finite is None else allow_non_finite
        batch, single = as_batch(observations, self.layout, allow_non_finite=allow)
        actions = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        return actions[0] if single else actions

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "LocalPolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
