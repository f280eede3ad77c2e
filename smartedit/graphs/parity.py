"""Parity of an exported graph with PyTorch: the check every export and `smartedit-verify` run.

    fp32: |got - torch| <= 1e-4 * max(1, max|ref|)  (different kernels, same precision).
    fp16: |got - ref32| <= k * |torch16 - ref32| + 1e-3 * max|ref|: bounded by PyTorch's own fp16 error
    (flash-attention's rule), not by a hand-picked atol; other runtimes' fp16 kernels accumulate differently.

Each graph is checked at its spec's opt point and at a second point that differs from it in every dimension the
range allows (batch 2, a mid size, width != height), which catches shape bugs a single traced shape would hide.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from smartedit.errors import InputError

from .spec import GraphSpec


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


def verification_points(spec: GraphSpec) -> list[dict[str, int]]:
    """opt, and a second point that differs from it in every dim where the range allows (batch 2, a mid size,
    and width != height)."""
    opt = spec.point("opt")
    alt: dict[str, int] = {}
    for n, r in spec.dims.items():
        other = {"w8": alt.get("h8"), "w": alt.get("h")}.get(n)  # keep the second point non-square
        prefs = [2] if n == "B" else [(r.min + r.max) // 2]
        prefs += [r.max, r.min] + list(range(r.min, r.max + 1))
        alt[n] = next((v for v in prefs if r.min <= v <= r.max and v != opt[n] and v != other), opt[n])
    return [opt] if alt == opt else [opt, alt]


def compare(run: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]], spec: GraphSpec, ref_model: nn.Module,
            precision: str, model_at_precision: nn.Module | None, points: list[dict[str, int]], seed: int = 1,
            k: float = 4.0) -> list[Comparison]:
    """`run(inputs at the precision, on the CPU) -> outputs` (an exported artifact) against fp32 PyTorch
    (`ref_model`, and `model_at_precision` for PyTorch's own fp16 error) at each shape point."""
    results = []
    for point in points:
        if not spec.contains(point):
            raise InputError(f"{spec.name}: verification point {point} lies outside the profile {spec.dims}")
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


def as_dicts(cs: list[Comparison]) -> list[dict]:
    return [asdict(c) for c in cs]


def summary(what: str, comps: list[Comparison], seconds: float) -> str:
    """One line: pass/fail at how many shapes, and the comparison closest to its bound."""
    ok = all(c.passed for c in comps)
    worst = max(comps, key=lambda c: c.max_abs_err / max(c.bound, 1e-30))
    return (f"    {what} vs PyTorch at {len({str(c.point) for c in comps})} shapes: {'PASS' if ok else 'FAIL'} "
            f"(worst {worst.output}: max err {worst.max_abs_err:.2e}, bound {worst.bound:.2e}, "
            f"cosine {worst.cosine:.6f}) in {seconds:.1f} s")
