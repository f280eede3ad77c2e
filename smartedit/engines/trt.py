"""TensorRT backend: runs the plans of `smartedit-export --target trt | trt-rtx` behind the stage interface.

Written against TensorRT 10's documented Python API (ICudaEngine / IExecutionContext, name-based tensors,
execute_async_v3) and TensorRT-RTX's (the same calls, plus IRuntimeConfig). `trt` and `cuda` can be stand-ins (the
CPU tests drive this code against a stand-in TensorRT runtime and CUDA layer: what is bound, captured, replayed,
shared, copied).

- Refuses a plan built by another TensorRT version or for another GPU, naming both.
- I/O are torch CUDA tensors bound by address: no host round trips; one CUDA stream (torch's current stream).
- Each graph picks the first of its profiles that holds the call's shapes (exact 256/512 profiles come first), and
  rejects shapes outside every profile, naming the dim and the range.
- One block of activation memory per engine, shared by all its execution contexts (USER_MANAGED allocation): the
  contexts run one at a time on one stream, and each would otherwise hold the engine's whole activation memory.
- The UNet step runs from a CUDA graph:
    trt       captured by hand per (profile, shapes), with an execution context of its own (NVIDIA/TensorRT#3798),
              after one plain enqueue (NVIDIA/TensorRT#2603), only if `is_stream_capturable` says so and the enqueue
              inside the capture succeeds; otherwise it runs plainly (a failed enqueue captured as an empty graph
              would replay nothing and return uninitialised memory). Inputs are copied into buffers of the graph's
              own: a caller's tensor is never bound as a static buffer (later copies would overwrite it).
    trt-rtx   TensorRT-RTX's own strategy (IRuntimeConfig.cuda_graph_strategy = WHOLE_GRAPH_CAPTURE): its docs make hand
              capture need engines built with REQUIRE_USER_ALLOCATION, and its runtime knows when shape-specialised
              kernels are ready to capture.
- Weight-stripped plans are refitted from OUT/onnx at load (OnnxParserRefitter).
"""

from __future__ import annotations

import importlib
import logging

import torch

from smartedit.errors import ArtifactError, RunError, UnavailableError
from smartedit.graphs import GRAPHS
from smartedit.graphs.spec import GraphSpec

from .artifacts import Artifacts, load_exported
from .backend import Backend, cuda_unavailable

log = logging.getLogger(__name__)
TARGET_MODULES = {"trt": "tensorrt", "trt-rtx": "tensorrt_rtx"}  # the Python module of each target


def import_tensorrt(target: str):
    """The TensorRT module of a target, or an UnavailableError that says how to get it."""
    if target not in TARGET_MODULES:
        raise ValueError(f"unknown TensorRT target {target!r}; choose one of {sorted(TARGET_MODULES)}")
    try:
        return importlib.import_module(TARGET_MODULES[target])
    except ImportError as e:
        if target == "trt":
            raise UnavailableError(
                "`tensorrt` is not installed. On a GPU machine, install NVIDIA's TensorRT Python wheels "
                "(`pip install tensorrt`, from NVIDIA's package index; see NVIDIA's TensorRT installation guide). "
                "They are not on PyPI. To build engines ahead of time without a GPU, use --target trt-rtx "
                f"(`pip install tensorrt-rtx-cu13`). ({e})") from e
        raise UnavailableError(f"`tensorrt_rtx` is not installed: `pip install tensorrt-rtx-cu13` ({e})") from e


def _torch_dtype(trt, dt):
    table = {trt.DataType.HALF: torch.float16, trt.DataType.FLOAT: torch.float32, trt.DataType.INT64: torch.int64,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dt]


class CudaOps:
    """The CUDA calls this backend makes, in one place: device facts, the stream handle, memory, graph capture."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)

    def available(self) -> bool:
        return torch.cuda.is_available()

    def capability(self) -> str:
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"{major}{minor}"

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def capture(self, enqueue) -> tuple[object | None, bool | str]:
        """Capture `enqueue(stream) -> bool` -> (a graph whose replay() re-runs it, what enqueue returned); (None,
        the error) if the capture itself failed."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                ok = enqueue(torch.cuda.current_stream(self.device).cuda_stream)
        except RuntimeError as e:  # capture invalidated (an unsupported call inside the enqueue)
            return None, str(e)
        return graph, ok


class TensorRTRunner:
    def __init__(self, artifacts: Artifacts, device: str | torch.device = "cuda", cuda_graphs: bool = True,
                 trt=None, cuda: CudaOps | None = None):
        """`trt` (the TensorRT module) and `cuda` default to the real ones; tests pass stand-ins."""
        target = artifacts.target
        self.name = target
        self.trt = trt = trt or import_tensorrt(target)
        self.is_rtx = target == "trt-rtx"
        self.cuda = cuda or CudaOps(device)
        self.arts = artifacts
        self.root, self.entries = artifacts.root, artifacts.entries
        if not self.cuda.available():
            raise UnavailableError("the TensorRT backend needs a CUDA GPU and there is none here")
        artifacts.refuse_incompatible({"tensorrt": trt.__version__, "compute_capability": self.cuda.capability()},
                                      self.cuda.name())
        self.fold_cfg, self.cache_branch = artifacts.fold_cfg, artifacts.cache_branch
        self.specs = {g: e.spec for g, e in self.entries.items()}
        self.cuda_graphs = cuda_graphs
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self._engines: dict[str, object] = {}
        self._memory: dict[str, torch.Tensor] = {}  # graph -> the activation memory its contexts share
        # per graph: the spec restricted to each engine profile (exact resolutions first, the dynamic one last)
        self._profiles: dict[str, list[GraphSpec]] = {g: e.profile_specs() for g, e in self.entries.items()}
        self._contexts: dict[tuple, object] = {}
        self._graphs: dict[tuple, tuple] = {}  # (graph, profile, shapes) -> (CUDA graph or None, ctx, outs, inputs)

    # -- loading ------------------------------------------------------------------------------------------------------

    def _engine(self, graph: str):
        if graph not in self._engines:
            entry = self.arts.entry(graph)
            path = self.arts.file(graph, ".plan")
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT could not load {path} (corrupt, or built for another TensorRT / GPU)")
            if entry.options.get("strip_weights"):
                self._refit_from_onnx(engine, graph)
            self._engines[graph] = engine
            size = getattr(engine, "device_memory_size_v2", None)
            size = engine.device_memory_size if size is None else size  # the largest over all profiles
            self._memory[graph] = self.cuda.empty((max(int(size), 1),), torch.uint8)  # 256-byte aligned (allocator)
        return self._engines[graph]

    def _refit_from_onnx(self, engine, graph: str) -> None:
        trt = self.trt
        refitter = trt.Refitter(engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        onnx = Artifacts(self.root, "onnx").file(graph, ".onnx")  # the same folder's ONNX export of the graph
        if not parser_refitter.refit_from_file(str(onnx)):
            errs = [parser_refitter.get_error(i).desc() for i in range(parser_refitter.num_errors)]
            raise RunError(f"{graph}: refitting from ONNX failed: {errs}")
        if not refitter.refit_cuda_engine():
            raise RunError(f"{graph}: refit_cuda_engine failed (weights missing: {refitter.get_missing_weights()})")

    def _context(self, graph: str, profile: int, key: tuple = (), rtx_graphs: bool = False):
        k = (graph, profile, rtx_graphs) + key
        if k not in self._contexts:
            trt, engine = self.trt, self._engine(graph)
            user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            if self.is_rtx:
                config = engine.create_runtime_config()
                config.set_execution_context_allocation_strategy(user_managed)
                if rtx_graphs:
                    config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                ctx = engine.create_execution_context(config)
            else:
                ctx = engine.create_execution_context(user_managed)
            if ctx is None:
                raise RunError(f"{graph}: TensorRT could not create an execution context")
            memory = self._memory[graph]
            if hasattr(ctx, "set_device_memory"):
                ctx.set_device_memory(memory.data_ptr(), memory.numel())
            else:  # TensorRT 10.0
                ctx.device_memory = memory.data_ptr()
            ctx.set_optimization_profile_async(profile, self.cuda.stream())
            self._contexts[k] = ctx
        return self._contexts[k]

    # -- running ------------------------------------------------------------------------------------------------------

    def _pick_profile(self, graph: str, inputs: dict[str, torch.Tensor]) -> int:
        profiles = self._profiles[graph]
        point = profiles[-1].check_inputs(inputs)  # the last profile is the full dynamic range: names bad dims
        for i, p in enumerate(profiles):
            if p.contains(point):
                return i
        raise ArtifactError(f"{graph}: shapes {point} fit no profile of the engine")

    def _bind(self, ctx, engine, spec: GraphSpec, inputs: dict[str, torch.Tensor], static: bool = False
              ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Bind inputs and fresh outputs -> (outputs, the input tensors bound). static=True binds copies the backend
        owns (a CUDA graph replays with these addresses); otherwise a caller's tensor of the right dtype, device and
        layout is bound as it is."""
        trt = self.trt
        bound = []
        for t in spec.inputs:
            x = inputs[t.name]
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(t.name))
            if static:
                x = self.cuda.empty(tuple(x.shape), dtype).copy_(x)
            else:
                x = x.to(self.cuda.device, dtype).contiguous()
            bound.append(x)
            ctx.set_input_shape(t.name, tuple(x.shape))
            ctx.set_tensor_address(t.name, x.data_ptr())
        outs = {}
        for t in spec.outputs:
            shape = tuple(ctx.get_tensor_shape(t.name))
            outs[t.name] = self.cuda.empty(shape, _torch_dtype(trt, engine.get_tensor_dtype(t.name)))
            ctx.set_tensor_address(t.name, outs[t.name].data_ptr())
        return outs, bound

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine = self._engine(graph)
        idx = self._pick_profile(graph, inputs)
        spec = self._profiles[graph][idx]
        graphed = GRAPHS[graph].per_step and self.cuda_graphs
        if graphed and not self.is_rtx:
            return self._run_graphed(graph, idx, spec, engine, inputs)
        ctx = self._context(graph, idx, rtx_graphs=graphed)  # trt-rtx: its runtime captures and replays
        outs, bound = self._bind(ctx, engine, spec, inputs)
        if not ctx.execute_async_v3(self.cuda.stream()):
            raise RunError(f"{graph}: TensorRT enqueue failed")
        del bound  # the enqueue is stream-ordered: the allocator reuses these only after it
        return outs

    def _run_graphed(self, graph, idx, spec, engine, inputs):
        """Replay a captured CUDA graph for these exact shapes; capture it on first use (or run plainly where
        TensorRT says the enqueue cannot be captured)."""
        key = tuple((t.name, tuple(inputs[t.name].shape)) for t in spec.inputs)
        if (graph, idx, key) not in self._graphs:
            ctx = self._context(graph, idx, key)  # a context of its own: its bindings never change
            outs, bound = self._bind(ctx, engine, spec, inputs, static=True)
            stream = self.cuda.stream()
            if not ctx.execute_async_v3(stream):  # one plain enqueue before capture
                raise RunError(f"{graph}: TensorRT enqueue failed")
            cuda_graph, why = None, "is_stream_capturable is false"
            if ctx.is_stream_capturable(stream):
                cuda_graph, ok = self.cuda.capture(ctx.execute_async_v3)
                if ok is not True:  # an enqueue that failed in capture would replay as an empty graph
                    cuda_graph, why = None, ok or "execute_async_v3 returned false inside the capture"
            if cuda_graph is None:
                log.warning("TensorRT: %s runs without a CUDA graph (%s)", graph, why)
            self._graphs[(graph, idx, key)] = (cuda_graph, ctx, outs, bound)
            return {name: o.clone() for name, o in outs.items()}  # computed by the plain enqueue
        cuda_graph, ctx, outs, bound = self._graphs[(graph, idx, key)]
        for t, buf in zip(spec.inputs, bound):
            buf.copy_(inputs[t.name])
        if cuda_graph is not None:
            cuda_graph.replay()
        elif not ctx.execute_async_v3(self.cuda.stream()):
            raise RunError(f"{graph}: TensorRT enqueue failed")
        return {name: o.clone() for name, o in outs.items()}


def _loader(target: str):
    def load(source, device, dtype, artifacts):
        return load_exported(source, device, dtype, artifacts, target, lambda a, d: TensorRTRunner(a, d))

    return load


def _unavailable(target: str):
    def why(device: torch.device) -> str | None:
        try:
            importlib.import_module(TARGET_MODULES[target])
        except ImportError:
            return f"`{TARGET_MODULES[target]}` is not installed here"
        return cuda_unavailable(device)

    return why


TRT = Backend("trt", "TensorRT engines (needs `tensorrt` and the GPU they were built for)", ("cuda",), "trt",
              _unavailable("trt"), _loader("trt"))
TRT_RTX = Backend("trt-rtx", "TensorRT-RTX engines (built ahead of time for chosen GPUs; no SM90)", ("cuda",),
                  "trt-rtx", _unavailable("trt-rtx"), _loader("trt-rtx"))
