"""The serving contract: the `smartedit` model of every Triton model repository this project writes, its request,
its config (dynamic batching with priority levels, bounded queues, the response cache allowed, its settings), its
decoupled twin `smartedit_stream` (the same edit answered as a stream), and the check that what a repository serves
is what was exported. smartedit-serve's repository is written here; `smartedit-export --target triton`
(smartedit/export/triton.py) builds the container repository on the same pieces, and the launcher derives the twin
of its `smartedit` model once the repository was checked (write_stream_twin).

Every config.pbtxt is built as Triton's ModelConfig protobuf (tritonclient's model_config_pb2) and written in its
text format, so it parses by construction; tests parse the files back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterable

from smartedit.errors import ArtifactError, InputError, UnavailableError
from smartedit.files import sha256_file_cached, write_atomic

from .settings import ServeSettings

MODEL = "smartedit"  # the orchestrating model's name, in every repository
# what a --target triton repository's graph models (one per graph) run on: Triton's onnxruntime backend on OUT/onnx,
# its tensorrt_plan backend on OUT/trt, or Python models running the ONNX files in ONNX Runtime (serve/graph_model.py)
GRAPH_MODEL_KINDS = ("onnx", "trt", "python")
STREAM_MODEL = "smartedit_stream"  # its decoupled twin: the same edit, answered as a stream (progress, previews)
# The model's request, (name, Triton dtype, dims per request, optional): one edit per request; max_batch_size > 0
# stacks requests in front. seed and the guidance scales hold one value per variant (dims [-1]: 1 to --max-variants
# values, each list either one value or as many as the longest); the other inputs one value, the guidance intervals
# two (start, end). Integers are INT64 (Triton Inference Server narrows a JSON number to an INT32 input silently,
# 4294967297 steps to 1); the intervals FP64, so a JSON 0.2 arrives as the 0.2 an offline edit is given.
REQUEST_INPUTS = (("image", "TYPE_STRING", (1,), False), ("instruction", "TYPE_STRING", (1,), False),
                  ("seed", "TYPE_INT64", (-1,), True), ("steps", "TYPE_INT64", (1,), True),
                  ("guidance_scale", "TYPE_FP32", (-1,), True), ("image_guidance_scale", "TYPE_FP32", (-1,), True),
                  ("resolution", "TYPE_INT64", (1,), True), ("sampler", "TYPE_STRING", (1,), True),
                  ("guidance_interval", "TYPE_FP64", (2,), True), ("text_only_interval", "TYPE_FP64", (2,), True),
                  ("deepcache", "TYPE_INT64", (1,), True))
STREAM_INPUTS = (("preview_every", "TYPE_INT64", (1,), True),)  # the stream's own: a preview every N steps (0: none)
# the answer: the edited PNGs' bytes (one after another, a variant each; their sizes are in the timings) and the
# timings' JSON, each one UINT8 row per request ([1, N]). Not BYTES: Triton Inference Server 2.51 dies (SIGFPE)
# computing the classification extension of a BYTES output, which any client may ask for; on UINT8 it answers
# harmless class indices.
REQUEST_OUTPUTS = (("edited", "TYPE_UINT8"), ("timings", "TYPE_UINT8"))
# a stream's messages before the answer: `progress` (JSON: the step done, the steps, the previews' sizes) and, every
# preview_every steps, `preview` (small PNGs of the predicted clean image, one per variant, one after another)
STREAM_OUTPUTS = (*REQUEST_OUTPUTS, ("progress", "TYPE_UINT8"), ("preview", "TYPE_UINT8"))
CACHE_ENV = "SMARTEDIT_RESPONSE_CACHE"  # set ("1") in the server's environment when it runs with a response cache
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


MAX_QUEUE = 16  # requests waiting for the model per priority level, at most; more are refused at once (HTTP 503)
MAX_QUEUE_DELAY_MS = 60_000.0  # a batching delay past a minute only delays: its microseconds fit Triton's uint64
# Priority levels of the dynamic batcher: a request's KServe `priority` parameter, 1 (the highest, and the default of
# a request that names none) to PRIORITY_LEVELS; Triton takes the highest level first. Every level below the first
# waits at most LOW_PRIORITY_WAIT_S in the queue: started by then, or refused (HTTP 503 "Request timeout expired",
# retryable), so that no request waits forever behind higher ones (Triton has no aging or share between levels).
PRIORITY_LEVELS = 2
MAX_PRIORITY_LEVELS = 16
LOW_PRIORITY_WAIT_S = 300.0
MAX_WAIT_S = 86_400.0
MAX_CACHE_MB = 1 << 20  # a response cache past a TiB is a typo


def check_queue_delay_ms(value: float, name: str = "--max-queue-delay-ms") -> float:
    """How long a request may wait for others to batch with: a finite number of ms in 0..MAX_QUEUE_DELAY_MS."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_QUEUE_DELAY_MS):
        raise InputError(f"{name} must be a number of milliseconds from 0 to {MAX_QUEUE_DELAY_MS:g}, got {value!r}")
    return float(value)


def check_priority(levels: object, wait_s: object) -> tuple[int, float]:
    """(--priority-levels, --low-priority-wait-s): 1..MAX_PRIORITY_LEVELS levels, a wait of 1 s to a day."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_PRIORITY_LEVELS:
        raise InputError(f"--priority-levels must be an integer from 1 to {MAX_PRIORITY_LEVELS}, got {levels!r}")
    if not (isinstance(wait_s, (int, float)) and math.isfinite(wait_s) and 1 <= wait_s <= MAX_WAIT_S):
        raise InputError(f"--low-priority-wait-s must be a number of seconds from 1 to {MAX_WAIT_S:g}, got {wait_s!r}")
    return levels, float(wait_s)


def check_cache_mb(value: object) -> int:
    """--cache-mb: the response cache's size in MiB, 0 (off) to MAX_CACHE_MB."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CACHE_MB:
        raise InputError(f"--cache-mb must be an integer from 0 (no cache) to {MAX_CACHE_MB}, got {value!r}")
    return value


def orchestrator_config(settings: ServeSettings, max_batch: int, queue_delay_ms: float, instances: int,
                        gpu: bool, max_queue: int = MAX_QUEUE, priority_levels: int = PRIORITY_LEVELS,
                        low_priority_wait_s: float = LOW_PRIORITY_WAIT_S, cache: bool = True):
    """The `smartedit` model: the request contract above, dynamic batching (batch 1: each request alone) with
    `priority_levels` levels, at most `max_queue` requests waiting per level (Triton refuses more at once: an edit
    holds the model for seconds, and a queue without a bound grows for as long as clients send), every level below
    the first waiting at most `low_priority_wait_s`, its settings as a parameter. `cache`: the model's answers may be
    kept in Triton's response cache, which the server has only when started with one (--cache-config)."""
    mc, _ = model_config_pb()
    c = mc.ModelConfig(name=MODEL, backend="python", max_batch_size=max_batch)
    for name, dtype, dims, optional in REQUEST_INPUTS:
        # ragged: requests with different numbers of variants still share a batch (each request is read alone)
        c.input.add(name=name, data_type=mc.DataType.Value(dtype), dims=dims, optional=optional,
                    allow_ragged_batch=dims == (-1,))
    for name, dtype in REQUEST_OUTPUTS:
        c.output.add(name=name, data_type=mc.DataType.Value(dtype), dims=[-1])
    check_priority(priority_levels, low_priority_wait_s)
    batching = c.dynamic_batching
    policy = batching.default_queue_policy
    policy.max_queue_size = max_queue
    policy.allow_timeout_override = True  # a request's own `timeout`: rejected if it expires while queued
    policy.timeout_action = mc.ModelQueuePolicy.TimeoutAction.Value("REJECT")
    if priority_levels > 1:
        batching.priority_levels = priority_levels
        batching.default_priority_level = 1
        for level in range(2, priority_levels + 1):
            low = batching.priority_queue_policy[level]
            low.CopyFrom(policy)
            # a request's own timeout may only shorten this (Triton takes the smaller of the two)
            low.default_timeout_microseconds = int(low_priority_wait_s * 1e6)
    if max_batch > 1:
        batching.max_queue_delay_microseconds = int(check_queue_delay_ms(queue_delay_ms, "queue delay") * 1000)
    kind = mc.ModelInstanceGroup.Kind.Value("KIND_GPU" if gpu else "KIND_CPU")
    c.instance_group.add(count=instances, kind=kind)
    c.response_cache.enable = cache
    c.parameters["settings"].string_value = settings.to_json()
    return c


def stream_config(config, settings: ServeSettings | None = None):
    """The decoupled twin of the `smartedit` model's config: the same batching, priorities, instances and settings
    (or `settings`), its stream's inputs and outputs, no response cache (Triton caches no decoupled model)."""
    mc, _ = model_config_pb()
    c = mc.ModelConfig()
    c.CopyFrom(config)
    c.name = STREAM_MODEL
    c.model_transaction_policy.decoupled = True
    c.response_cache.enable = False
    for name, dtype, dims, optional in STREAM_INPUTS:
        c.input.add(name=name, data_type=mc.DataType.Value(dtype), dims=dims, optional=optional)
    known = {o.name for o in c.output}
    for name, dtype in STREAM_OUTPUTS:
        if name not in known:
            c.output.add(name=name, data_type=mc.DataType.Value(dtype), dims=[-1])
    if settings is not None:
        c.parameters["settings"].string_value = settings.to_json()
    return c


def write_serving_repository(repo: Path, settings: ServeSettings, max_batch: int, queue_delay_ms: float,
                             instances: int, gpu: bool, max_queue: int = MAX_QUEUE, stream: bool = False,
                             cache: bool = False, priority_levels: int = PRIORITY_LEVELS,
                             low_priority_wait_s: float = LOW_PRIORITY_WAIT_S) -> Path:
    """The repository of smartedit-serve: one `smartedit` model whose graphs run in-process, and with `stream` its
    decoupled twin `smartedit_stream` (a second process with its own copy of the graphs)."""
    config = orchestrator_config(settings, max_batch, queue_delay_ms, instances, gpu, max_queue, priority_levels,
                                 low_priority_wait_s, cache)
    model_dir = Path(repo) / MODEL
    version_dir(model_dir, "smartedit.serve.model", "the whole SmartEdit edit")
    write_config(model_dir, config)
    if stream:
        twin = Path(repo) / STREAM_MODEL
        version_dir(twin, "smartedit.serve.model", "the whole SmartEdit edit, answered as a stream")
        write_config(twin, stream_config(config))
    return Path(repo)


def write_stream_twin(repo: Path, dst: Path) -> Path:
    """DST/smartedit_stream: the stream twin of a `--target triton` repository's `smartedit` model (BLS: its graphs
    are the graph models, so the twin holds no weights of its own), derived from that model's config once the
    repository was checked against its record. DST is a repository of its own (the server's private folder; the
    exported one stays as exported): the twin's settings name the exported repository, which it checks as the
    `smartedit` model does, and its checkpoint files there."""
    mc, text_format = model_config_pb()
    repo = Path(repo).resolve()
    config = text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    settings = ServeSettings.from_json(config.parameters["settings"].string_value, f"{repo / MODEL}/config.pbtxt")
    settings = dataclasses.replace(settings, repository=str(repo), source=settings.model_source(repo / MODEL / "1"))
    twin = Path(dst) / STREAM_MODEL
    version_dir(twin, "smartedit.serve.model", "the whole SmartEdit edit, answered as a stream")
    write_config(twin, stream_config(config, settings))
    return Path(dst)


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
        if "settings" not in c.parameters:
            return None
        settings = json.loads(c.parameters["settings"].string_value)
    except (text_format.ParseError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{config} is not a model config this project wrote ({str(e)[:200]})") from None
    files = settings.get("files") if isinstance(settings, dict) else None
    if isinstance(settings, dict) and settings.get("runner") == "bls" and not isinstance(files, dict):
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


