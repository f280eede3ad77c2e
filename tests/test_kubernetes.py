"""smartedit-k8s: the manifests of the shared tiny `--target triton` export, each check with a case that must fail it.

- built-in kinds (Deployment, Service, HorizontalPodAutoscaler, ConfigMap) against Kubernetes 1.34's OpenAPI
  schemas, strictly (unknown fields are errors), by kubernetes-validate (PyPI, offline);
- custom resources (ServingRuntime, InferenceService, PodMonitor, PrometheusRule) against their projects' published
  CRD schemas (tests/k8s-crds/, with their sources), strictly: a field no schema node lists is an error unless the
  node preserves unknown fields;
- the recording rule with promtool (Debian's prometheus package: install.sh): `check rules`, and `test rules` on
  synthetic series whose ratio is known;
- the rule on a real Prometheus (the same package) scraping a running smartedit-serve through the load test at
  concurrency 1, then 8: the ratio is near zero alone and high under load, and the HPA's formula gives one replica
  alone and more under load. Bounded in requests and time; every process it starts is stopped.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_cli
from smartedit.serve.kubernetes import RATIO, DeployOptions, main as k8s_main, recording_rule

KUBERNETES = "1.34.0"  # the Kubernetes version the built-in kinds are validated against
CRDS = Path(__file__).resolve().parent / "k8s-crds"
IMAGE = "registry.example.com/smartedit-triton:1"
BUILT_IN = {("apps/v1", "Deployment"), ("v1", "Service"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
            ("v1", "ConfigMap")}


@pytest.fixture(scope="module")
def manifests(triton_repository, tmp_path_factory):
    out, _ = triton_repository
    dst = tmp_path_factory.mktemp("k8s") / "k8s"
    k8s_main([str(out), "--image", IMAGE, "--storage-uri", "s3://models/smartedit/triton", "--out", str(dst),
              "--min-replicas", "1", "--max-replicas", "6"])
    return dst


def _docs(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): yaml.safe_load(p.read_text()) for p in sorted(folder.rglob("*.yaml"))}


def test_the_files_for_the_tiny_export(manifests):
    assert sorted(str(p.relative_to(manifests)) for p in manifests.rglob("*") if p.is_file()) == [
        "Dockerfile", "kserve/inferenceservice.yaml", "kserve/podmonitor.yaml", "kserve/prometheusrule.yaml",
        "kserve/servingruntime.yaml", "plain/deployment.yaml", "plain/hpa.yaml", "plain/podmonitor.yaml",
        "plain/prometheus-adapter.yaml", "plain/prometheusrule.yaml", "plain/service.yaml"]
    docs = _docs(manifests)
    pod = docs["plain/deployment.yaml"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["image"] == IMAGE
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["lifecycle"]["preStop"]["exec"]["command"][:3] == ["python3", "-m", "smartedit.serve.drain"]
    assert pod["terminationGracePeriodSeconds"] > int(next(a for a in c["args"] if a.startswith(
        "--exit-timeout-secs=")).split("=")[1])  # the drain and Triton's exit fit the grace period
    assert any(a.startswith("--http-restricted-api=model-repository") for a in c["args"])
    hpa = docs["plain/hpa.yaml"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 6)
    isvc = docs["kserve/inferenceservice.yaml"]["spec"]["predictor"]
    assert isvc["model"]["storageUri"] == "s3://models/smartedit/triton" and isvc["maxReplicas"] == 6


# -- built-in kinds: kubernetes-validate, strict ---------------------------------------------------------------------


def _validate_builtin(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_built_in_kinds_validate_strictly(manifests):
    import kubernetes_validate

    checked = 0
    for name, doc in _docs(manifests).items():
        if (doc["apiVersion"], doc["kind"]) in BUILT_IN:
            _validate_builtin(doc)
            checked += 1
    assert checked == 4
    wrong = copy.deepcopy(_docs(manifests)["plain/deployment.yaml"])
    wrong["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # not a field of a container
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_builtin(wrong)
    wrong = copy.deepcopy(_docs(manifests)["plain/hpa.yaml"])
    wrong["spec"]["metrics"][0]["pods"]["target"]["type"] = 7  # a string in autoscaling/v2
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_builtin(wrong)


# -- custom resources: their published CRD schemas, strict -----------------------------------------------------------


def _strict(node):
    """The schema with additionalProperties false wherever it lists properties and does not preserve the rest."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [_strict(x) for x in node] if isinstance(node, list) else node


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for f in CRDS.glob("*.yaml.gz"):
        crd = yaml.safe_load(gzip.decompress(f.read_bytes()))
        for v in crd["spec"]["versions"]:
            schemas[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = \
                _strict(v["schema"]["openAPIV3Schema"])
    return schemas


def _validate_custom(doc: dict, schemas) -> list[str]:
    import jsonschema

    schema = schemas[(doc["apiVersion"], doc["kind"])]
    return [f"{'.'.join(map(str, e.path))}: {e.message[:200]}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def test_custom_resources_validate_against_their_crds(manifests, crd_schemas):
    custom = {n: d for n, d in _docs(manifests).items() if (d["apiVersion"], d["kind"]) not in BUILT_IN}
    assert sorted(d["kind"] for d in custom.values()) == ["InferenceService", "PodMonitor", "PodMonitor",
                                                          "PrometheusRule", "PrometheusRule", "ServingRuntime"]
    for name, doc in custom.items():
        assert _validate_custom(doc, crd_schemas) == [], name
    isvc = copy.deepcopy(custom["kserve/inferenceservice.yaml"])
    isvc["spec"]["predictor"]["gpuCount"] = 1  # unknown
    assert any("gpuCount" in e for e in _validate_custom(isvc, crd_schemas))
    isvc = copy.deepcopy(custom["kserve/inferenceservice.yaml"])
    isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["backend"] = "datadog"  # enum
    assert _validate_custom(isvc, crd_schemas)
    rule = copy.deepcopy(custom["plain/prometheusrule.yaml"])
    rule["spec"]["groups"][0]["rules"][0]["recrd"] = rule["spec"]["groups"][0]["rules"][0].pop("record")
    assert _validate_custom(rule, crd_schemas)


# -- bad options: one line each --------------------------------------------------------------------------------------


def _trt_export(triton_repository, tmp_path: Path, tensorrt: str, caps: list[str]) -> Path:
    """The shared export as if its repository served TensorRT plans built by `tensorrt` for `caps` (the manifest's
    record; the files are not read: the manifests come from the record alone)."""
    out, _ = triton_repository
    dst = tmp_path / "export"
    shutil.copytree(out, dst, ignore=shutil.ignore_patterns("__pycache__", ".smartedit-export.lock", "*.onnx*"))
    m = json.loads((dst / "manifest.json").read_text())
    m["artifacts"]["trt"] = {g: {**e, "target": "trt", "requires": {"tensorrt": tensorrt, "compute_capability": caps}}
                             for g, e in m["artifacts"]["onnx"].items()}
    m["repositories"]["triton"]["stages"] = "trt"
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_plans_pick_the_container_of_their_tensorrt_and_their_gpus(triton_repository, tmp_path, capsys):
    export = _trt_export(triton_repository, tmp_path, "10.7.0.23", ["80", "90"])
    code, _, err = run_cli(k8s_main, [export, "--image", IMAGE, "--storage-uri", "pvc://models/triton", "--out",
                                      tmp_path / "k8s"], capsys)
    assert code == 0, err
    assert "FROM nvcr.io/nvidia/tritonserver:24.12-py3" in (tmp_path / "k8s" / "Dockerfile").read_text()
    pod = yaml.safe_load((tmp_path / "k8s" / "plain" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [[e["values"][0] for e in t["matchExpressions"]] for t in terms] == [["8", "0"], ["9", "0"]]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert "initContainers" not in pod  # a claim is mounted, not copied


BAD = [
    # (id, extra args, export change, what the line names)
    ("replicas-upside-down", ["--min-replicas", "5", "--max-replicas", "2"], None, "--min-replicas 5 and --max-replicas 2"),
    ("storage-scheme-unknown", ["--storage-uri", "ftp://host/models"], None, "--storage-uri 'ftp://host/models'"),
    ("storage-without-path", ["--storage-uri", "s3://"], None, "--storage-uri 's3://'"),
    ("name-not-kubernetes", ["--name", "Smart_Edit"], None, "--name 'Smart_Edit'"),
    ("target-ratio-zero", ["--target-ratio", "0"], None, "--target-ratio"),
    ("metric-window-bad", ["--metric-window", "5 minutes"], None, "--metric-window"),
    ("no-triton-repository", [], "no-repo", "has no Triton model repository"),
    ("plans-of-an-unknown-tensorrt", [], "trt-10.99", "built by TensorRT 10.99.1"),
    ("release-of-another-tensorrt", ["--triton-release", "25.01"], "trt-10.7",
     "--triton-release 25.01 ships TensorRT 10.8.0, but the plans were built by TensorRT 10.7.0.23"),
    ("out-inside-the-export", ["--out", "INSIDE"], None, "--out"),
]


@pytest.mark.parametrize("what,extra,change,says", BAD, ids=[b[0] for b in BAD])
def test_bad_options_are_one_line(triton_repository, tmp_path, capsys, what, extra, change, says):
    out, _ = triton_repository
    export = out
    if change == "no-repo":
        export = tmp_path / "export"
        shutil.copytree(out, export, ignore=shutil.ignore_patterns("triton", ".smartedit-export.lock", "*.onnx*"))
        m = json.loads((export / "manifest.json").read_text())
        m["repositories"] = {}
        (export / "manifest.json").write_text(json.dumps(m))
    elif change:
        export = _trt_export(triton_repository, tmp_path, {"trt-10.99": "10.99.1.0", "trt-10.7": "10.7.0.23"}[change],
                             ["90"])
    args = {"--image": IMAGE, "--storage-uri": "s3://models/triton", "--out": str(tmp_path / "k8s")}
    extra = [str(export / "k8s") if a == "INSIDE" else a for a in extra]
    for flag in list(args):
        if flag in extra:
            del args[flag]
    argv = [export, *[x for kv in args.items() for x in kv], *extra]
    code, out_text, err = run_cli(k8s_main, argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and says in lines[0], (what, code, err)
    assert "Traceback" not in err and not (tmp_path / "k8s").exists() and not (export / "k8s").exists()


# -- the recording rule: promtool ------------------------------------------------------------------------------------


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package: bash install.sh)")
    return tool


def _rules_file(tmp_path: Path, opts: DeployOptions, broken: bool = False) -> Path:
    group = recording_rule(opts)
    if broken:
        group["rules"][0]["expr"] = group["rules"][0]["expr"].replace("rate(", "rate((", 1)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    return path


def test_promtool_checks_the_rule(tmp_path):
    tool = _promtool()
    opts = DeployOptions(image=IMAGE, storage_uri="s3://m/t")
    ok = subprocess.run([tool, "check", "rules", str(_rules_file(tmp_path, opts))], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([tool, "check", "rules", str(_rules_file(tmp_path, opts, broken=True))],
                         capture_output=True, text=True)
    assert bad.returncode != 0


def _rule_test(tmp_path: Path, want: float) -> subprocess.CompletedProcess:
    """promtool test rules on synthetic counters: per 15 s, the smartedit model queues 1.5 s and computes 3 s (the
    ratio is 0.5), while a stage model of the same pod queues 30 s (which must not count: the rule is the
    orchestrator's alone)."""
    rules = _rules_file(tmp_path, DeployOptions(image=IMAGE, storage_uri="s3://m/t"))
    pod = 'namespace="ns",pod="smartedit-0"'
    test = {"rule_files": [rules.name], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [
            {"series": f'nv_inference_queue_duration_us{{model="smartedit",{pod}}}', "values": "0+1500000x12"},
            {"series": f'nv_inference_compute_infer_duration_us{{model="smartedit",{pod}}}', "values": "0+3000000x12"},
            {"series": f'nv_inference_queue_duration_us{{model="unet",{pod}}}', "values": "0+30000000x12"},
            {"series": f'nv_inference_compute_infer_duration_us{{model="unet",{pod}}}', "values": "0+100000x12"}],
        "promql_expr_test": [{"expr": RATIO, "eval_time": "2m",
                              "exp_samples": [{"labels": f"{RATIO}{{{pod}}}", "value": want}]}]}]}
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(test))
    return subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True, cwd=tmp_path)


def test_promtool_computes_the_stated_ratio(tmp_path):
    ok = _rule_test(tmp_path, 0.5)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = _rule_test(tmp_path, 0.25)  # what an average over the stage models too would not give either
    assert wrong.returncode != 0 and "got: " in wrong.stderr and "5E-01" in wrong.stderr, wrong.stderr


# -- the rule on a real Prometheus, scraping smartedit-serve under load ----------------------------------------------

MAX_BATCH, LOADED = 2, 8  # the server's batch bound and the loaded level's concurrency
TARGET = 0.5  # smartedit-k8s's default --target-ratio


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


@pytest.fixture(scope="module")
def k8s_server():
    """smartedit-serve as a pod would run it, small: batches of up to 2 within 5 ms."""
    from smartedit.weights import ModelSource
    from smartedit.serve.server import running, settings_for

    settings = settings_for(ModelSource(preset="tiny", seed=0), "eager", None, "cpu", "fp32", max_steps=100,
                            max_megapixels=1.0, max_batch=MAX_BATCH)
    with running(settings, max_batch=MAX_BATCH, queue_delay_ms=5, ready_timeout_s=300) as s:
        yield s


def test_the_ratio_on_a_real_prometheus_scales_one_pod_alone_and_more_under_load(k8s_server, tiny_pipe, tmp_path):
    """Prometheus scrapes the server's metrics every second and evaluates the project's rule (a 6 s window) while
    the load test runs 8 requests alone, then 24 from 8 clients (measured here: 0 to 0.007 alone, 3.3 to 4.5 under
    load). Alone a request waits at most the batcher's 5 ms;
    with 8 clients and batches of 2, a request waits for the 3 batches ahead of it: queue / compute -> 8/2 - 1 = 3
    in steady state. The test asserts half of that (1.5) under load, at most 0.2 alone, and the HPA's replicas."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian's prometheus package: bash install.sh)")
    from smartedit.bench.serve import DISTINCT, level
    from smartedit.serve.server import read_metrics

    opts = DeployOptions(image=IMAGE, storage_uri="s3://m/t", metric_window="6s")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [recording_rule(opts)]}))
    e = k8s_server.endpoints
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["rules.yaml"],
              "scrape_configs": [{"job_name": "smartedit", "static_configs": [{
                  "targets": [f"127.0.0.1:{e.metrics}"], "labels": {"namespace": "ns", "pod": "smartedit-0"}}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"), cwd=tmp_path)
    try:
        buf = io.BytesIO()
        Image.fromarray((np.random.RandomState(0).rand(96, 128, 3) * 255).astype(np.uint8)).save(buf, format="PNG")
        image = buf.getvalue()
        expected = []
        for seed, text, g, gi in DISTINCT:
            out = io.BytesIO()
            tiny_pipe(Image.open(io.BytesIO(image)), text, steps=2, resolution=64, seed=seed, guidance_scale=g,
                      image_guidance_scale=gi).save(out, format="PNG")
            expected.append(out.getvalue())

        def ratio_after(concurrency: int, n: int) -> float:
            r = level(e.http_url, "http", lambda: read_metrics(e), concurrency, n, image, 2, 64, expected, 300)
            assert r["answered"] == n and r["max_pixel_diff"] <= 1, r
            time.sleep(3)  # one more scrape, and one evaluation of the rule on it
            deadline = time.monotonic() + 30
            while not (got := _query(port, RATIO)):
                assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
                time.sleep(1)
            return float(got[0]["value"][1])

        _wait_ready(port)
        alone = ratio_after(1, 8)
        time.sleep(7)  # the 6 s window holds the loaded level only
        loaded = ratio_after(LOADED, 24)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ideal = LOADED / MAX_BATCH - 1
    assert alone <= 0.2, alone
    assert loaded >= ideal / 2 and loaded > 5 * alone, (alone, loaded)
    def replicas(metric: float, current: int = 1, lowest: int = 1, highest: int = 6) -> int:
        """The HPA's formula (autoscaling/v2, a Pods metric's average), within the replica range."""
        return max(lowest, min(highest, math.ceil(current * metric / TARGET)))

    assert replicas(alone) == 1 and replicas(loaded) > 1, (alone, loaded)


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "prometheus did not become ready"
        time.sleep(0.5)


def test_the_pre_stop_hook_drains_the_pod(k8s_server):
    """The pods' pre-stop hook (python -m smartedit.serve.drain) unloads the model with the pod's key: without the
    key nothing happens; with it the model is unloaded (in-flight finish, new refused). Last: it ends the server."""
    import sys

    e = k8s_server.endpoints
    port = ["--model", "smartedit", "--http-port", str(e.http)]
    env = {k: v for k, v in os.environ.items() if k != "SMARTEDIT_ADMIN_KEY"}
    r = subprocess.run([sys.executable, "-m", "smartedit.serve.drain", *port], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "SMARTEDIT_ADMIN_KEY is not set" in r.stderr
    assert urllib.request.urlopen(f"http://{e.http_url}/v2/models/smartedit/ready", timeout=10).status == 200
    r = subprocess.run([sys.executable, "-m", "smartedit.serve.drain", *port], capture_output=True, text=True,
                       env={**env, "SMARTEDIT_ADMIN_KEY": k8s_server._admin_key}, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{e.http_url}/v2/models/smartedit/ready", timeout=10)
