"""The manifest of an export folder, OUT/manifest.json: one schema whatever the target.

    {"manifest_version": 4,
     "source":    what the graphs were exported from (a checkpoint's file hashes, or a random preset and seed),
     "toolchain": library versions of the export,
     "artifacts": {target: {graph: entry}},       target: onnx | trt | trt-rtx | aoti
     "repositories": {"triton": repository},      what serves the graphs: a model repository built from entries
     "sampler": {"name", "class", "config"},      the source's sampler at export (smartedit.scheduler) and the full
                                                  diffusers config it runs with: what the C++ runtime builds its
                                                  schedule from; absent in older manifests: EulerAncestral
     "edit_defaults": {"steps", "guidance_scale", "image_guidance_scale", "seed"}
                                                  an edit's defaults (smartedit.config), the C++ runtime's
     "dims": {dim: {"what", "px", "flag"}}}       what each named dimension of the specs means (spec.DIM_MEANINGS):
                                                  px = image pixels per unit (0: not an image side), flag = the
                                                  smartedit-export flag that sets its range

Every entry has the same fields:
    target, graph, key       the target, the graph, the hash of everything that went into it (a rerun compares it)
    source                   the sha256 of the source it was exported from: an entry copied in from another export
                             (another source) is refused by every runner and by smartedit-verify
    spec                     the graph spec (smartedit.graphs.spec), with its full dynamic range
    options                  precision (a name in smartedit.config.PRECISIONS: a quantized UNet's says int8 or
                             fp8, its row the fp16 inputs and outputs), fold_cfg, profile, and the target's own options
    files                    {path relative to OUT: {"sha256", "bytes"}}
    requires                 what a runner must match to run it: {"tensorrt": "10.7.0", "compute_capability":
                             ["86", "80"]} or {"torch": "2.13.0", "device": {"type": "cuda", "capability": "9.0"}}
    profiles                 the optimisation profiles: [{"name", "dims"}] (TensorRT's exact ones first); [] = the spec's
    verified                 the export's check of the artifact (against fp32 PyTorch; a quantized graph: its quality
                             report against the fp16 graph): true passed; false failed: no runner runs the entry
                             (`Entry.refused`), smartedit-verify reports it failed; null not checked (smartedit-export
                             --no-verify, or a TensorRT plan built where it cannot run): runners run it and say so
    record                   what happened (timings, sizes, logs): informative, never required

A repository records {"source", "stages", "files": {path relative to OUT: {"sha256", "bytes"}}}: every file a
server loads from it, so that what is served is what was exported and verified.

`Entry.compatible(here)` returns why an entry cannot run on a machine described by `here` (the same keys as
`requires`), or None. Paths from a manifest are resolved inside OUT or refused.

A manifest is read, not trusted: at most MAX_MANIFEST_BYTES, JSON nested at most MAX_JSON_DEPTH levels (the C++
reader's limit too; a manifest is about 8 deep), every entry's fields typed. `load_json` is the one reader of
manifest.json and the other JSON files of an export folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from smartedit.config import PRECISIONS
from smartedit.errors import ArtifactError
from smartedit import files
from smartedit.files import MAX_JSON_BYTES, sha256_file, sha256_file_cached, write_json

from smartedit.config import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
)

from .spec import DIM_MEANINGS, DimRange, GraphSpec, parse_dim

MANIFEST_VERSION = 4
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = MAX_JSON_BYTES


def loads_json(text: str | bytes, where: str) -> Any:
    """The JSON value of `text`, nested at most MAX_JSON_DEPTH levels; ArtifactError naming `where` otherwise."""
    return files.loads_json(text, where, ArtifactError)


def load_json(path: str | Path, want: type = dict) -> Any:
    """The JSON value (of type `want`) of an export folder's file: at most MAX_MANIFEST_BYTES, nested at most
    MAX_JSON_DEPTH levels. ArtifactError naming the file otherwise; OSError when it cannot be read."""
    return files.read_json(Path(path), ArtifactError, want)


@dataclass
class Entry:
    target: str
    graph: str
    key: str
    spec: GraphSpec
    options: dict[str, Any]
    files: dict[str, dict[str, Any]]
    requires: dict[str, Any] = field(default_factory=dict)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    verified: bool | None = None
    record: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the source's sha256; Manifest.put stamps it

    @property
    def precision(self) -> str:
        return self.options["precision"]

    @property
    def fold_cfg(self) -> bool:
        return bool(self.options.get("fold_cfg", False))

    def profile_specs(self) -> list[GraphSpec]:
        """The spec restricted to each optimisation profile, in order (the last: the widest)."""
        if not self.profiles:
            return [self.spec]
        return [replace(self.spec, dims={k: DimRange(**v) for k, v in p["dims"].items()}) for p in self.profiles]

    def refused(self) -> str | None:
        """Why no runner runs this entry (its check at export failed), or None. An entry that was not checked
        (verified null) is not refused: runners warn that it was not checked."""
        if self.verified is not False:
            return None
        check = ("its quality report fell below --min-psnr against the fp16 graph"
                 if PRECISIONS[self.precision].quantized else "it did not match PyTorch")
        return (f"{self.target}/{self.graph} failed its check at export ({check}; verified: false in the manifest, "
                f"see report.json): it is not run; re-run smartedit-export --target {self.target}")

    def compatible(self, here: dict[str, Any]) -> str | None:
        """Why this entry cannot run where `here` describes (None: it can). A list in `requires` is the set of
        values accepted; a dict must match except for its "name" (a card's marketing name)."""
        for key, want in self.requires.items():
            have = here.get(key)
            if isinstance(want, list):
                ok = have in want
            elif isinstance(want, dict):
                ok = isinstance(have, dict) and _sans_name(have) == _sans_name(want)
            else:
                ok = have == want
            if not ok:
                return (f"{self.graph} ({self.target}) was built for {key} {want}; this machine has {have}: re-run "
                        f"smartedit-export --target {self.target} here")
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Entry":
        try:
            entry = cls(target=str(d["target"]), graph=str(d["graph"]), key=str(d["key"]),
                        spec=GraphSpec.from_dict(d["spec"]), options=dict(d["options"]), files=dict(d["files"]),
                        requires=dict(d.get("requires", {})), profiles=list(d.get("profiles", [])),
                        verified=d.get("verified"), record=dict(d.get("record", {})), source=d["source"])
            if not isinstance(entry.source, str):
                raise TypeError(f"source must be a sha256 string, got {entry.source!r}")
            if not any(entry.verified is v for v in (True, False, None)):  # not 1 or 0
                raise TypeError(f"verified must be true, false or null, got {entry.verified!r}")
            if not isinstance(entry.precision, str) or entry.precision not in PRECISIONS:
                raise ValueError(f"options.precision must be one of {list(PRECISIONS)}, got {entry.precision!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{where}: malformed manifest entry ({type(e).__name__}: {e})") from None
        _check_bounded(entry.spec, where)
        return entry


MAX_TENSOR_ELEMENTS = 1 << 32  # 16 GiB in fp32: above any tensor of the 7b graphs at 1024 px, batch 8


def _check_bounded(spec: GraphSpec, where: str) -> None:
    """A manifest is read, not trusted: a profile widened by hand would make verify or a runner allocate its max
    shapes (7.6 TB was seen). Every tensor at the profile's max must stay under MAX_TENSOR_ELEMENTS."""
    top = {n: r.max for n, r in spec.dims.items()}
    for t in (*spec.inputs, *spec.outputs):
        n = 1
        for expr in t.shape:
            k, dim = parse_dim(expr)
            n *= k * (top.get(dim, 1) if dim else 1)
        if n > MAX_TENSOR_ELEMENTS:
            raise ArtifactError(f"{where}: {spec.name} tensor {t.name} at the profile's max has {n:.3g} elements, "
                                f"over the limit {MAX_TENSOR_ELEMENTS:.3g} (2^32): not a profile smartedit-export "
                                "writes; re-export")


def edit_defaults() -> dict[str, Any]:
    """An edit's defaults as the manifest records them (smartedit.config's): what a runtime without the Python
    package (the C++ one) runs when no flag says otherwise."""
    return {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE, "seed": DEFAULT_SEED}


def dim_meanings() -> dict[str, dict[str, Any]]:
    """spec.DIM_MEANINGS as the manifest records it: {dim: {"what", "px", "flag"}}."""
    return {name: {"what": m.what, "px": m.px, "flag": m.flag} for name, m in DIM_MEANINGS.items()}


def _sans_name(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "name"}


@dataclass
class Manifest:
    root: Path
    source: dict[str, Any]
    toolchain: dict[str, Any]
    artifacts: dict[str, dict[str, Entry]] = field(default_factory=dict)
    repositories: dict[str, dict[str, Any]] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)  # the source's sampler record; {}: none recorded
    edit_defaults: dict[str, Any] = field(default_factory=dict)  # {}: none recorded (an older manifest)
    dims: dict[str, dict[str, Any]] = field(default_factory=dict)  # {}: none recorded (an older manifest)

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_FILE

    @classmethod
    def read(cls, root: str | Path) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise ArtifactError(f"{path} not found: {root} is not an smartedit-export output folder")
        d = load_json(path)
        if d.get("manifest_version") != MANIFEST_VERSION:
            raise ArtifactError(f"{path} is manifest version {d.get('manifest_version')!r}, this smartedit reads "
                                f"version {MANIFEST_VERSION}: re-run smartedit-export into {root}")
        arts = d.get("artifacts")
        if not isinstance(arts, dict) or not all(isinstance(v, dict) for v in arts.values()):
            raise ArtifactError(f"{path}: 'artifacts' must map each target to its graphs")
        repos = d.get("repositories") or {}
        if not isinstance(repos, dict) or not all(isinstance(r, dict) and isinstance(r.get("files"), dict)
                                                  for r in repos.values()):
            raise ArtifactError(f"{path}: 'repositories' must map each repository to its files")
        sampler = d.get("sampler") or {}
        if not isinstance(sampler, dict):
            raise ArtifactError(f"{path}: 'sampler' must be a JSON object (name, class, config)")
        defaults, dims = d.get("edit_defaults") or {}, d.get("dims") or {}
        if not isinstance(defaults, dict) or not isinstance(dims, dict):
            raise ArtifactError(f"{path}: 'edit_defaults' and 'dims' must be JSON objects")
        return cls(root, dict(d.get("source") or {}), dict(d.get("toolchain") or {}),
                   {t: {g: Entry.from_dict(e, f"{path} [{t}][{g}]") for g, e in gs.items()}
                    for t, gs in arts.items()}, dict(repos), dict(sampler), dict(defaults), dict(dims))

    def write(self) -> None:
        write_json(self.path, {"manifest_version": MANIFEST_VERSION, "source": self.source,
                               "toolchain": self.toolchain,
                               "artifacts": {t: {g: e.to_dict() for g, e in gs.items()}
                                             for t, gs in self.artifacts.items()},
                               "repositories": self.repositories,
                               **({"sampler": self.sampler} if self.sampler else {}),
                               **({"edit_defaults": self.edit_defaults} if self.edit_defaults else {}),
                               **({"dims": self.dims} if self.dims else {})})

    def entries(self, target: str) -> dict[str, Entry]:
        return self.artifacts.get(target, {})

    def put(self, entry: Entry) -> None:
        """Add an entry exported from this manifest's source (stamped with it)."""
        entry.source = entry.source or self.source["sha256"]
        if entry.source != self.source["sha256"]:
            raise ArtifactError(f"{entry.graph} ({entry.target}) was exported from another source")
        self.artifacts.setdefault(entry.target, {})[entry.graph] = entry

    def foreign(self, entry: Entry) -> str | None:
        """Why `entry` is not from this manifest's source (copied in from another export), or None."""
        if entry.source == self.source.get("sha256"):
            return None
        return (f"{self.path} [{entry.target}][{entry.graph}] was exported from another source (sha256 "
                f"{entry.source[:12] or 'unrecorded'}..., this folder's is {str(self.source.get('sha256'))[:12]}...): "
                f"re-run smartedit-export --target {entry.target} --out {self.root}")

    def drop(self, target: str, graph: str) -> None:
        self.artifacts.get(target, {}).pop(graph, None)

    def file(self, rel: str) -> Path:
        """The absolute path of a file the manifest names; it must stay inside the folder (links resolved)."""
        root = self.root.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise ArtifactError(f"{self.path} names {rel!r}, which is outside {self.root}: refused")
        return path

    def damaged(self, entry: Entry, hashes: bool = True) -> list[str]:
        """The files of `entry` that are missing, of another size, or (hashes=True) of another sha256."""
        return self.damaged_files(entry.files, hashes)

    def damaged_files(self, files: dict[str, dict[str, Any]], hashes: bool = True) -> list[str]:
        """Of `files` ({path relative to OUT: {"sha256", "bytes"}}), those missing, of another size or sha256."""
        bad = []
        for rel, meta in files.items():
            f = self.file(rel)
            if not f.is_file() or f.stat().st_size != meta["bytes"] or (hashes and sha256_file_cached(f) !=
                                                                         meta["sha256"]):
                bad.append(rel)
        return bad

    def file_record(self, rel: str) -> dict[str, Any]:
        f = self.file(rel)
        return {"sha256": sha256_file(f), "bytes": f.stat().st_size}
