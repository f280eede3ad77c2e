"""ONNX Runtime backend: runs the graphs of an `smartedit-export --target onnx` folder.

CPU by default; on `--device cuda` the CUDA execution provider (onnxruntime-gpu). Inputs are checked against each
graph's exported profile first (the error names the dim and range), cast to the graph's precision, and the outputs
come back as torch tensors on the caller's device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from smartedit.config import PRECISIONS
from smartedit.errors import ArtifactError

from .artifacts import ArtifactRunner, Artifacts, load_exported
from .backend import Backend

_NP = {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64}


def session(path: Path, providers: list[str] | None = None, basic: bool = False):
    """An ONNX Runtime session; a file it cannot load (garbage whose hash an edited manifest matches, a graph for
    another opset) is an ArtifactError naming the file, not ONNX Runtime's own exception. `basic`: graph
    optimisations up to BASIC only (a precision's onnxruntime_basic)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) share no useful base
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})") from None


def run_file(path: Path, inputs: dict[str, torch.Tensor], providers: list[str] | None = None) -> list[torch.Tensor]:
    """Run one ONNX file on inputs given in its own dtypes (the export's check)."""
    out = session(path, providers).run(None, {k: v.detach().cpu().numpy() for k, v in inputs.items()})
    return [torch.from_numpy(o) for o in out]


class OnnxRuntimeRunner(ArtifactRunner):
    name = "onnxruntime"
    suffix = ".onnx"

    def __init__(self, artifacts: Artifacts, providers: list[str] | None = None):
        import onnxruntime  # noqa: F401  (fail here, with the import error, not at the first run)

        super().__init__(artifacts)
        self.providers = providers or ["CPUExecutionProvider"]

    def open(self, path: Path, entry):
        return session(path, self.providers, basic=PRECISIONS[entry.precision].onnxruntime_basic)

    def call(self, opened, entry, inputs):
        feed = {t.name: inputs[t.name].detach().cpu().numpy().astype(_NP[t.torch_dtype(entry.precision)], copy=False)
                for t in entry.spec.inputs}
        return [torch.from_numpy(o) for o in opened.run([t.name for t in entry.spec.outputs], feed)]


def _unavailable(device: torch.device) -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install -e '.[export]')"
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install onnxruntime-gpu), and CPU times beside CUDA ones mislead"
    return None


def _load(source, device, dtype, artifacts):
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else None
    return load_exported(source, device, dtype, artifacts, "onnx", lambda a, d: OnnxRuntimeRunner(a, providers))


ONNXRUNTIME = Backend("onnxruntime", "the ONNX graphs in ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)",
                      ("cpu", "cuda"), "onnx", _unavailable, _load)
