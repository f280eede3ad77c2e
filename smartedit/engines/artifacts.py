"""An export folder's artifacts of one target, checked before any runner loads them.

Every runner of exported graphs (ONNX Runtime, TensorRT, AOTInductor) opens its folder through `Artifacts`, so the
checks are the same for all: the manifest is one this version reads, the target was exported, every entry was
exported from the folder's source (not copied in from another export), no entry failed its check at export
(`Entry.refused`: a graph the export found wrong is not run, not even once; one it did not check is run, and a
warning says so), every file the manifest names is inside the
folder and has its recorded size (at once) and sha256 (when the graph is first opened: what runs is what was
exported and verified; hashed once per process per unchanged file), and each entry is compatible with this machine
(`refuse_incompatible`, with what the runner knows of it: TensorRT version and GPU, torch version and device). A
failure is an ArtifactError naming the file or the difference.

`ArtifactRunner` is what the runners of one file per graph (ONNX Runtime, AOTInductor) share: each graph opened on
first use, inputs checked against its exported profile, outputs back on the caller's device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from smartedit.errors import ArtifactError
from smartedit.graphs import DEEPCACHE_SHALLOW, DEEPCACHE_WHOLE, DENOISER, graph_with_role
from smartedit.graphs.manifest import Entry, Manifest
from smartedit.graphs.spec import GraphSpec
from smartedit.weights import ModelSource

from .backend import Loaded

log = logging.getLogger(__name__)


class Artifacts:
    def __init__(self, root: str | Path, target: str):
        self.root = Path(root)
        self.target = target
        self.manifest = Manifest.read(self.root)
        self.entries = self.manifest.entries(target)
        if not self.entries:
            raise ArtifactError(f"{self.root} holds no {target} artifacts (it has "
                                f"{sorted(self.manifest.artifacts) or 'none'}): run smartedit-export --target "
                                f"{target} --out {self.root}")
        for g, e in self.entries.items():
            foreign = self.manifest.foreign(e)  # an entry and its file copied in from another export
            if foreign:
                raise ArtifactError(foreign)
            refused = e.refused()  # the export checked it and it failed
            if refused:
                raise ArtifactError(f"{self.root}: {refused}")
            self._refuse_damaged(e, hashes=False)  # sizes now; each graph's sha256 when it is first opened
        unchecked = [g for g, e in self.entries.items() if e.verified is None]
        if unchecked:
            log.warning("%s: %s %s not checked at export (smartedit-export --no-verify, or plans built where they "
                        "cannot run): smartedit-verify checks them where they run", self.root,
                        ", ".join(f"{target}/{g}" for g in unchecked), "was" if len(unchecked) == 1 else "were")
        self._hashed: set[str] = set()

    def refuse_incompatible(self, here: dict[str, Any], machine: str = "") -> None:
        """ArtifactError when an entry was built for another machine than `here` describes (its TensorRT version
        and GPU, its torch version and device); `machine` (a card's name) is added to the message."""
        for e in self.entries.values():
            reason = e.compatible(here)
            if reason:
                raise ArtifactError(f"{reason} ({machine})" if machine else reason)

    def _refuse_damaged(self, e: Entry, hashes: bool) -> None:
        bad = self.manifest.damaged(e, hashes=hashes)
        if bad:
            rel = bad[0]
            raise ArtifactError(f"{self.manifest.file(rel)} is missing or does not match its manifest entry "
                                f"({e.files[rel]['bytes']} bytes, sha256 {e.files[rel]['sha256'][:12]}...): "
                                "re-run the export")

    def entry(self, graph: str) -> Entry:
        """The graph's entry; its files are checked against their sha256 the first time (runners open a graph's
        files only after asking for its entry)."""
        if graph not in self.entries:
            raise ArtifactError(f"graph {graph!r} has no {self.target} artifact in {self.root} "
                                f"(it has {sorted(self.entries)})")
        if graph not in self._hashed:
            self._refuse_damaged(self.entries[graph], hashes=True)
            self._hashed.add(graph)
        return self.entries[graph]

    def file(self, graph: str, suffix: str) -> Path:
        """The path of the graph's file ending in `suffix` (.onnx, .plan, .pt2), inside the folder: <graph><suffix>
        where the entry lists it (a quantized unet also lists the fp16 graph it came from)."""
        e = self.entry(graph)
        main = f"{self.target}/{graph}{suffix}"
        rel = main if main in e.files else next((r for r in e.files if r.endswith(suffix)), None)
        if rel is None:
            raise ArtifactError(f"the manifest lists no {suffix} file for {graph} ({self.target})")
        return self.manifest.file(rel)

    @property
    def fold_cfg(self) -> bool:
        unet = self.entries.get(graph_with_role(DENOISER))
        return unet is not None and unet.fold_cfg

    @property
    def cache_branch(self) -> int | None:
        """The skip branch the DeepCache graphs were exported at (None: not exported)."""
        e = self.entries.get(graph_with_role(DEEPCACHE_SHALLOW))
        whole = graph_with_role(DEEPCACHE_WHOLE) in self.entries
        return e.options.get("cache_branch") if e is not None and whole else None


class ArtifactRunner:
    """A runner of the graphs of an export folder with one file per graph (`suffix`): `open(path)` makes a graph
    callable once (`entry`: its manifest entry), `call(opened, entry, inputs)` runs it on inputs already checked against its profile and returns
    its outputs in the spec's order."""

    name: str
    suffix: str

    def __init__(self, artifacts: Artifacts):
        self.arts = artifacts
        self.fold_cfg, self.cache_branch = artifacts.fold_cfg, artifacts.cache_branch
        self.specs: dict[str, GraphSpec] = {g: e.spec for g, e in artifacts.entries.items()}
        self._opened: dict[str, Any] = {}

    def open(self, path: Path, entry: Entry) -> Any:
        raise NotImplementedError

    def call(self, opened: Any, entry: Entry, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry = self.arts.entry(graph)
        if graph not in self._opened:
            self._opened[graph] = self.open(self.arts.file(graph, self.suffix), entry)
        entry.spec.check_inputs(inputs)
        caller = next(iter(inputs.values())).device
        outs = self.call(self._opened[graph], entry, inputs)
        return {t.name: o.to(caller) for t, o in zip(entry.spec.outputs, outs)}


def load_exported(source: ModelSource, device: torch.device, dtype: torch.dtype, artifacts: Path, target: str,
                  runner: Callable[[Artifacts, torch.device], object]) -> Loaded:
    """The weights an exported backend needs (only the config, tokenizer and null-text embedding: the graphs run
    from the artifacts) and its runner; the artifacts must come from the same model."""
    arts = Artifacts(artifacts, target)
    reason = source.mismatch(arts.manifest.source)
    if reason:
        raise ArtifactError(reason)
    return Loaded(source.load(device, dtype, only=[]), runner(arts, device))
