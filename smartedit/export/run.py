"""`smartedit-export` as a typed function: describe the source, open the manifest, run the target's producer.

OUT/manifest.json  the schema of smartedit/graphs/manifest.py: the source (checkpoint hashes or random preset +
                   seed), toolchain versions, and per target and graph one entry (spec, options, files with sha256,
                   what a runner must match, profiles, whether it was verified)
OUT/report.json    per target, graph and shape point: error against fp32 PyTorch, cosine, the bound, pass/fail
OUT/onnx/<graph>.onnx (+ .onnx.data over 2 GB)   OUT/<trt|trt-rtx>/<graph>.plan   OUT/aoti/<graph>.pt2

A graph whose key (source hash, spec, options, toolchain, and the target's own inputs) and file hashes match its
entry is skipped on a rerun. An entry leaves the manifest before its file is replaced and comes back when the new
file is complete, and the manifest is rewritten (atomically) after each graph: an interrupted export leaves every
finished graph valid and nothing half-written that passes for valid. An export of another model (or over a manifest
this version cannot read) writes its fresh, empty manifest before it replaces any file.

The output folder:
- one writer at a time: the export holds an exclusive lock (flock) on OUT/.smartedit-export.lock from before it
  reads the manifest to its end; the file records the holder's pid and host. A second export into the same OUT
  fails at once (RunError, exit 1) naming the folder and that pid. The lock file stays (an ordinary file; the lock
  dies with its process, a SIGKILL included).
- leftovers of a killed export (`.<name>.tmp-*` staging files and folders that smartedit.files writes beside each
  destination, and the write probe) are removed, under the lock, by the next export into OUT, which says so.
- it never writes into a folder it does not own: OUT must be new, empty, or hold only what an export writes (our
  manifest.json and the files it lists, report.json, verify.json, the target subfolders onnx/ trt/ trt-rtx/ aoti/
  triton/, the lock and staging names). Anything else (a user's files, another tool's manifest.json) is refused,
  named, before anything is written (InputError, exit 2). There is no override flag, on purpose: export into an
  empty folder, or move those files out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from smartedit.config import EXPORT_PRECISIONS, QUANTIZED_PRECISIONS, Precision, SmartEditConfig, precision_named
from smartedit.errors import InputError, RunError
from smartedit.files import write_json
from smartedit.graphs import (
    DEEPCACHE_GRAPHS,
    DENOISER,
    GRAPH_NAMES,
    GRAPHS,
    check_cache_branch,
    graph_table,
    graph_with_role,
    parse_graph_names,
)
from smartedit.graphs.manifest import MANIFEST_FILE, Manifest, dim_meanings, edit_defaults, load_json, loads_json
from smartedit.graphs.spec import DIM_MEANINGS, ProfileOptions
from smartedit.scheduler import get_sampler
from smartedit.weights import ModelSource

from . import targets
from .job import ExportJob, Target
from .quantize import QuantizeOptions
from .quantize import prepare as prepare_quantize
from .onnx import NoExamplePoint, export_point

LOCK_FILE = ".smartedit-export.lock"
WRITE_PROBE = ".write-probe"
REPORT_FILE, VERIFY_FILE = "report.json", "verify.json"
STAGING = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")  # smartedit.files.scratch_folder: .<name>.tmp-XXXXXXXX

TOOLCHAIN_PACKAGES = ("smartedit", "torch", "transformers", "diffusers", "peft", "onnx", "onnxscript", "onnxruntime")


def toolchain() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in TOOLCHAIN_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def run_export(out: str | Path, source: ModelSource, target: str = "onnx", precision: Precision | str = "fp16",
               graph_names: str | list[str] | None = None,
               opset: int = 18, profile: ProfileOptions | None = None, fold_cfg: bool = False, verify: bool = True,
               target_options=None, quantize=None, progress: Callable[[str], None] = print,
               cache_branch: int | None = None) -> Manifest:
    """Export the graphs of `source` (a converted folder, or a preset's random weights) for `target` into `out`; see
    targets.TARGETS. `precision`: a row of config.PRECISIONS (or its name); a quantized one quantizes
    the unet with `quantize` (its defaults when None). `target_options`: the target's TargetOptions (its defaults when
    None). Argument problems are refused before any model is loaded. `cache_branch`: also export the DeepCache graphs
    (unet_deep, unet_shallow) at this skip branch."""
    t = targets.get(target)
    target_options = t.options() if target_options is None else target_options
    if not isinstance(target_options, t.options):
        raise InputError(f"--target {target} takes {t.options.__name__}, got {type(target_options).__name__}")
    precision = precision_named(precision) if isinstance(precision, str) else precision
    if not precision.exported:
        raise InputError(f"--precision {precision.name} is not exported (eager PyTorch only); smartedit-export "
                         f"builds {', '.join(EXPORT_PRECISIONS)}")
    if precision.quantized:  # the unet quantized, the other graphs (and the unet's inputs and outputs) its dtype
        quantize = quantize or QuantizeOptions(precision=precision)
        if quantize.precision != precision:
            raise InputError(f"--precision {precision.name} with quantization options for "
                             f"{quantize.precision.name}")
        if not t.quantized:
            plain = [n for n in EXPORT_PRECISIONS if n not in QUANTIZED_PRECISIONS]
            raise InputError(f"--target {target} takes --precision {' or '.join(plain)}; "
                             f"{', '.join(QUANTIZED_PRECISIONS)} quantize the ONNX UNet (targets "
                             f"{', '.join(n for n, x in targets.TARGETS.items() if x.quantized)})")
    elif quantize is not None:
        raise InputError(f"--precision {precision.name} quantizes nothing: no quantization options")
    if opset < 18:
        raise InputError(f"opset must be >= 18 (the dynamo exporter's minimum), got {opset}")
    cfg = source.config()
    names = _with_deepcache(parse_graph_names(graph_names), cfg, cache_branch, quantize)
    profile = profile or ProfileOptions()
    _check_traceable(cfg, profile, fold_cfg, names, t)
    t.check(target, target_options, quantize)  # e.g. TensorRT missing, no GPU to compile for: before any work
    graphs = graph_table(cfg, profile, fold_cfg=fold_cfg, cache_branch=cache_branch)
    if quantize is not None:  # Model Optimizer, the device, the calibration's memory, every image: before any work
        unet = graphs[graph_with_role(DENOISER)]
        quantize = prepare_quantize(quantize, unet.spec, profile.opt_res, cfg.vision.image_size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    _check_owned(out)
    if quantize is not None:  # again under the lock, once the manifest is known to be this model's
        _check_calibration_graphs(_manifest_or_none(out) or Manifest(out, {}, {}), names, precision)
    _check_writable(out)
    with lock_output(out):
        removed = remove_leftovers(out)
        if removed:
            progress(f"removed the leftovers of an interrupted export in {out}: {', '.join(removed)}")
        recorded = source.describe(progress)
        tools = toolchain()
        fresh = False
        try:
            manifest = Manifest.read(out)
            if manifest.source.get("sha256") != recorded["sha256"]:
                manifest, fresh = Manifest(out, recorded, tools), True  # another model: nothing in OUT is reused
        except InputError:  # no manifest yet (or one this version cannot read): start afresh
            manifest, fresh = Manifest(out, recorded, tools), True
        if quantize is not None:
            _check_calibration_graphs(manifest, names, precision)
        manifest.source, manifest.toolchain = recorded, tools
        manifest.sampler = get_sampler(source.sampler()).record()  # what the C++ runtime runs by default
        manifest.edit_defaults, manifest.dims = edit_defaults(), dim_meanings()  # and its defaults, its dims' pixels
        report = _read_report(out)
        if fresh:  # on disk before any file is replaced: no entry of the old model outlives its file
            manifest.write()
            if report:
                report = {}
                write_json(out / REPORT_FILE, report)
        job = ExportJob(target=target, out=out, source=source, cfg=cfg, graphs=graphs, names=names, manifest=manifest,
                        report=report, precision=precision, opset=opset, profile=profile, fold_cfg=fold_cfg,
                        verify=verify, progress=progress, target_options=target_options, quantize=quantize)
        t.produce(job)
    return manifest


def _with_deepcache(names: list[str], cfg, cache_branch: int | None, quantize) -> list[str]:
    """The graphs to export with the DeepCache pair added when `cache_branch` is given (InputError: a DeepCache graph
    named without a branch, a branch outside this UNet's, or with a quantized precision, which quantizes the unet
    graph only)."""
    if cache_branch is None:
        named = [n for n in names if n in DEEPCACHE_GRAPHS]
        if named:
            raise InputError(f"--graphs {','.join(named)}: the DeepCache graphs are exported with --deepcache [BRANCH]")
        return names
    check_cache_branch(cfg, cache_branch)
    if quantize is not None:
        raise InputError(f"--deepcache exports unquantized graphs; --precision {quantize.precision.name} quantizes "
                         "the unet graph only (export the DeepCache graphs into another folder)")
    return [n for n in GRAPHS if n in names or n in DEEPCACHE_GRAPHS]


def _check_calibration_graphs(manifest: Manifest, names: list[str], precision: Precision) -> None:
    """Quantization calibrates on whole edits through the onnx graphs: those this export does not write must be in
    the manifest already, in the precision it leaves unquantized (fp16), and not failed (InputError naming them,
    before any work)."""
    entries = manifest.entries("onnx")
    missing = [g for g in GRAPH_NAMES if g not in names and g not in entries]
    if missing:
        raise InputError(f"--precision {precision.name} calibrates on whole edits: {manifest.root} has no onnx "
                         f"{missing} and --graphs {','.join(names)} does not export them (export every graph: "
                         "--graphs all)")
    bad = [f"{g} ({entries[g].refused() or 'precision ' + entries[g].precision})" for g in GRAPH_NAMES
           if g not in names and (entries[g].refused() or entries[g].precision != precision.unquantized.name)]
    if bad:
        raise InputError(f"--precision {precision.name} calibrates on whole edits through the onnx graphs, and "
                         f"--graphs {','.join(names)} leaves {', '.join(bad)} as they are: export them too "
                         "(--graphs all)")


def _manifest_or_none(out: Path) -> Manifest | None:
    try:
        return Manifest.read(out)
    except InputError:
        return None


def _read_report(out: Path) -> dict:
    """OUT/report.json, or {} when it is missing or unreadable (malformed, nested too deeply): it is rewritten."""
    try:
        return load_json(out / REPORT_FILE)
    except (OSError, ValueError):  # ArtifactError is a ValueError
        return {}


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / WRITE_PROBE
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to output folder {out}: {e.strerror or e}") from e


def _traceable(cfg, profile: ProfileOptions, fold_cfg: bool, names: list[str], target: Target
               ) -> tuple[str, set] | None:
    """(graph, the dims at fault) of the first graph that cannot be exported at `profile`, or None."""
    graphs = graph_table(cfg, profile, fold_cfg=fold_cfg)
    for n in names:
        spec = graphs[n].spec
        if target.every_dim_dynamic:  # its artifacts are checked to keep every named dim dynamic: one value is not
            fixed = {d for d, r in spec.dims.items() if r.min == r.max}
            if fixed:
                return n, fixed
        try:
            export_point(spec)
        except NoExamplePoint:
            return n, {d for d, r in spec.dims.items() if r.min < r.max}
    return None


def _check_traceable(cfg, profile: ProfileOptions, fold_cfg: bool, names: list[str], target: Target) -> None:
    """Refuse, before any model is loaded, a profile that torch.export cannot trace with its dims dynamic (a narrow
    range whose every size collides with a fixed size of the graph, e.g. --min-res 256 --max-res 320 for the
    unet), naming the flags and a profile that works."""
    bad = _traceable(cfg, profile, fold_cfg, names, target)
    if bad is None:
        return
    graph, dims = bad
    groups: list[tuple[str, list[list[tuple[str, ProfileOptions | None]]]]] = []  # (flags, [kinds of fix])
    if any(DIM_MEANINGS[d].px for d in dims if d in DIM_MEANINGS):
        r = profile.opt_res
        widen = [(f"--max-res {profile.max_res + 64 * k}", _replace(profile, max_res=profile.max_res + 64 * k))
                 for k in range(1, 5)]
        one = [(f"one size --min-res {r} --opt-res {r} --max-res {r}",
                _replace(profile, min_res=r, opt_res=r, max_res=r))] if not target.every_dim_dynamic else []
        groups.append((f"--min-res {profile.min_res} --opt-res {profile.opt_res} --max-res {profile.max_res}",
                       [widen, one]))
    if "B" in dims:
        more = [(f"--max-batch {b}", _replace(profile, max_batch=b)) for b in range(profile.max_batch + 1,
                                                                                   profile.max_batch + 4)]
        one = [("--max-batch 1", _replace(profile, max_batch=1, opt_batch=1, min_batch=1))] \
            if not target.every_dim_dynamic else []
        groups.append((f"--max-batch {profile.max_batch}", [more, one]))
    named, works = [], []
    for flags, kinds in groups:
        fixes = [next((f for f, p in kind if p is not None and _traceable(cfg, p, fold_cfg, names, target) is None),
                      None) for kind in kinds]
        fixes = [f for f in fixes if f]
        if fixes:
            named.append(flags)
            works += fixes
    named = named or [flags for flags, _ in groups] or [", ".join(sorted(dims))]
    why = (f"--target {target.name} keeps every named dim dynamic, and this profile fixes "
           f"{sorted(dims)} to one value" if target.every_dim_dynamic else
           "torch.export cannot keep its dims dynamic: every size in the range collides with a fixed size of the "
           "graph or with another dim")
    raise InputError(f"{', '.join(named)}: the {graph} graph cannot be exported at this profile ({why}); "
                     + (f"what works: {' or '.join(works)}" if works else "widen the range"))


def _replace(profile: ProfileOptions, **changes) -> ProfileOptions | None:
    import dataclasses

    try:
        return dataclasses.replace(profile, **changes)
    except InputError:
        return None


def _is_our_manifest(path: Path) -> bool:
    """An smartedit-export manifest (of any version): a JSON object with manifest_version and artifacts."""
    try:
        d = load_json(path)
    except (OSError, ValueError):
        return False
    return "manifest_version" in d and isinstance(d.get("artifacts"), dict)


def _listed_top_names(path: Path) -> set[str]:
    """The first path component of every file our manifest at `path` lists."""
    try:
        arts = load_json(path).get("artifacts", {})
        return {Path(rel).parts[0] for gs in arts.values() if isinstance(gs, dict) for e in gs.values()
                if isinstance(e, dict) for rel in (e.get("files") or {}) if Path(rel).parts}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def _looks_ours(folder: Path) -> list[str]:
    """Without a manifest of ours: the entries of a target subfolder that no export writes (an export's files are
    named after a graph: <graph>.onnx, <graph>.plan, <graph>.pt2, triton/<graph>/; and staging leftovers)."""
    t = targets.TARGETS[folder.name]
    ours = tuple(f"{g}." for g in GRAPH_NAMES)
    bad = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if STAGING.match(name) or name in t.side_files or name.startswith(ours) or (
                t.whole_folder and name in GRAPH_NAMES):  # a repository's <graph>/ model folders
            continue
        bad.append(f"{folder.name}/{name}")
    return bad


def _foreign_in_repository(manifest: Path, repo: Path) -> list[str]:
    """What in OUT/triton the manifest's record of the repository does not list (without a record, e.g. an export
    killed between writing the repository and recording it: what is not named after a graph)."""
    from smartedit.serve.repository import unrecorded

    try:
        files = load_json(manifest).get("repositories", {}).get(repo.name, {}).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if not isinstance(files, dict):
        return _looks_ours(repo)
    prefix = f"{repo.name}/"
    recorded = [rel[len(prefix):] for rel in files if rel.startswith(prefix)]
    return [prefix + rel for rel in unrecorded(repo, recorded) if not STAGING.match(Path(rel).name)]


def foreign_entries(out: Path) -> list[str]:
    """What in `out` an export did not write (empty for a new or empty folder, or one of our exports)."""
    out = Path(out)
    if not out.is_dir():
        return []
    manifest = out / MANIFEST_FILE
    ours_manifest = manifest.is_file() and _is_our_manifest(manifest)
    listed = _listed_top_names(manifest) if ours_manifest else set()
    bad = []
    for p in sorted(out.iterdir(), key=lambda p: p.name):
        name = p.name
        if name == MANIFEST_FILE:
            if not ours_manifest:
                bad.append(f"{name} (not an smartedit-export manifest)")
        elif name in (REPORT_FILE, VERIFY_FILE, LOCK_FILE, WRITE_PROBE) or STAGING.match(name) or name in listed:
            continue
        elif name in targets.TARGETS and p.is_dir() and not p.is_symlink():
            if targets.TARGETS[name].whole_folder and ours_manifest:  # replaced whole: all of it must be ours
                bad += _foreign_in_repository(manifest, p)
            elif not ours_manifest:
                bad += _looks_ours(p)
        else:
            bad.append(name + ("/" if p.is_dir() else ""))
    return bad


def _check_owned(out: Path) -> None:
    bad = foreign_entries(out)
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise InputError(f"output folder {out} holds files smartedit-export did not write: {', '.join(bad[:4])}{more}; "
                         "it writes only into a new or empty folder or one of its own exports, and never deletes "
                         "what it does not own: use an empty folder for --out")


@contextlib.contextmanager
def lock_output(out: Path, holder: str = "smartedit-export") -> Iterator[Path]:
    """Hold the exclusive lock on `out` (OUT/.smartedit-export.lock, recording this program, pid and host) for the
    block; RunError at once when another process holds it. smartedit-export and smartedit-verify both take it."""
    path = Path(out) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunError(f"cannot create the lock file {path}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise RunError(f"cannot lock the output folder {out} ({path}): {e.strerror or e}") from e
            raise RunError(f"output folder {out} is in use by another {_holder(fd)}: wait for it to finish, or "
                           "use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"program": holder, "pid": os.getpid(), "host": socket.gethostname(),
                                   "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would let two holders lock two inodes)


def _holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its pid just after it locks: give it a moment
        try:
            d = loads_json(os.pread(fd, 4096, 0) or b"null", str(Path(LOCK_FILE)))
        except (OSError, ValueError):
            d = None
        if isinstance(d, dict) and "pid" in d:
            return (f"{d.get('program', 'smartedit-export')} (pid {d['pid']} on host {d.get('host', '?')}, "
                    f"since {d.get('since', '?')})")
        time.sleep(0.05)
    return "smartedit-export (pid unknown)"


def remove_leftovers(out: Path) -> list[str]:
    """Remove (call with the lock held) the staging leftovers a killed export left in `out` and its subfolders:
    only names matching `.<name>.tmp-*`, and the write probe. -> what was removed, relative to `out`."""
    out = Path(out)
    removed = []
    for dirpath, dirnames, filenames in os.walk(out):  # links are not followed
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            if STAGING.match(name) or (here == out and name == WRITE_PROBE):
                p = here / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(str(p.relative_to(out)) + ("/" if name in dirnames else ""))
        dirnames[:] = [d for d in dirnames if not STAGING.match(d)]
    return removed
