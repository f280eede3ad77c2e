"""`smartedit-k8s`: the Triton deployment of an export on Kubernetes, as KServe resources and as plain manifests.

    smartedit-k8s OUT --image REGISTRY/smartedit-triton:TAG --storage-uri s3://bucket/smartedit/triton --out k8s/

reads OUT/manifest.json and the model repository OUT/triton (smartedit-export --target triton) and writes k8s/:

    Dockerfile, Dockerfile.dockerignore the serving image: NVIDIA's Triton container, of the release whose TensorRT
                                        built the plans, with this project installed (the `smartedit` model imports
                                        it); the build context sends and copies the package's sources only
    kserve/servingruntime.yaml          ServingRuntime: the launcher and Triton, probes, /dev/shm, /tmp
    kserve/inferenceservice.yaml        InferenceService: the repository from --storage-uri, raw deployment, KEDA
                                        autoscaling on the queue-to-compute ratio (KServe creates the ScaledObject)
    kserve/networkpolicy.yaml, kserve/poddisruptionbudget.yaml, kserve/podmonitor.yaml, kserve/prometheusrule.yaml
    plain/deployment.yaml, plain/service.yaml, plain/networkpolicy.yaml, plain/poddisruptionbudget.yaml,
    plain/podmonitor.yaml, plain/prometheusrule.yaml, plain/hpa.yaml (autoscaling/v2, Pods metric),
    plain/prometheus-adapter.yaml (the rule exposing the metric)
    .smartedit-k8s.json                 what this command wrote there, with each file's sha256

A command of its own, not an export target: it produces no graph from a model, it deploys a finished export with
options (image, storage, replicas, time limits) that no export has; its output belongs to the cluster's repository
of manifests, not inside the export (an output there is refused, as elsewhere).

Nothing is written until every option, the export's record and the repository's bytes have been checked: each bad
value is one InputError naming it. The repository is hashed against the manifest's record (what is deployed is what
was exported), and --out may hold only files this command wrote and nobody changed since (its record says which).

Both forms: pods that meet Kubernetes' "restricted" Pod Security Standard (non-root user and group, no privilege
escalation, every capability dropped, the RuntimeDefault seccomp profile, a read-only root filesystem with /tmp an
emptyDir, no host namespaces, ports or paths, no service-account token); one `nvidia.com/gpu` per pod, scheduled
(GPU Feature Discovery's node labels) on the compute capabilities the TensorRT plans were built for; every emptyDir
with a sizeLimit and the pod's ephemeral storage sized from the repository's bytes; liveness
/v2/health/live, readiness /v2/health/ready and a startup probe that allows the repository's load and hash check;
/dev/shm as a memory volume (the Python backend passes tensors through it). The container runs
`python3 -m smartedit.serve.launch --record-sha256 SHA -- <tritonserver flags>`: the launcher checks the repository
against the sha256 of smartedit/config.pbtxt that the export recorded before any of it runs, closes Triton's
administrative APIs, serves the `smartedit_stream` twin beside the repository (gRPC streaming on the same port), and
drains on SIGTERM (the `smartedit` model refuses new edits, the running ones finish, then Triton stops); the grace
period allows an edit at the repository's step limit and Triton's exit timeout. With --cache-mb the server gets
Triton's response cache of that size, and the container that much more memory.
A NetworkPolicy lets only labelled client pods (and namespaces the user names) reach the inference ports, and only
Prometheus' namespace the metrics port; a PodDisruptionBudget lets voluntary disruptions take one pod at a time.

The autoscaling signal: each edit holds the GPU for seconds, so utilisation says little; time in Triton's queue
against time computing does. Recorded per pod, for the `smartedit` model and its stream twin only (a BLS repository
loads six more models, and an average over all of them reads a fraction of the truth):
    smartedit:queue_compute_ratio = rate(nv_inference_queue_duration_us{model=~"smartedit|smartedit_stream"}[w])
                            / rate(nv_inference_compute_infer_duration_us{model=~"smartedit|smartedit_stream"}[w])
and the autoscaler keeps its per-pod average at --target-ratio: replicas = ceil(replicas x ratio / target).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smartedit.arguments import positive
from smartedit.errors import ArtifactError, InputError, run_command
from smartedit.files import check_writable_parent, read_json, refuse_overwriting_inputs, sha256_file, write_atomic
from smartedit.graphs.manifest import Manifest

from .repository import GRAPH_MODEL_KINDS, MODEL, STREAM_MODEL, check_cache_mb, check_repository

# NVIDIA's Triton containers (nvcr.io/nvidia/tritonserver:<tag>-py3) and the TensorRT each ships, as their release
# notes list it (docs/introduction/release_notes.md of triton-inference-server/server at each release): a TensorRT plan
# loads only in the TensorRT that built it. Only releases whose TensorRT was read there are listed; another release
# can be named with --triton-release (its TensorRT is then the user's to check).
TRITON_RELEASES = {"24.08": "10.3.0", "24.10": "10.5.0", "24.12": "10.7.0", "25.01": "10.8.0"}
STORAGE_SCHEMES = ("s3", "gs", "pvc")  # what KServe's storage initializer and a plain volume can both serve
NAME_MAX = 52  # DNS-1123 label (63) less room for the names derived from it ("-triton", "-client", ...)
RATIO = "smartedit:queue_compute_ratio"
HTTP, GRPC, METRICS = 8000, 8001, 8002
KSERVE_HTTP, KSERVE_GRPC = 8080, 9000  # KServe's ports for Triton (its v2 and grpc-v2 protocols)
SHM_PATH, TMP_PATH, MODELS_PATH = "/dev/shm", "/tmp", "/mnt/models"
UID = 1000  # the Triton container's own user (triton-server), never root
TMP_GI, LOGS_GI = 1, 1  # /tmp (the launcher's bytecode cache and drain flag, Python's scratch); the container's logs
MODELS_HEADROOM = 1.1  # a copied repository's volume over its recorded bytes (the storage initializer's own files)
EXIT_MARGIN_S = 30  # grace period beyond the longest edit and Triton's exit timeout
MAX_REPLICAS = 1000  # GPU pods of one deployment
MAX_TIMEOUT_S = 86400
MAX_RATIO = 100.0
RECORD_FILE = ".smartedit-k8s.json"  # in --out: the files smartedit-k8s wrote there, with their sha256
STAGING = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")  # smartedit.files.scratch_folder: .<name>.tmp-XXXXXXXX

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # a Service's name: a DNS-1123 label starting with a letter
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
BUCKET = {"s3": re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),  # S3's bucket naming rules
          "gs": re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")}  # Cloud Storage's (222 with dots)
PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~@+=,-]+")  # an object key's or sub-path's segment: no space, quote, control
# An image reference, as the distribution/reference grammar (Docker, containerd, the kubelet) reads it
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
IMAGE = re.compile(rf"(?:{_DOMAIN}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                   r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")
# A Kubernetes quantity (resource.Quantity), unsigned: a number and a binary, decimal or exponent suffix
QUANTITY = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                      r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][-+]?[0-9]+)?")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           **{s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}
# a Prometheus duration (1m, 30s, 1m30s): units largest first, each once (prometheus-operator's Duration pattern)
DURATION = re.compile(r"(?=.)(?:[0-9]+y)?(?:[0-9]+w)?(?:[0-9]+d)?(?:[0-9]+h)?(?:[0-9]+m)?(?:[0-9]+s)?(?:[0-9]+ms)?")
_UNIT_S = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def _check_name(flag: str, value: str, max_len: int = 63, service: bool = False) -> None:
    """A namespace's name (a DNS-1123 label) or, with service=True, a name that also names Services (DNS-1035)."""
    rule = DNS1035_LABEL if service else DNS1123_LABEL
    if not (isinstance(value, str) and len(value) <= max_len and rule.fullmatch(value)):
        start = "a letter" if service else "a letter or digit"
        raise InputError(f"{flag} {value!r} is not a Kubernetes name (lowercase letters, digits and '-', starting "
                         f"with {start} and ending with a letter or digit, at most {max_len} characters)")


def _quantity(flag: str, value: str) -> float:
    m = QUANTITY.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise InputError(f"{flag} {value!r} is not a Kubernetes quantity (such as 32Gi, 4 or 500m)")
    suffix = m["suffix"]
    scale = float("1e" + suffix[1:]) if suffix and suffix[0] in "eE" else _SUFFIX[suffix]  # 1e999 -> inf
    amount = float(m["num"]) * scale
    if not (math.isfinite(amount) and amount > 0):
        raise InputError(f"{flag} {value!r} must be a finite quantity above 0")
    return amount


def _duration_s(flag: str, value: str) -> float:
    if not (isinstance(value, str) and DURATION.fullmatch(value)):
        raise InputError(f"{flag} must be a Prometheus duration such as 1m or 30s, got {value!r}")
    seconds = sum(int(n) * _UNIT_S[u] for n, u in re.findall(r"([0-9]+)(ms|[smhdwy])", value))
    if seconds < 1:
        raise InputError(f"{flag} {value!r} is under a second")
    return seconds


def _check_path(flag: str, uri: str, path: str, what: str) -> None:
    """The path part of a storage URI: segments of safe characters, no '.' or '..', no empty segment."""
    for segment in path.rstrip("/").split("/") if path.rstrip("/") else []:
        if segment in (".", "..") or not PATH_SEGMENT.fullmatch(segment):
            raise InputError(f"{flag} {uri!r}: the {what} segment {segment!r} is not allowed (letters, digits and "
                             "._~@+=,- only; no '.', '..', empty segment, space, quote or control character)")


def check_storage_uri(uri: str, flag: str = "--storage-uri") -> None:
    """s3://bucket[/path], gs://bucket[/path] or pvc://claim[/sub/path], each part as its service names it."""
    schemes = ", ".join(s + "://..." for s in STORAGE_SCHEMES)
    if not isinstance(uri, str) or "://" not in uri:
        raise InputError(f"{flag} {uri!r}: give {schemes} (the folder holding the repository's model folders)")
    scheme, rest = uri.split("://", 1)
    if scheme not in STORAGE_SCHEMES:
        raise InputError(f"{flag} {uri!r}: the scheme {scheme!r} is not one of {schemes}")
    head, _, path = rest.partition("/")
    if scheme == "pvc":
        if not (head and len(head) <= 253 and DNS1123_SUBDOMAIN.fullmatch(head)):
            raise InputError(f"{flag} {uri!r}: the claim {head!r} is not a PersistentVolumeClaim name (DNS-1123: "
                             "lowercase letters, digits, '-' and '.')")
        _check_path(flag, uri, path, "sub-path")
    else:
        if not BUCKET[scheme].fullmatch(head):
            raise InputError(f"{flag} {uri!r}: the bucket {head!r} is not a bucket name (3 to 63 lowercase letters, "
                             "digits, '-' and '.')")
        _check_path(flag, uri, path, "object path")


def check_image(image: str) -> None:
    if not (isinstance(image, str) and len(image) <= 512 and IMAGE.fullmatch(image)):
        raise InputError(f"--image {image!r} is not an image reference (REGISTRY/PATH:TAG or @sha256:DIGEST; "
                         "lowercase path, no space)")


@dataclass(frozen=True)
class DeployOptions:
    image: str                        # the serving image (built from the Dockerfile written here, pushed)
    storage_uri: str                  # where the repository (OUT/triton) lives: s3://, gs://, pvc://
    name: str = "smartedit"
    namespace: str = "default"
    min_replicas: int = 1
    max_replicas: int = 4
    target_ratio: float = 0.5         # a request may wait half as long as it computes, on average, per pod
    metric_window: str = "1m"         # the rate() window of the recorded ratio
    scrape_interval: str = "15s"      # how often Prometheus scrapes the pods' metrics (the PodMonitor's interval)
    edit_timeout_s: int = 120         # the longest edit the drain waits for (one at the repository's step limit)
    load_timeout_s: int = 900         # startup: download done, repository hashed (~8 s per 13.8 GB), engines loaded
    memory: str = "32Gi"
    cpu: str = "4"
    shm: str = "2Gi"
    triton_release: str | None = None  # the Triton container release to build on (default: from the plans)
    client_namespaces: tuple[str, ...] = ()  # namespaces whose pods may all reach the inference ports
    prometheus_namespace: str = "monitoring"  # the only namespace that reaches the metrics port
    cache_mb: int = 0                 # Triton's response cache per pod, MiB (0: none); added to --memory

    @property
    def client_label(self) -> str:
        """The pod label (value "true") that lets a pod of the same namespace reach the inference ports."""
        return f"{self.name}-client"

    def check(self) -> None:
        """Each bad option is one InputError naming the flag and the value, before anything is read."""
        _check_name("--name", self.name, NAME_MAX, service=True)
        _check_name("--namespace", self.namespace)
        for ns in self.client_namespaces:
            _check_name("--client-namespace", ns)
        _check_name("--prometheus-namespace", self.prometheus_namespace)
        check_image(self.image)
        check_storage_uri(self.storage_uri)
        if not 1 <= self.min_replicas <= self.max_replicas <= MAX_REPLICAS:
            raise InputError(f"--min-replicas {self.min_replicas} and --max-replicas {self.max_replicas}: the range "
                             f"must run from at least 1 up to at least the minimum, at most {MAX_REPLICAS}")
        if not (isinstance(self.target_ratio, (int, float)) and math.isfinite(self.target_ratio)
                and 0 < self.target_ratio <= MAX_RATIO):
            raise InputError(f"--target-ratio must be a number in (0, {MAX_RATIO:g}], got {self.target_ratio}")
        scrape = _duration_s("--scrape-interval", self.scrape_interval)
        window = _duration_s("--metric-window", self.metric_window)
        if window < 2 * scrape:  # rate() needs two samples in its window: with fewer the rule records nothing
            raise InputError(f"--metric-window {self.metric_window} holds fewer than two scrapes at --scrape-interval "
                             f"{self.scrape_interval}: rate() would have no two samples, the ratio would never be "
                             f"recorded and the autoscaler never scale up; use at least {_seconds(4 * scrape)}")
        for flag, value in (("--edit-timeout-s", self.edit_timeout_s), ("--load-timeout-s", self.load_timeout_s)):
            if not (isinstance(value, int) and 1 <= value <= MAX_TIMEOUT_S):
                raise InputError(f"{flag} must be a whole number of seconds in 1..{MAX_TIMEOUT_S}, got {value!r}")
        check_cache_mb(self.cache_mb)
        memory = _quantity("--memory", self.memory)
        _quantity("--cpu", self.cpu)
        shm = _quantity("--shm", self.shm)
        if shm >= memory:  # a memory-backed emptyDir is counted against the container's memory limit
            raise InputError(f"--shm {self.shm} is not below --memory {self.memory}: /dev/shm is memory the pod's "
                             "limit counts, and the server needs the rest")
        if self.triton_release is not None and not re.fullmatch(r"\d\d\.\d\d", self.triton_release):
            raise InputError(f"--triton-release must be a release tag such as 25.01, got {self.triton_release!r}")


def pod_memory(opts: DeployOptions) -> str:
    """The serving container's memory: --memory, plus the response cache (which Triton holds in host memory)."""
    if not opts.cache_mb:
        return opts.memory
    return f"{math.ceil(_quantity('--memory', opts.memory) / 2**20) + opts.cache_mb}Mi"


def _seconds(s: float) -> str:
    return f"{int(s // 60)}m" if s >= 60 and s % 60 == 0 else f"{int(math.ceil(s))}s"


@dataclass
class Facts:
    """What the manifests take from the export."""
    graph_models: str                            # onnx | trt | python
    files: dict[str, str]                        # the repository's record: {path in OUT/triton: sha256}
    record_sha256: str                           # smartedit/config.pbtxt's sha256 (it lists every other file's)
    repository_bytes: int = 0                    # the repository's size, once its files matched the record
    capabilities: list[str] = field(default_factory=list)  # the plans' compute capabilities ("80", "90"); [] any
    tensorrt: str | None = None                  # the plans' TensorRT version
    release: str = ""                            # the Triton container release to build on

    @property
    def models_gi(self) -> int:
        """The volume a copied repository needs, in GiB."""
        return max(1, math.ceil(self.repository_bytes * MODELS_HEADROOM / 2 ** 30))


def _recorded_repository(manifest: Manifest, out: Path) -> tuple[str, dict[str, str]]:
    """(graph_models, {path in OUT/triton: sha256}) of the manifest's record of OUT/triton, each value checked."""
    where = f"{manifest.path} [repositories][triton]"
    repo = manifest.repositories.get("triton")
    if repo is None:
        raise ArtifactError(f"{out} has no Triton model repository: run smartedit-export --target triton --out {out}")
    graph_models = repo.get("graph_models")
    if graph_models not in GRAPH_MODEL_KINDS:
        raise ArtifactError(f"{where} records graph_models {graph_models!r}, not one of "
                            f"{', '.join(GRAPH_MODEL_KINDS)}: re-run "
                            "smartedit-export --target triton")
    files = {}
    for rel, meta in repo["files"].items():
        sha = meta.get("sha256") if isinstance(meta, dict) else None
        if not (isinstance(rel, str) and rel.startswith("triton/") and isinstance(sha, str)
                and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise ArtifactError(f"{where} holds a malformed entry {rel!r}: {json.dumps(meta)[:120]}")
        files[rel[len("triton/"):]] = sha
    if f"{MODEL}/config.pbtxt" not in files:
        raise ArtifactError(f"{where} does not record {MODEL}/config.pbtxt: re-run smartedit-export --target triton")
    return graph_models, files


def read_export(out: Path, opts: DeployOptions) -> Facts:
    """The facts of an export folder, or one InputError naming what is missing, malformed or cannot match. The
    repository's bytes are not read here (check_export does that)."""
    manifest = Manifest.read(out)
    graph_models, files = _recorded_repository(manifest, out)
    facts = Facts(graph_models=graph_models, files=files, record_sha256=files[f"{MODEL}/config.pbtxt"])
    if graph_models == "trt":
        entries = manifest.entries("trt")
        if not entries:
            raise ArtifactError(f"{out}: the repository serves TensorRT plans, but the manifest has no trt entries")
        versions = set()
        for graph, e in entries.items():
            trt = e.requires.get("tensorrt")
            if not (isinstance(trt, str) and re.fullmatch(r"[0-9]+(\.[0-9]+){1,3}", trt)):
                raise ArtifactError(f"the manifest's trt/{graph} entry records TensorRT {trt!r}, not a version such "
                                    "as 10.7.0.23")
            versions.add(trt)
            caps = e.requires.get("compute_capability", [])
            for c in caps if isinstance(caps, list) else [caps]:
                if not (isinstance(c, str) and re.fullmatch(r"[1-9][0-9]{1,2}", c)):
                    raise ArtifactError(f"the manifest's trt/{graph} entry records compute capability {c!r}, not "
                                        "one such as 80 or 90 (major and minor digits)")
                facts.capabilities.append(c)
        if len(versions) != 1:
            raise ArtifactError(f"the plans in {out} were built by {sorted(versions)}: one TensorRT must build them "
                                "all")
        facts.tensorrt = versions.pop()
        facts.capabilities = sorted(set(facts.capabilities), key=int)
    newest = max(TRITON_RELEASES)
    if opts.triton_release:
        shipped = TRITON_RELEASES.get(opts.triton_release)
        if facts.tensorrt and shipped is not None and not _same_trt(facts.tensorrt, shipped):
            raise InputError(f"--triton-release {opts.triton_release} ships TensorRT {shipped}, but the plans were "
                             f"built by TensorRT {facts.tensorrt}: they load only in that TensorRT")
        facts.release = opts.triton_release
    elif facts.tensorrt:
        match = sorted(tag for tag, trt in TRITON_RELEASES.items() if _same_trt(facts.tensorrt, trt))
        if not match:
            raise InputError(f"the plans were built by TensorRT {facts.tensorrt}, and no Triton container this "
                             f"version knows ships it ({', '.join(f'{t}: {v}' for t, v in TRITON_RELEASES.items())}): "
                             "build the plans in the container you deploy (smartedit-export --target trt there), or "
                             "name its release with --triton-release")
        facts.release = match[-1]
    else:
        facts.release = newest
    return facts


def check_export(export: Path, facts: Facts) -> None:
    """What is deployed is what was exported: every file of OUT/triton has the sha256 the export recorded, and
    nothing else is there; then the repository's size (which sizes the pods' storage) is taken from those files."""
    repo = Path(export) / "triton"
    check_repository(repo, facts.files)
    facts.repository_bytes = sum((repo / rel).stat().st_size for rel in facts.files)


def _same_trt(built: str, shipped: str) -> bool:
    """A plan's TensorRT (10.7.0.23) against a container's (10.7.0): major, minor and patch must agree."""
    return built.split(".")[:3] == shipped.split(".")[:3]


# -- the pieces both forms share ---------------------------------------------------------------------------------


def launcher_command(facts: Facts) -> list[str]:
    """The container's command: the launcher, which checks the repository against the record before any of it
    runs, then runs tritonserver with the args (and its own restrictions of Triton's administrative APIs)."""
    return ["python3", "-m", "smartedit.serve.launch", "--record-sha256", facts.record_sha256, "--"]


def _triton_args(opts: DeployOptions, http: int, grpc: int) -> list[str]:
    """tritonserver's flags that place the server and size its response cache (the launcher adds the rest: metrics
    on, strict readiness, exit on error, the closed APIs, the cache's library folder, the stream model), each as
    --name=value."""
    cache = [f"--cache-config=local,size={opts.cache_mb << 20}"] if opts.cache_mb else []
    return [f"--model-repository={MODELS_PATH}", f"--http-port={http}", f"--grpc-port={grpc}",
            f"--metrics-port={METRICS}", f"--exit-timeout-secs={opts.edit_timeout_s}", *cache]


def _probes(http_port: int | str, opts: DeployOptions) -> dict[str, Any]:
    period = 10
    return {
        "startupProbe": {"httpGet": {"path": "/v2/health/ready", "port": http_port}, "periodSeconds": period,
                         "failureThreshold": max(1, math.ceil(opts.load_timeout_s / period))},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": http_port}, "periodSeconds": period,
                          "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": http_port}, "periodSeconds": 5,
                           "failureThreshold": 2},
    }


def _container_security() -> dict[str, Any]:
    """Every container's: the restricted Pod Security Standard's controls, set on the container itself too, and a
    read-only root filesystem."""
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "allowPrivilegeEscalation": False,
            "privileged": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _ephemeral(gi: int) -> dict[str, str]:
    return {"ephemeral-storage": f"{gi}Gi"}


def _server_container(opts: DeployOptions, facts: Facts, name: str, http: int, grpc: int, models_gi: int,
                      ports: list[dict[str, Any]]) -> dict[str, Any]:
    """The serving container; `models_gi`: the copied repository it must hold (0 for a mounted claim)."""
    disk = _ephemeral(models_gi + TMP_GI + LOGS_GI)
    return {
        "name": name, "image": opts.image, "command": launcher_command(facts), "args": _triton_args(opts, http, grpc),
        "ports": ports,
        "env": [{"name": "HOME", "value": TMP_PATH}],  # the root filesystem is read-only
        "resources": {"requests": {"nvidia.com/gpu": 1, "cpu": opts.cpu, "memory": pod_memory(opts), **disk},
                      "limits": {"nvidia.com/gpu": 1, "memory": pod_memory(opts), **disk}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "dshm", "mountPath": SHM_PATH}, {"name": "tmp", "mountPath": TMP_PATH}],
        **_probes(http, opts),
    }


def _scratch_volumes(opts: DeployOptions) -> list[dict[str, Any]]:
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm}},
            {"name": "tmp", "emptyDir": {"sizeLimit": f"{TMP_GI}Gi"}}]


def _gpu_affinity(facts: Facts) -> dict[str, Any]:
    """Nodes with a GPU (GPU Feature Discovery's labels), of a compute capability the plans were built for."""
    if not facts.capabilities:
        terms = [{"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]
    else:
        terms = [{"matchExpressions": [
            {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": [c[:-1]]},
            {"key": "nvidia.com/gpu.compute.minor", "operator": "In", "values": [c[-1]]}]} for c in facts.capabilities]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def grace_s(opts: DeployOptions) -> int:
    """The pod's termination grace: the launcher's drain (the longest edit), Triton's exit timeout, a margin."""
    return opts.edit_timeout_s + opts.edit_timeout_s + EXIT_MARGIN_S


def _labels(opts: DeployOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": opts.name, "app.kubernetes.io/part-of": "smartedit"}


def recording_rule(opts: DeployOptions) -> dict[str, Any]:
    """The PrometheusRule's group: the queue-to-compute ratio of the `smartedit` model and its stream twin, per
    pod (both queue for the same graphs)."""
    w = opts.metric_window
    sel = f'model=~"{MODEL}|{STREAM_MODEL}"'
    expr = (f"sum by (namespace, pod) (rate(nv_inference_queue_duration_us{{{sel}}}[{w}]))\n"
            f"  / clamp_min(sum by (namespace, pod) (rate(nv_inference_compute_infer_duration_us{{{sel}}}[{w}])), 1)")
    return {"name": "smartedit.rules", "rules": [{"record": RATIO, "expr": expr}]}


def _guards(opts: DeployOptions, selector: dict[str, str], http: int, grpc: int) -> dict[str, dict[str, Any]]:
    """NetworkPolicy (the inference ports from client pods and the named namespaces only, the metrics port from
    Prometheus' namespace only, nothing else) and PodDisruptionBudget (voluntary disruptions take one pod at a
    time; an unhealthy pod never blocks a node's drain)."""
    meta = {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts)}

    def namespace(ns: str) -> dict[str, Any]:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}

    clients = [{"podSelector": {"matchLabels": {opts.client_label: "true"}}}, *map(namespace, opts.client_namespaces)]
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
              "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"], "ingress": [
                  {"from": clients, "ports": [{"protocol": "TCP", "port": p} for p in (http, grpc)]},
                  {"from": [namespace(opts.prometheus_namespace)],
                   "ports": [{"protocol": "TCP", "port": METRICS}]}]}}
    budget = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
              "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector},
                       "unhealthyPodEvictionPolicy": "AlwaysAllow"}}
    return {"networkpolicy.yaml": policy, "poddisruptionbudget.yaml": budget}


def _monitoring(opts: DeployOptions, selector: dict[str, str], port_name: str) -> dict[str, dict[str, Any]]:
    meta = {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts)}
    return {
        "podmonitor.yaml": {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": meta,
                            "spec": {"selector": {"matchLabels": selector},
                                     "podMetricsEndpoints": [{"port": port_name, "path": "/metrics",
                                                              "interval": opts.scrape_interval}]}},
        "prometheusrule.yaml": {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": meta,
                                "spec": {"groups": [recording_rule(opts)]}},
    }


# -- the two forms -----------------------------------------------------------------------------------------------


def kserve(opts: DeployOptions, facts: Facts) -> dict[str, dict[str, Any]]:
    """ServingRuntime + InferenceService (raw deployment, KEDA on the recorded ratio) + guards + monitoring. KServe
    copies the repository into a volume of its own (its storage initializer) and adds that container itself."""
    runtime = f"{opts.name}-triton"
    http, grpc = KSERVE_HTTP, KSERVE_GRPC
    container = _server_container(opts, facts, "kserve-container", http, grpc, facts.models_gi, [
        {"containerPort": http, "name": "http1", "protocol": "TCP"},
        {"containerPort": METRICS, "name": "metrics", "protocol": "TCP"}])
    serving_runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
        "metadata": {"name": runtime, "namespace": opts.namespace, "labels": _labels(opts)},
        "spec": {"annotations": {"prometheus.kserve.io/port": str(METRICS), "prometheus.kserve.io/path": "/metrics"},
                 "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
                 "protocolVersions": ["v2", "grpc-v2"], "containers": [container],
                 "volumes": _scratch_volumes(opts)}}
    pod_labels = {**_labels(opts), "component": "predictor"}
    ratio_query = (f'sum({RATIO}{{namespace="{opts.namespace}", pod=~"{opts.name}-predictor-.*"}})')
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts),
                     "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment",
                                     "serving.kserve.io/autoscalerClass": "keda"}},
        "spec": {"predictor": {
            "minReplicas": opts.min_replicas, "maxReplicas": opts.max_replicas,
            "labels": pod_labels, "affinity": _gpu_affinity(facts),
            "securityContext": _pod_security(), "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": grace_s(opts),
            "model": {"modelFormat": {"name": "triton", "version": "2"}, "runtime": runtime,
                      "protocolVersion": "v2", "storageUri": opts.storage_uri},
            # KEDA's prometheus trigger with an AverageValue target: replicas = ceil(sum over pods / target), the
            # HPA's own formula for a per-pod average
            "autoScaling": {"metrics": [{"type": "External", "external": {
                "metric": {"backend": "prometheus",
                           "serverAddress": f"http://prometheus-operated.{opts.prometheus_namespace}:9090",
                           "query": ratio_query},
                "target": {"type": "AverageValue", "averageValue": str(opts.target_ratio)}}}]}}}}
    return {"servingruntime.yaml": serving_runtime, "inferenceservice.yaml": isvc,
            **_guards(opts, pod_labels, http, grpc), **_monitoring(opts, pod_labels, "metrics")}


def plain(opts: DeployOptions, facts: Facts) -> dict[str, dict[str, Any]]:
    """Deployment + Service + guards + monitoring + HPA (autoscaling/v2, Pods metric) + prometheus-adapter's rule."""
    labels = _labels(opts)
    meta = {"name": opts.name, "namespace": opts.namespace, "labels": labels}
    volumes = _scratch_volumes(opts)
    init = []
    scheme, rest = opts.storage_uri.split("://", 1)
    if scheme == "pvc":  # a claim holding the repository: mounted read-only, nothing copied at start
        claim, _, sub = rest.partition("/")
        sub = sub.rstrip("/")
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mount = {"name": "models", "mountPath": MODELS_PATH, "readOnly": True, **({"subPath": sub} if sub else {})}
        copied_gi = 0
    else:  # a bucket: KServe's storage initializer copies it into the pod at every start (see the README)
        copied_gi = facts.models_gi
        volumes.append({"name": "models", "emptyDir": {"sizeLimit": f"{copied_gi}Gi"}})
        mount = {"name": "models", "mountPath": MODELS_PATH, "readOnly": True}
        disk = _ephemeral(copied_gi + TMP_GI + LOGS_GI)
        init = [{"name": "storage-initializer", "image": "kserve/storage-initializer:v0.15.2",
                 "args": [opts.storage_uri, MODELS_PATH],
                 "env": [{"name": "HOME", "value": TMP_PATH}],
                 "securityContext": _container_security(),
                 "volumeMounts": [{"name": "models", "mountPath": MODELS_PATH},
                                  {"name": "tmp", "mountPath": TMP_PATH}],
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi", **disk},
                               "limits": {"memory": "1Gi", **disk}}}]
    container = _server_container(opts, facts, "tritonserver", HTTP, GRPC, copied_gi, [
        {"containerPort": HTTP, "name": "http"}, {"containerPort": GRPC, "name": "grpc"},
        {"containerPort": METRICS, "name": "metrics"}])
    container["volumeMounts"].append(mount)
    pod: dict[str, Any] = {"securityContext": _pod_security(), "automountServiceAccountToken": False,
                           "affinity": _gpu_affinity(facts), "containers": [container], "volumes": volumes,
                           "terminationGracePeriodSeconds": grace_s(opts)}
    if init:
        pod["initContainers"] = init
    # no spec.replicas: the HPA owns the count, and a replicas field would reset it at every `kubectl apply`
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                  "spec": {"selector": {"matchLabels": labels},
                           "template": {"metadata": {"labels": labels}, "spec": pod}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
               "spec": {"selector": labels, "ports": [{"name": n, "port": p, "targetPort": n} for n, p in
                                                      (("http", HTTP), ("grpc", GRPC))]}}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
                    "minReplicas": opts.min_replicas, "maxReplicas": opts.max_replicas,
                    "metrics": [{"type": "Pods", "pods": {
                        "metric": {"name": RATIO.replace(":", "_")},
                        "target": {"type": "AverageValue", "averageValue": str(opts.target_ratio)}}}],
                    # an edit holds a GPU for seconds and a new pod loads for minutes: scale down slowly
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}
    adapter_rule = {"seriesQuery": f'{RATIO}{{namespace!="",pod!=""}}',
                    "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                    "name": {"matches": f"^{RATIO}$", "as": RATIO.replace(":", "_")},
                    "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"}
    adapter = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": f"{opts.name}-prometheus-adapter-rules", "namespace": opts.namespace,
                            "labels": labels},
               "data": {"config.yaml": _yaml({"rules": [adapter_rule]})}}
    return {"deployment.yaml": deployment, "service.yaml": service, **_guards(opts, labels, HTTP, GRPC),
            **_monitoring(opts, labels, "metrics"), "hpa.yaml": hpa, "prometheus-adapter.yaml": adapter}


# What the image installs: the package's sources and what its build reads (pyproject.toml names README.md)
IMAGE_SOURCES = ("pyproject.toml", "README.md", "smartedit/")


def dockerfile(facts: Facts) -> str:
    return (f"# The serving image of smartedit-k8s: NVIDIA's Triton container {facts.release}"
            + (f" (TensorRT {TRITON_RELEASES.get(facts.release, '?')}, which built the plans)" if facts.tensorrt
               else "") + ",\n"
            "# with this project installed for the `smartedit` Python model and its launcher. From the project's\n"
            "# root:\n"
            "#   docker build -f k8s/Dockerfile -t REGISTRY/smartedit-triton:TAG . && docker push REGISTRY/...\n"
            "# Only the package's sources are copied; Dockerfile.dockerignore beside this file keeps everything else\n"
            "# of the context (exports, .git, .env files) from being sent to the builder at all.\n"
            f"FROM nvcr.io/nvidia/tritonserver:{facts.release}-py3\n"
            "COPY pyproject.toml README.md /tmp/smartedit-deploy/\n"
            "COPY smartedit/ /tmp/smartedit-deploy/smartedit/\n"
            "RUN pip install --no-cache-dir /tmp/smartedit-deploy && rm -rf /tmp/smartedit-deploy\n"
            f"USER {UID}:{UID}\n")


def dockerignore() -> str:
    """BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile (before the context's own .dockerignore):
    everything is left out but the image's sources."""
    return ("# smartedit-k8s: the build context is the project's root; only what the image installs is sent\n"
            "*\n" + "".join(f"!{s.rstrip('/')}\n" for s in IMAGE_SOURCES)
            + "**/__pycache__\n**/*.pyc\n**/.env\n**/.env.*\n")


def _yaml(obj: Any) -> str:
    import yaml

    class Plain(yaml.SafeDumper):  # a dict used twice (the labels) is written twice, not as an &anchor / *alias
        def ignore_aliases(self, data) -> bool:
            return True

    return yaml.dump(obj, Dumper=Plain, sort_keys=False, default_flow_style=False, width=120)


# -- the output folder -------------------------------------------------------------------------------------------


def _read_record(out: Path) -> dict[str, list[str]]:
    """{path in --out: the sha256s it may have} from the record of an earlier run ({} without one)."""
    path = out / RECORD_FILE
    if not path.is_file():
        return {}
    record = read_json(path, InputError)
    files = record.get("files")
    if record.get("written_by") != "smartedit-k8s" or not isinstance(files, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in files.values()):
        raise InputError(f"--out {out}: {path} is not a record smartedit-k8s wrote; use an empty folder")
    return files


def foreign_files(out: Path) -> list[str]:
    """What in `out` smartedit-k8s did not write, or was changed since (empty for a new or empty folder)."""
    if not out.is_dir():
        return []
    record = _read_record(out)
    bad = []
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.is_dir() and not p.is_symlink() or rel == RECORD_FILE or _staging(p.relative_to(out)):
            continue
        if rel not in record:
            bad.append(rel)
        elif p.is_symlink() or not p.is_file() or sha256_file(p) not in record[rel]:
            bad.append(f"{rel} (changed)")
    return bad


def _staging(rel: Path) -> bool:
    """A leftover of a killed write (smartedit.files' staging names), or something inside one."""
    return any(STAGING.match(part) for part in rel.parts)


def _write_record(out: Path, files: dict[str, list[str]]) -> None:
    write_atomic(out / RECORD_FILE, json.dumps({"written_by": "smartedit-k8s", "files": files}, indent=2) + "\n")


def write_manifests(export: str | Path, out: str | Path, opts: DeployOptions) -> list[Path]:
    """Check the options, the output folder, the export's record and the repository's bytes, then write every file
    (atomically); -> the paths written."""
    opts.check()
    export, out = Path(export), Path(out)
    refuse_overwriting_inputs({"--out": out}, {"export folder": export})
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    bad = foreign_files(out)
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise InputError(f"--out {out} holds files smartedit-k8s did not write (or changed since): "
                         f"{', '.join(bad[:4])}{more}; it "
                         "writes only into a new or empty folder or one of its own outputs, and never overwrites "
                         "yours: use an empty folder or move them out")
    check_writable_parent(out / RECORD_FILE, "--out")
    facts = read_export(export, opts)
    check_export(export, facts)
    files = {"Dockerfile": dockerfile(facts), "Dockerfile.dockerignore": dockerignore()}
    for form, make in (("kserve", kserve), ("plain", plain)):
        for name, doc in make(opts, facts).items():
            files[f"{form}/{name}"] = _yaml(doc)
    old = _read_record(out)
    for p in sorted(out.rglob(".*.tmp-*")) if out.is_dir() else []:  # leftovers of a killed run
        if STAGING.match(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    new = {rel: [hashlib.sha256(text.encode()).hexdigest()] for rel, text in files.items()}
    # while the files are replaced, a file may hold its old or its new bytes: the record accepts both until done
    _write_record(out, {rel: sorted(set(old.get(rel, [])) | set(new.get(rel, []))) for rel in {*old, *new}})
    written = []
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        written.append(write_atomic(out / rel, text))
    for rel in old.keys() - new.keys():  # ours, unchanged (checked above), and no longer written
        (out / rel).unlink(missing_ok=True)
    _write_record(out, new)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="smartedit-k8s", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Kubernetes manifests (KServe and plain) for the Triton deployment of an export folder "
                    "(smartedit-export --target triton), autoscaled on Triton's queue-to-compute ratio.",
        epilog="example:\n  smartedit-k8s out/ --image registry.example.com/smartedit-triton:1 \\\n"
               "      --storage-uri s3://models/smartedit/triton --out k8s/\n"
               "  kubectl apply -f k8s/kserve/        # or k8s/plain/")
    p.add_argument("export", help="the export folder (its manifest.json and triton/ repository)")
    p.add_argument("--out", required=True, help="folder for the Dockerfile and the kserve/ and plain/ manifests "
                   "(new, empty, or an earlier output of this command)")
    p.add_argument("--image", required=True, help="the serving image: built from OUT/Dockerfile, pushed where the "
                   "cluster pulls")
    p.add_argument("--storage-uri", required=True, help="where the repository (the export's triton/ folder) "
                   "lives: s3://bucket/path, gs://bucket/path, or pvc://claim/path")
    p.add_argument("--name", default="smartedit", help="name of the resources (default smartedit); client pods "
                   "carry the label NAME-client=true")
    p.add_argument("--namespace", default="default")
    p.add_argument("--client-namespace", action="append", default=[], help="a namespace whose pods may all reach "
                   "the inference ports (an ingress controller's, a gateway's); repeat for several")
    p.add_argument("--prometheus-namespace", default="monitoring", help="the namespace of the Prometheus that "
                   "scrapes the pods: the only one that reaches the metrics port (default monitoring)")
    p.add_argument("--min-replicas", type=positive, default=1)
    p.add_argument("--max-replicas", type=positive, default=4)
    p.add_argument("--target-ratio", type=float, default=0.5, help="per-pod average of queue time over compute "
                   "time the autoscaler keeps (default 0.5: a request waits half as long as it computes)")
    p.add_argument("--metric-window", default="1m", help="rate() window of the recorded ratio (default 1m; at "
                   "least two scrapes)")
    p.add_argument("--scrape-interval", default="15s", help="how often Prometheus scrapes the pods (default 15s)")
    p.add_argument("--edit-timeout-s", type=positive, default=120, help="the longest in-flight edit a stopping "
                   "pod waits for (one at the repository's step limit; default 120)")
    p.add_argument("--load-timeout-s", type=positive, default=900, help="start-up allowed before the pod is "
                   "restarted: download, hash check, engines loaded (default 900)")
    p.add_argument("--memory", default="32Gi", help="host memory per pod (default 32Gi)")
    p.add_argument("--cpu", default="4", help="CPUs per pod (default 4)")
    p.add_argument("--shm", default="2Gi", help="/dev/shm per pod for the Python backend (default 2Gi)")
    p.add_argument("--cache-mb", type=int, default=0, help="Triton's response cache per pod, MiB (default 0: none): "
                   "repeated requests answered from it; added to the pod's --memory; requests must name a seed")
    p.add_argument("--triton-release", help="the Triton container release to build on (default: the one whose "
                   "TensorRT built the plans, or the newest known)")
    a = p.parse_args(argv)

    def body() -> None:
        opts = DeployOptions(image=a.image, storage_uri=a.storage_uri, name=a.name, namespace=a.namespace,
                             min_replicas=a.min_replicas, max_replicas=a.max_replicas, target_ratio=a.target_ratio,
                             metric_window=a.metric_window, scrape_interval=a.scrape_interval,
                             edit_timeout_s=a.edit_timeout_s, load_timeout_s=a.load_timeout_s, memory=a.memory,
                             cpu=a.cpu, shm=a.shm, triton_release=a.triton_release, cache_mb=a.cache_mb,
                             client_namespaces=tuple(a.client_namespace),
                             prometheus_namespace=a.prometheus_namespace)
        for path in write_manifests(a.export, a.out, opts):
            print(f"wrote {path}")

    run_command("smartedit-k8s", body)


if __name__ == "__main__":
    main()
