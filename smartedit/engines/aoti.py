"""AOTInductor backend: runs the `.pt2` packages of an `smartedit-export --target aoti` folder.

A package is bound to the device type (and, for CUDA, the GPU architecture) and the torch version it was compiled
with; the manifest records both (`requires`) and loading refuses others, naming both, instead of failing inside
torch's loader. Each package also carries its graph and input dtypes in its own metadata (export/aoti.py), which the C++
runtime reads. Inputs are checked against the graph's exported profile, cast to the package's precision and made
contiguous (the compiled code trusts the traced strides); outputs come back on the caller's device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smartedit.errors import ArtifactError, InputError

from .artifacts import ArtifactRunner, Artifacts, load_exported
from .backend import Backend, cuda_unavailable

# What a package says about itself (AOTIModelPackageLoader::get_metadata() in C++). Version 2: the first that carries
# the graph and its input/output dtypes; export/aoti.py writes it, runtime/src/package.cpp reads it.
PACKAGE_VERSION = 2


def device_record(device: str | torch.device) -> dict:
    """What a package is bound to: the device type and, for CUDA, the GPU architecture (and the card's name)."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"AOTInductor packages are compiled for cpu or cuda, got --device {device}")
    if dev.type == "cpu":
        return {"type": "cpu"}
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU here (a CUDA package is compiled for this machine's GPU)")
    major, minor = torch.cuda.get_device_capability(dev)
    return {"type": "cuda", "name": torch.cuda.get_device_name(dev), "capability": f"{major}.{minor}"}


def here(device: str | torch.device) -> dict:
    return {"torch": torch.__version__, "device": device_record(device)}


def load_package(path: Path, device: str | torch.device):
    """-> a callable(*tensors) -> tuple of tensors, on `device` (of the type the package was compiled for)."""
    index = torch.device(device).index
    try:
        package = torch._inductor.aoti_load_package(str(path), device_index=-1 if index is None else index)
    except Exception as e:  # not a zip, a damaged .so, a package for another ABI: torch raises RuntimeError and more
        raise ArtifactError(f"{path}: torch cannot load it as an AOTInductor package "
                            f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:300]})") from None
    if package.get_metadata().get("smartedit.package_version") != str(PACKAGE_VERSION):
        raise ArtifactError(f"{path} was compiled by an older smartedit-export (no input dtypes in its metadata): "
                            "re-run smartedit-export --target aoti")

    def run(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = package(*args)  # the model's own output structure: one tensor, or a tuple
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run


class AOTIRunner(ArtifactRunner):
    name = "aoti"
    suffix = ".pt2"

    def __init__(self, artifacts: Artifacts, device: str | torch.device = "cpu"):
        super().__init__(artifacts)
        self.device = torch.device(device)
        artifacts.refuse_incompatible(here(self.device))

    def open(self, path: Path, entry):
        return load_package(path, self.device)

    def call(self, opened, entry, inputs):
        # contiguous: the compiled code assumes the traced example's strides and does not check them (a permuted
        # pixel tensor from preprocessing gave silently wrong CLIP features before this)
        args = [inputs[t.name].to(self.device, t.torch_dtype(entry.precision)).contiguous() for t in entry.spec.inputs]
        with torch.inference_mode():
            return opened(*args)


def _unavailable(device: torch.device) -> str | None:
    return cuda_unavailable(device) if device.type == "cuda" else None


def _load(source, device, dtype, artifacts):
    return load_exported(source, device, dtype, artifacts, "aoti", AOTIRunner)


AOTI = Backend("aoti", "AOTInductor packages (compiled for this torch and device by smartedit-export --target aoti)",
               ("cpu", "cuda"), "aoti", _unavailable, _load)
