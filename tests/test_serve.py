"""smartedit-serve on the real Triton Inference Server (PyTriton's tritonserver build, Python backend), tiny preset on
the CPU: started and stopped inside the tests on free loopback ports, every request loop bounded in count and time.

The reference for every answer is the offline pipeline run alone in this process (tests/conftest.py tiny_pipe: the
same preset and seed the server loads). Alone on the server is byte-identical to alone offline (the same fp32 CPU
kernels in the same order). Batched answers are compared with a tolerance of 1 grey level of 255: a batch runs other
matmul blockings (oneDNN picks kernels by shape) and pads prompts to the batch's longest (masked), so float sums
differ in the last bits and a pixel can round the other way; the seed, instruction and guidance stay each request's
own (a wrong seed or guidance moves pixels by tens of grey levels).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install -e '.[test]')")
tritonclient = pytest.importorskip("tritonclient.grpc")

from conftest import readme_block, settled  # noqa: E402
from smartedit.export.triton import stage_config  # noqa: E402
from smartedit.serve.repository import MAX_QUEUE, MODEL, write_serving_repository  # noqa: E402
from smartedit.serve.client import connect, edit  # noqa: E402
from smartedit.serve.server import free_endpoints, read_metrics  # noqa: E402
from smartedit.weights import ModelSource  # noqa: E402

TOLERANCE = 1  # grey levels of 255, batched vs alone: see the module doc
BAD = pytest.importorskip("tritonclient.utils").InferenceServerException


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def image(test_image) -> bytes:
    return _png(test_image)


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def _offline(tiny_pipe, image: bytes, text: str, **kw) -> bytes:
    return _png(tiny_pipe(Image.open(io.BytesIO(image)), text, **kw))


def test_http_and_grpc_answer_what_the_offline_pipeline_gives(server, tiny_pipe, image):
    e = server.endpoints
    want = _offline(tiny_pipe, image, "make it blue", steps=2, resolution=64, seed=7)
    for protocol, url in (("http", e.http_url), ("grpc", e.grpc_url)):
        png, timings = edit(connect(protocol, url, 120), image, "make it blue", seed=7, steps=2, resolution=64)
        assert png == want, f"{protocol}: alone on the server differs from alone offline"
        assert timings["batch_size"] == 1 and timings["seed"] == 7 and timings["backend"] == "eager"
        assert set(timings["stage_ms"]) >= {"condition", "denoise", "vae_decode", "total"}


def _concurrently(calls):
    """Run the callables at once (threads), return their results or exceptions, in order; bounded by each call's
    own client timeout."""
    out = [None] * len(calls)

    def run(i):
        try:
            out[i] = calls[i]()
        except Exception as ex:  # noqa: BLE001: the test inspects it
            out[i] = ex

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=300)
    return out


def test_requests_batch_together_and_each_gets_its_own_image(server, tiny_pipe, image):
    e = server.endpoints
    reqs = [dict(seed=1, text="make it blue", g=7.5, gi=1.5), dict(seed=2, text="add a red hat to the small cat", g=5.0,
                                                                  gi=1.2), dict(seed=3, text="make it blue", g=9.0, gi=2.0)]
    before = settled(e)
    odd = lambda: edit(connect("grpc", e.grpc_url, 120), image, "make it blue", seed=1, steps=2,  # noqa: E731
                       resolution=128)
    calls = [lambda r=r: edit(connect("grpc", e.grpc_url, 120), image, r["text"], seed=r["seed"], steps=2,
                              resolution=64, guidance_scale=r["g"], image_guidance_scale=r["gi"]) for r in reqs]
    *answers, (odd_png, odd_t) = _concurrently(calls + [odd])
    after = read_metrics(e)
    assert (after["nv_inference_count"] - before["nv_inference_count"]) == 4
    # the three 64 px requests ran as one batch, the 128 px one alone: 2 executions for 4 requests
    assert after["nv_inference_exec_count"] - before["nv_inference_exec_count"] == 2
    assert odd_t["batch_size"] == 1 and _pixels(odd_png).shape == (128, 128, 3)
    for r, (png, t) in zip(reqs, answers):
        assert t["batch_size"] == 3 and t["seed"] == r["seed"]
        alone = _offline(tiny_pipe, image, r["text"], steps=2, resolution=64, seed=r["seed"], guidance_scale=r["g"],
                         image_guidance_scale=r["gi"])
        diff = int(np.abs(_pixels(png) - _pixels(alone)).max())
        assert diff <= TOLERANCE, f"request {r}: batched differs from alone by {diff} grey levels"
    # ... and not because the requests hardly matter: another request's seed moves pixels far more
    other = _pixels(_offline(tiny_pipe, image, reqs[0]["text"], steps=2, resolution=64, seed=reqs[1]["seed"]))
    assert int(np.abs(_pixels(answers[0][0]) - other).max()) > 10 * TOLERANCE


def _big_png() -> bytes:
    return _png(Image.new("RGB", (1200, 1000), (10, 20, 30)))  # 1.2 MP, over the fixture's 1 MP limit


BAD_REQUESTS = [
    # (what, request pieces, text the error must contain)
    ("empty image", dict(image=b""), "image is empty"),
    ("undecodable image", dict(image=b"not an image at all"), "cannot be decoded"),
    ("a path is not an image", dict(image=b"/etc/passwd"), "cannot be decoded"),
    ("GIF is not taken", dict(image="gif"), "cannot be decoded"),
    ("over the megapixel limit", dict(image="big"), "1200x1000"),
    ("instruction past the prompt profile", dict(instruction="blue " * 700), "too long"),
    ("instruction not UTF-8", dict(instruction=b"\xff\xfe make it"), "not UTF-8"),
    ("empty instruction", dict(instruction="   "), "instruction is empty"),
    ("resolution not a multiple of 64", dict(resolution=100), "got 100"),
    ("resolution over the profile", dict(resolution=4096), "got 4096"),
    ("steps 0", dict(steps=0), "got 0"),
    ("steps over the limit", dict(steps=101), "got 101"),
    ("NaN guidance", dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
    ("infinite image guidance", dict(image_guidance_scale=float("inf")), "image_guidance_scale must be a finite"),
    ("negative seed", dict(seed=-5), "got -5"),
    ("unknown parameters", dict(parameters={"output_path": "/tmp/x"}), "unknown request parameters ['output_path']"),
]


@pytest.mark.parametrize("what,pieces,message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_request_is_refused_naming_the_value_and_the_next_is_served(server, image, what, pieces, message):
    client = connect("http", server.endpoints.http_url, 120)
    pieces = dict(pieces)
    img = pieces.pop("image", image)
    img = {"big": _big_png(), "gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"}.get(img, img) if isinstance(img, str) \
        else img
    text = pieces.pop("instruction", "make it blue")
    params = pieces.pop("parameters", None)
    kw = {"steps": 1, "resolution": 64, **pieces}
    with pytest.raises(BAD) as err:
        edit(client, img, text, parameters=params, **kw)
    assert message in str(err.value), f"{what}: {err.value}"
    assert "Traceback" not in str(err.value)
    png, _ = edit(client, image, "make it blue", steps=1, resolution=64, seed=0)  # the server still serves
    assert _pixels(png).shape == (64, 64, 3)


def test_triton_itself_refuses_missing_inputs_and_wrong_dtypes(server, image):
    import tritonclient.http as http

    client = connect("http", server.endpoints.http_url, 60)
    only_image = http.InferInput("image", [1, 1], "BYTES")
    only_image.set_data_from_numpy(np.array([[image]], dtype=object))
    with pytest.raises(BAD, match="instruction"):
        client.infer(MODEL, [only_image])
    text = http.InferInput("instruction", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"make it blue"]], dtype=object))
    steps = http.InferInput("steps", [1, 1], "FP32")
    steps.set_data_from_numpy(np.array([[2.0]], dtype=np.float32))
    with pytest.raises(BAD, match="FP32"):
        client.infer(MODEL, [only_image, text, steps])


def test_config_pbtxt_parses_into_tritons_model_config(tmp_path, onnx_export):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from smartedit.graphs.manifest import Manifest

    repo = write_serving_repository(tmp_path / "repo", {"runner": "registry"}, max_batch=4, queue_delay_ms=5,
                                    instances=2, gpu=True)
    c = text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (c.backend, c.max_batch_size, c.dynamic_batching.max_queue_delay_microseconds) == ("python", 4, 5000)
    assert [(g.count, g.kind) for g in c.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    assert {i.name for i in c.input} >= {"image", "instruction", "seed", "steps", "resolution"}
    assert {i.name for i in c.input if not i.optional} == {"image", "instruction"}
    assert c.dynamic_batching.default_queue_policy.max_queue_size == MAX_QUEUE  # the queue is bounded
    unbatched = write_serving_repository(tmp_path / "one", {}, max_batch=1, queue_delay_ms=5, instances=1, gpu=False,
                                         max_queue=3)
    one = text_format.Parse((unbatched / MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (one.max_batch_size, one.dynamic_batching.max_queue_delay_microseconds) == (1, 0)  # each request alone
    assert one.dynamic_batching.default_queue_policy.max_queue_size == 3

    entry = Manifest.read(onnx_export("fp16")).entries("onnx")["unet"]
    for kind, want in (("onnx", ("onnxruntime", "")), ("trt", ("", "tensorrt_plan")), ("python", ("python", ""))):
        c = text_format.Parse(text_format.MessageToString(stage_config(entry, kind, 0 if kind == "trt" else None)),
                              mc.ModelConfig())
        assert (c.backend, c.platform) == want and c.max_batch_size == 0
        sample = next(i for i in c.input if i.name == "sample")
        assert sample.data_type == mc.TYPE_FP16 and list(sample.dims) == [-1, 8, -1, -1]
        assert list(c.instance_group[0].profile) == (["0"] if kind == "trt" else [])


def test_container_repository_runs_on_the_bundled_server(repository_server, triton_repository, image):
    """--target triton --triton-stages python: the BLS-orchestrated repository, stage models in ONNX Runtime, served
    by the bundled tritonserver; it answers what the in-process onnxruntime backend answers for the same request."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from smartedit.pipeline import SmartEditPipeline

    out, said = triton_repository
    assert not any("exporting" in m for m in said), "the ONNX graphs were up to date: reused, not re-exported"
    repo = out / "triton"
    for cfg in repo.glob("*/config.pbtxt"):
        text_format.Parse(cfg.read_text(), mc.ModelConfig())
    assert sorted(p.name for p in repo.iterdir()) == ["llava", "qformer_bim", MODEL, "unet", "vae_decoder",
                                                      "vae_encoder"]
    assert os.stat(repo / "unet" / "1" / "model.onnx").st_ino == os.stat(out / "onnx" / "unet.onnx").st_ino

    offline = SmartEditPipeline.on_backend("onnxruntime", ModelSource(preset="tiny", seed=0), "cpu",
                                           __import__("torch").float32, out)
    want = _png(offline(Image.open(io.BytesIO(image)), "make it blue", steps=2, resolution=256, seed=4))
    png, timings = edit(connect("grpc", repository_server.endpoints.grpc_url, 300), image, "make it blue", seed=4,
                        steps=2, resolution=256)
    assert timings["backend"] == "bls"
    diff = int(np.abs(_pixels(png) - _pixels(want)).max())
    assert diff <= TOLERANCE, f"BLS through Triton differs from in-process ONNX Runtime by {diff} grey levels"


def _serve_cli(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    return subprocess.Popen([sys.executable, "-m", "smartedit.serve.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _ports(e) -> list[str]:
    return ["--http-port", str(e.http), "--grpc-port", str(e.grpc), "--metrics-port", str(e.metrics)]


@pytest.fixture(scope="module")
def damaged(onnx_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged")
    shutil.copytree(onnx_export("fp16"), out, dirs_exist_ok=True)
    f = out / "onnx" / "vae_decoder.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the sha256 sees it
    f.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("case", ["damaged", "foreign"])
def test_damaged_or_foreign_artifacts_keep_the_server_from_starting(case, onnx_export, damaged, tmp_path):
    arts, seed = (damaged, "0") if case == "damaged" else (onnx_export("fp16"), "1")
    p = _serve_cli(["--preset", "tiny", "--random-weights", "--seed", seed, "--backend", "onnxruntime",
                    "--artifacts", str(arts), *_ports(free_endpoints())], tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert ("sha256" in lines[0] and "vae_decoder.onnx" in lines[0]) if case == "damaged" else "seed" in lines[0], \
        lines[0]
    assert "ready" not in out.replace("not ready", "")


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(tmp_path, image):
    e = free_endpoints()
    p = _serve_cli(["--preset", "tiny", "--random-weights", *_ports(e)], tmp_path)
    try:
        deadline = time.monotonic() + 300
        while "ready:" not in (line := p.stdout.readline()):
            assert line or p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline
        # How long a request takes to reach the model scales with the machine's load, so the wait is measured on
        # this machine, now: a 1-step edit (arrival + one step + decode) timed, the wait 5x that, and the in-flight
        # edit 100 steps, far longer than the wait, on an idle or a loaded CPU alike.
        t0 = time.monotonic()
        edit(connect("http", e.http_url, 120), image, "make it blue", steps=1, resolution=256, seed=0)
        wait = min(max(5 * (time.monotonic() - t0), 1.0), 30.0)
        slow: dict = {}
        t = threading.Thread(target=lambda: slow.update(r=edit(connect("http", e.http_url, 600), image,
                                                               "make it blue", steps=100, resolution=256, seed=0)))
        t.start()
        time.sleep(wait)  # the request is in the model now
        p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # refused, nothing computed: HTTP takes no new connection; a gRPC call waits behind the running edit in
        # Triton's queue, then the model, draining, answers it UNAVAILABLE (retryable) without starting it
        with pytest.raises(Exception) as refused:
            edit(connect("http", e.http_url, 30), image, "make it blue", steps=1, resolution=64)
        assert "closed" in str(refused.value).lower() or "refused" in str(refused.value).lower(), repr(refused.value)
        with pytest.raises(Exception) as refused:
            edit(connect("grpc", e.grpc_url, 600), image, "make it blue", steps=1, resolution=64)
        assert "UNAVAILABLE" in str(refused.value) and "the server is stopping" in str(refused.value), \
            repr(refused.value)
        t.join(timeout=600)
        assert "r" in slow, "the in-flight request did not finish"
        assert _pixels(slow["r"][0]).shape == (256, 256, 3)
        assert p.wait(timeout=120) == 0
        assert "stopped (status 0)" in p.stdout.read()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_load_test_writes_its_results_and_every_answer_matches_offline(tmp_path):
    from smartedit.bench.serve import run_load_test, write_outputs

    res = run_load_test(preset="tiny", concurrency=(1, 3), requests=3, steps=1, resolution=64, max_batch=4,
                        queue_delay_ms=100, progress=lambda m: None)
    assert res["all_answered"] and res["all_match_offline"]
    assert [(r["protocol"], r["concurrency"]) for r in res["levels"]] == [("http", 1), ("http", 3), ("grpc", 1),
                                                                          ("grpc", 3)]
    assert res["levels"][0]["avg_batch"] == 1.0 and res["unbatched"]["avg_batch"] == 1.0
    assert res["batching_gain"] > 0
    paths = write_outputs(res, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert json.loads(paths[0].read_text())["levels"][1]["concurrency"] == 3
    assert "Dynamic batching gain" in paths[1].read_text()


def test_readme_queries_run_as_written(server, tmp_path, test_image):
    e = server.endpoints
    test_image.save(tmp_path / "in.png")
    curl = readme_block("binary_data_size").replace("localhost:8000", e.http_url)
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + curl], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ready: 200" in r.stdout, r.stdout + r.stderr
    assert Image.open(tmp_path / "out.png").size == (256, 256)
    (tmp_path / "out.png").unlink()
    py = readme_block("grpcclient.InferenceServerClient").replace("localhost:8001", e.grpc_url)
    r = subprocess.run([sys.executable, "-c", py], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "denoise" in r.stdout, r.stdout + r.stderr
    assert Image.open(tmp_path / "out.png").size == (256, 256)
