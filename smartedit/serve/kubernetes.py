"""`smartedit-k8s`: the Triton deployment of an export on Kubernetes, as KServe resources and as plain manifests.

    smartedit-k8s OUT --image REGISTRY/smartedit-triton:TAG --storage-uri s3://bucket/smartedit/triton --out k8s/

reads OUT/manifest.json and the model repository OUT/triton (smartedit-export --target triton) and writes k8s/:

    Dockerfile                          the serving image: NVIDIA's Triton container, of the release whose TensorRT
                                        built the plans, with this project installed (the `smartedit` model imports it)
    kserve/servingruntime.yaml          ServingRuntime: Triton with the project, its probes, drain, /dev/shm
    kserve/inferenceservice.yaml        InferenceService: the repository from --storage-uri, raw deployment, KEDA
                                        autoscaling on the queue-to-compute ratio (KServe creates the ScaledObject)
    kserve/podmonitor.yaml, kserve/prometheusrule.yaml     Triton's metrics scraped, the ratio recorded
    plain/deployment.yaml, plain/service.yaml, plain/podmonitor.yaml, plain/prometheusrule.yaml,
    plain/hpa.yaml (autoscaling/v2, Pods metric), plain/prometheus-adapter.yaml (the rule exposing the metric)

A command of its own, not an export target: it produces no graph from a model, it deploys a finished export with
options (image, storage, replicas, time limits) that no export has; its output belongs to the cluster's repository
of manifests, not inside the export (an output there is refused, as elsewhere).

Both forms: one `nvidia.com/gpu` per pod, scheduled (GPU Feature Discovery's node labels) on the compute
capabilities the TensorRT plans were built for; liveness /v2/health/live, readiness /v2/health/ready and a startup
probe that allows the repository's load and hash check; /dev/shm as a memory volume (the Python backend passes
tensors through it); Triton's non-inference APIs restricted to a key from a Secret; and a drain: the pre-stop hook
unloads the `smartedit` model (in-flight edits finish, new ones are refused) and the grace period and Triton's exit
timeout allow an edit at the repository's step limit to finish.

The autoscaling signal: each edit holds the GPU for seconds, so utilisation says little; time in Triton's queue
against time computing does. Recorded per pod, for the `smartedit` model only (a BLS repository loads six models,
and an average over all of them reads a fraction of the truth):
    smartedit:queue_compute_ratio = rate(nv_inference_queue_duration_us{model="smartedit"}[w])
                                    / rate(nv_inference_compute_infer_duration_us{model="smartedit"}[w])
and the autoscaler keeps its per-pod average at --target-ratio: replicas = ceil(replicas x ratio / target).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smartedit.arguments import positive
from smartedit.errors import ArtifactError, InputError, run_command
from smartedit.files import refuse_overwriting_inputs, write_atomic
from smartedit.graphs.manifest import Manifest

from .admin import ADMIN_KEY_ENV, restricted_flags
from .repository import MODEL

# NVIDIA's Triton containers (nvcr.io/nvidia/tritonserver:<tag>-py3) and the TensorRT each ships, as their release
# notes list it (docs/introduction/release_notes.md of triton-inference-server/server at each release): a TensorRT plan
# loads only in the TensorRT that built it. Only releases whose TensorRT was read there are listed; another release
# can be named with --triton-release (its TensorRT is then the user's to check).
TRITON_RELEASES = {"24.08": "10.3.0", "24.10": "10.5.0", "24.12": "10.7.0", "25.01": "10.8.0"}
STORAGE_SCHEMES = ("s3", "gs", "pvc")  # what KServe's storage initializer and a plain volume can both serve
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")  # DNS-1123 label, short enough for derived names
RATIO = "smartedit:queue_compute_ratio"
HTTP, GRPC, METRICS = 8000, 8001, 8002
SHM_PATH = "/dev/shm"


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
    edit_timeout_s: int = 120         # the longest edit the drain waits for (one at the repository's step limit)
    load_timeout_s: int = 900         # startup: download done, repository hashed (~8 s per 13.8 GB), engines loaded
    memory: str = "32Gi"
    cpu: str = "4"
    shm: str = "2Gi"
    triton_release: str | None = None  # the Triton container release to build on (default: from the plans)
    admin_secret: str = "smartedit-admin"  # Secret with the restricted APIs' key (key "key")

    def check(self) -> None:
        """Each bad option is one InputError naming the flag and the value, before anything is read."""
        if not K8S_NAME.match(self.name):
            raise InputError(f"--name {self.name!r} is not a Kubernetes name (lowercase letters, digits, '-', at "
                             "most 52 characters)")
        if not K8S_NAME.match(self.namespace):
            raise InputError(f"--namespace {self.namespace!r} is not a Kubernetes namespace name")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InputError(f"--min-replicas {self.min_replicas} and --max-replicas {self.max_replicas}: the range "
                             "must run from at least 1 up to at least the minimum")
        if not (math.isfinite(self.target_ratio) and self.target_ratio > 0):
            raise InputError(f"--target-ratio must be a finite number > 0, got {self.target_ratio}")
        if not re.fullmatch(r"[1-9][0-9]*[smh]", self.metric_window):
            raise InputError(f"--metric-window must be a Prometheus duration such as 1m or 30s, got "
                             f"{self.metric_window!r}")
        scheme = self.storage_uri.split("://", 1)[0] if "://" in self.storage_uri else ""
        if scheme not in STORAGE_SCHEMES or not self.storage_uri.split("://", 1)[1].strip("/"):
            raise InputError(f"--storage-uri {self.storage_uri!r}: give {', '.join(s + '://...' for s in STORAGE_SCHEMES)}"
                             " (the folder holding the repository's model folders)")
        if not self.image or any(c.isspace() for c in self.image):
            raise InputError(f"--image {self.image!r} is not an image reference")
        if self.triton_release is not None and not re.fullmatch(r"\d\d\.\d\d", self.triton_release):
            raise InputError(f"--triton-release must be a release tag such as 25.01, got {self.triton_release!r}")


@dataclass
class Facts:
    """What the manifests take from the export."""
    stages: str                                  # onnx | trt | python
    capabilities: list[str] = field(default_factory=list)  # the plans' compute capabilities ("80", "90"); [] any
    tensorrt: str | None = None                  # the plans' TensorRT version
    release: str = ""                            # the Triton container release to build on


def read_export(out: Path, opts: DeployOptions) -> Facts:
    """The facts of an export folder, or one InputError naming what is missing or cannot match."""
    manifest = Manifest.read(out)
    repo = manifest.repositories.get("triton")
    if repo is None:
        raise ArtifactError(f"{out} has no Triton model repository: run smartedit-export --target triton --out {out}")
    stages = repo.get("stages", "?")
    facts = Facts(stages=stages)
    if stages == "trt":
        entries = manifest.entries("trt")
        versions = {e.requires.get("tensorrt") for e in entries.values()}
        if len(versions) != 1:
            raise ArtifactError(f"the plans in {out} were built by {sorted(map(str, versions))}: one TensorRT "
                                "must build them all")
        facts.tensorrt = versions.pop()
        facts.capabilities = sorted({c for e in entries.values() for c in e.requires.get("compute_capability", [])},
                                    key=int)
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


def _same_trt(built: str, shipped: str) -> bool:
    """A plan's TensorRT (10.7.0.23) against a container's (10.7.0): major, minor and patch must agree."""
    return built.split(".")[:3] == shipped.split(".")[:3]


# -- the pieces both forms share ---------------------------------------------------------------------------------


def _triton_args(opts: DeployOptions, repository: str, http: int, grpc: int) -> list[str]:
    return ["tritonserver", f"--model-repository={repository}", f"--http-port={http}", f"--grpc-port={grpc}",
            f"--metrics-port={METRICS}", "--allow-metrics=true", "--model-control-mode=explicit", "--load-model=*",
            "--strict-readiness=true", "--exit-on-error=true", f"--exit-timeout-secs={opts.edit_timeout_s}",
            *restricted_flags(f"$({ADMIN_KEY_ENV})")]  # Kubernetes expands $(VAR) in args


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


def _container_common(opts: DeployOptions, http_port: int) -> dict[str, Any]:
    return {
        "env": [{"name": ADMIN_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": opts.admin_secret, "key": "key"}}}],
        "resources": {"requests": {"nvidia.com/gpu": 1, "cpu": opts.cpu, "memory": opts.memory},
                      "limits": {"nvidia.com/gpu": 1, "memory": opts.memory}},
        "lifecycle": {"preStop": {"exec": {"command": [
            "python3", "-m", "smartedit.serve.drain", "--model", MODEL, "--http-port", str(http_port),
            "--timeout-s", str(opts.edit_timeout_s)]}}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "dshm", "mountPath": SHM_PATH}],
        **_probes(http_port, opts),
    }


def _shm_volume(opts: DeployOptions) -> dict[str, Any]:
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm}}


def _gpu_affinity(facts: Facts) -> dict[str, Any]:
    """Nodes with a GPU (GPU Feature Discovery's labels), of a compute capability the plans were built for."""
    if not facts.capabilities:
        terms = [{"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]
    else:
        terms = [{"matchExpressions": [
            {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": [c[:-1]]},
            {"key": "nvidia.com/gpu.compute.minor", "operator": "In", "values": [c[-1]]}]} for c in facts.capabilities]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def _grace_s(opts: DeployOptions) -> int:
    return opts.edit_timeout_s + 30  # the pre-stop drain, then Triton's own exit timeout, then a margin


def _labels(opts: DeployOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": opts.name, "app.kubernetes.io/part-of": "smartedit"}


def recording_rule(opts: DeployOptions) -> dict[str, Any]:
    """The PrometheusRule's group: the queue-to-compute ratio of the `smartedit` model, per pod."""
    w = opts.metric_window
    sel = f'model="{MODEL}"'
    expr = (f"sum by (namespace, pod) (rate(nv_inference_queue_duration_us{{{sel}}}[{w}]))\n"
            f"  / clamp_min(sum by (namespace, pod) (rate(nv_inference_compute_infer_duration_us{{{sel}}}[{w}])), 1)")
    return {"name": "smartedit.rules", "rules": [{"record": RATIO, "expr": expr}]}


def _monitoring(opts: DeployOptions, selector: dict[str, str], port_name: str) -> dict[str, dict[str, Any]]:
    meta = {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts)}
    return {
        "podmonitor.yaml": {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": meta,
                            "spec": {"selector": {"matchLabels": selector},
                                     "podMetricsEndpoints": [{"port": port_name, "path": "/metrics",
                                                              "interval": "15s"}]}},
        "prometheusrule.yaml": {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": meta,
                                "spec": {"groups": [recording_rule(opts)]}},
    }


# -- the two forms -----------------------------------------------------------------------------------------------


def kserve(opts: DeployOptions, facts: Facts) -> dict[str, dict[str, Any]]:
    """ServingRuntime + InferenceService (raw deployment, KEDA on the recorded ratio) + monitoring."""
    runtime = f"{opts.name}-triton"
    http, grpc = 8080, 9000  # KServe's ports for Triton (its v2 and grpc-v2 protocols)
    container = {"name": "kserve-container", "image": opts.image,
                 "args": _triton_args(opts, "/mnt/models", http, grpc),
                 "ports": [{"containerPort": http, "name": "http1", "protocol": "TCP"},
                           {"containerPort": METRICS, "name": "metrics", "protocol": "TCP"}],
                 **_container_common(opts, http)}
    serving_runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
        "metadata": {"name": runtime, "namespace": opts.namespace, "labels": _labels(opts)},
        "spec": {"annotations": {"prometheus.kserve.io/port": str(METRICS), "prometheus.kserve.io/path": "/metrics"},
                 "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
                 "protocolVersions": ["v2", "grpc-v2"], "containers": [container], "volumes": [_shm_volume(opts)]}}
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
            "terminationGracePeriodSeconds": _grace_s(opts),
            "model": {"modelFormat": {"name": "triton", "version": "2"}, "runtime": runtime,
                      "protocolVersion": "v2", "storageUri": opts.storage_uri},
            # KEDA's prometheus trigger with an AverageValue target: replicas = ceil(sum over pods / target), the
            # HPA's own formula for a per-pod average
            "autoScaling": {"metrics": [{"type": "External", "external": {
                "metric": {"backend": "prometheus", "serverAddress": "http://prometheus-operated.monitoring:9090",
                           "query": ratio_query},
                "target": {"type": "AverageValue", "averageValue": str(opts.target_ratio)}}}]}}}}
    return {"servingruntime.yaml": serving_runtime, "inferenceservice.yaml": isvc,
            **_monitoring(opts, pod_labels, "metrics")}


def plain(opts: DeployOptions, facts: Facts) -> dict[str, dict[str, Any]]:
    """Deployment + Service + monitoring + HPA (autoscaling/v2, Pods metric) + prometheus-adapter's rule."""
    labels = _labels(opts)
    meta = {"name": opts.name, "namespace": opts.namespace, "labels": labels}
    volumes = [_shm_volume(opts)]
    init = []
    scheme, rest = opts.storage_uri.split("://", 1)
    if scheme == "pvc":  # a claim holding the repository: mounted read-only, nothing copied at start
        claim, _, sub = rest.partition("/")
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mount = {"name": "models", "mountPath": "/mnt/models", "readOnly": True, **({"subPath": sub} if sub else {})}
    else:  # a bucket: KServe's storage initializer copies it into the pod at every start (see the README)
        volumes.append({"name": "models", "emptyDir": {}})
        mount = {"name": "models", "mountPath": "/mnt/models"}
        init = [{"name": "storage-initializer", "image": "kserve/storage-initializer:v0.15.2",
                 "args": [opts.storage_uri, "/mnt/models"],
                 "volumeMounts": [{"name": "models", "mountPath": "/mnt/models"}],
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}}]
    common = _container_common(opts, HTTP)
    common["volumeMounts"] = [*common["volumeMounts"], {**mount, "readOnly": True}]
    container = {"name": "tritonserver", "image": opts.image, "args": _triton_args(opts, "/mnt/models", HTTP, GRPC),
                 "ports": [{"containerPort": HTTP, "name": "http"}, {"containerPort": GRPC, "name": "grpc"},
                           {"containerPort": METRICS, "name": "metrics"}], **common}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {"replicas": opts.min_replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"affinity": _gpu_affinity(facts), "initContainers": init,
                                       "containers": [container], "volumes": volumes,
                                       "terminationGracePeriodSeconds": _grace_s(opts)}}}}
    if not init:
        del deployment["spec"]["template"]["spec"]["initContainers"]
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
    return {"deployment.yaml": deployment, "service.yaml": service, **_monitoring(opts, labels, "metrics"),
            "hpa.yaml": hpa, "prometheus-adapter.yaml": adapter}


def dockerfile(facts: Facts) -> str:
    return (f"# The serving image of smartedit-k8s: NVIDIA's Triton container {facts.release}"
            + (f" (TensorRT {TRITON_RELEASES.get(facts.release, '?')}, which built the plans)" if facts.tensorrt
               else "") + ",\n"
            "# with this project installed for the `smartedit` Python model. From the project's root:\n"
            "#   docker build -f k8s/Dockerfile -t REGISTRY/smartedit-triton:TAG . && docker push REGISTRY/...\n"
            f"FROM nvcr.io/nvidia/tritonserver:{facts.release}-py3\n"
            "COPY . /tmp/smartedit-deploy\n"
            "RUN pip install --no-cache-dir /tmp/smartedit-deploy && rm -rf /tmp/smartedit-deploy\n"
            "USER 1000\n")


def _yaml(obj: Any) -> str:
    import yaml

    class Plain(yaml.SafeDumper):  # a dict used twice (the labels) is written twice, not as an &anchor / *alias
        def ignore_aliases(self, data) -> bool:
            return True

    return yaml.dump(obj, Dumper=Plain, sort_keys=False, default_flow_style=False, width=120)


def write_manifests(export: str | Path, out: str | Path, opts: DeployOptions) -> list[Path]:
    """Check the options and the export, then write every file (atomically); -> the paths written."""
    opts.check()
    export, out = Path(export), Path(out)
    refuse_overwriting_inputs({"--out": out}, {"export folder": export})
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    facts = read_export(export, opts)
    files = {"Dockerfile": dockerfile(facts)}
    for form, make in (("kserve", kserve), ("plain", plain)):
        for name, doc in make(opts, facts).items():
            files[f"{form}/{name}"] = _yaml(doc)
    written = []
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        written.append(write_atomic(out / rel, text))
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="smartedit-k8s", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Kubernetes manifests (KServe and plain) for the Triton deployment of an export folder "
                    "(smartedit-export --target triton), autoscaled on Triton's queue-to-compute ratio.",
        epilog="example:\n  smartedit-k8s out/ --image registry.example.com/smartedit-triton:1 \\\n"
               "      --storage-uri s3://models/smartedit/triton --out k8s/\n"
               "  kubectl create secret generic smartedit-admin --from-literal=key=$(openssl rand -hex 24)\n"
               "  kubectl apply -f k8s/kserve/        # or k8s/plain/")
    p.add_argument("export", help="the export folder (its manifest.json and triton/ repository)")
    p.add_argument("--out", required=True, help="folder for the Dockerfile and the kserve/ and plain/ manifests")
    p.add_argument("--image", required=True, help="the serving image: built from OUT/Dockerfile, pushed where the "
                   "cluster pulls")
    p.add_argument("--storage-uri", required=True, help="where the repository (the export's triton/ folder) "
                   "lives: s3://bucket/path, gs://bucket/path, or pvc://claim/path")
    p.add_argument("--name", default="smartedit", help="name of the resources (default smartedit)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--min-replicas", type=positive, default=1)
    p.add_argument("--max-replicas", type=positive, default=4)
    p.add_argument("--target-ratio", type=float, default=0.5, help="per-pod average of queue time over compute "
                   "time the autoscaler keeps (default 0.5: a request waits half as long as it computes)")
    p.add_argument("--metric-window", default="1m", help="rate() window of the recorded ratio (default 1m)")
    p.add_argument("--edit-timeout-s", type=positive, default=120, help="the longest in-flight edit a stopping "
                   "pod waits for (one at the repository's step limit; default 120)")
    p.add_argument("--load-timeout-s", type=positive, default=900, help="start-up allowed before the pod is "
                   "restarted: download, hash check, engines loaded (default 900)")
    p.add_argument("--memory", default="32Gi", help="host memory per pod (default 32Gi)")
    p.add_argument("--cpu", default="4", help="CPUs per pod (default 4)")
    p.add_argument("--shm", default="2Gi", help="/dev/shm per pod for the Python backend (default 2Gi)")
    p.add_argument("--triton-release", help="the Triton container release to build on (default: the one whose "
                   "TensorRT built the plans, or the newest known)")
    a = p.parse_args(argv)

    def body() -> None:
        opts = DeployOptions(image=a.image, storage_uri=a.storage_uri, name=a.name, namespace=a.namespace,
                             min_replicas=a.min_replicas, max_replicas=a.max_replicas, target_ratio=a.target_ratio,
                             metric_window=a.metric_window, edit_timeout_s=a.edit_timeout_s,
                             load_timeout_s=a.load_timeout_s, memory=a.memory, cpu=a.cpu, shm=a.shm,
                             triton_release=a.triton_release)
        for path in write_manifests(a.export, a.out, opts):
            print(f"wrote {path}")

    run_command("smartedit-k8s", body)


if __name__ == "__main__":
    main()
