"""Every backend an edit can run on, in one table: its name, what it is, where it can run, and how to load it.

The edit CLI, the benchmark, smartedit-verify and the server find backends here and nowhere else (through
SmartEditPipeline.on_backend). A backend is one file in this package holding its runner (a
smartedit.graphs.GraphRunner) and its `Backend` entry (backend.py); adding one is that file and one line in BACKENDS.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smartedit.errors import InputError, UnavailableError
from smartedit.graphs.manifest import Manifest
from smartedit.weights import ModelSource

from . import aoti, cudagraph, eager, onnxruntime, trt
from .backend import Backend, Loaded

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    eager.EAGER, eager.OFFICIAL, cudagraph.CUDAGRAPH, cudagraph.COMPILE, onnxruntime.ONNXRUNTIME, trt.TRT,
    trt.TRT_RTX, aoti.AOTI)}


def get(name: str) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    return BACKENDS[name]


def why_not(name: str, device: str | torch.device, artifacts: str | Path | None = None) -> str | None:
    """Why backend `name` cannot run on `device` here with `artifacts` (None: it can). Cheap: loads nothing."""
    b = get(name)
    device = torch.device(device)
    if device.type not in b.devices:
        return f"runs on {' or '.join(b.devices)}, not {device.type}"
    if b.target is not None:
        if not artifacts:
            return f"runs exported graphs: pass --artifacts OUT (smartedit-export --target {b.target})"
        try:
            entries = Manifest.read(artifacts).entries(b.target)
        except InputError as e:
            return str(e)
        if not entries:
            return f"no {b.target} artifacts in {artifacts} (smartedit-export --target {b.target})"
        refused = next((e.refused() for e in entries.values() if e.refused()), None)
        if refused:  # failed its check at export: not run, not even once
            return f"{artifacts}: {refused}"
    return b.unavailable(device)


def load(name: str, source: ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         artifacts: str | Path | None = None) -> Loaded:
    """The weights backend `name` needs of `source`, and its runner. Refuses at once, naming the reason, what cannot run here: a device
    the backend does not run on or missing artifacts (InputError), a missing library or GPU (UnavailableError)."""
    b = get(name)
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"--device {device!r} is not a device: {e}") from None
    if device.type not in b.devices:
        raise InputError(f"--backend {name} runs on {' or '.join(b.devices)}; --device is {device}")
    if b.target is not None and not artifacts:
        raise InputError(f"--backend {name} runs exported graphs: pass --artifacts OUT (smartedit-export "
                         f"--target {b.target} output)")
    reason = b.unavailable(device)
    if reason:
        raise UnavailableError(f"--backend {name}: {reason}")
    return b.load(source, device, dtype, Path(artifacts) if artifacts else None)
