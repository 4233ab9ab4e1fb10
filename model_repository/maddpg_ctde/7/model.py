"""Triton python-backend model: runs this version's ``model.onnx`` with onnxruntime.

Used with ``--model-config-name=local`` by hosts whose tritonserver has no onnxruntime backend (the one bundled in
nvidia-pytriton). The graph, tensor names and results are the same as the onnxruntime backend's. Dynamic batching hands
``execute`` several requests at once: they are concatenated into one onnxruntime call and split again.

This file is copied into every exported version by ``maddpg-citylearn export``; it imports only numpy, onnxruntime and
Triton's ``triton_python_backend_utils``.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("onnx_intra_op_threads", "1") or 1)
        options.inter_op_num_threads = 1
        model_path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            actions = self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as exc:  # noqa: BLE001 - every request gets the error instead of a crashed stub
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, offset = [], 0
        for array in arrays:
            part = actions[offset : offset + array.shape[0]]
            offset += array.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)]))
        return responses

    def finalize(self):
        self.session = None
