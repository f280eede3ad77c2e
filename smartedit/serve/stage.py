"""A stage model as a Python-backend Triton model: one graph's ONNX file in ONNX Runtime.

For the `--triton-stages python` repository: what this project's bundled Triton (Python backend only) can serve, so
the BLS-orchestrated repository runs end to end here. In NVIDIA's container the same graphs use Triton's own
onnxruntime or tensorrt_plan backends instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from smartedit.graphs.spec import GraphSpec

_NP = {"float16": np.float16, "float32": np.float32, "int64": np.int64}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.spec = GraphSpec.from_dict(json.loads(config["parameters"]["spec"]["string_value"]))
        self.precision = config["parameters"]["precision"]["string_value"]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb

        responses = []
        for r in requests:
            feed = {}
            for t in self.spec.inputs:
                dtype = str(t.torch_dtype(self.precision)).removeprefix("torch.")
                feed[t.name] = pb.get_input_tensor_by_name(r, t.name).as_numpy().astype(_NP[dtype], copy=False)
            try:
                outs = self.session.run([t.name for t in self.spec.outputs], feed)
            except Exception as e:  # onnxruntime's own errors: reported on this request
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))))
                continue
            responses.append(pb.InferenceResponse(
                output_tensors=[pb.Tensor(t.name, o) for t, o in zip(self.spec.outputs, outs)]))
        return responses
