"""AOTInductor package of one graph: torch.export (the same dynamic dims as the ONNX export) -> Inductor ahead of
time -> OUT/aoti/<graph>.pt2, a self-contained package (compiled kernels + weights) that runs without Python model
code, from Python (torch._inductor.aoti_load_package) or C++ (torch::inductor::AOTIModelPackageLoader).

A package is compiled for one device type (cpu or cuda; on CUDA the Triton kernels, the BIM attention kernel's
included, are compiled for this GPU's architecture) and one torch version: the manifest records both and the
runtime (engines/aoti.py) refuses others. Compilation runs in a temporary folder and the package is moved into place
last, so an interrupted build leaves no `.pt2` that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .onnx import dynamic_shapes, export_point
from .spec import GraphSpec, parse_dim

# What a package says about itself (AOTIModelPackageLoader::get_metadata() in C++): its graph and the dtype of each
# input and output, in call order, so a C++ caller can cast its tensors (the compiled code checks dtypes only with
# AOTI_RUNTIME_CHECK_INPUTS=1: an fp32 tensor handed to an fp16 package is otherwise read as garbage).
# Version 2: the first with this metadata; the version is part of each package's key in the manifest.
PACKAGE_VERSION = 2


def package_metadata(spec: GraphSpec, precision: str) -> dict[str, str]:
    def io(tensors) -> str:
        return ",".join(f"{t.name}:{str(t.torch_dtype(precision)).removeprefix('torch.')}" for t in tensors)

    return {"smartedit.package_version": str(PACKAGE_VERSION), "smartedit.graph": spec.name,
            "smartedit.inputs": io(spec.inputs), "smartedit.outputs": io(spec.outputs)}


def compile_aoti(model: nn.Module, spec: GraphSpec, path: Path, precision: str, device: str) -> dict:
    """`model` (already in `precision`, on `device`) -> the package at `path`. Returns timings and size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = spec.sample_inputs(export_point(spec), precision, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, tuple(example.values()), dynamic_shapes=dynamic_shapes(spec),
                                      strict=False)
    export_s = time.perf_counter() - t0
    _check_dynamic(program, spec)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.tmp-", dir=path.parent))
    try:
        t0 = time.perf_counter()
        staged = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp / path.name),
            inductor_configs={"aot_inductor.metadata": package_metadata(spec, precision)})
        compile_s = time.perf_counter() - t0
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"export_s": round(export_s, 2), "compile_s": round(compile_s, 2), "bytes": path.stat().st_size}


def _check_dynamic(program: torch.export.ExportedProgram, spec: GraphSpec) -> None:
    """Refuse a program in which torch.export specialised a spec dim to a constant (it would reject other sizes)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = placeholders[len(placeholders) - len(spec.inputs):]  # parameters and buffers come first
    for node, t in zip(user_inputs, spec.inputs):
        shape = node.meta["val"].shape
        for got, want in zip(shape, t.shape):
            if parse_dim(want)[1] is not None and isinstance(got, int):
                raise RuntimeError(f"{spec.name}.{t.name}: dimension {want!r} was exported as the constant {got} "
                                   f"(torch.export specialised it); exported input shape: {tuple(shape)}")


def load_aoti(path: Path, device: str):
    """-> a callable(*tensors) -> tuple of tensors, on `device` (of the type the package was compiled for)."""
    index = torch.device(device).index
    package = torch._inductor.aoti_load_package(str(path), device_index=-1 if index is None else index)
    if package.get_metadata().get("smartedit.package_version") != str(PACKAGE_VERSION):
        raise ValueError(f"{path} was compiled by an older smartedit-export (no input dtypes in its metadata): "
                         "re-run smartedit-export --target aoti")

    def run(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = package(*args)  # the model's own output structure: one tensor, or a tuple
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run


class OnDevice(nn.Module):
    """Runs `inner` on `device` for callers that hold CPU tensors (verification); outputs come back on the CPU."""

    def __init__(self, inner: nn.Module, device: str):
        super().__init__()
        self.inner, self.device = inner, device

    def forward(self, *args):
        out = self.inner(*(a.to(self.device) for a in args))
        return tuple(o.cpu() for o in out) if isinstance(out, (tuple, list)) else out.cpu()
