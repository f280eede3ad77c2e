"""CUDA-graph backend: eager PyTorch modules, with the UNet step captured once per shape set and replayed.

At 256x256 the eager UNet step is launch-bound (DESIGN §7: ~39 ms of launches for < 1 ms of work); replaying a
captured graph issues the whole step as one launch. Captures use static input/output buffers: each call copies its
inputs in, replays, and returns a copy of the output. Only the UNet graph is captured; the CFG combine and the
scheduler step stay eager (a few elementwise launches per step).
`torch_compile=True` compiles the UNet instead (mode "max-autotune-no-cudagraphs", then captured the same way).
"""

from __future__ import annotations

import torch

from .eager import EagerBackend


class CudaGraphBackend(EagerBackend):
    def __init__(self, pipe, torch_compile: bool = False, warmup: int = 2):
        if not torch.cuda.is_available() or pipe.device.type != "cuda":
            raise RuntimeError("the CUDA-graph backend needs the pipeline on a CUDA device")
        super().__init__(pipe)
        self.name = "compile" if torch_compile else "cudagraph"
        self.torch_compile = torch_compile
        self.warmup = warmup
        self._captured: dict[tuple, tuple] = {}

    def _unet(self):
        if "unet" not in self._modules:
            module = self._graphs["unet"].build(self._pipe).eval()
            if self.torch_compile:
                module = torch.compile(module, mode="max-autotune-no-cudagraphs", fullgraph=False)
            self._modules["unet"] = module
        return self._modules["unet"]

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if graph != "unet":
            return super().run(graph, inputs)
        names = [t.name for t in self._graphs["unet"].spec.inputs]
        key = tuple((n, tuple(inputs[n].shape), inputs[n].dtype) for n in names)
        if key not in self._captured:
            module = self._unet()
            static = [inputs[n].clone() for n in names]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(self.warmup):  # allocator and cuBLAS/cuDNN warm-up outside the capture
                    module(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph_ = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph_), torch.inference_mode():
                out = module(*static)
            self._captured[key] = (graph_, static, out)
        graph_, static, out = self._captured[key]
        for buf, n in zip(static, names):
            buf.copy_(inputs[n])
        graph_.replay()
        return {"eps": out.clone()}
