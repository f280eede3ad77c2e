"""Parity of an exported graph with PyTorch: the check every export and `smartedit-verify` run. Here: the shape
points, PyTorch's reference outputs there (`references`) and the bound; the ONNX graphs are compared through
Polygraphy (smartedit.export.onnx_parity), the runners it has no runner for by `compare`.

    fp32: |got - torch| <= 1e-4 * max(1, max|ref|)  (different kernels, same precision).
    fp16: |got - ref32| <= k * |torch16 - ref32| + 1e-3 * max|ref|: bounded by PyTorch's own fp16 error
    (flash-attention's rule), not by a hand-picked atol; other backends' fp16 kernels accumulate differently.

Each graph is checked at its spec's opt point and at a second point that differs from it in every dimension the
range allows (batch 2, the image side one 64 px step from opt, width != height), which catches shape bugs a single
traced shape would hide. The second point stays near opt on purpose, not at the profile's max: the check runs fp32
PyTorch and the exported graph side by side on the CPU, and self-attention memory grows with the square of the image
area (768 x 768 px is 9216 latent tokens, a 9216^2 score matrix per head and batch item). The old mid/max point
(batch 2, 512 x 768 px) peaked at 15.9 GB RSS for the tiny preset's unet; the max shapes are the runner's to
honour (TensorRT builds for them), and `max_point_note` says in the report that they were not run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from smartedit.errors import ExportError, InputError

from smartedit.config import RESOLUTION_STEP

from .spec import DIM_MEANINGS, GraphSpec


@dataclass
class Comparison:
    point: dict[str, int]
    output: str
    max_abs_err: float  # |exported - fp32 PyTorch|
    ref_max_abs: float  # max |fp32 PyTorch|: the scale of the output
    torch_same_dtype_err: float | None  # |PyTorch at the export precision - fp32 PyTorch| (fp16 only)
    cosine: float
    bound: float
    passed: bool
    # the comparator's own error statistics where one made the comparison (Polygraphy: mean / median absdiff,
    # max / mean reldiff, its PASSED / FAILED), None for the hand-written one
    stats: dict | None = None


@dataclass
class Reference:
    """PyTorch at one shape point: the inputs at the export precision (what the artifact is fed), fp32 PyTorch's
    outputs on the same values in fp32, and PyTorch's own outputs at the precision (fp16 only: the bound's scale)."""

    point: dict[str, int]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    at_precision: dict[str, torch.Tensor] | None

    def bound(self, output: str, precision: str, k: float = 4.0) -> float:
        """The largest |exported - fp32 PyTorch| that passes for `output` (the module docstring's rule)."""
        r = self.outputs[output].double()
        scale = r.abs().max().item()
        if precision == "fp32":
            return 1e-4 * max(1.0, scale)
        torch_err = self.torch_err(output) or 0.0
        return k * torch_err + 1e-3 * max(scale, 1e-6)

    def torch_err(self, output: str) -> float | None:
        if self.at_precision is None:
            return None
        return (self.at_precision[output].double() - self.outputs[output].double()).abs().max().item()


# image-side dims in their units per 64 px step: h8/w8 (px / 64) move by 1, h/w (px / 8) by 8
_STEP = {n: RESOLUTION_STEP // m.px for n, m in DIM_MEANINGS.items() if m.px}


def verification_points(spec: GraphSpec) -> list[dict[str, int]]:
    """opt, and a second point near it that differs from it in every dim where the range allows: batch 2 (or
    another batch), the image side one 64 px step above opt (below at the top of the range), the width one step
    further than the height (non-square); a prompt length at the middle of its range."""
    opt = spec.point("opt")
    height, width, _ = spec.image_dims() or (None, None, 0)
    alt: dict[str, int] = {}
    for n, r in spec.dims.items():
        other = alt.get(height) if n == width else None  # keep the second point non-square
        if n in _STEP:
            s, near = _STEP[n], (2 if n == width else 1)
            prefs = [opt[n] + near * s, opt[n] - near * s, opt[n] + s, opt[n] - s, opt[n] + 2 * s, opt[n] - 2 * s]
            prefs += sorted(range(r.min + (opt[n] - r.min) % s, r.max + 1, s), key=lambda v: (abs(v - opt[n]), v))
        else:
            prefs = [2] if n == "B" else [(r.min + r.max) // 2]
            prefs += [r.max, r.min] + list(range(r.min, r.max + 1))
        alt[n] = next((v for v in prefs if r.min <= v <= r.max and v != opt[n] and v != other), opt[n])
    return [opt] if alt == opt else [opt, alt]


def max_point_note(spec: GraphSpec) -> str | None:
    """Why the profile's max shape is not among the checked points (None when it is)."""
    top = spec.point("max")
    if top in verification_points(spec):
        return None
    return (f"the profile's max {top} is not checked: fp32 PyTorch and the runner side by side there can need tens "
            "of GB (attention memory grows with the square of the image area); checked at opt and a point near it")


def references(spec: GraphSpec, ref_model: nn.Module, precision: str, model_at_precision: nn.Module | None,
               points: list[dict[str, int]], seed: int = 1) -> list[Reference]:
    """fp32 PyTorch (`ref_model`, and `model_at_precision` for PyTorch's own fp16 error) at each shape point, on the
    inputs an artifact is checked with (spec.sample_inputs at `seed`)."""
    refs = []
    for point in points:
        if not spec.contains(point):
            raise InputError(f"{spec.name}: verification point {point} lies outside the profile {spec.dims}")
        x32 = spec.sample_inputs(point, "fp32", seed=seed)
        x = spec.sample_inputs(point, precision, seed=seed)
        names = [t.name for t in spec.outputs]
        with torch.no_grad():
            ref = dict(zip(names, (o.detach().cpu() for o in _as_tuple(ref_model(*x32.values())))))
            same = (dict(zip(names, (o.detach().cpu() for o in _as_tuple(model_at_precision(*x.values())))))
                    if model_at_precision is not None else None)
        refs.append(Reference(point, x, ref, same))
    return refs


def check_shape(spec: GraphSpec, output: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise ExportError(f"{spec.name}.{output}: exported shape {tuple(got)} != PyTorch {tuple(want)}")


def compare(run: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]], spec: GraphSpec, ref_model: nn.Module,
            precision: str, model_at_precision: nn.Module | None, points: list[dict[str, int]], seed: int = 1,
            k: float = 4.0) -> list[Comparison]:
    """`run(inputs at the precision, on the CPU) -> outputs` (an exported artifact) against fp32 PyTorch
    (`ref_model`, and `model_at_precision` for PyTorch's own fp16 error) at each shape point. Hand-written: the
    runners Polygraphy has no runner for (AOTInductor packages, this project's TensorRT runner with its profile
    choice) are checked here; ONNX artifacts go through Polygraphy (smartedit.export.onnx_parity)."""
    results = []
    for ref in references(spec, ref_model, precision, model_at_precision, points, seed):
        got = [g.detach().cpu() for g in run(ref.inputs)]
        for i, t in enumerate(spec.outputs):
            r, g = ref.outputs[t.name].double(), got[i].double()
            check_shape(spec, t.name, g.shape, r.shape)
            err = (g - r).abs().max().item()
            cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item()
            bound = ref.bound(t.name, precision, k)
            ok = math.isfinite(err) and err <= bound
            results.append(Comparison(ref.point, t.name, err, r.abs().max().item(), ref.torch_err(t.name), cos, bound,
                                      ok))
    return results


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def as_dicts(cs: list[Comparison]) -> list[dict]:
    return [asdict(c) for c in cs]


def summary(what: str, comps: list[Comparison], seconds: float, against: str = "PyTorch") -> str:
    """One line: pass/fail at how many shapes, and the comparison closest to its bound."""
    ok = all(c.passed for c in comps)
    worst = max(comps, key=lambda c: c.max_abs_err / max(c.bound, 1e-30))
    return (f"    {what} vs {against} at {len({str(c.point) for c in comps})} shapes: {'PASS' if ok else 'FAIL'} "
            f"(worst {worst.output}: max err {worst.max_abs_err:.2e}, bound {worst.bound:.2e}, "
            f"cosine {worst.cosine:.6f}) in {seconds:.1f} s")
