"""Eager PyTorch backend: the export wrappers themselves, run on the pipeline's modules (the reference)."""

from __future__ import annotations

import torch

from .base import StageBackend


class EagerBackend(StageBackend):
    name = "eager"

    def __init__(self, pipe):
        from smartedit.export.graphs import graphs
        from smartedit.export.spec import ProfileOptions

        self._graphs = graphs(pipe.config, ProfileOptions())
        self._pipe = pipe
        self._modules: dict[str, torch.nn.Module] = {}

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self._graphs[graph]
        if graph not in self._modules:
            self._modules[graph] = g.build(self._pipe).eval()
        with torch.inference_mode():
            out = self._modules[graph](*(inputs[t.name] for t in g.spec.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(g.spec.outputs, out)}
