"""`--target aoti`: each graph through torch.export (the same dynamic dims as the ONNX export) and Inductor ahead of
time into OUT/aoti/<graph>.pt2, a self-contained package (compiled kernels + weights) that runs without the model
code, from Python (torch._inductor.aoti_load_package) or C++ (torch::inductor::AOTIModelPackageLoader).

A package is compiled for one device type (cpu or cuda; on CUDA the Triton kernels, the BIM attention kernel's
included, are compiled for this GPU's architecture) and one torch version: its manifest entry requires both, and
the runtime (engines/aoti.py) refuses others. It carries its graph and input/output dtypes in its own metadata, for
C++ callers. Compilation runs in a temporary folder and the package is moved into place last, so an interrupted
build leaves no `.pt2` that looks complete.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smartedit.engines.aoti import PACKAGE_VERSION, device_record, load_package
from smartedit.errors import ExportError
from smartedit.files import move_into_place, scratch_folder
from smartedit.graphs import parity
from smartedit.graphs.manifest import Entry
from smartedit.graphs.spec import GraphSpec, parse_dim

from .job import ExportJob, Target, TargetOptions
from .onnx import dynamic_shapes, export_point


def package_metadata(spec: GraphSpec, precision: str) -> dict[str, str]:
    """What a package says about itself: its graph, and each input's and output's dtype in call order."""
    def io(tensors) -> str:
        return ",".join(f"{t.name}:{str(t.torch_dtype(precision)).removeprefix('torch.')}" for t in tensors)

    return {"smartedit.package_version": str(PACKAGE_VERSION), "smartedit.graph": spec.name,
            "smartedit.inputs": io(spec.inputs), "smartedit.outputs": io(spec.outputs)}


def compile_aoti(model: nn.Module, spec: GraphSpec, path: Path, precision: str, device: str) -> dict:
    """`model` (already in `precision`, on `device`) -> the package at `path`. Returns timings and size."""
    path = Path(path)
    example = spec.sample_inputs(export_point(spec), precision, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, tuple(example.values()), dynamic_shapes=dynamic_shapes(spec, model),
                                      strict=False)
    export_s = time.perf_counter() - t0
    _check_dynamic(program, spec)
    with scratch_folder(path) as tmp:
        t0 = time.perf_counter()
        staged = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp / path.name),
            inductor_configs={"aot_inductor.metadata": package_metadata(spec, precision)})
        compile_s = time.perf_counter() - t0
        move_into_place(Path(staged), path)
    return {"export_s": round(export_s, 2), "compile_s": round(compile_s, 2), "bytes": path.stat().st_size}


def _check_dynamic(program: torch.export.ExportedProgram, spec: GraphSpec) -> None:
    """Refuse a program in which torch.export specialised a spec dim to a constant (it would reject other sizes)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = placeholders[len(placeholders) - len(spec.inputs):]  # parameters and buffers come first
    for node, t in zip(user_inputs, spec.inputs):
        shape = node.meta["val"].shape
        for got, want in zip(shape, t.shape):
            if parse_dim(want)[1] is not None and isinstance(got, int):
                raise ExportError(f"{spec.name}.{t.name}: dimension {want!r} was exported as the constant {got} "
                                  f"(torch.export specialised it); exported input shape: {tuple(shape)}")


class OnDevice(nn.Module):
    """Runs `inner` on `device` for callers that hold CPU tensors (verification); outputs come back on the CPU."""

    def __init__(self, inner: nn.Module, device: str):
        super().__init__()
        self.inner, self.device = inner, device

    def forward(self, *args):
        out = self.inner(*(a.to(self.device) for a in args))
        return tuple(o.cpu() for o in out) if isinstance(out, (tuple, list)) else out.cpu()


@dataclass(frozen=True)
class AotiOptions(TargetOptions):
    FLAGS = {"--device": dict(dest="device", default="cpu",
                              help="aoti: the device the packages are compiled for and run on (cpu, cuda, cuda:1)")}

    device: str = "cpu"


def _check(target: str, options: AotiOptions, quantize) -> None:
    device_record(options.device)  # a device AOTInductor compiles for, present here


def produce(job: ExportJob) -> None:
    """One package per graph, skipped when source, spec, options, toolchain and device are unchanged."""
    device = job.target_options.device
    where = device_record(device)
    requires = {"torch": torch.__version__, "device": where}
    todo = job.todo("aoti", "AOTInductor package", device=where, package=PACKAGE_VERSION)
    if not todo:
        return
    job.model(todo)
    failed = []
    for i, n in enumerate(todo, 1):
        g = job.graphs[n]
        ref, at_precision = job.modules(n, device)
        job.progress(f"[{i}/{len(todo)}] {n}: torch.export + AOTInductor ({job.precision.name}, {device}) ...")
        job.forget("aoti", n)
        rel = f"aoti/{n}.pt2"
        info = compile_aoti(at_precision, g.spec, job.out / rel, job.precision.name, device)
        job.progress(f"    exported in {info['export_s']:.1f} s, compiled in {info['compile_s']:.1f} s, "
                     f"{info['bytes'] / 1e6:.1f} MB")
        entry = Entry("aoti", n, job.key(n, device=where, package=PACKAGE_VERSION), g.spec,
                      {**job.entry_options(n), "device": device}, {rel: job.manifest.file_record(rel)}, requires=requires,
                      record={"export_s": info["export_s"], "compile_s": info["compile_s"]})
        package = load_package(job.out / rel, device) if job.verify else None
        # hand-written (parity.compare): Polygraphy has no runner for an AOTInductor package
        compare = functools.partial(parity.compare, lambda x: package(*(v.to(device) for v in x.values())))
        report = job.check(entry, "the package", compare, ref,
                           OnDevice(at_precision, device), device=where)
        if entry.verified is False:
            failed.append(n)
        package = None  # the package's memory goes before the next graph compiles
        job.record(entry, report)
        del ref, at_precision
    if failed:
        raise ExportError(f"the AOTInductor packages do not match PyTorch for {failed}; see {job.out / 'report.json'}")


TARGET = Target("aoti", "AOTInductor .pt2 packages for --device, from torch.export (no ONNX)", produce, AotiOptions,
                _check, every_dim_dynamic=True, quantized=False)
