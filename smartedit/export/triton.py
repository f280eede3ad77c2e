"""`--target triton`: a Triton Inference Server model repository for NVIDIA's container, built on the serving
contract of smartedit/serve/repository.py (the `smartedit` model, its request and config, the repository check).

Two repositories, one model implementation (smartedit/serve/model.py, a Python-backend model that runs the whole
edit: tokenizer, sampler and guidance in PyTorch, the graphs on a GraphRunner):

  smartedit-serve (local)      one model `smartedit`; its graphs run in-process on a backend of the registry
  --target triton (container)  `smartedit` runs its graphs through BLS calls to one graph model per graph:
                                 --graph-models onnx  Triton's onnxruntime backend on OUT/onnx  (the default)
                                 --graph-models trt   Triton's tensorrt_plan backend on OUT/trt (built with the
                                                       container's TensorRT, on its GPU)
                                 --graph-models python  Python-backend graph models running the ONNX files in
                                                       ONNX Runtime: what the bundled server of this project can
                                                       serve (it has the Python backend only); for testing

Stage files are hard-linked from the export's
own graph files (copied where links cannot be made), never rewritten; what the orchestrator needs of a checkpoint
(config, tokenizer, null-text embedding) is copied, never linked, so nothing done to the repository reaches the
user's model folder.

What is served is what was exported: every file of OUT/triton is recorded with its sha256 in the manifest
(`repositories.triton`, which smartedit-verify checks), the `smartedit` model's settings list the sha256 of every
other file of the repository, and its initialize() refuses to serve when one differs or an unrecorded file is there;
a Python graph model checks its own graph files before ONNX Runtime opens them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smartedit.config import PRECISIONS
from smartedit.errors import ArtifactError, ExportError, InputError
from smartedit.files import sha256_file, staged
from smartedit.serve.repository import (
    GRAPH_MODEL_KINDS,
    MODEL,
    model_config_pb,
    orchestrator_config,
    repository_files,
    unrecorded,
    version_dir,
    write_config,
)
from smartedit.serve.settings import ServeSettings
from smartedit.graphs import GRAPH_NAMES
from smartedit.graphs.manifest import Entry, Manifest
from smartedit.graphs.spec import GraphSpec, parse_dim
from smartedit.weights import ModelSource

from . import onnx
from .job import ExportJob, Target, TargetOptions

_TRITON_DTYPE = {"float16": "TYPE_FP16", "float32": "TYPE_FP32", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64"}
def _dims(t, spec: GraphSpec) -> list[int]:
    return [-1 if parse_dim(d)[1] is not None else int(d) for d in t.shape]


def served_name(graph: str, rel: str) -> str:
    """The name of an entry's file in its graph model's version folder: the graph itself is model.onnx / model.plan;
    its other files (external data, which the .onnx names; a quantized unet's fp16 source) keep their names."""
    name = Path(rel).name
    return {f"{graph}.onnx": "model.onnx", f"{graph}.plan": "model.plan"}.get(name, name)


def graph_model_config(entry: Entry, kind: str, profile: int | None = None, files: dict[str, str] | None = None):
    """One graph as a Triton model: its inputs and outputs from the spec (named dims -1: dynamic), batch dims
    explicit (max_batch_size 0: the unet's 3B is not a plain batch). A Python graph model also gets the spec (it
    refuses shapes outside the profile before any work) and `files`, its version folder's {name: sha256}."""
    mc, _ = model_config_pb()
    spec = entry.spec
    basic = PRECISIONS[entry.precision].onnxruntime_basic  # ONNX Runtime: optimisations up to BASIC
    if kind == "onnx":
        c = mc.ModelConfig(name=spec.name, backend="onnxruntime", max_batch_size=0)
        if basic:
            c.optimization.graph.level = -1  # the onnxruntime backend's BASIC
    elif kind == "trt":
        c = mc.ModelConfig(name=spec.name, platform="tensorrt_plan", max_batch_size=0)
    else:
        c = mc.ModelConfig(name=spec.name, backend="python", max_batch_size=0)
        c.parameters["spec"].string_value = json.dumps(spec.to_dict(), sort_keys=True)
        c.parameters["precision"].string_value = entry.precision
        c.parameters["files"].string_value = json.dumps(files or {}, sort_keys=True)
    for tensors, add in ((spec.inputs, c.input.add), (spec.outputs, c.output.add)):
        for t in tensors:
            dtype = str(t.torch_dtype(entry.precision)).removeprefix("torch.")
            add(name=t.name, data_type=mc.DataType.Value(_TRITON_DTYPE[dtype]), dims=_dims(t, spec))
    group = c.instance_group.add(count=1, kind=mc.ModelInstanceGroup.Kind.Value(
        "KIND_CPU" if kind == "python" else "KIND_GPU"))
    if profile is not None:  # TensorRT: the engine's dynamic profile (the last); Triton does not pick by shape
        group.profile.append(str(profile))
    return c


def _link(src: Path, dst: Path) -> None:
    """A graph file of the export into the repository: a hard link (both are this export's outputs), or a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, dst)


def _copy_model_folder(source_model: Path, dst: Path) -> None:
    """What the orchestrator needs of a converted checkpoint: config, tokenizer, null-text embedding (no weights).
    Copied, contents only (never links, never the source's modes): the user's folder stays as it was."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "null_text.safetensors"):
        shutil.copyfile(source_model / name, dst / name)
    shutil.copytree(source_model / "tokenizer", dst / "tokenizer", copy_function=shutil.copyfile, symlinks=False)


def write_container_repository(manifest: Manifest, repo: Path, graph_models: str, max_batch: int,
                               queue_delay_ms: float, device: str) -> Path:
    """OUT/triton: a graph model per graph (from the export's entries) and the BLS-orchestrating `smartedit`, every
    file recorded in the manifest (repositories.triton) and its sha256 in the orchestrator's settings."""
    if graph_models not in GRAPH_MODEL_KINDS:
        raise InputError(f"--graph-models must be one of {list(GRAPH_MODEL_KINDS)}, got {graph_models!r}")
    target = {"onnx": "onnx", "python": "onnx", "trt": "trt"}[graph_models]
    entries = manifest.entries(target)
    missing = [g for g in GRAPH_NAMES if g not in entries]
    if missing:
        raise ExportError(f"the {target} export lacks {missing}: export every graph first")
    refused = [e.refused() for e in entries.values() if e.refused()]
    if refused:  # a graph the export found wrong is not served
        raise ArtifactError(f"{manifest.root}: {refused[0]}")
    if manifest.repositories.pop("triton", None) is not None:  # the record goes before the files are replaced
        manifest.write()
    with staged(repo, folder=True) as tmp:
        known: dict[str, dict[str, Any]] = {}  # repository path -> its entry's file record (not hashed again)
        for graph, e in entries.items():
            model_dir = tmp / graph
            version = model_dir / "1"
            graph_model_files = {}
            for rel in e.files:
                src = manifest.file(rel)
                name = served_name(graph, rel)
                _link(src, version / name)  # external data keeps its name: the .onnx refers to it by name
                known[f"{graph}/1/{name}"] = e.files[rel]
                graph_model_files[name] = e.files[rel]["sha256"]
            if graph_models == "python":
                version_dir(model_dir, "smartedit.serve.graph_model", f"the {graph} graph in ONNX Runtime")
            profile = len(e.profiles) - 1 if graph_models == "trt" and e.profiles else None
            write_config(model_dir, graph_model_config(e, graph_models, profile, graph_model_files))
        src = manifest.source
        if src.get("kind") == "checkpoint":
            _copy_model_folder(Path(src["path"]), tmp / MODEL / "1" / "model")
            source = ModelSource(model=Path("model"))  # relative to the model's version folder
        else:
            source = ModelSource(preset=src["preset"], seed=src["seed"])
        version_dir(tmp / MODEL, "smartedit.serve.model", "the whole SmartEdit edit, graphs through BLS")
        record = {rel: known.get(rel) or {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size}
                  for rel in repository_files(tmp)}
        settings = ServeSettings(
            source, "bls", backend=None, device=device, dtype="fp32",
            graphs={g: {"spec": e.spec.to_dict(), "precision": e.precision, "fold_cfg": e.fold_cfg,
                        **({"cache_branch": e.options["cache_branch"]} if "cache_branch" in e.options else {})}
                    for g, e in entries.items()},
            max_batch=min([max_batch] + [e.spec.dims["B"].max for e in entries.values()]),
            files={rel: meta["sha256"] for rel, meta in record.items()})
        write_config(tmp / MODEL, orchestrator_config(settings, settings.max_batch, queue_delay_ms, 1,
                                                       gpu=device.startswith("cuda")))
        own = f"{MODEL}/config.pbtxt"
        record[own] = {"sha256": sha256_file(tmp / own), "bytes": (tmp / own).stat().st_size}
    prefix = Path(repo).resolve().relative_to(manifest.root.resolve())  # OUT/triton -> "triton"
    manifest.repositories["triton"] = {"source": manifest.source["sha256"], "graph_models": graph_models,
                                       "files": {str(prefix / rel): meta for rel, meta in sorted(record.items())}}
    manifest.write()
    return repo


def repository_problems(manifest: Manifest, name: str = "triton", hashes: bool = True) -> list[str]:
    """Why the recorded repository `name` would not serve what the export verified (empty: it would): files missing
    or changed, files the record does not list, a record from another source, stage files that are not the current
    graph files of the target it was built from."""
    repo = manifest.repositories[name]
    files = repo["files"]
    bad = [f"{rel}: missing or changed" for rel in manifest.damaged_files(files, hashes)]
    bad += [f"{name}/{rel}: not written by the export" for rel in unrecorded(manifest.root / name,
                                                                             [r.split("/", 1)[1] for r in files])]
    if repo.get("source") != manifest.source.get("sha256"):
        bad.append(f"{name}: recorded from another source than this folder's")
    target = {"onnx": "onnx", "python": "onnx", "trt": "trt"}.get(repo.get("graph_models"), "?")
    for graph, e in manifest.entries(target).items():
        for rel, meta in e.files.items():
            served = f"{name}/{graph}/1/{served_name(graph, rel)}"
            if files.get(served, {}).get("sha256") != meta["sha256"]:
                bad.append(f"{served}: not the current {rel} (re-run smartedit-export --target triton)")
    return bad


@dataclass(frozen=True)
class TritonOptions(TargetOptions):
    FLAGS = {
        "--graph-models": dict(dest="graph_models", choices=list(GRAPH_MODEL_KINDS), default="onnx",
                               help="triton: what the graph models run on: Triton's onnxruntime backend, its "
                                    "tensorrt_plan (OUT/trt, built with the container's TensorRT), or Python models "
                                    "running ONNX Runtime (what smartedit's bundled server can run)"),
        "--device": dict(dest="device", default="cpu",
                         help="triton: the device of the orchestrating model's PyTorch work"),
    }

    graph_models: str = "onnx"
    device: str = "cpu"


def produce(job: ExportJob) -> None:
    """The ONNX graphs (exported or reused; --graph-models trt needs OUT/trt built first), then OUT/triton."""
    model_config_pb()  # tritonclient present: before the export work
    graph_models, device = job.target_options.graph_models, job.target_options.device
    if graph_models != "trt":
        onnx.produce(job)
    repo = job.out / "triton"
    job.progress(f"writing the Triton model repository {repo} ({graph_models} graph models) ...")
    write_container_repository(job.manifest, repo, graph_models, job.profile.max_batch, 5.0, device)
    job.progress(f"    {repo}: {', '.join(sorted(p.name for p in repo.iterdir()))}")


TARGET = Target("triton", "a Triton Inference Server model repository (graph models + the BLS-orchestrating "
                "`smartedit` Python model) in OUT/triton", produce, TritonOptions,
                side_files=("smartedit",), whole_folder=True, runtime="NVIDIA Triton Inference Server (tritonserver, or smartedit-serve for --graph-models python)")
