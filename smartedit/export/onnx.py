"""`--target onnx`: each graph exported with torch.onnx's dynamo exporter and checked in ONNX Runtime against PyTorch
(through Polygraphy: onnx_parity).

The dynamo exporter traces without computing (fake tensors), so fp16 graphs export on a CPU in seconds to minutes,
keeps the spec's named dynamic dims ("3*B", "8*h8"), and runs onnxscript's optimizer (constant folding, dead-code
and redundancy cleanup) on the result. ONNX shape inference then annotates every intermediate. Graphs over 2 GB
(the 7b LLaMA) are written with external data (`<graph>.onnx.data` beside the `.onnx`).
"""

from __future__ import annotations

import functools
import inspect
import time
from pathlib import Path

import torch
from torch import nn

from smartedit.errors import ExportError
from smartedit.files import move_into_place, scratch_folder
from smartedit.graphs.manifest import Entry
from smartedit.graphs.spec import GraphSpec, parse_dim

from .job import ExportJob, Target
from .onnx_parity import compare_onnx

TWO_GB = 2**31


def dynamic_shapes(spec: GraphSpec, model: nn.Module):
    """Spec dims -> torch.export dynamic_shapes, one per input in call order ("3*B" becomes 3 * Dim("B")); a dim
    whose range is one value (min = max: e.g. --max-batch 1, or --min-res = --max-res) stays static. For a
    forward(*args) (GraphModule) they go under the name of its variadic parameter."""
    dims = {n: torch.export.Dim(n, min=r.min, max=r.max) for n, r in spec.dims.items() if r.min < r.max}
    out = []
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.shape):
            k, name = parse_dim(d)
            if name in dims:
                axes[i] = dims[name] if k == 1 else k * dims[name]
        out.append(axes or None)
    variadic = [n for n, p in inspect.signature(model.forward).parameters.items() if p.kind == p.VAR_POSITIONAL]
    return {variadic[0]: tuple(out)} if variadic else tuple(out)


class NoExamplePoint(ExportError):
    """No shape point in the profile lets torch.export keep every dynamic dim dynamic."""


def export_point(spec: GraphSpec) -> dict[str, int]:
    """The shape point traced at export: near opt, but never 0 or 1 (torch.export specialises those) and never a
    size that another axis has (duck shaping would unify the two: a dynamic batch of 2 beside the static
    guidance [2] came out static). Static dims (min = max) take their one value; the dynamic ones are searched
    (closest to opt first, backtracking when a choice leaves a later dim no free size)."""
    static = {n: r.min for n, r in spec.dims.items() if r.min == r.max}
    taken = {0, 1} | {d for t in spec.inputs for d in t.shape if isinstance(d, int)}
    for n, v in static.items():
        taken |= {k * v for t in spec.inputs for d in t.shape for k, name in [parse_dim(d)] if name == n}
    factors = {n: {k for t in spec.inputs for d in t.shape for k, name in [parse_dim(d)] if name == n}
               for n in spec.dims}
    dynamic = [n for n in spec.dims if n not in static]

    def free(n: str, used: set[int]) -> list[int]:
        r = spec.dims[n]
        candidates = sorted(range(r.min, r.max + 1), key=lambda v: (abs(v - r.opt), v))
        return [v for v in candidates if v not in used and all(k * v not in used for k in factors[n])]

    def search(i: int, used: set[int], point: dict[str, int]) -> dict[str, int] | None:
        if i == len(dynamic):
            return point
        n = dynamic[i]
        for v in free(n, used)[:64]:  # a wide range always has a free size within its first few candidates
            found = search(i + 1, used | {v}, {**point, n: v})
            if found is not None:
                return found
        return None

    point = search(0, set(taken), {})
    if point is None:
        ranges = ", ".join(f"{n} in [{spec.dims[n].min}, {spec.dims[n].max}]" for n in dynamic)
        raise NoExamplePoint(f"{spec.name}: no example size for the dynamic dims ({ranges}) avoids the fixed sizes "
                             f"{sorted(taken)} and each other")
    return {n: static.get(n, point.get(n)) for n in spec.dims}


def export_onnx(model: nn.Module, spec: GraphSpec, path: Path, precision: str, opset: int = 18) -> dict:
    """Export `model` (already in `precision`) to `path`, atomically: written in a temporary folder beside it and
    moved into place last (external data first), so an interrupted export never leaves a `.onnx` that looks
    complete."""
    import onnx

    path = Path(path)
    example = spec.sample_inputs(export_point(spec), precision)
    t0 = time.perf_counter()
    with scratch_folder(path) as tmp:
        with torch.no_grad():
            program = torch.onnx.export(
                model, tuple(example.values()), dynamo=True, dynamic_shapes=dynamic_shapes(spec, model),
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                opset_version=opset, optimize=True, verbose=False,
            )
        export_s = time.perf_counter() - t0
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        external = nbytes > TWO_GB * 0.9  # protobuf's 2 GB limit, with headroom for the graph itself
        staged = tmp / path.name
        program.save(str(staged), external_data=external)
        # shape inference on the saved file (works with external data, which in-memory inference does not)
        onnx.shape_inference.infer_shapes_path(str(staged), str(staged))
        onnx.checker.check_model(str(staged))  # path form: also checks external data files
        _check_dynamic_inputs(onnx.load(str(staged), load_external_data=False), spec)
        names = sorted((f.name for f in tmp.iterdir()), key=lambda n: n.endswith(".onnx"))  # data first, .onnx last
        for name in names:
            move_into_place(tmp / name, path.parent / name)
    return {"export_s": round(export_s, 2), "external_data": external, "files": names}


def _check_dynamic_inputs(model, spec: GraphSpec) -> None:
    """torch.onnx falls back to a static export when torch.export cannot keep a dim dynamic: refuse that."""
    for inp, t in zip(model.graph.input, spec.inputs):
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        for got, want in zip(dims, t.shape):
            k, name = parse_dim(want)
            if name is not None and spec.dims[name].min == spec.dims[name].max:  # static by the profile
                if got != k * spec.dims[name].min:
                    raise ExportError(f"{spec.name}.{t.name}: dimension {want!r} was exported as {got!r}, the "
                                      f"profile fixes it at {k * spec.dims[name].min}. Exported input shape: {dims}")
            elif name is not None and not isinstance(got, str):
                raise ExportError(
                    f"{spec.name}.{t.name}: dimension {want!r} was exported as the constant {got} (torch.export "
                    f"specialised it); the graph would reject other sizes. Exported input shape: {dims}")



def produce(job: ExportJob) -> None:
    """OUT/onnx/<graph>.onnx for every graph asked for (skipping those up to date), each checked in ONNX Runtime
    against fp32 PyTorch at two shapes of its profile (opt and one near it: parity.verification_points; the report
    says when the max shape was not run), recorded in the manifest as it completes."""
    todo = job.todo("onnx")
    if not todo:
        return
    job.model(todo)
    failed = []
    for i, n in enumerate(todo, 1):
        g = job.graphs[n]
        ref, at_precision = job.modules(n)
        precision = job.precision.unquantized.name  # every graph exported so; the one to quantize quantized after
        job.progress(f"[{i}/{len(todo)}] {n}: exporting ({precision}, opset {job.opset}) ...")
        job.forget("onnx", n)  # the entry goes before its file is replaced: nothing stale passes for current
        path = job.out / "onnx" / f"{n}.onnx"
        info = export_onnx(at_precision, g.spec, path, precision, job.opset)
        # the graph to quantize is recorded as fp16 first, under a key no rerun matches: quantize.produce replaces it
        key = f"{precision} before quantizing: {job.key(n)}" if job.quantizes(n) else job.key(n)
        entry = Entry("onnx", n, key, g.spec, {**job.entry_options(n), "precision": precision},
                      {f"onnx/{f}": job.manifest.file_record(f"onnx/{f}") for f in info["files"]},
                      record={"export_s": info["export_s"], "external_data": info["external_data"]})
        job.progress(f"    exported in {info['export_s']:.1f} s, "
                     f"{sum(f['bytes'] for f in entry.files.values()) / 1e6:.1f} MB")
        report = job.check(entry, "ONNX Runtime", functools.partial(compare_onnx, path), ref, at_precision)
        if entry.verified is False:
            failed.append(n)
        job.record(entry, report)
        del ref, at_precision
    if failed:
        raise ExportError(f"ONNX Runtime does not match PyTorch for {failed}; see {job.out / 'report.json'}")
    if any(job.quantizes(n) for n in todo):
        from .quantize import produce as quantize

        quantize(job, job.quantize)


TARGET = Target("onnx", "ONNX graphs (opset >= 18), checked in ONNX Runtime", produce)
