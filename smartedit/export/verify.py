"""`smartedit-verify OUT`: check an export folder after the fact, and say plainly what could not be checked.

1. integrity: every file of every entry against its sha256 (a damaged entry is not run: nothing below checks it);
2. parity: given the source model (--model DIR, or --preset P --random-weights), every graph of every target runs on
   the backend of the registry that runs that target (ONNX Runtime, AOTInductor, TensorRT), on this machine where it
   can, and is compared with fp32 PyTorch at the two shapes the export checked, with the export's bound (PyTorch's
   own fp16 error, smartedit.graphs.parity). The ONNX graphs on the CPU go through Polygraphy (onnx_parity: PyTorch's
   outputs saved as its RunResults, its OnnxrtRunner and Comparator, one line per output in its terms); the other
   runners are compared by hand (parity.compare: Polygraphy has no runner for an AOTInductor package, and the
   TensorRT runner's own profile choice is what an edit runs). A quantized graph is judged by its whole-edit PSNR
   report (quantize.verify_quality), a metric over finished images rather than one graph's outputs. A target that
   cannot run here (no GPU, no TensorRT, built for another torch) is listed with the reason, not failed. An entry
   whose check failed at export (verified: false) is reported failed and not run.
3. TensorRT against ONNX Runtime (trt, trt-rtx): each plan in Polygraphy's TrtRunner against its ONNX graph in
   ONNX Runtime on the same inputs, where a GPU and the TensorRT package run; otherwise listed as not run, with why.
Writes OUT/verify.json. Exit status 1 if anything checked failed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from pathlib import Path
from typing import Callable

import torch

from smartedit.arguments import add_model_source, model_source
from smartedit.config import PRECISIONS
from smartedit.engines import registry
from smartedit.errors import (
    ArtifactError,
    InputError,
    RunError,
    UnavailableError,
    run_command,
)
from smartedit.files import write_json
from smartedit.graphs import GRAPH_NAMES, GRAPHS, graph_table, parity
from smartedit.graphs.manifest import Entry, Manifest
from smartedit.graphs.spec import ProfileOptions
from smartedit.pipeline import SmartEditPipeline
from smartedit.weights import ModelSource

from . import onnx_parity
from .aoti import OnDevice
from .quantize import verify_quality
from .run import lock_output
from .triton import repository_problems


def verify_artifacts(out: str | Path, source: ModelSource | None = None,
                     progress: Callable[[str], None] = print) -> dict:
    manifest = Manifest.read(out)
    with lock_output(manifest.root, "smartedit-verify"):  # no export rewrites files while they are checked
        return _verify(manifest, source, progress)


def _verify(manifest: Manifest, source: ModelSource | None, progress: Callable[[str], None]) -> dict:
    out = manifest.root
    result: dict = {"integrity": {}, "parity": {}, "tensorrt_vs_onnxruntime": {}, "not_run": []}
    intact: dict[str, dict[str, Entry]] = {}
    for target, entries in manifest.artifacts.items():
        for g in [n for n in GRAPHS if n in entries]:  # the DeepCache pair too, where exported
            t0 = time.perf_counter()
            foreign = manifest.foreign(entries[g])  # copied in from another export: what it would run is not ours
            bad = [foreign] if foreign else manifest.damaged(entries[g])
            result["integrity"][f"{target}/{g}"] = {"files": len(entries[g].files), "bad": bad}
            progress(f"{target}/{g}: {len(entries[g].files)} files " + ("intact" if not bad else f"DAMAGED: {bad}")
                     + f" ({time.perf_counter() - t0:.1f} s)")
            if not bad:
                intact.setdefault(target, {})[g] = entries[g]
        absent = [g for g in GRAPH_NAMES if g not in entries]
        if absent:  # a deleted entry, or a partial export (--graphs): either way no edit can run on this target
            result["integrity"][f"{target} graphs"] = {"files": 0, "bad": [f"no manifest entry for {g}"
                                                                           for g in absent]}
            progress(f"{target}: INCOMPLETE: no manifest entry for {', '.join(absent)} (an edit needs all of "
                     f"{', '.join(GRAPH_NAMES)})")
    for name in manifest.repositories:  # what a server loads: every file as recorded, and the graphs verified here
        t0 = time.perf_counter()
        bad = repository_problems(manifest, name)
        result["integrity"][f"{name} repository"] = {"files": len(manifest.repositories[name]["files"]), "bad": bad}
        progress(f"{name} repository: {len(manifest.repositories[name]['files'])} files "
                 + ("intact, serving the graphs above" if not bad else f"DAMAGED: {bad[:4]}")
                 + f" ({time.perf_counter() - t0:.1f} s)")
    for target, entries in intact.items():  # failed at export: reported failed, with or without a source
        for g, e in entries.items():
            if e.refused():
                result["parity"].setdefault(target, {})[g] = {"passed": False, "error": e.refused()}
                progress(f"{target}/{g}: FAILED: {e.refused()}")
    if source is None:
        result["not_run"].append("parity with PyTorch: no source model given (--model DIR or --preset P "
                                 "--random-weights)")
    else:
        reason = source.mismatch(manifest.source)
        if reason:
            raise InputError(reason)
        reference = _Reference(source, progress)
        for target, entries in intact.items():
            _verify_target(manifest, target, entries, source, reference, result, progress)
            if target in TENSORRT_TARGETS:
                _tensorrt_vs_onnxruntime(manifest, target, entries, intact.get("onnx", {}), reference, result,
                                         progress)
    write_json(out / "verify.json", result)
    return result


class _Reference:
    """The source model in fp32 with its LoRA merged, loaded once, when a target first needs it."""

    def __init__(self, source: ModelSource, progress):
        self.source, self.progress, self._pipe = source, progress, None

    def modules(self, e: Entry, device: str):
        """(the fp32 graph module, the same at the entry's precision on `device`, or None for fp32)."""
        if self._pipe is None:
            from .lora import merge_lora

            self.progress(f"loading the source model ({self.source}) as the fp32 reference ...")
            self._pipe = SmartEditPipeline.from_weights(self.source.load())
            merge_lora(self._pipe.stages.llm)
        pipe, opts = self._pipe, e.options
        g = graph_table(pipe.config, ProfileOptions(**opts["profile"]), fold_cfg=opts.get("fold_cfg", False),
                        cache_branch=opts.get("cache_branch"))[e.graph]
        ref = g.module(pipe.stages, pipe.null_text_embeds).eval()
        if e.precision == "fp32":
            return ref, None
        at = copy.deepcopy(ref).to(device=device, dtype=PRECISIONS[e.precision].dtype)
        return ref, (at if device == "cpu" else OnDevice(at, device))


def _verify_target(manifest: Manifest, target: str, entries: dict[str, Entry], source: ModelSource,
                   reference: _Reference, result: dict, progress) -> None:
    out = manifest.root
    refused = [g for g, e in entries.items() if e.refused()]
    if refused:  # reported failed by _verify; no runner opens the target
        rest = [g for g in entries if g not in refused]
        if rest:
            result["not_run"].append(f"{target} ({', '.join(rest)}) vs PyTorch: no runner opens a target holding an "
                                     f"entry that failed its check at export ({', '.join(refused)})")
        return
    backend = next((b for b in registry.BACKENDS.values() if b.target == target), None)
    if backend is None:
        result["not_run"].append(f"{target}: no backend runs this target")
        return
    wanted = {e.requires.get("device", {}).get("type") for e in entries.values()} - {None}
    device = wanted.pop() if len(wanted) == 1 else ("cpu" if "cpu" in backend.devices else "cuda")
    why = registry.why_not(backend.name, device, out)
    runner = None
    if why is None:
        try:
            runner = registry.load(backend.name, source, device, torch.float32, out).runner
        except (ArtifactError, UnavailableError) as e:  # built for another torch / GPU / TensorRT
            why = str(e)
    if runner is None:
        result["not_run"].append(f"{target} ({', '.join(entries)}) vs PyTorch: {why}")
        return
    for g, e in entries.items():
        if PRECISIONS[e.precision].quantized:  # judged by its quality report, not by fp16's bound
            _verify_quantized(out, target, g, e, source, result, progress)
            continue
        ref, at = reference.modules(e, device)
        points = parity.verification_points(e.spec)
        progress(f"{target}/{g}: {backend.name} on {device} vs PyTorch at {len(points)} shapes ...")
        t0 = time.perf_counter()
        if backend.name == "onnxruntime" and device == "cpu":
            compare = functools.partial(onnx_parity.compare_onnx, manifest.file(f"onnx/{g}.onnx"))
        else:
            compare = functools.partial(parity.compare, lambda x: list(
                runner.run(g, {k: v.to(device) for k, v in x.items()}).values()))
        try:
            comps = compare(e.spec, ref, e.precision, at, points)
        except ArtifactError as err:  # a file that passed its hash but does not load: a failure, not "not run"
            result["parity"].setdefault(target, {})[g] = {"passed": False, "backend": backend.name, "error": str(err)}
            progress(f"{target}/{g}: FAILED to load: {err}")
            continue
        ok = all(c.passed for c in comps)
        result["parity"].setdefault(target, {})[g] = {"passed": ok, "backend": backend.name, "device": device,
                                                      "comparisons": parity.as_dicts(comps)}
        progress(parity.summary(f"{target}/{g} {backend.name}", comps, time.perf_counter() - t0))
        for line in onnx_parity.describe(comps):
            progress(line)


TENSORRT_TARGETS = ("trt", "trt-rtx")


def _tensorrt_vs_onnxruntime(manifest: Manifest, target: str, entries: dict[str, Entry], onnx: dict[str, Entry],
                             reference: _Reference, result: dict, progress) -> None:
    """Each plan against its intact ONNX graph, both run by Polygraphy, where TensorRT and a GPU run here."""
    plain = [g for g, e in entries.items() if not e.refused() and not e.options.get("quantization") and g in onnx]
    stripped = [g for g in plain if entries[g].options.get("strip_weights")]
    if stripped:  # Polygraphy's EngineFromBytes runs a plan as it is; the project's runner refits these at load
        result["not_run"].append(f"{target} ({', '.join(stripped)}) vs ONNX Runtime through Polygraphy: "
                                 "weight-stripped plans (--strip-weights) run only refitted, by the trt backend")
        plain = [g for g in plain if g not in stripped]
    if not plain:
        return
    why = onnx_parity.why_no_tensorrt(target)
    if why is not None:
        result["not_run"].append(f"{target} ({', '.join(plain)}) vs ONNX Runtime through Polygraphy: {why}")
        return
    for g in plain:
        e = entries[g]
        ref, at = reference.modules(e, "cpu")
        points = parity.verification_points(e.spec)
        progress(f"{target}/{g}: Polygraphy's TrtRunner vs its OnnxrtRunner at {len(points)} shapes ...")
        t0 = time.perf_counter()
        try:
            comps = onnx_parity.compare_tensorrt(manifest.file(f"{target}/{g}.plan"), manifest.file(f"onnx/{g}.onnx"),
                                                 e.profile_specs(), e.spec, ref, e.precision, at, points)
        except ArtifactError as err:
            result["tensorrt_vs_onnxruntime"].setdefault(target, {})[g] = {"passed": False, "error": str(err)}
            progress(f"{target}/{g}: FAILED: {err}")
            continue
        ok = all(c.passed for c in comps)
        result["tensorrt_vs_onnxruntime"].setdefault(target, {})[g] = {"passed": ok,
                                                                       "comparisons": parity.as_dicts(comps)}
        progress(parity.summary(f"{target}/{g} TensorRT", comps, time.perf_counter() - t0, "ONNX Runtime"))
        for line in onnx_parity.describe(comps):
            progress(line)


def _verify_quantized(out: Path, target: str, g: str, e: Entry, source: ModelSource, result: dict,
                      progress) -> None:
    if target != "onnx":
        result["not_run"].append(f"{target}/{g} ({e.precision}) vs the fp16 graph: built from the quantized "
                                 f"onnx/{g}.onnx, "
                                 "whose quality report smartedit-verify runs in ONNX Runtime")
        return
    progress(f"{target}/{g}: {e.precision} quality report again (its edits against the fp16 graph's) ...")
    report = verify_quality(out, source, e, progress)
    result["parity"].setdefault(target, {})[g] = {"passed": report["passed"], "backend": "onnxruntime",
                                                  "quantization": report}
    progress(f"    {target}/{g}: worst PSNR {report['worst_psnr_db']} dB (--min-psnr {report['min_psnr_db']:g}): "
             + ("PASS" if report["passed"] else "FAIL"))


def failed(result: dict) -> list[str]:
    bad = [f"integrity of {k} ({'; '.join(r['bad'])})" for k, r in result["integrity"].items() if r["bad"]]
    bad += [f"{t}/{g}" for t, rs in result["parity"].items() for g, r in rs.items() if not r["passed"]]
    bad += [f"{t}/{g} vs onnx" for t, rs in result["tensorrt_vs_onnxruntime"].items() for g, r in rs.items()
            if not r["passed"]]
    return bad


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="smartedit-verify", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Checks that cannot run here (no TensorRT, no GPU) are listed as not run.")
    p.add_argument("out", help="smartedit-export output folder")
    add_model_source(p, required=False, what=": the source the artifacts came from (for the parity check)")
    a = p.parse_args(argv)
    source = model_source(p, a)

    def body() -> None:
        result = verify_artifacts(a.out, source)
        for line in result["not_run"]:
            print(f"not run: {line}")
        bad = failed(result)
        if bad:
            raise RunError(f"FAILED: {', '.join(bad)}")
        print("all checks that could run passed")

    run_command("smartedit-verify", body)
