"""Parity of an ONNX artifact with PyTorch through Polygraphy, and TensorRT against ONNX Runtime where a GPU runs.

PyTorch's fp32 outputs at the verification points (smartedit.graphs.parity) are saved as Polygraphy `RunResults`
(`<graph>.pytorch.json`, with the feeds in `<graph>.inputs.json`), loaded back with Polygraphy's own loader, and
compared with the ONNX file run by Polygraphy's `OnnxrtRunner` (ONNX Runtime's CPU provider, its default graph
optimisations: the session smartedit.engines.onnxruntime opens for an unquantized graph). The tolerance is the
project's bound (parity.Reference.bound) as a per-output absolute tolerance of `SimpleCompareFunc` on the `max`
statistic with rtol 0, so PASS means max |ONNX Runtime - fp32 PyTorch| <= bound, as in the hand-written check; NaN
fails. The cosine comes from Polygraphy's CosineSimilarityCompareFunc, reported, not a criterion (as before).

Quantized graphs (int8 / fp8) are not compared here: their check is the whole-edit PSNR of export/quantize.py, a
metric over finished images that no per-output comparison of one graph expresses.

With the saved files, the same comparison runs from the command line:
    polygraphy run OUT/onnx/<graph>.onnx --onnxrt --load-inputs <graph>.inputs.json \\
        --load-outputs <graph>.pytorch.json --check-error-stat max --atol <output>:<bound> --rtol 0
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smartedit.errors import ArtifactError, UnavailableError
from smartedit.graphs import parity
from smartedit.graphs.spec import GraphSpec

PYTORCH = "pytorch-fp32"  # the runner name of PyTorch's saved outputs
ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"


def _polygraphy():
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its logger's first words (no `colored` module) go
            from polygraphy.logger import G_LOGGER
    except ImportError:
        raise UnavailableError("polygraphy is not installed (pip install -e '.[export]')") from None

    return G_LOGGER


def _feeds(refs: list[parity.Reference]) -> list[OrderedDict]:
    return [OrderedDict((k, v.detach().cpu().numpy()) for k, v in r.inputs.items()) for r in refs]


def save_reference(refs: list[parity.Reference], folder: Path, name: str) -> tuple[Path, Path]:
    """PyTorch's fp32 outputs as Polygraphy RunResults (one iteration per point) and the feeds beside them ->
    (outputs path, inputs path)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    results = RunResults()
    results.add([OrderedDict((k, v.numpy()) for k, v in r.outputs.items()) for r in refs], runner_name=PYTORCH)
    outputs, inputs = Path(folder) / f"{name}.pytorch.json", Path(folder) / f"{name}.inputs.json"
    results.save(str(outputs))
    save_json(_feeds(refs), str(inputs), description="the verification inputs")
    return outputs, inputs


def compare_onnx(path: Path, spec: GraphSpec, ref_model: nn.Module, precision: str,
                 model_at_precision: nn.Module | None, points: list[dict[str, int]], seed: int = 1,
                 folder: Path | None = None) -> list[parity.Comparison]:
    """The ONNX file at `path` in ONNX Runtime (through Polygraphy) against PyTorch's saved outputs at each point,
    with the project's per-output bounds. `folder`: where the RunResults are saved (a temporary folder when None)."""
    g_logger = _polygraphy()
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, RunResults

    refs = parity.references(spec, ref_model, precision, model_at_precision, points, seed)
    runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name=ONNXRUNTIME)
    with g_logger.verbosity(g_logger.CRITICAL):  # its log goes to stdout; the verdicts come back as objects
        with tempfile.TemporaryDirectory() as tmp:
            saved, _ = save_reference(refs, Path(folder or tmp), spec.name)
            reference = RunResults.load(str(saved))[PYTORCH]
        try:
            got = Comparator.run([runner], data_loader=_feeds(refs))
        except Exception as e:  # onnxruntime's pybind errors and PolygraphyException share no useful base
            raise ArtifactError(f"{path}: ONNX Runtime (through Polygraphy) cannot load or run it "
                                f"({str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__})"
                                ) from None
    return _compare(spec, refs, precision, got[ONNXRUNTIME], reference, ONNXRUNTIME, PYTORCH)


def _compare(spec: GraphSpec, refs: list[parity.Reference], precision: str, runs, baseline, name: str,
             base_name: str, scale: float = 1.0) -> list[parity.Comparison]:
    """Per point: Polygraphy's Comparator on (runs[i], baseline[i]) with atol = scale * the parity bound of each
    output, on the max statistic, rtol 0 (a per-point call: the bound depends on the point's outputs)."""
    g_logger = _polygraphy()
    from polygraphy.comparator import Comparator, CosineSimilarityCompareFunc, RunResults, SimpleCompareFunc

    out = []
    for ref, it, base in zip(refs, runs, baseline):
        for t in spec.outputs:
            parity.check_shape(spec, t.name, np.shape(it[t.name]), np.shape(base[t.name]))
        atol = {t.name: scale * ref.bound(t.name, precision) for t in spec.outputs}
        pair = RunResults()
        pair.append((name, [it]))
        pair.append((base_name, [base]))
        simple = SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="max")
        cosine = CosineSimilarityCompareFunc(cosine_similarity_threshold=-1.0)  # reported, not a criterion
        with g_logger.verbosity(g_logger.CRITICAL):
            accuracy = Comparator.compare_accuracy(pair, comparisons=[(0, 1)], compare_func=[simple, cosine])
        stats, cosines = (acc[(name, base_name)][0] for acc in accuracy)
        for t in spec.outputs:
            s = stats[t.name]
            r = torch.as_tensor(np.asarray(base[t.name]))
            out.append(parity.Comparison(
                ref.point, t.name, s.max_absdiff, r.abs().max().item(), ref.torch_err(t.name),
                cosines[t.name].cosine_similarity, atol[t.name], bool(s),
                stats={"comparator": f"polygraphy {name} vs {base_name}", "check_error_stat": "max",
                       "atol": atol[t.name], "rtol": 0.0, "mean_absdiff": s.mean_absdiff,
                       "median_absdiff": s.median_absdiff, "max_reldiff": s.max_reldiff,
                       "mean_reldiff": s.mean_reldiff, "verdict": "PASSED" if bool(s) else "FAILED"}))
    return out


def why_no_tensorrt(target: str) -> str | None:
    """Why Polygraphy's TrtRunner cannot run `target`'s plans here (None: it can)."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and there is none here"
    module = "tensorrt_rtx" if target == "trt-rtx" else "tensorrt"
    try:
        __import__(module)
    except ImportError:
        return f"`{module}` is not installed"
    _polygraphy()
    from polygraphy import config

    if config.USE_TENSORRT_RTX != (target == "trt-rtx"):  # read once, from the environment, at its import
        return ("Polygraphy runs " + ("TensorRT-RTX plans only with POLYGRAPHY_USE_TENSORRT_RTX=1 in the environment"
                                      if target == "trt-rtx" else
                                      "TensorRT-RTX, not TensorRT, with POLYGRAPHY_USE_TENSORRT_RTX set"))
    return None


def compare_tensorrt(plan: Path, onnx_path: Path, profiles: list[GraphSpec], spec: GraphSpec, ref_model: nn.Module,
                     precision: str, model_at_precision: nn.Module | None, points: list[dict[str, int]],
                     seed: int = 1) -> list[parity.Comparison]:
    """A TensorRT plan (Polygraphy's TrtRunner, at each point the first of its `profiles` that holds it, as the
    project's runner picks) against the ONNX file in ONNX Runtime, on the same feeds, with atol twice the parity
    bound (each runtime may lie its bound away from fp32 PyTorch, on either side). Call where why_no_tensorrt is
    None."""
    g_logger = _polygraphy()
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    refs = parity.references(spec, ref_model, precision, model_at_precision, points, seed)
    feeds = _feeds(refs)
    engine = EngineFromBytes(plan.read_bytes())
    ort, trt = [], []
    with g_logger.verbosity(g_logger.CRITICAL):
        try:
            ort = Comparator.run([OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]),
                                               name=ONNXRUNTIME)], data_loader=feeds)[ONNXRUNTIME]
            for ref, feed in zip(refs, feeds):
                idx = next(i for i, p in enumerate(profiles) if p.contains(ref.point))
                run = Comparator.run([TrtRunner(engine, name=TENSORRT, optimization_profile=idx)], data_loader=[feed])
                trt += run[TENSORRT]
        except StopIteration:
            raise ArtifactError(f"{plan}: no profile of the plan holds the verification points {points}") from None
        except Exception as e:
            raise ArtifactError(f"{plan}: TensorRT (through Polygraphy) cannot load or run it "
                                f"({str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__})"
                                ) from None
    return _compare(spec, refs, precision, trt, ort, TENSORRT, ONNXRUNTIME, scale=2.0)


def describe(comps: list[parity.Comparison]) -> list[str]:
    """One line per output in Polygraphy's terms, at the point closest to its tolerance."""
    lines = []
    for name in dict.fromkeys(c.output for c in comps):
        mine = [c for c in comps if c.output == name and c.stats]
        if not mine:
            continue
        c = max(mine, key=lambda c: c.max_abs_err / max(c.bound, 1e-30))
        s = c.stats
        lines.append(f"      {name}: {'PASSED' if all(m.passed for m in mine) else 'FAILED'} | max absdiff "
                     f"{c.max_abs_err:.3g} (atol {s['atol']:.3g}, rtol 0, check_error_stat max), mean absdiff "
                     f"{s['mean_absdiff']:.3g}, median absdiff {s['median_absdiff']:.3g}, max reldiff "
                     f"{s['max_reldiff']:.3g}, cosine {c.cosine:.6f} ({s['comparator']}, worst of {len(mine)} shapes)")
    return lines
