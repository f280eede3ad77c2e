"""`smartedit-export` as a typed function: describe the source, open the manifest, run the target's producer.

OUT/manifest.json  the schema of smartedit/graphs/manifest.py: the source (checkpoint hashes or random preset +
                   seed), toolchain versions, and per target and graph one entry (spec, options, files with sha256,
                   what a runtime must match, profiles, whether it was verified)
OUT/report.json    per target, graph and shape point: error against fp32 PyTorch, cosine, the bound, pass/fail
OUT/onnx/<graph>.onnx (+ .onnx.data over 2 GB)   OUT/<trt|trt-rtx>/<graph>.plan   OUT/aoti/<graph>.pt2

A graph whose key (source hash, spec, options, toolchain, and the target's own inputs) and file hashes match its
entry is skipped on a rerun. An entry leaves the manifest before its file is replaced and comes back when the new
file is complete, and the manifest is rewritten (atomically) after each graph: an interrupted export leaves every
finished graph valid and nothing half-written that passes for valid.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Callable

from smartedit.config import SmartEditConfig
from smartedit.errors import InputError
from smartedit.graphs import graph_table, parse_graph_names
from smartedit.graphs.manifest import Manifest
from smartedit.graphs.spec import EXPORT_PRECISIONS, ProfileOptions
from smartedit.pipeline import ModelSource

from . import targets
from .job import ExportJob

TOOLCHAIN_PACKAGES = ("smartedit", "torch", "transformers", "diffusers", "peft", "onnx", "onnxscript", "onnxruntime")


def toolchain() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in TOOLCHAIN_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def run_export(out: str | Path, model: str | Path | None = None, preset: str | None = None, seed: int = 0,
               target: str = "onnx", precision: str = "fp16", graph_names: str | list[str] | None = None,
               opset: int = 18, profile: ProfileOptions | None = None, fold_cfg: bool = False, verify: bool = True,
               build=None, device: str = "cpu", triton_stages: str = "onnx",
               progress: Callable[[str], None] = print) -> Manifest:
    """Export the graphs of `model` (a converted folder) or `preset` (random weights, `seed`) for `target` into
    `out`; see targets.TARGETS. Argument problems are refused before any model is loaded."""
    t = targets.get(target)
    if precision not in EXPORT_PRECISIONS:
        raise InputError(f"precision must be one of {list(EXPORT_PRECISIONS)}, got {precision!r}")
    if opset < 18:
        raise InputError(f"opset must be >= 18 (the dynamo exporter's minimum), got {opset}")
    source = ModelSource(model=model) if model is not None else ModelSource(preset=preset, seed=seed)
    cfg = source.config()
    if model is not None and preset is not None:  # a checkpoint named with the preset it should be
        if SmartEditConfig.from_name(preset).to_dict() | {"name": cfg.name} != cfg.to_dict():
            raise InputError(f"the checkpoint at {model} (config {cfg.name!r}) does not match preset {preset!r}")
    names = parse_graph_names(graph_names)
    profile = profile or ProfileOptions()
    build = t.check(target, build, device)  # e.g. TensorRT missing, no GPU to compile for: before any work
    out = Path(out)
    _check_writable(out)
    recorded = source.describe(progress)
    tools = toolchain()
    try:
        manifest = Manifest.read(out)
        if manifest.source.get("sha256") != recorded["sha256"]:
            manifest = Manifest(out, recorded, tools)  # another model: nothing in OUT can be reused
    except InputError:  # no manifest yet (or one this version cannot read): start afresh
        manifest = Manifest(out, recorded, tools)
    manifest.source, manifest.toolchain = recorded, tools
    report = _read_report(out)
    job = ExportJob(target=target, out=out, source=source, cfg=cfg,
                            graphs=graph_table(cfg, profile, fold_cfg=fold_cfg), names=names, manifest=manifest,
                            report=report, precision=precision, opset=opset, profile=profile, fold_cfg=fold_cfg,
                            verify=verify, progress=progress, build=build, device=device, triton_stages=triton_stages)
    t.produce(job)
    return manifest


def _read_report(out: Path) -> dict:
    import json

    try:
        report = json.loads((out / "report.json").read_text())
        return report if isinstance(report, dict) else {}
    except (OSError, ValueError):
        return {}


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to output folder {out}: {e.strerror or e}") from e
