"""A graph model as a Python-backend Triton model: one graph's ONNX file in ONNX Runtime.

For the `--graph-models python` repository: what this project's bundled Triton (Python backend only) can serve, so
the BLS-orchestrated repository runs end to end here. In NVIDIA's container the same graphs use Triton's own
onnxruntime or tensorrt_plan backends instead.

A graph model is as reachable from outside as the `smartedit` model (Triton restricts by API, not by model), so it
trusts no request: it answers only calls that carry the graph key of the server's environment (serve/admin.py),
which the `smartedit` model's BLS calls do, and refuses every other call before reading it (80 direct calls once
held an edit 32 s behind them); its files are checked against the sha256 the export recorded before ONNX Runtime
opens them, and every request's shapes against the graph's exported profile before any work (a 200x200-latent
vae_decoder call took the server from 3.4 to 17 GB). A refused call is the client's error (INVALID_ARG).
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

import numpy as np

from smartedit.config import PRECISIONS
from smartedit.errors import ArtifactError, InputError
from smartedit.files import sha256_file_cached
from smartedit.graphs.spec import GraphSpec

from .admin import GRAPH_KEY, GRAPH_KEY_ENV

_NP = {"float16": np.float16, "float32": np.float32, "int64": np.int64}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = config["parameters"]
        self.key = os.environ.get(GRAPH_KEY_ENV, "")
        if not self.key:
            raise RuntimeError(f"smartedit: InputError: ${GRAPH_KEY_ENV} is not set: start the repository with "
                               "python -m smartedit.serve.launch, which draws the key its graph models answer to")
        self.spec = GraphSpec.from_dict(json.loads(params["spec"]["string_value"]))
        self.precision = params["precision"]["string_value"]
        version = Path(args["model_repository"]) / args["model_version"]
        files = json.loads(params.get("files", {}).get("string_value") or "{}")
        if "model.onnx" not in files:
            raise RuntimeError(f"smartedit: ArtifactError: {version} records no sha256 for model.onnx: re-run "
                               "smartedit-export --target triton")
        for name, sha in files.items():  # the .onnx and its external data, before ONNX Runtime reads them
            path = version / name
            if not path.is_file() or sha256_file_cached(path) != sha:
                raise RuntimeError(f"smartedit: ArtifactError: {path} is missing or does not match the sha256 the "
                                   f"export recorded ({sha[:12]}...): re-run smartedit-export --target triton")
        options = ort.SessionOptions()
        if PRECISIONS[self.precision].onnxruntime_basic:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(str(version / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb

        responses = []
        for r in requests:
            try:
                self._check_caller(r)
                feed = self._feed(r)
            except (InputError, ArtifactError) as e:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(
                    f"{type(e).__name__}: {e}", pb.TritonError.INVALID_ARG)))
                continue
            try:
                outs = self.session.run([t.name for t in self.spec.outputs], feed)
            except Exception as e:  # onnxruntime's own errors: reported on this request, one line
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(
                    str(e).splitlines()[0][:500])))
                continue
            responses.append(pb.InferenceResponse(
                output_tensors=[pb.Tensor(t.name, o) for t, o in zip(self.spec.outputs, outs)]))
        return responses

    def _check_caller(self, request) -> None:
        """InputError unless the call carries the server's graph key (the `smartedit` model's BLS calls do)."""
        try:
            key = json.loads(request.parameters() or "{}").get(GRAPH_KEY, "")
        except (ValueError, AttributeError):
            key = ""
        if not (isinstance(key, str) and hmac.compare_digest(key.encode(), self.key.encode())):
            raise InputError("this graph model answers only the `smartedit` model: send edits to "
                             "/v2/models/smartedit")

    def _feed(self, request) -> dict[str, np.ndarray]:
        """The request's inputs in the graph's dtypes, refused (InputError) outside the exported profile."""
        import triton_python_backend_utils as pb

        given = {t.name: pb.get_input_tensor_by_name(request, t.name) for t in self.spec.inputs}
        raw = {name: x.as_numpy() for name, x in given.items() if x is not None}
        self.spec.check_inputs(raw)  # shapes first: nothing is converted or computed outside the profile
        return {t.name: raw[t.name].astype(_NP[str(t.torch_dtype(self.precision)).removeprefix("torch.")],
                                           copy=False) for t in self.spec.inputs}
