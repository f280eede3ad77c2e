"""AOTInductor backend: runs the `.pt2` packages of an `smartedit-export --target aoti` folder.

A package is bound to the device type (and, for CUDA, the GPU architecture) and the torch version it was compiled
with; loading refuses others, naming both, instead of failing inside the runtime. Inputs are checked against each
graph's exported profile (the error names the dim and range) and cast to the package's precision; outputs come back
on the caller's device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import StageBackend, read_manifest


class AOTIBackend(StageBackend):
    name = "aoti"

    def __init__(self, artifacts: str | Path, device: str = "cpu"):
        from smartedit.export.run import aoti_device_record
        from smartedit.export.spec import GraphSpec

        self.root, self.manifest = read_manifest(artifacts)
        entries = self.manifest.get("aoti", {})
        if not entries:
            raise ValueError(f"{self.root} holds no AOTInductor packages: run smartedit-export --target aoti")
        self.device = torch.device(device)
        here = aoti_device_record(device)
        for n, e in entries.items():
            f = self.root / e["file"]
            if not f.is_file() or f.stat().st_size != e["bytes"]:
                raise ValueError(f"{f} is missing or differs from the manifest ({e['bytes']} bytes): re-run the export")
            if e["torch"] != torch.__version__:
                raise ValueError(f"{f} was compiled with torch {e['torch']}; this is torch {torch.__version__}: "
                                 "AOTInductor packages are not portable across versions, re-run the export")
            built = {k: v for k, v in e["device"].items() if k != "name"}
            if built != {k: v for k, v in here.items() if k != "name"}:
                raise ValueError(f"{f} was compiled for {e['device']}; this run is on {here}: re-run the export "
                                 f"with --device {device}")
        self.specs = {n: GraphSpec.from_dict(e["spec"]) for n, e in entries.items()}
        self.precision = {n: e["options"]["precision"] for n, e in entries.items()}
        self.fold_cfg = bool(entries.get("unet", {}).get("options", {}).get("fold_cfg", False))
        self._runners: dict[str, object] = {}

    def _runner(self, graph: str):
        if graph not in self.specs:
            raise ValueError(f"graph {graph!r} was not compiled into {self.root / 'aoti'} "
                             f"(it has {sorted(self.specs)})")
        if graph not in self._runners:
            from smartedit.export.aoti import load_aoti

            self._runners[graph] = load_aoti(self.root / "aoti" / f"{graph}.pt2", str(self.device))
        return self._runners[graph]

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        runner = self._runner(graph)
        spec = self.specs[graph]
        spec.check_inputs(inputs)
        # contiguous: the compiled code assumes the traced example's strides and does not check them (a permuted
        # pixel tensor from preprocessing gave silently wrong CLIP features before this)
        args = [inputs[t.name].to(self.device, t.torch_dtype(self.precision[graph])).contiguous()
                for t in spec.inputs]
        caller = next(iter(inputs.values())).device
        with torch.inference_mode():
            outs = runner(*args)
        return {t.name: o.to(caller) for t, o in zip(spec.outputs, outs)}
