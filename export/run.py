"""`smartedit-export` as a typed function: load, merge the LoRA, export each graph, verify it, record it.

OUT/manifest.json  toolchain versions, the source (checkpoint sha256 or random preset + seed), options, and per graph
                   its spec, profile, files with sha256, and the key of everything that went into it
OUT/onnx/<graph>.onnx (+ .onnx.data for graphs over 2 GB)
OUT/report.json    per graph and shape point: max abs error against fp32 PyTorch, cosine, the bound, pass/fail
OUT/<trt|trt-rtx>/<graph>.plan   TensorRT engines, built from the ONNX files (manifest "engines")
OUT/aoti/<graph>.pt2             AOTInductor packages, compiled from torch.export directly, no ONNX (manifest "aoti",
                                 report "aoti")

A graph whose key (source hash, spec, precision, opset, options, toolchain) and file hashes match the manifest is
skipped on a rerun. Files are moved into place only when complete, and the manifest is rewritten (atomically) after
each graph, so an interrupted export leaves every finished graph valid and nothing half-written that passes for valid.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from smartedit.checkpoint import STAGE_FILES, read_config
from smartedit.config import SmartEditConfig

from .aoti import PACKAGE_VERSION, OnDevice, compile_aoti, load_aoti
from .graphs import graphs, parse_graph_names
from .lora import merge_lora
from .onnx import comparisons_to_dict, export_onnx, verify_against, verify_onnx
from .spec import PRECISIONS, GraphSpec, ProfileOptions
from .trt import BuildOptions, Flavor, build_engine, engine_profiles, import_tensorrt

TARGETS = ("onnx", "trt", "trt-rtx", "aoti")

MANIFEST_VERSION = 1
STAGES_OF = {"llava": ("vision", "llm"), "qformer_bim": ("qformer", "bim"), "unet": ("unet",),
             "vae_encoder": ("vae",), "vae_decoder": ("vae",)}
TOOLCHAIN_PACKAGES = ("smartedit", "torch", "transformers", "diffusers", "peft", "onnx", "onnxscript", "onnxruntime")


class ExportError(RuntimeError):
    pass


def toolchain() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in TOOLCHAIN_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def verification_points(spec: GraphSpec) -> list[dict[str, int]]:
    """opt, and a second point that differs from it in every dim where the range allows (batch 2, a mid size,
    and width != height) to catch shape bugs a single traced shape would hide."""
    opt = spec.point("opt")
    alt: dict[str, int] = {}
    for n, r in spec.dims.items():
        other = {"w8": alt.get("h8"), "w": alt.get("h")}.get(n)  # keep the second point non-square
        prefs = [2] if n == "B" else [(r.min + r.max) // 2]
        prefs += [r.max, r.min] + list(range(r.min, r.max + 1))
        alt[n] = next((v for v in prefs if r.min <= v <= r.max and v != opt[n] and v != other), opt[n])
    return [opt] if alt == opt else [opt, alt]


def run_export(out: str | Path, model: str | Path | None = None, preset: str | None = None, seed: int = 0,
               target: str = "onnx", precision: str = "fp16", graph_names: str | list[str] | None = None,
               opset: int = 18, profile: ProfileOptions | None = None, fold_cfg: bool = False, verify: bool = True,
               build: BuildOptions | None = None, device: str = "cpu",
               progress: Callable[[str], None] = print) -> dict:
    """Export the ONNX graphs, then, for --target trt / trt-rtx, build a TensorRT engine per graph into
    OUT/<target>/<graph>.plan. --target aoti compiles AOTInductor packages for `device` from torch.export instead
    (no ONNX)."""
    if target not in TARGETS:
        raise ExportError(f"target {target!r} is not implemented (available: {', '.join(TARGETS)})")
    if target == "aoti":
        device = _aoti_device(device)
    flavor = None
    if target in ("trt", "trt-rtx"):  # fail before the (long) ONNX export when TensorRT is missing or targets nothing
        flavor = Flavor(import_tensorrt(target), target)
        build = build or BuildOptions()
        flavor.resolve_targets(build.compute_capabilities)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if opset < 18:
        raise ValueError(f"opset must be >= 18 (the dynamo exporter's minimum), got {opset}")
    names = parse_graph_names(graph_names) if not isinstance(graph_names, list) else parse_graph_names(
        ",".join(graph_names))
    profile = profile or ProfileOptions()
    out = Path(out)
    _check_writable(out)
    source, cfg = _describe_source(model, preset, seed, progress)

    graph_defs = graphs(cfg, profile, fold_cfg=fold_cfg)
    manifest_path, report_path = out / "manifest.json", out / "report.json"
    tools = toolchain()
    options = {"precision": precision, "opset": opset, "fold_cfg": fold_cfg, "profile": asdict(profile)}
    manifest = _read_json(manifest_path) or {}
    if manifest.get("source", {}).get("sha256") != source["sha256"]:
        manifest = {}  # another model: nothing in OUT can be reused
    manifest.update({"manifest_version": MANIFEST_VERSION, "toolchain": tools, "source": source})
    manifest.setdefault("graphs", {})
    report = _read_json(report_path) or {}
    report.setdefault("graphs", {})

    keys = {n: _sha256_json({"source": source["sha256"], "spec": graph_defs[n].spec.to_dict(), "options": options,
                             "toolchain": tools}) for n in names}
    if target == "aoti":
        _export_aoti(out, names, graph_defs, source, options, tools, manifest, report, model, preset, seed, cfg,
                     precision, verify, device, progress)
        return manifest
    todo = [n for n in names if not _up_to_date(out, manifest["graphs"].get(n), keys[n])]
    for n in names:
        if n not in todo:
            progress(f"{n}: up to date, skipped")
    if todo:
        _export_onnx(out, todo, graph_defs, keys, options, manifest, report, model, preset, seed, cfg, precision,
                     opset, verify, progress)
    if flavor is not None:
        _build_engines(out, names, graph_defs, manifest, flavor, build, progress)
    return manifest


def _export_onnx(out, todo, graph_defs, keys, options, manifest, report, model, preset, seed, cfg, precision, opset,
                 verify, progress) -> None:
    manifest_path, report_path = out / "manifest.json", out / "report.json"
    pipe = _load(model, preset, seed, cfg, todo, precision, verify)
    if "llava" in todo:
        merged = merge_lora(pipe.stages.llm)
        progress(f"merged the LoRA into {merged} LLaMA projections")

    (out / "onnx").mkdir(parents=True, exist_ok=True)
    failed = []
    for i, n in enumerate(todo, 1):
        g = graph_defs[n]
        wrapper = g.build(pipe).eval()
        at_precision = wrapper if (precision == "fp32" or not verify) else copy.deepcopy(wrapper).to(PRECISIONS[precision])
        progress(f"[{i}/{len(todo)}] {n}: exporting ({precision}, opset {opset}) ...")
        path = out / "onnx" / f"{n}.onnx"
        info = export_onnx(at_precision, g.spec, path, precision, opset)
        files = {f"onnx/{f}": sha256_file(out / "onnx" / f) for f in info["files"]}
        sizes = {f"onnx/{f}": (out / "onnx" / f).stat().st_size for f in info["files"]}
        progress(f"    exported in {info['export_s']:.1f} s, {sum(sizes.values()) / 1e6:.1f} MB")
        entry = {"key": keys[n], "spec": g.spec.to_dict(), "files": files, "bytes": sizes, "options": options,
                 "export_s": info["export_s"], "verified": None}
        if verify:
            t0 = time.perf_counter()
            comps = verify_onnx(path, g.spec, wrapper, precision,
                                at_precision if precision != "fp32" else None, verification_points(g.spec))
            ok = all(c.passed for c in comps)
            entry["verified"] = ok
            report["graphs"][n] = {"passed": ok, "precision": precision, "comparisons": comparisons_to_dict(comps)}
            progress(_check_summary("ONNX Runtime", comps, ok, time.perf_counter() - t0))
            if not ok:
                failed.append(n)
        manifest["graphs"][n] = entry
        _write_json_atomic(manifest_path, manifest)
        _write_json_atomic(report_path, report)
        del wrapper, at_precision
    if failed:
        raise ExportError(f"ONNX Runtime does not match PyTorch for {failed}; see {report_path}")


def _check_summary(what: str, comps, ok: bool, seconds: float) -> str:
    worst = max(comps, key=lambda c: c.max_abs_err / max(c.bound, 1e-30))  # closest to its bound
    return (f"    {what} vs PyTorch at {len({str(c.point) for c in comps})} shapes: {'PASS' if ok else 'FAIL'} "
            f"(worst {worst.output}: max err {worst.max_abs_err:.2e}, bound {worst.bound:.2e}, "
            f"cosine {worst.cosine:.6f}) in {seconds:.1f} s")


def _aoti_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"AOTInductor packages are compiled for cpu or cuda, got --device {device}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU here (a CUDA package is compiled for this machine's GPU)")
    return str(dev)


def aoti_device_record(device: str) -> dict:
    """What a package is bound to: the device type and, for CUDA, the GPU architecture it was compiled for."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"type": dev.type}
    major, minor = torch.cuda.get_device_capability(dev)
    return {"type": "cuda", "name": torch.cuda.get_device_name(dev), "capability": f"{major}.{minor}"}


def _export_aoti(out, names, graph_defs, source, options, tools, manifest, report, model, preset, seed, cfg,
                 precision, verify, device, progress) -> None:
    """One AOTInductor package per graph, skipped when source, spec, options, toolchain and device are unchanged."""
    folder = out / "aoti"
    folder.mkdir(parents=True, exist_ok=True)
    entries = manifest.setdefault("aoti", {})
    report.setdefault("aoti", {})
    where = aoti_device_record(device)
    keys = {n: _sha256_json({"source": source["sha256"], "spec": graph_defs[n].spec.to_dict(), "options": options,
                             "toolchain": tools, "device": where, "package": PACKAGE_VERSION}) for n in names}
    todo = []
    for n in names:
        e = entries.get(n)
        f = out / e["file"] if e else None
        if e and e["key"] == keys[n] and e.get("verified") is not False and f.is_file() \
                and f.stat().st_size == e["bytes"] and sha256_file(f) == e["sha256"]:
            progress(f"{n}: AOTInductor package up to date, skipped")
        else:
            todo.append(n)
    if not todo:
        return
    pipe = _load(model, preset, seed, cfg, todo, precision, verify)
    if "llava" in todo:
        progress(f"merged the LoRA into {merge_lora(pipe.stages.llm)} LLaMA projections")
    failed = []
    for i, n in enumerate(todo, 1):
        g = graph_defs[n]
        wrapper = g.build(pipe).eval()
        if verify and (precision != "fp32" or where["type"] != "cpu"):  # keep the fp32 CPU reference intact
            at_precision = copy.deepcopy(wrapper).to(device=device, dtype=PRECISIONS[precision])
        else:
            at_precision = wrapper.to(device=device)  # loaded at the precision already
        progress(f"[{i}/{len(todo)}] {n}: torch.export + AOTInductor ({precision}, {device}) ...")
        path = folder / f"{n}.pt2"
        info = compile_aoti(at_precision, g.spec, path, precision, device)
        progress(f"    exported in {info['export_s']:.1f} s, compiled in {info['compile_s']:.1f} s, "
                 f"{info['bytes'] / 1e6:.1f} MB")
        entry = {"key": keys[n], "file": f"aoti/{path.name}", "sha256": sha256_file(path), "bytes": info["bytes"],
                 "spec": g.spec.to_dict(), "options": options, "device": where, "torch": torch.__version__,
                 "export_s": info["export_s"], "compile_s": info["compile_s"], "verified": None}
        if verify:
            t0 = time.perf_counter()
            runner = load_aoti(path, device)
            comps = verify_against(lambda x: runner(*(v.to(device) for v in x.values())), g.spec, wrapper,
                                   precision, OnDevice(at_precision, device) if precision != "fp32" else None,
                                   verification_points(g.spec))
            ok = all(c.passed for c in comps)
            entry["verified"] = ok
            report["aoti"][n] = {"passed": ok, "precision": precision, "device": where,
                                 "comparisons": comparisons_to_dict(comps)}
            progress(_check_summary("package", comps, ok, time.perf_counter() - t0))
            if not ok:
                failed.append(n)
            del runner
        entries[n] = entry
        _write_json_atomic(out / "manifest.json", manifest)
        _write_json_atomic(out / "report.json", report)
        del wrapper, at_precision
    if failed:
        raise ExportError(f"the AOTInductor packages do not match PyTorch for {failed}; see {out / 'report.json'}")


def _build_engines(out: Path, names: list[str], graph_defs, manifest: dict, flavor: Flavor, build: BuildOptions,
                   progress) -> None:
    """One plan per graph, skipped when the ONNX file, the profiles, the options and TensorRT are unchanged."""
    folder = out / flavor.target
    folder.mkdir(parents=True, exist_ok=True)
    engines = manifest.setdefault("engines", {}).setdefault(flavor.target, {})
    for i, n in enumerate(names, 1):
        spec = graph_defs[n].spec
        onnx_entry = manifest["graphs"][n]
        key = _sha256_json({"onnx": onnx_entry["files"], "options": asdict(build), "tensorrt": flavor.version,
                            "profiles": [p.to_dict() for _, p in engine_profiles(spec, build)]})
        plan = folder / f"{n}.plan"
        entry = engines.get(n)
        if entry and entry.get("key") == key and plan.is_file() and sha256_file(plan) == entry.get("sha256"):
            progress(f"{n}: {flavor.target} engine up to date, skipped")
            continue
        caps = ",".join(build.compute_capabilities) or "this GPU"
        progress(f"[{i}/{len(names)}] {n}: building the {flavor.target} engine (TensorRT {flavor.version}, "
                 f"{caps}, opt level {build.opt_level}) ...")
        record = build_engine(flavor, out / "onnx" / f"{n}.onnx", spec, plan, build,
                              timing_cache=folder / "timing.cache")
        record.update({"key": key, "file": f"{flavor.target}/{plan.name}", "sha256": sha256_file(plan)})
        engines[n] = record
        _write_json_atomic(out / "manifest.json", manifest)
        progress(f"    built in {record['build_s']:.1f} s (parse {record['parse_s']:.1f} s): "
                 f"{record['plan_bytes'] / 1e6:.1f} MB, profiles {[p['name'] for p in record['profiles']]}")


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to output folder {out}: {e.strerror or e}") from e


def _describe_source(model, preset, seed, progress) -> tuple[dict, SmartEditConfig]:
    if model is not None:
        model = Path(model)
        cfg, meta = read_config(model)
        if preset is not None and SmartEditConfig.from_name(preset).to_dict() | {"name": cfg.name} != cfg.to_dict():
            raise ValueError(f"the checkpoint at {model} (config {cfg.name!r}) does not match preset {preset!r}")
        progress(f"hashing the checkpoint at {model} ...")
        files = ["config.json", "null_text.safetensors"] + [f"{s}.safetensors" for s in STAGE_FILES]
        hashes = {f: sha256_file(model / f) for f in files if (model / f).exists()}
        return {"kind": "checkpoint", "path": str(model.resolve()), "files": hashes,
                "random_weights": bool(meta.get("random_weights")), "sha256": _sha256_json(hashes)}, cfg
    if preset is None:
        raise ValueError("give --model DIR, or --preset NAME --random-weights")
    cfg = SmartEditConfig.from_name(preset)
    src = {"kind": "random", "preset": preset, "seed": seed}
    return src | {"sha256": _sha256_json(src)}, cfg


def _load(model, preset, seed, cfg, todo, precision, verify):
    from smartedit.pipeline import SmartEditPipeline

    only = sorted({s for n in todo for s in STAGES_OF[n]})
    # verification needs the fp32 reference: load fp32 and cast a copy per graph; otherwise load at the precision
    dtype = torch.float32 if verify else PRECISIONS[precision]
    if model is not None:
        return SmartEditPipeline.from_pretrained(model, dtype=dtype, only=only)
    return SmartEditPipeline.from_preset(preset, seed=seed, dtype=dtype, only=only)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _up_to_date(out: Path, entry: dict | None, key: str) -> bool:
    if not entry or entry.get("key") != key or entry.get("verified") is False:
        return False
    for rel, digest in entry.get("files", {}).items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != entry["bytes"][rel] or sha256_file(f) != digest:
            return False
    return True
