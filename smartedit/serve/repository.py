"""The serving contract: the `smartedit` model of every Triton model repository this project writes, its request,
its config (dynamic batching, a bounded queue, its settings), and the check that what a repository serves is what
was exported. smartedit-serve's repository is written here; `smartedit-export --target triton`
(smartedit/export/triton.py) builds the container repository on the same pieces.

Every config.pbtxt is built as Triton's ModelConfig protobuf (tritonclient's model_config_pb2) and written in its
text format, so it parses by construction; tests parse the files back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from smartedit.errors import ArtifactError, InputError, UnavailableError
from smartedit.files import sha256_file_cached, write_atomic

MODEL = "smartedit"  # the orchestrating model's name, in every repository
# the model's request: per request one edit (dims [1]); max_batch_size > 0 stacks requests in front
# (integers are INT64: Triton Inference Server narrows a JSON number to an INT32 input silently, 4294967297 steps to 1)
REQUEST_INPUTS = (("image", "TYPE_STRING", False), ("instruction", "TYPE_STRING", False),
                  ("seed", "TYPE_INT64", True), ("steps", "TYPE_INT64", True), ("guidance_scale", "TYPE_FP32", True),
                  ("image_guidance_scale", "TYPE_FP32", True), ("resolution", "TYPE_INT64", True))
# the answer: the edited PNG's bytes and the timings' JSON, each one UINT8 row per request ([1, N]). Not BYTES: Triton
# Inference Server 2.51 dies (SIGFPE) computing the classification extension of a BYTES output, which any client may
# ask for; on UINT8 it answers harmless class indices.
REQUEST_OUTPUTS = (("edited", "TYPE_UINT8"), ("timings", "TYPE_UINT8"))
_MODEL_PY = '''"""Triton Python-backend model: {what} (smartedit-deploy writes this file; the code is in the package)."""
from {module} import TritonPythonModel  # noqa: F401
'''


def model_config_pb():
    """(model_config_pb2, text_format): tritonclient's ModelConfig protobuf, or UnavailableError."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise UnavailableError("writing Triton model configs needs tritonclient: pip install -e '.[serve]' "
                               f"({e})") from None
    return model_config_pb2, text_format


def write_config(model_dir: Path, config) -> Path:
    """MODEL_DIR/config.pbtxt, written atomically in the protobuf text format."""
    _, text_format = model_config_pb()
    return write_atomic(model_dir / "config.pbtxt", text_format.MessageToString(config))


def version_dir(model_dir: Path, module: str, what: str) -> Path:
    """MODEL_DIR/1 with its one-line model.py importing `module`'s TritonPythonModel."""
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    write_atomic(version / "model.py", _MODEL_PY.format(module=module, what=what))
    return version


MAX_QUEUE = 16  # requests waiting for the model, at most; more are refused at once (UNAVAILABLE / HTTP 503)
MAX_QUEUE_DELAY_MS = 60_000.0  # a batching delay past a minute only delays: its microseconds fit Triton's uint64


def check_queue_delay_ms(value: float, name: str = "--max-queue-delay-ms") -> float:
    """How long a request may wait for others to batch with: a finite number of ms in 0..MAX_QUEUE_DELAY_MS."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_QUEUE_DELAY_MS):
        raise InputError(f"{name} must be a number of milliseconds from 0 to {MAX_QUEUE_DELAY_MS:g}, got {value!r}")
    return float(value)


def orchestrator_config(settings: dict[str, Any], max_batch: int, queue_delay_ms: float, instances: int,
                        gpu: bool, max_queue: int = MAX_QUEUE):
    """The `smartedit` model: the request contract above, dynamic batching (batch 1: each request alone), at most
    `max_queue` requests waiting (Triton refuses more at once: an edit holds the model for seconds, and a queue
    without a bound grows for as long as clients send), its settings as a parameter."""
    mc, _ = model_config_pb()
    c = mc.ModelConfig(name=MODEL, backend="python", max_batch_size=max_batch)
    for name, dtype, optional in REQUEST_INPUTS:
        c.input.add(name=name, data_type=mc.DataType.Value(dtype), dims=[1], optional=optional)
    for name, dtype in REQUEST_OUTPUTS:
        c.output.add(name=name, data_type=mc.DataType.Value(dtype), dims=[-1])
    policy = c.dynamic_batching.default_queue_policy
    policy.max_queue_size = max_queue
    policy.allow_timeout_override = True  # a request's own `timeout`: rejected if it expires while queued
    policy.timeout_action = mc.ModelQueuePolicy.TimeoutAction.Value("REJECT")
    if max_batch > 1:
        c.dynamic_batching.max_queue_delay_microseconds = int(check_queue_delay_ms(queue_delay_ms, "queue delay") * 1000)
    kind = mc.ModelInstanceGroup.Kind.Value("KIND_GPU" if gpu else "KIND_CPU")
    c.instance_group.add(count=instances, kind=kind)
    c.parameters["settings"].string_value = json.dumps(settings, sort_keys=True)
    return c


def write_serving_repository(repo: Path, settings: dict[str, Any], max_batch: int, queue_delay_ms: float,
                             instances: int, gpu: bool, max_queue: int = MAX_QUEUE) -> Path:
    """The repository of smartedit-serve: one `smartedit` model whose graphs run in-process."""
    model_dir = Path(repo) / MODEL
    version_dir(model_dir, "smartedit.serve.model", "the whole SmartEdit edit")
    write_config(model_dir, orchestrator_config(settings, max_batch, queue_delay_ms, instances, gpu, max_queue))
    return Path(repo)


BYTECODE = "__pycache__"  # Python's compiled model.py files: it writes them when Triton imports a model.py, and
# would run a planted one in place of the source beside it. Never recorded: removed before a server starts
# (clear_bytecode), refused wherever one is found otherwise.


def repository_files(repo: Path, bytecode: bool = True) -> list[str]:
    """Every file under `repo`, relative to it, in order; `bytecode`: __pycache__ folders' files too."""
    repo = Path(repo)
    out = []
    for dirpath, dirnames, filenames in os.walk(repo):
        dirnames[:] = sorted(d for d in dirnames if bytecode or d != BYTECODE)
        out += sorted(str((Path(dirpath) / f).relative_to(repo)) for f in filenames)
    return out


def clear_bytecode(repo: Path) -> None:
    """Remove every __pycache__ folder under `repo` (what an earlier server's imports wrote, or a planted .pyc),
    before the repository is checked and served; one that cannot be removed (a read-only repository, where Python
    could not have written it) is left for the check to refuse."""
    for cache in sorted(Path(repo).rglob(BYTECODE)):
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(cache, ignore_errors=True)


def recorded_files(repo: Path) -> dict[str, str] | None:
    """{path relative to repo: sha256} that the `smartedit` model of a `--target triton` repository records for
    every other file (its settings' "files"); None for a repository without that record (smartedit-serve's own,
    written privately for one run). ArtifactError if the config cannot be read."""
    config = Path(repo) / MODEL / "config.pbtxt"
    if not config.is_file():
        return None
    mc, text_format = model_config_pb()
    try:
        c = text_format.Parse(config.read_text(), mc.ModelConfig())
        settings = json.loads(c.parameters["settings"].string_value) if "settings" in c.parameters else {}
    except (text_format.ParseError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{config} is not a model config this project wrote ({str(e)[:200]})") from None
    files = settings.get("files") if isinstance(settings, dict) else None
    if settings.get("runner") == "bls" and not isinstance(files, dict):
        raise ArtifactError(f"{config} records no repository files: re-run smartedit-export --target triton")
    return files if isinstance(files, dict) else None


def unrecorded(repo: Path, recorded: Iterable[str], bytecode: bool = True) -> list[str]:
    """What under `repo` the record does not list, relative to `repo`: a model folder none of whose files is
    recorded is named as the folder ("my_detector/"), other files one by one; `bytecode` False: __pycache__ aside
    (a check that runs while Triton imports the other models' model.py, which writes it)."""
    recorded = set(recorded)
    tops = {Path(r).parts[0] for r in recorded}
    out: list[str] = []
    for rel in repository_files(repo, bytecode):
        if rel in recorded:
            continue
        top = Path(rel).parts[0]
        name = f"{top}/" if top not in tops and (Path(repo) / top).is_dir() else rel
        if name not in out:
            out.append(name)
    return out


def check_repository(repo: Path, files: dict[str, str], own: Iterable[str] = (), bytecode: bool = True) -> None:
    """Before serving: every file `files` lists ({path relative to repo: sha256}) is in `repo` with that sha256, and
    nothing else is there but `own` (the caller's own files, which the record cannot hold; `bytecode` False:
    __pycache__ aside, see unrecorded). ArtifactError naming the first file that differs or is not recorded."""
    repo = Path(repo).resolve()
    for rel, sha in files.items():
        path = (repo / rel).resolve()
        if not path.is_relative_to(repo) or not path.is_file():
            raise ArtifactError(f"the model repository {repo} lacks {rel} (or it leads outside): re-run "
                                "smartedit-export --target triton")
        if sha256_file_cached(path) != sha:
            raise ArtifactError(f"{path} does not match the sha256 the export recorded ({sha[:12]}...): the "
                                "repository was changed after export; re-run smartedit-export --target triton")
    extra = unrecorded(repo, [*files, *own], bytecode)
    if extra:
        cache = " (Python's compiled code, which would run in place of the model.py beside it: remove it)" if any(
            BYTECODE in e for e in extra) else ""
        raise ArtifactError(f"the model repository {repo} holds {', '.join(extra[:4])}, which the export did not "
                            f"write{cache}: what is served must be what was exported; move it out or re-export")


