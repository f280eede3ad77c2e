"""`smartedit-verify OUT`: check an export folder after the fact, and say plainly what could not be checked.

1. integrity: every file in the manifest against its sha256;
2. ONNX vs PyTorch in ONNX Runtime (when the source model is given: --model DIR or --preset P --random-weights);
3. each AOTInductor package vs PyTorch (same source), where this torch and device can load it;
4. each TensorRT engine vs ONNX Runtime at the opt shape of every engine profile, where TensorRT and a GPU are
   present (fp16 engines against fp16 ONNX: cosine >= 0.999 and max error <= 2% of the output's scale, the
   Polygraphy-style distance check, since the two differ only in kernels and accumulation order).
Writes OUT/verify.json. Exit status 1 if anything checked failed; checks that could not run are listed, not failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from .graphs import GRAPH_NAMES, graphs
from .onnx import comparisons_to_dict, run_onnxruntime, verify_onnx
from .run import _write_json_atomic, sha256_file, verification_points
from .spec import GraphSpec, ProfileOptions


def verify_artifacts(out: str | Path, model: str | Path | None = None, preset: str | None = None, seed: int = 0,
                     progress: Callable[[str], None] = print) -> dict:
    out = Path(out)
    path = out / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out} is not an smartedit-export output folder")
    manifest = json.loads(path.read_text())
    result: dict = {"integrity": {}, "onnx": {}, "engines": {}, "not_run": []}

    aoti = manifest.get("aoti", {})
    for g in [n for n in GRAPH_NAMES if n in manifest.get("graphs", {}) or n in aoti]:
        files = dict(manifest.get("graphs", {}).get(g, {}).get("files", {}))
        for target, engines in manifest.get("engines", {}).items():
            if g in engines:
                files[engines[g]["file"]] = engines[g]["sha256"]
        if g in aoti:
            files[aoti[g]["file"]] = aoti[g]["sha256"]
        bad = [rel for rel, digest in files.items() if not (out / rel).is_file() or sha256_file(out / rel) != digest]
        result["integrity"][g] = {"files": len(files), "bad": bad}
        progress(f"{g}: {len(files)} files " + ("intact" if not bad else f"DAMAGED: {bad}"))

    if model is None and preset is None:
        result["not_run"].append("ONNX / AOTInductor vs PyTorch: no source model given (--model DIR or --preset P "
                                 "--random-weights)")
    else:
        from smartedit.export.lora import merge_lora
        from smartedit.pipeline import SmartEditPipeline

        pipe = (SmartEditPipeline.from_pretrained(model) if model else SmartEditPipeline.from_preset(preset, seed=seed))
        merge_lora(pipe.stages.llm)
        for g, e in manifest.get("graphs", {}).items():
            spec = GraphSpec.from_dict(e["spec"])
            opts = e["options"]
            wrapper = graphs(pipe.config, ProfileOptions(**opts["profile"]), fold_cfg=opts["fold_cfg"])[g].build(pipe)
            prec = opts["precision"]
            at = wrapper if prec == "fp32" else copy.deepcopy(wrapper).half()
            comps = verify_onnx(out / "onnx" / f"{g}.onnx", spec, wrapper, prec, at if prec != "fp32" else None,
                                verification_points(spec))
            ok = all(c.passed for c in comps)
            result["onnx"][g] = {"passed": ok, "comparisons": comparisons_to_dict(comps)}
            progress(f"{g}: ONNX Runtime vs PyTorch {'PASS' if ok else 'FAIL'}")
        _verify_aoti(out, aoti, pipe, result, progress)

    for target, engines in manifest.get("engines", {}).items():
        reason = _why_engines_cannot_run(target)
        if reason:
            result["not_run"].append(f"{target} engines ({', '.join(engines)}): {reason}")
            progress(f"{target} engines: NOT RUN: {reason}")
            continue
        from smartedit.engines.trt import TensorRTBackend

        backend = TensorRTBackend(out, target=target, cuda_graphs=False)
        for g, e in engines.items():
            spec = GraphSpec.from_dict(manifest["graphs"][g]["spec"])
            checks = []
            for prof in e["profiles"]:
                point = {k: v["opt"] for k, v in prof["dims"].items()}
                x = spec.sample_inputs(point, manifest["graphs"][g]["options"]["precision"], seed=2)
                ref = run_onnxruntime(out / "onnx" / f"{g}.onnx", x)
                got = backend.run(g, {k: v.cuda() for k, v in x.items()})
                for t, r in zip(spec.outputs, ref):
                    o, r = got[t.name].float().cpu(), r.float()
                    err, scale = (o - r).abs().max().item(), r.abs().max().item()
                    cos = torch.nn.functional.cosine_similarity(o.flatten(), r.flatten(), dim=0).item()
                    checks.append({"profile": prof["name"], "output": t.name, "max_abs_err": err, "scale": scale,
                                   "cosine": cos, "passed": cos >= 0.999 and err <= 0.02 * max(scale, 1e-6)})
            ok = all(c["passed"] for c in checks)
            result["engines"].setdefault(target, {})[g] = {"passed": ok, "checks": checks}
            progress(f"{g}: {target} engine vs ONNX Runtime {'PASS' if ok else 'FAIL'}")
    _write_json_atomic(out / "verify.json", result)
    return result


def _verify_aoti(out: Path, entries: dict, pipe, result: dict, progress) -> None:
    """Each AOTInductor package against PyTorch at its verification points, where it can load (same torch, and a
    GPU of the architecture it was compiled for when it is a CUDA package)."""
    from .aoti import OnDevice, load_aoti
    from .onnx import verify_against
    from .run import aoti_device_record

    result["aoti"] = {}
    for g, e in entries.items():
        where = e["device"]
        device = where["type"]
        if e["torch"] != torch.__version__:
            reason = f"compiled with torch {e['torch']}, this is torch {torch.__version__}"
        elif device == "cuda" and not torch.cuda.is_available():
            reason = "a CUDA package and no CUDA GPU here"
        elif device == "cuda" and aoti_device_record("cuda")["capability"] != where["capability"]:
            reason = f"compiled for compute capability {where['capability']}, this GPU is another"
        else:
            reason = None
        if reason:
            result["not_run"].append(f"aoti {g} vs PyTorch: {reason}")
            progress(f"{g}: AOTInductor package NOT RUN: {reason}")
            continue
        spec = GraphSpec.from_dict(e["spec"])
        opts = e["options"]
        wrapper = graphs(pipe.config, ProfileOptions(**opts["profile"]), fold_cfg=opts["fold_cfg"])[g].build(pipe)
        prec = opts["precision"]
        at = None if prec == "fp32" else OnDevice(copy.deepcopy(wrapper).to(device=device, dtype=torch.float16), device)
        runner = load_aoti(out / e["file"], device)
        comps = verify_against(lambda x: runner(*(v.to(device) for v in x.values())), spec, wrapper, prec, at,
                               verification_points(spec))
        ok = all(c.passed for c in comps)
        result["aoti"][g] = {"passed": ok, "comparisons": comparisons_to_dict(comps)}
        progress(f"{g}: AOTInductor package vs PyTorch {'PASS' if ok else 'FAIL'}")


def _why_engines_cannot_run(target: str) -> str | None:
    from smartedit.export.trt import TARGET_MODULES

    try:
        __import__(TARGET_MODULES[target])
    except ImportError:
        return f"`{TARGET_MODULES[target]}` is not installed here"
    if not torch.cuda.is_available():
        return "no CUDA GPU here (TensorRT engines run on a GPU only)"
    return None


def failed(result: dict) -> list[str]:
    bad = [f"integrity of {g}" for g, r in result["integrity"].items() if r["bad"]]
    bad += [f"onnx {g}" for g, r in result["onnx"].items() if not r["passed"]]
    bad += [f"aoti {g}" for g, r in result.get("aoti", {}).items() if not r["passed"]]
    bad += [f"{t} {g}" for t, rs in result["engines"].items() for g, r in rs.items() if not r["passed"]]
    return bad


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="smartedit-verify", description=__doc__.split("\n")[0],
                                epilog="Checks that cannot run here (no TensorRT, no GPU) are listed as not run.")
    p.add_argument("out", help="smartedit-export output folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="the converted checkpoint the artifacts came from")
    src.add_argument("--preset", choices=["tiny", "7b", "13b"], help="the random-weight preset they came from")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.preset and not a.random_weights:
        p.error("--preset builds random weights: add --random-weights")
    try:
        result = verify_artifacts(a.out, a.model, a.preset, a.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"smartedit-verify: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for line in result["not_run"]:
        print(f"not run: {line}")
    bad = failed(result)
    if bad:
        print(f"FAILED: {', '.join(bad)}", file=sys.stderr)
        raise SystemExit(1)
    print("all checks that could run passed")
