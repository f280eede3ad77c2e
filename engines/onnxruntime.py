"""ONNX Runtime backend: runs the graphs of an `smartedit-export --target onnx` folder.

CPU by default; `providers` picks others (CUDAExecutionProvider, TensorrtExecutionProvider) where onnxruntime-gpu is
installed. Inputs are checked against each graph's exported profile first (a clear error names the dim and range),
cast to the graph's precision, and the outputs come back as torch tensors on the caller's device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import StageBackend, read_manifest

_NP = {"float16": np.float16, "float32": np.float32, "int64": np.int64}


class OnnxRuntimeBackend(StageBackend):
    name = "onnxruntime"

    def __init__(self, artifacts: str | Path, providers: list[str] | None = None):
        import onnxruntime  # noqa: F401  (fail here, with the import error, not at the first run)

        from smartedit.export.spec import GraphSpec

        self.root, self.manifest = read_manifest(artifacts)
        entries = self.manifest.get("graphs", {})
        self.specs = {n: GraphSpec.from_dict(e["spec"]) for n, e in entries.items()}
        for n, e in entries.items():
            for rel, size in e.get("bytes", {}).items():
                f = self.root / rel
                if not f.is_file() or f.stat().st_size != size:
                    raise ValueError(f"{f} is missing or differs from the manifest ({size} bytes): re-run the export")
        self.precision = {n: e["options"]["precision"] for n, e in entries.items()}
        self.fold_cfg = bool(entries.get("unet", {}).get("options", {}).get("fold_cfg", False))
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[str, object] = {}

    def _session(self, graph: str):
        if graph not in self.specs:
            raise ValueError(f"graph {graph!r} was not exported to {self.root} (it has {sorted(self.specs)})")
        if graph not in self._sessions:
            import onnxruntime as ort

            self._sessions[graph] = ort.InferenceSession(str(self.root / "onnx" / f"{graph}.onnx"),
                                                         providers=self.providers)
        return self._sessions[graph]

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self._session(graph)
        spec = self.specs[graph]
        spec.check_inputs(inputs)
        float_dtype = "float16" if self.precision[graph] == "fp16" else "float32"
        feed = {}
        for t in spec.inputs:
            dtype = float_dtype if t.dtype == "float" else t.dtype
            feed[t.name] = inputs[t.name].detach().cpu().numpy().astype(_NP[dtype], copy=False)
        device = next(iter(inputs.values())).device
        outs = session.run([t.name for t in spec.outputs], feed)
        return {t.name: torch.from_numpy(o).to(device) for t, o in zip(spec.outputs, outs)}
