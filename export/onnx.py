"""ONNX export of one graph (torch.onnx dynamo exporter) and its check in ONNX Runtime against PyTorch.

The dynamo exporter traces without computing (fake tensors), so fp16 graphs export on a CPU in seconds to minutes,
keeps the spec's named dynamic dims ("3*B", "8*h8"), and runs onnxscript's optimizer (constant folding, dead-code
and redundancy cleanup) on the result. ONNX shape inference then annotates every intermediate. Graphs over 2 GB
(the 7b LLaMA) are written with external data (`<graph>.onnx.data` beside the `.onnx`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .spec import GraphSpec, parse_dim

TWO_GB = 2**31


def dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, object] | None]:
    """Spec dims -> torch.export dynamic_shapes ("3*B" becomes 3 * Dim("B"))."""
    dims = {n: torch.export.Dim(n, min=r.min, max=r.max) for n, r in spec.dims.items()}
    out: dict[str, dict[int, object] | None] = {}
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.shape):
            k, name = parse_dim(d)
            if name is not None:
                axes[i] = dims[name] if k == 1 else k * dims[name]
        out[t.name] = axes or None
    return out


def export_point(spec: GraphSpec) -> dict[str, int]:
    """The shape point traced at export: near opt, but never 0 or 1 (torch.export specialises those) and never a
    size that another axis has (duck shaping would unify the two: a dynamic batch of 2 beside the static
    guidance [2] came out static)."""
    taken = {0, 1} | {d for t in spec.inputs for d in t.shape if isinstance(d, int)}
    point: dict[str, int] = {}
    for n, r in spec.dims.items():
        candidates = sorted(range(r.min, r.max + 1), key=lambda v: (abs(v - r.opt), v))
        free = [v for v in candidates if v not in taken and all(
            k * v not in taken for t in spec.inputs for d in t.shape for k, name in [parse_dim(d)] if name == n)]
        if not free:
            raise ValueError(f"{spec.name}: no example size for dimension {n} in [{r.min}, {r.max}] avoids {taken}")
        point[n] = free[0]
        taken |= {point[n]}
    return point


def export_onnx(model: nn.Module, spec: GraphSpec, path: Path, precision: str, opset: int = 18) -> dict:
    """Export `model` (already in `precision`) to `path`, atomically: written in a temporary folder beside it and
    moved into place last, so an interrupted export never leaves a `.onnx` that looks complete."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = spec.sample_inputs(export_point(spec), precision)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.tmp-", dir=path.parent))
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model, tuple(example.values()), dynamo=True, dynamic_shapes=dynamic_shapes(spec),
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
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".onnx"):  # data first, the .onnx last
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = [path] + ([path.with_name(path.name + ".data")] if (path.parent / (path.name + ".data")).exists() else [])
    return {"export_s": round(export_s, 2), "external_data": external, "files": [f.name for f in files]}


def _check_dynamic_inputs(model, spec: GraphSpec) -> None:
    """torch.onnx falls back to a static export when torch.export cannot keep a dim dynamic: refuse that."""
    for inp, t in zip(model.graph.input, spec.inputs):
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        for got, want in zip(dims, t.shape):
            if parse_dim(want)[1] is not None and not isinstance(got, str):
                raise RuntimeError(
                    f"{spec.name}.{t.name}: dimension {want!r} was exported as the constant {got} (torch.export "
                    f"specialised it); the graph would reject other sizes. Exported input shape: {dims}")


@dataclass
class Comparison:
    point: dict[str, int]
    output: str
    max_abs_err: float  # |exported (ONNX, AOTI) - fp32 PyTorch|
    ref_max_abs: float  # max |fp32 PyTorch|: the scale of the output
    torch_same_dtype_err: float | None  # |PyTorch at the export precision - fp32 PyTorch| (fp16 only)
    cosine: float
    bound: float
    passed: bool


def run_onnxruntime(path: Path, inputs: dict[str, torch.Tensor], providers: list[str] | None = None
                    ) -> list[torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    out = session.run(None, {k: v.detach().cpu().numpy() for k, v in inputs.items()})
    return [torch.from_numpy(o) for o in out]


def verify_onnx(path: Path, spec: GraphSpec, ref_model: nn.Module, precision: str,
                model_at_precision: nn.Module | None, points: list[dict[str, int]], seed: int = 1,
                k: float = 4.0) -> list[Comparison]:
    """Run the ONNX file in ONNX Runtime (CPU) at each shape point and compare with PyTorch (`verify_against`)."""
    return verify_against(lambda x: run_onnxruntime(path, x), spec, ref_model, precision, model_at_precision,
                          points, seed, k)


def verify_against(run, spec: GraphSpec, ref_model: nn.Module, precision: str, model_at_precision: nn.Module | None,
                   points: list[dict[str, int]], seed: int = 1, k: float = 4.0) -> list[Comparison]:
    """`run(inputs at the precision, CPU) -> outputs` (an exported artifact) against PyTorch at each shape point.

    fp32: |got - torch| <= 1e-4 * max(1, max|ref|)  (different kernels, same precision).
    fp16: |got - ref32| <= k * |torch16 - ref32| + 1e-3 * max|ref|: bounded by PyTorch's own fp16 error
    (flash-attention's rule), not by a hand-picked atol; other runtimes' fp16 kernels accumulate differently.
    """
    results = []
    for point in points:
        if not spec.contains(point):
            raise ValueError(f"{spec.name}: verification point {point} lies outside the profile {spec.dims}")
        x32 = spec.sample_inputs(point, "fp32", seed=seed)
        x = spec.sample_inputs(point, precision, seed=seed)
        got = [g.detach().cpu() for g in run(x)]
        with torch.no_grad():
            ref = _as_tuple(ref_model(*x32.values()))
            same = _as_tuple(model_at_precision(*x.values())) if model_at_precision is not None else None
        for i, t in enumerate(spec.outputs):
            r, g = ref[i].double(), got[i].double()
            if tuple(g.shape) != tuple(r.shape):
                raise AssertionError(f"{spec.name}.{t.name}: exported shape {tuple(g.shape)} != PyTorch "
                                     f"{tuple(r.shape)}")
            err = (g - r).abs().max().item()
            scale = r.abs().max().item()
            cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item()
            torch_err = (same[i].double() - r).abs().max().item() if same is not None else None
            if precision == "fp32":
                bound = 1e-4 * max(1.0, scale)
            else:
                bound = k * (torch_err or 0.0) + 1e-3 * max(scale, 1e-6)
            ok = math.isfinite(err) and err <= bound
            results.append(Comparison(point, t.name, err, scale, torch_err, cos, bound, ok))
    return results


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def comparisons_to_dict(cs: list[Comparison]) -> list[dict]:
    return [asdict(c) for c in cs]
