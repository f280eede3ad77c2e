"""engines/trt.py on the CPU: the TensorRT backend's own logic against a stand-in TensorRT runtime and CUDA layer.

No GPU and no full TensorRT here, so the engines cannot run. What this checks is the backend around them, on the real
manifest and plans of a TensorRT-RTX build (tests/conftest.py): which execution contexts it makes and with what
memory, what it binds, when it captures a CUDA graph and when it must not, and that replays compute from the current
call's inputs without writing into the caller's tensors. The stand-in engine computes a known function of its inputs
in the memory at the bound addresses, as a real engine would read and write them.
"""

import ctypes
import enum
import json
import logging
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[test]')")

from smartedit.engines.artifacts import Artifacts  # noqa: E402
from smartedit.engines.trt import CudaOps, TensorRTRunner  # noqa: E402
from smartedit.errors import ArtifactError  # noqa: E402
from smartedit.graphs.spec import GraphSpec  # noqa: E402

_CTYPES = {torch.float16: ctypes.c_uint16, torch.float32: ctypes.c_float, torch.int64: ctypes.c_int64}
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64}


def _at(address: int, shape, dtype) -> torch.Tensor:
    """The memory at a bound address, as a tensor (no copy): what an engine reads and writes."""
    n = int(np.prod(shape))
    raw = np.ctypeslib.as_array((_CTYPES[dtype] * n).from_address(address))
    return torch.from_numpy(raw.view(_NUMPY[dtype]).reshape(shape))


class FakeTensorRT:
    """Stands in for the tensorrt / tensorrt_rtx module (the names engines/trt.py uses, as the real packages spell
    them: tests/test_trt_backend.py::test_the_names_used_exist_in_tensorrt_rtx checks them against the wheel)."""

    DataType = enum.Enum("DataType", "HALF FLOAT INT64 INT32 BOOL")
    ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC USER_MANAGED")
    CudaGraphStrategy = enum.Enum("CudaGraphStrategy", "DISABLED WHOLE_GRAPH_CAPTURE")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    def __init__(self, version: str, plans: dict[bytes, GraphSpec], capturable=True, enqueue_fails_in_capture=False):
        self.__version__, self.plans = version, plans
        self.capturable, self.enqueue_fails_in_capture = capturable, enqueue_fails_in_capture
        self.capturing = False
        self.engines: list[FakeEngine] = []

    def Runtime(self, logger):  # noqa: N802 (the TensorRT name)
        trt = self

        class Runtime:
            def deserialize_cuda_engine(self, plan: bytes):
                engine = FakeEngine(trt, trt.plans[plan])
                trt.engines.append(engine)
                return engine

        return Runtime()


class FakeEngine:
    device_memory_size_v2 = 4096

    def __init__(self, trt: FakeTensorRT, spec: GraphSpec):
        self.trt, self.spec, self.contexts = trt, spec, []

    def get_tensor_dtype(self, name: str):
        t = next(t for t in self.spec.inputs + self.spec.outputs if t.name == name)
        return {"float": self.trt.DataType.HALF, "float32": self.trt.DataType.FLOAT,
                "int64": self.trt.DataType.INT64}[t.dtype]

    def create_runtime_config(self):
        class RuntimeConfig:
            strategy, cuda_graph_strategy = None, self.trt.CudaGraphStrategy.DISABLED

            def set_execution_context_allocation_strategy(self, s):
                self.strategy = s

        return RuntimeConfig()

    def create_execution_context(self, how):
        ctx = FakeContext(self, how)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine, how):
        self.engine, self.how = engine, how
        self.memory, self.profile, self.shapes, self.addresses, self.enqueues = None, None, {}, {}, 0

    def set_device_memory(self, address, size):
        self.memory = (address, size)

    def set_optimization_profile_async(self, index, stream):
        self.profile = index

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        spec = self.engine.spec
        point = spec.check_inputs({n: torch.empty(s, device="meta") for n, s in self.shapes.items()})
        return spec.shape(next(t for t in spec.outputs if t.name == name), point)

    def is_stream_capturable(self, stream):
        return self.engine.trt.capturable

    def execute_async_v3(self, stream):
        """The plain UNet graph's contract with a known function: eps = sample[:, :4] / 2 + timestep."""
        trt = self.engine.trt
        if trt.capturing:  # recorded, not run: replay() runs it
            return not trt.enqueue_fails_in_capture
        assert self.memory is not None, "enqueue without activation memory"
        spec, dt = self.engine.spec, self.engine.get_tensor_dtype
        dtypes = {trt.DataType.HALF: torch.float16, trt.DataType.FLOAT: torch.float32, trt.DataType.INT64: torch.int64}
        ins = {t.name: _at(self.addresses[t.name], self.shapes[t.name], dtypes[dt(t.name)]) for t in spec.inputs}
        for t in spec.outputs:
            out = _at(self.addresses[t.name], self.get_tensor_shape(t.name), dtypes[dt(t.name)])
            if spec.name == "unet":
                out.copy_(ins["sample"][:, :4].float() / 2 + ins["timestep"].float())
            else:
                out.zero_()
        self.enqueues += 1
        return True


class CpuCuda(CudaOps):
    """The CUDA layer on the CPU: a 'graph' replays the captured enqueue on the addresses bound at capture, as a
    CUDA graph does."""

    def __init__(self, trt: FakeTensorRT, capability="86"):
        super().__init__("cpu")
        self.trt, self.cc, self.captures = trt, capability, 0

    def available(self):
        return True

    def capability(self):
        return self.cc

    def name(self):
        return "Stand-in GPU"

    def stream(self):
        return 7

    def capture(self, enqueue):
        self.captures += 1
        self.trt.capturing = True
        try:
            ok = enqueue(self.stream())
        finally:
            self.trt.capturing = False

        class Graph:
            def replay(self):
                assert enqueue(7)

        return Graph(), ok


@pytest.fixture()
def artifacts(trt_rtx_export, tmp_path):
    """The TensorRT-RTX build, with its engine entries also listed as `trt` ones (same plans) for the trt path."""
    src, _ = trt_rtx_export
    out = tmp_path / "artifacts"
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    rtx = manifest["artifacts"]["trt-rtx"]
    manifest["artifacts"]["trt"] = {g: dict(e, target="trt") for g, e in rtx.items()}
    (out / "manifest.json").write_text(json.dumps(manifest))
    plans = {(out / next(iter(e["files"]))).read_bytes(): GraphSpec.from_dict(e["spec"]) for e in rtx.values()}
    return out, manifest, plans


def _backend(artifacts, target="trt", **fake):
    out, manifest, plans = artifacts
    trt = FakeTensorRT(manifest["artifacts"]["trt-rtx"]["unet"]["requires"]["tensorrt"], plans, **fake)
    cuda = CpuCuda(trt)
    return TensorRTRunner(Artifacts(out, target), trt=trt, cuda=cuda), trt, cuda


def _unet_inputs(seed: int, side: int = 32):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(3, 8, side, side, generator=g).half(),
            "timestep": torch.tensor([float(100 + seed)]),  # float32, as the engine takes it: bindable as it is
            "prompt_embeds": torch.randn(3, 77, 32, generator=g).half(),
            "bim_residual": torch.randn(1, 32, 16, 16, generator=g).half()}


def _expected(x):
    return x["sample"][:, :4].float() / 2 + x["timestep"]


def test_graphed_unet_replays_this_calls_inputs_and_never_writes_into_the_callers(artifacts):
    backend, trt, cuda = _backend(artifacts)
    first, second = _unet_inputs(1), _unet_inputs(2)
    kept = {k: v.clone() for k, v in first.items()}
    out1 = backend.run("unet", first)["eps"]
    out2 = backend.run("unet", second)["eps"]  # replay: the same graph, new values copied in
    assert cuda.captures == 1
    torch.testing.assert_close(out1.float(), _expected(first), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(out2.float(), _expected(second), rtol=2e-3, atol=1e-3)
    for k in first:  # the static buffers are the backend's own: the first call's tensors are untouched
        assert torch.equal(first[k], kept[k]), f"the backend wrote into the caller's {k}"
    assert out1.data_ptr() != out2.data_ptr()  # each call gets its own output, not the graph's buffer


@pytest.mark.parametrize("fake, why", [(dict(capturable=False), "is_stream_capturable is false"),
                                       (dict(enqueue_fails_in_capture=True), "returned false inside the capture")])
def test_no_graph_where_tensorrt_cannot_be_captured(artifacts, caplog, fake, why):
    backend, trt, cuda = _backend(artifacts, **fake)
    with caplog.at_level(logging.WARNING, logger="smartedit.engines.trt"):
        outs = [backend.run("unet", _unet_inputs(s))["eps"] for s in (1, 2, 3)]
    for s, o in zip((1, 2, 3), outs):  # plain enqueues, every call computed from its own inputs
        torch.testing.assert_close(o.float(), _expected(_unet_inputs(s)), rtol=2e-3, atol=1e-3)
    [graph] = [v[0] for v in backend._graphs.values()]
    assert graph is None and why in caplog.text
    unet = next(e for e in trt.engines if e.spec.name == "unet")
    assert sum(c.enqueues for c in unet.contexts) == 3


def test_tensorrt_rtx_uses_its_own_cuda_graph_strategy(artifacts):
    backend, trt, cuda = _backend(artifacts, target="trt-rtx")
    x = _unet_inputs(4)
    torch.testing.assert_close(backend.run("unet", x)["eps"].float(), _expected(x), rtol=2e-3, atol=1e-3)
    backend.run("vae_decoder", {"latents": torch.randn(1, 4, 32, 32).half()})
    assert cuda.captures == 0  # no hand capture on TensorRT-RTX
    strategy = {e.spec.name: c.how.cuda_graph_strategy for e in trt.engines for c in e.contexts}
    assert strategy == {"unet": trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE,
                        "vae_decoder": trt.CudaGraphStrategy.DISABLED}
    assert all(c.how.strategy == trt.ExecutionContextAllocationStrategy.USER_MANAGED
               for e in trt.engines for c in e.contexts)


def test_contexts_of_one_engine_share_one_activation_memory(artifacts):
    backend, trt, _ = _backend(artifacts)
    backend.run("unet", _unet_inputs(1, side=32))  # 256 px: the exact 256x256 profile
    backend.run("unet", _unet_inputs(2, side=40))  # 320 px: the dynamic profile, another graph and context
    backend.run("unet", _unet_inputs(3, side=40))
    for side in (32, 40):
        backend.run("vae_decoder", {"latents": torch.randn(1, 4, side, side).half()})
    unet = next(e for e in trt.engines if e.spec.name == "unet")
    assert len(unet.contexts) == 2 and {c.profile for c in unet.contexts} == {0, 2}
    for engine in trt.engines:
        memories = {c.memory for c in engine.contexts}
        assert len(memories) == 1 and next(iter(memories))[1] >= FakeEngine.device_memory_size_v2
    assert len({next(iter(c.memory for c in e.contexts)) for e in trt.engines}) == len(trt.engines) == 2


def test_foreign_plans_are_refused_by_name(artifacts):
    out, manifest, plans = artifacts
    trt = FakeTensorRT("10.0.0", plans)
    with pytest.raises(ArtifactError, match=r"\(trt\) was built for tensorrt 1\.7\.1\.116; this machine has 10\.0\.0"):
        TensorRTRunner(Artifacts(out, "trt"), trt=trt, cuda=CpuCuda(trt))
    trt = FakeTensorRT(manifest["artifacts"]["trt"]["unet"]["requires"]["tensorrt"], plans)
    with pytest.raises(ArtifactError, match=r"built for compute_capability \['86', '80'\]; this machine has 90.*"
                                            r"\(Stand-in GPU\)"):
        TensorRTRunner(Artifacts(out, "trt"), trt=trt, cuda=CpuCuda(trt, capability="90"))


def test_the_names_used_exist_in_tensorrt_rtx():
    """The stand-in spells the API as the backend calls it; the real wheel must have those names."""
    import tensorrt_rtx as trt

    assert trt.ExecutionContextAllocationStrategy.USER_MANAGED and trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
    for owner, names in [(trt.ICudaEngine, ("create_runtime_config", "create_execution_context",
                                            "device_memory_size_v2", "get_tensor_dtype")),
                         (trt.IRuntimeConfig, ("set_execution_context_allocation_strategy", "cuda_graph_strategy")),
                         (trt.IExecutionContext, ("set_device_memory", "set_optimization_profile_async",
                                                  "set_input_shape", "set_tensor_address", "get_tensor_shape",
                                                  "execute_async_v3", "is_stream_capturable"))]:
        missing = [n for n in names if not hasattr(owner, n)]
        assert not missing, f"{owner.__name__} has no {missing}"
