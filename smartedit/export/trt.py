"""TensorRT engines from the exported ONNX: one code path for `tensorrt` (10.x, 11.x) and `tensorrt_rtx`.

    --target trt       `import tensorrt`: builds for the GPU it runs on (needs one)
    --target trt-rtx   `import tensorrt_rtx`: builds ahead of time for the given compute capabilities, on a CPU too

Networks are strongly typed (the fp16 ONNX carries its own types; TensorRT 11 has no fp16 builder flag and
TensorRT-RTX takes strongly typed networks only). Profiles come from the graph specs: the spec's dynamic range, plus,
for the UNet and VAE graphs, exact profiles at chosen resolutions (one tactic set per profile: a wide range costs
speed at its ends, NVIDIA/TensorRT#1166). Everything the two packages do differently is in `Flavor`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from smartedit.config import PRECISIONS, RESOLUTION_STEP
from smartedit.engines.trt import import_tensorrt
from smartedit.errors import ExportError, InputError, UnavailableError
from smartedit.files import write_atomic
from smartedit.graphs.manifest import Entry
from smartedit.graphs.spec import DimRange, GraphSpec

from . import onnx
from .job import ExportJob, Target, TargetOptions

class TensorRTError(ExportError):
    """TensorRT could not parse or build a graph."""


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@dataclass(frozen=True)
class BuildOptions(TargetOptions):
    """The options of --target trt and trt-rtx (one set: the two differ only in what `Flavor` says)."""

    FLAGS = {
        "--compute-capability": dict(dest="compute_capability", action="append", default=[], metavar="CC",
                                     help="GPU to build for, repeatable: 75, 80 (A100), 86, 89, 120, 121 (trt-rtx)"),
        "--opt-level": dict(dest="opt_level", type=int, default=3, help="TensorRT builder optimization level 0-5"),
        "--workspace-gb": dict(dest="workspace_gb", type=float, help="TensorRT workspace limit (default: TensorRT's)"),
        "--static-res": dict(dest="static_res", default="256,512",
                             help="exact TensorRT profiles for unet/VAE at these resolutions, besides the dynamic "
                                  "one ('' for none)"),
        "--refit": dict(dest="refit", action="store_true",
                        help="refittable engines (weights swappable without a rebuild)"),
        "--strip-weights": dict(dest="strip_weights", action="store_true",
                                help="weight-stripped engines, refitted from OUT/onnx at load: small plans, slower "
                                     "load"),
    }

    compute_capabilities: tuple[str, ...] = ()  # trt-rtx only: "75", "80", "86", "89", "120", "121"
    opt_level: int = 3  # builder optimization level 0..5 (5: slowest build, widest tactic search)
    workspace_gb: float | None = None  # workspace memory pool limit; None: TensorRT's default (the device memory)
    static_res: tuple[int, ...] = (256, 512)  # exact profiles for the UNet/VAE graphs, besides the dynamic one
    refit: bool = False  # refittable engine: weights can be swapped at load (TensorRT's REFIT_IDENTICAL)
    strip_weights: bool = False  # weight-stripped plan: small to ship, refitted from the ONNX at load (implies refit)

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise InputError(f"builder optimization level must be 0..5, got {self.opt_level}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise InputError(f"workspace must be > 0 GB, got {self.workspace_gb}")
        for r in self.static_res:
            if r % RESOLUTION_STEP:
                raise InputError(f"static resolution {r} is not a multiple of {RESOLUTION_STEP}")

    @classmethod
    def from_flags(cls, a) -> "BuildOptions":
        try:
            static = tuple(int(r) for r in a.static_res.split(",") if r.strip())
        except ValueError:
            raise InputError(f"--static-res must be comma-separated integers, got {a.static_res!r}") from None
        return cls(compute_capabilities=tuple(a.compute_capability), opt_level=a.opt_level,
                   workspace_gb=a.workspace_gb, refit=a.refit or a.strip_weights, strip_weights=a.strip_weights,
                   static_res=static)


class Flavor:
    """What differs between `tensorrt` and `tensorrt_rtx`, in one place."""

    def __init__(self, trt, target: str):
        self.trt, self.target = trt, target
        self.is_rtx = target == "trt-rtx"

    @property
    def version(self) -> str:
        return self.trt.__version__

    def network_flags(self) -> int:
        flags = self.trt.NetworkDefinitionCreationFlag
        # TensorRT 10: opt in to strong typing; TensorRT 11 / RTX: strongly typed only (flag may still exist)
        return 1 << int(flags.STRONGLY_TYPED) if hasattr(flags, "STRONGLY_TYPED") else 0

    def resolve_targets(self, caps: tuple[str, ...]) -> list[str]:
        """Check the requested GPUs before anything is built -> their names ("86", ...)."""
        if not self.is_rtx:
            if caps:
                raise InputError("--compute-capability is for --target trt-rtx; --target trt builds for the GPU "
                                 "it runs on")
            if not cuda_available():
                raise UnavailableError("--target trt builds for the GPU it runs on and there is no CUDA GPU here; "
                                       "to build ahead of time without one, use --target trt-rtx "
                                       "--compute-capability 86")
            return [_this_gpu()]
        if not caps:
            if not cuda_available():
                raise InputError("no GPU here: say which GPUs to build for with --compute-capability (repeatable), "
                                 f"one of {self.known_capabilities()}")
            return [_this_gpu()]  # TensorRT-RTX's default: the GPU it builds on
        bad = [c for c in caps if not hasattr(self.trt.ComputeCapability, f"SM{c}")]
        if bad:
            raise InputError(f"compute capability {bad} is not one TensorRT-RTX {self.version} can target; "
                             f"choose from {self.known_capabilities()} (no SM90: H100 needs --target trt)")
        return list(caps)

    def set_targets(self, config, caps: tuple[str, ...]) -> list[str]:
        targets = self.resolve_targets(caps)
        if self.is_rtx and caps:
            config.num_compute_capabilities = len(caps)
            for i, c in enumerate(caps):
                config.set_compute_capability(getattr(self.trt.ComputeCapability, f"SM{c}"), i)
        return targets

    def known_capabilities(self) -> list[str]:
        enum = getattr(self.trt, "ComputeCapability", None)
        return sorted((n[2:] for n in dir(enum) if n.startswith("SM")), key=int) if enum else []

    def set_refit(self, config, refit: bool, strip: bool) -> None:
        if not (refit or strip):
            return
        if self.is_rtx and not cuda_available():
            # TensorRT-RTX 1.7's Myelin compiler needs CUDA for REFIT / STRIP_PLAN (refused without a GPU)
            raise TensorRTError("TensorRT-RTX cannot build refittable or weight-stripped engines without a GPU; "
                                "build them on a GPU machine, or drop --refit / --strip-weights")
        flags = self.trt.BuilderFlag
        # REFIT_IDENTICAL: weights refitted later are the ones built with (TensorRT 11.3 docs: plain REFIT may
        # drop a GEMM bias); that is our case, since the weights come from the same ONNX.
        config.set_flag(flags.REFIT_IDENTICAL if hasattr(flags, "REFIT_IDENTICAL") else flags.REFIT)
        if strip:
            config.set_flag(flags.STRIP_PLAN)


def _this_gpu() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def engine_profiles(spec: GraphSpec, opts: BuildOptions) -> list[tuple[str, GraphSpec]]:
    """[(name, spec restricted to the profile)]: exact resolutions first (the runner picks the first profile that
    holds a shape), then the full dynamic range."""
    out: list[tuple[str, GraphSpec]] = []
    if spec.image_dims() and opts.static_res:  # the graphs with an image side: unet and the VAE
        hdim, wdim, px = spec.image_dims()
        rng = spec.dims[hdim]
        for res in opts.static_res:
            v = res // px
            if not rng.min <= v <= rng.max:
                raise InputError(f"static resolution {res} is outside the exported range "
                                 f"[{rng.min * px}, {rng.max * px}] of graph {spec.name}")
            b = spec.dims["B"].opt
            dims = dict(spec.dims, **{hdim: DimRange(v, v, v), wdim: DimRange(v, v, v), "B": DimRange(b, b, b)})
            out.append((f"{res}x{res}", dataclasses.replace(spec, dims=dims)))
    out.append(("dynamic", spec))
    return out


class _Logger:
    """A TensorRT logger that keeps every message for the build log."""

    def __new__(cls, trt):
        class CaptureLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.lines: list[str] = []

            def log(self, severity, msg):
                self.lines.append(f"[{str(severity).split('.')[-1]}] {msg}")

        return CaptureLogger()


def parse_onnx(flavor: Flavor, onnx_path: Path):
    """-> (builder, network, parser, logger); parser errors name the node, its operator and the parser's message."""
    trt = flavor.trt
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX file {onnx_path} is missing: run the ONNX export first (smartedit-export "
                            "--target onnx)")
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(flavor.network_flags())
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))  # reads external data beside the file
    if not ok or parser.num_errors:
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            where = f"node {e.node()} '{e.node_name()}' ({e.node_operator()})" if e.node() >= 0 else "model"
            errors.append(f"{where}: {e.desc()}")
        detail = "; ".join(errors) or (logger.lines[-1] if logger.lines else "no message")
        raise TensorRTError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {detail}")
    return builder, network, parser, logger


def build_engine(flavor: Flavor, onnx_path: Path, spec: GraphSpec, plan_path: Path, opts: BuildOptions,
                 timing_cache: Path | None = None) -> dict:
    """Parse, configure, build, and write the plan atomically (+ <plan>.build.log). -> build record."""
    trt = flavor.trt
    t0 = time.perf_counter()
    builder, network, _, logger = parse_onnx(flavor, onnx_path)
    parse_s = time.perf_counter() - t0
    config = builder.create_builder_config()
    targets = flavor.set_targets(config, opts.compute_capabilities)
    config.builder_optimization_level = opts.opt_level
    if opts.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * 2**30))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names/details for the inspector
    flavor.set_refit(config, opts.refit, opts.strip_weights)
    profiles = engine_profiles(spec, opts)
    for _, p in profiles:
        prof = builder.create_optimization_profile()
        for name, (mn, op, mx) in p.profile().items():
            prof.set_shape(name, mn, op, mx)
        config.add_optimization_profile(prof)
    cache = None
    if timing_cache is not None and hasattr(config, "create_timing_cache"):
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    t1 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t1
    log_path = plan_path.with_name(plan_path.name + ".build.log")
    write_atomic(log_path, "\n".join(logger.lines) + "\n")
    if plan is None:
        tail = "\n".join(logger.lines[-5:])
        raise TensorRTError(f"TensorRT could not build {spec.name} (log: {log_path}): {tail}")
    write_atomic(plan_path, bytes(plan))
    layers = _layer_information(flavor, bytes(plan), plan_path, logger)
    if cache is not None:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"compute_capabilities": targets,
            "profiles": [{"name": n, "dims": {k: dataclasses.asdict(v) for k, v in p.dims.items()}}
                         for n, p in profiles],
            "parse_s": round(parse_s, 2), "build_s": round(build_s, 2), "log": log_path.name, "layers": layers}


def _layer_information(flavor: Flavor, plan: bytes, plan_path: Path, logger) -> str:
    """Write <plan>.layers.json from TensorRT's engine inspector; that needs the plan deserialised, i.e. a GPU."""
    if not cuda_available():
        return "not written: the engine inspector needs a GPU to deserialise the plan"
    try:
        trt = flavor.trt
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        out = plan_path.with_name(plan_path.name + ".layers.json")
        write_atomic(out, info)
        return out.name
    except Exception as e:  # an engine for another GPU cannot be deserialised here; the build itself succeeded
        return f"not written: {type(e).__name__}: {e}"


def _check(target: str, build: BuildOptions, quantize) -> None:
    """Before the (long) ONNX export: TensorRT is here, targets something, and each GPU has the quantized type (its
    precision's min_capability: TensorRT builds its Q/DQ nowhere else)."""
    caps = Flavor(import_tensorrt(target), target).resolve_targets(build.compute_capabilities)
    least = quantize.precision.min_capability if quantize is not None else None
    below = [c for c in caps if least is not None and int(c) < least]
    if below:
        others = [n for n, p in PRECISIONS.items()
                  if p.exported and all(int(c) >= (p.min_capability or 0) for c in below)]
        raise InputError(f"--precision {quantize.precision.name} needs a GPU of compute capability {least} or newer; "
                         f"SM{', SM'.join(below)} is older: build those with --precision {' or '.join(others)}")


def produce(job: ExportJob) -> None:
    """The ONNX graphs (exported or reused), then one plan per graph into OUT/<target>/<graph>.plan, skipped when the
    ONNX file, the profiles, the options and TensorRT are unchanged."""
    onnx.produce(job)
    flavor = Flavor(import_tensorrt(job.target), job.target)
    build = job.target_options
    folder = job.out / flavor.target
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(job.names, 1):
        spec = job.graphs[n].spec
        onnx_entry = job.manifest.entries("onnx")[n]
        key = job.key(n, onnx={r: f["sha256"] for r, f in onnx_entry.files.items()}, build=dataclasses.asdict(build),
                      tensorrt=flavor.version)
        if job.up_to_date(flavor.target, n, key):
            job.progress(f"{n}: {flavor.target} engine up to date, skipped")
            continue
        caps = ",".join(build.compute_capabilities) or "this GPU"
        job.progress(f"[{i}/{len(job.names)}] {n}: building the {flavor.target} engine (TensorRT {flavor.version}, "
                     f"{caps}, opt level {build.opt_level}) ...")
        job.forget(flavor.target, n)
        plan = folder / f"{n}.plan"
        # TensorRT-RTX tunes at run time: its timing-cache calls are deprecated no-ops (and warn)
        record = build_engine(flavor, job.manifest.file(f"onnx/{n}.onnx"), spec, plan, build,
                              timing_cache=None if flavor.target == "trt-rtx" else folder / "timing.cache")
        rel = f"{flavor.target}/{plan.name}"
        quantized = {"quantization": onnx_entry.options["quantization"]} if "quantization" in onnx_entry.options else {}
        entry = Entry(flavor.target, n, key, spec, {**job.entry_options(n), **dataclasses.asdict(build), **quantized},
                      {rel: job.manifest.file_record(rel)},
                      requires={"tensorrt": flavor.version, "compute_capability": record.pop("compute_capabilities")},
                      profiles=record.pop("profiles"), record=record)
        job.record(entry)
        job.progress(f"    built in {record['build_s']:.1f} s (parse {record['parse_s']:.1f} s): "
                     f"{entry.files[rel]['bytes'] / 1e6:.1f} MB, profiles {[p['name'] for p in entry.profiles]}")


TARGET = Target("trt", "TensorRT engines for this machine's GPU (needs `tensorrt` and a GPU)", produce, BuildOptions,
                _check, side_files=("timing.cache",))
TARGET_RTX = Target("trt-rtx", "TensorRT-RTX engines built ahead of time, on a CPU too (no SM90)", produce,
                    BuildOptions, _check)
