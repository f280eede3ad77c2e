"""TensorRT backend: runs the plans of `smartedit-export --target trt | trt-rtx` behind the stage interface.

Written against TensorRT 10's documented Python API (ICudaEngine / IExecutionContext, name-based tensors,
execute_async_v3); the same calls exist in tensorrt_rtx. NOT RUN in this project's CI or on its test GPU: CI has no
GPU, and the H100 test machine has no TensorRT (and TensorRT-RTX has no SM90 target). See the README.

- Refuses a plan built by another TensorRT version or for another GPU, naming both.
- I/O are torch CUDA tensors bound by address: no host round trips; one CUDA stream (torch's current stream).
- Each graph picks the first of its profiles that holds the call's shapes (exact 256/512 profiles come first), and
  rejects shapes outside every profile, naming the dim and the range.
- The UNet step is captured in a CUDA graph per (profile, shapes) and replayed, with its own execution context
  (NVIDIA/TensorRT#3798), after one plain enqueue (NVIDIA/TensorRT#2603: enqueue before capture).
- Weight-stripped plans are refitted from OUT/onnx at load (OnnxParserRefitter).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from smartedit.export.spec import DimRange, GraphSpec

from .base import StageBackend, read_manifest


def _torch_dtype(trt, dt):
    table = {trt.DataType.HALF: torch.float16, trt.DataType.FLOAT: torch.float32, trt.DataType.INT64: torch.int64,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dt]


class TensorRTBackend(StageBackend):
    def __init__(self, artifacts: str | Path, target: str = "trt", device: str = "cuda", cuda_graphs: bool = True):
        from smartedit.export.trt import import_tensorrt

        self.name = target
        self.trt = trt = import_tensorrt(target)
        self.root, self.manifest = read_manifest(artifacts)
        self.entries = self.manifest.get("engines", {}).get(target)
        if not self.entries:
            raise ValueError(f"{self.root} holds no {target} engines (run smartedit-export --target {target})")
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA GPU and there is none here")
        self.device = torch.device(device)
        major, minor = torch.cuda.get_device_capability(self.device)
        cc = f"{major}{minor}"
        for g, e in self.entries.items():
            if e["tensorrt"] != trt.__version__:
                raise ValueError(f"{g}: plan built with TensorRT {e['tensorrt']}, this is TensorRT {trt.__version__}; "
                                 "rebuild it (smartedit-export reruns only what changed)")
            caps = e["compute_capabilities"]
            if "current" not in caps and cc not in caps:
                raise ValueError(f"{g}: plan built for compute capability {caps}, this GPU "
                                 f"({torch.cuda.get_device_name(self.device)}) is {cc}")
        self.fold_cfg = bool(self.manifest["graphs"].get("unet", {}).get("options", {}).get("fold_cfg", False))
        self.cuda_graphs = cuda_graphs
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self._engines: dict[str, object] = {}
        self._profiles: dict[str, list[GraphSpec]] = {}  # per graph: the spec restricted to each engine profile
        for g, e in self.entries.items():
            base = GraphSpec.from_dict(self.manifest["graphs"][g]["spec"])
            self._profiles[g] = [dataclasses.replace(base, dims={k: DimRange(**v) for k, v in p["dims"].items()})
                                 for p in e["profiles"]]
        self._contexts: dict[tuple, object] = {}
        self._graphs: dict[tuple, tuple] = {}

    # -- loading ------------------------------------------------------------------------------------------------------

    def _engine(self, graph: str):
        if graph not in self.entries:
            raise ValueError(f"graph {graph!r} has no {self.name} engine in {self.root} ({sorted(self.entries)})")
        if graph not in self._engines:
            entry = self.entries[graph]
            plan = (self.root / entry["file"]).read_bytes()
            if len(plan) != entry["plan_bytes"]:
                raise ValueError(f"{entry['file']} differs from the manifest ({entry['plan_bytes']} bytes)")
            engine = self.runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise RuntimeError(f"TensorRT could not load {entry['file']} (corrupt, or built for another "
                                   "TensorRT / GPU)")
            if entry["options"].get("strip_weights"):
                self._refit_from_onnx(engine, graph)
            self._engines[graph] = engine
        return self._engines[graph]

    def _refit_from_onnx(self, engine, graph: str) -> None:
        trt = self.trt
        refitter = trt.Refitter(engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(self.root / "onnx" / f"{graph}.onnx")):
            errs = [parser_refitter.get_error(i).desc() for i in range(parser_refitter.num_errors)]
            raise RuntimeError(f"{graph}: refitting from ONNX failed: {errs}")
        if not refitter.refit_cuda_engine():
            raise RuntimeError(f"{graph}: refit_cuda_engine failed (weights missing: {refitter.get_missing_weights()})")

    def _context(self, graph: str, profile: int, key: tuple = ()):
        k = (graph, profile) + key
        if k not in self._contexts:
            ctx = self._engine(graph).create_execution_context()
            ctx.set_optimization_profile_async(profile, torch.cuda.current_stream(self.device).cuda_stream)
            self._contexts[k] = ctx
        return self._contexts[k]

    # -- running ------------------------------------------------------------------------------------------------------

    def _pick_profile(self, graph: str, inputs: dict[str, torch.Tensor]) -> int:
        profiles = self._profiles[graph]
        point = profiles[-1].check_inputs(inputs)  # the last profile is the full dynamic range: names bad dims
        for i, p in enumerate(profiles):
            if p.contains(point):
                return i
        raise ValueError(f"{graph}: shapes {point} fit no profile")

    def _bind(self, ctx, engine, spec: GraphSpec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trt = self.trt
        keep = []
        for t in spec.inputs:
            x = inputs[t.name].to(self.device, _torch_dtype(trt, engine.get_tensor_dtype(t.name))).contiguous()
            keep.append(x)
            ctx.set_input_shape(t.name, tuple(x.shape))
            ctx.set_tensor_address(t.name, x.data_ptr())
        outs = {}
        for t in spec.outputs:
            shape = tuple(ctx.get_tensor_shape(t.name))
            outs[t.name] = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(t.name)),
                                       device=self.device)
            ctx.set_tensor_address(t.name, outs[t.name].data_ptr())
        outs["_keep"] = keep  # inputs must outlive the enqueue
        return outs

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine = self._engine(graph)
        idx = self._pick_profile(graph, inputs)
        spec = self._profiles[graph][idx]
        if graph == "unet" and self.cuda_graphs:
            return self._run_graphed(graph, idx, spec, engine, inputs)
        ctx = self._context(graph, idx)
        outs = self._bind(ctx, engine, spec, inputs)
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{graph}: TensorRT enqueue failed")
        outs.pop("_keep")
        return outs

    def _run_graphed(self, graph, idx, spec, engine, inputs):
        """Replay a captured CUDA graph for these exact shapes; capture it on first use."""
        key = tuple((t.name, tuple(inputs[t.name].shape)) for t in spec.inputs)
        if (graph, idx, key) not in self._graphs:
            ctx = self._context(graph, idx, key)  # a context of its own: its bindings never change
            static = self._bind(ctx, engine, spec, inputs)
            stream = torch.cuda.current_stream(self.device)
            if not ctx.execute_async_v3(stream.cuda_stream):  # one plain enqueue before capture
                raise RuntimeError(f"{graph}: TensorRT enqueue failed")
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream)
            self._graphs[(graph, idx, key)] = (cuda_graph, static)
        cuda_graph, static = self._graphs[(graph, idx, key)]
        for t, buf in zip(spec.inputs, static["_keep"]):
            buf.copy_(inputs[t.name])
        cuda_graph.replay()
        return {t.name: static[t.name].clone() for t in spec.outputs}

