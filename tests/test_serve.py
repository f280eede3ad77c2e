"""smartedit-serve on the real Triton Inference Server (PyTriton's tritonserver build, Python backend), tiny preset on
the CPU: started and stopped inside the tests on free loopback ports, every request loop bounded in count and time.
The shared servers (tests/conftest.py) and one of this module's own, `features` (the stream twin, a response cache,
two priority levels), for the tests of those.

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
from smartedit.export.triton import graph_model_config  # noqa: E402
from smartedit.serve.repository import MAX_QUEUE, MODEL, write_serving_repository  # noqa: E402
from smartedit.serve.client import connect, edit  # noqa: E402
from smartedit.serve.server import free_endpoints, read_metrics  # noqa: E402
from smartedit.weights import ModelSource  # noqa: E402
from smartedit.serve.settings import ServeSettings  # noqa: E402

TOLERANCE = 1  # grey levels of 255, batched vs alone: see the module doc
BAD = pytest.importorskip("tritonclient.utils").InferenceServerException
TINY_SETTINGS = ServeSettings(ModelSource(preset="tiny"), backend="eager")  # what a repository test carries


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
        assert set(timings["phase_ms"]) >= {"condition", "denoise", "vae_decode", "total"}


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
    ("DeepCache interval 0", dict(deepcache=0), "DeepCache interval must be an integer in [1, 1000]"),
    ("DeepCache past 1000", dict(deepcache=1001), "got 1001"),
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

    repo = write_serving_repository(tmp_path / "repo", TINY_SETTINGS, max_batch=4, queue_delay_ms=5,
                                    instances=2, gpu=True)
    c = text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (c.backend, c.max_batch_size, c.dynamic_batching.max_queue_delay_microseconds) == ("python", 4, 5000)
    assert [(g.count, g.kind) for g in c.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    assert {i.name for i in c.input} >= {"image", "instruction", "seed", "steps", "resolution"}
    assert {i.name for i in c.input if not i.optional} == {"image", "instruction"}
    assert c.dynamic_batching.default_queue_policy.max_queue_size == MAX_QUEUE  # the queue is bounded
    unbatched = write_serving_repository(tmp_path / "one", TINY_SETTINGS, max_batch=1, queue_delay_ms=5, instances=1,
                                         gpu=False, max_queue=3)
    one = text_format.Parse((unbatched / MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (one.max_batch_size, one.dynamic_batching.max_queue_delay_microseconds) == (1, 0)  # each request alone
    assert one.dynamic_batching.default_queue_policy.max_queue_size == 3

    entry = Manifest.read(onnx_export("fp16")).entries("onnx")["unet"]
    for kind, want in (("onnx", ("onnxruntime", "")), ("trt", ("", "tensorrt_plan")), ("python", ("python", ""))):
        c = text_format.Parse(text_format.MessageToString(graph_model_config(entry, kind, 0 if kind == "trt" else None)),
                              mc.ModelConfig())
        assert (c.backend, c.platform) == want and c.max_batch_size == 0
        sample = next(i for i in c.input if i.name == "sample")
        assert sample.data_type == mc.TYPE_FP16 and list(sample.dims) == [-1, 8, -1, -1]
        assert list(c.instance_group[0].profile) == (["0"] if kind == "trt" else [])


def test_container_repository_runs_on_the_bundled_server(repository_server, triton_repository, image):
    """--target triton --graph-models python: the BLS-orchestrated repository, graph models in ONNX Runtime, served
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
    """The drain, for edits and streams alike (smartedit-serve --stream): the running edit and the running stream
    finish (the stream with every step and its answer), new requests of both models are refused UNAVAILABLE
    without work, and the server exits 0."""
    from smartedit.serve.client import stream

    e = free_endpoints()
    p = _serve_cli(["--preset", "tiny", "--random-weights", "--stream", *_ports(e)], tmp_path)
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
        streamed: list = []
        s = threading.Thread(target=lambda: streamed.extend(stream(connect("grpc", e.grpc_url, 600), image,
                                                                   "make it blue", steps=30, resolution=128, seed=0)))
        t.start()
        s.start()
        time.sleep(wait)  # the requests are in their models now
        assert streamed, "the stream had not started"
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
        with pytest.raises(BAD) as refused:  # a stream's error: its message (the protocol carries no code)
            list(stream(connect("grpc", e.grpc_url, 600), image, "make it blue", steps=1, resolution=64))
        # the stream model answers "Unavailable: the server is stopping" while its own stream runs; once that stream
        # has finished, Triton has unloaded the idle model and refuses in its own words ("Server is stopping,
        # scheduler for model has stopped accepting new inference requests"): refused without work either way
        assert "server is stopping" in str(refused.value).lower(), repr(refused.value)
        t.join(timeout=600)
        s.join(timeout=600)
        assert "r" in slow, "the in-flight request did not finish"
        assert _pixels(slow["r"][0]).shape == (256, 256, 3)
        assert [m["progress"]["step"] for m in streamed[:-1]] == list(range(31)), "the stream did not finish"
        assert _pixels(streamed[-1]["edited"]).shape == (128, 128, 3)
        assert p.wait(timeout=120) == 0
        assert "stopped (status 0)" in p.stdout.read()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_load_test_writes_its_results_and_every_answer_matches_offline(tmp_path):
    from smartedit.bench.serve import run_load_test, write_outputs

    res = run_load_test(ModelSource(preset="tiny"), concurrency=(1, 3), requests=3, steps=1, resolution=64,
                        max_batch=4, queue_delay_ms=100, progress=lambda m: None,
                        features=False)  # features: the test below
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


# -- variants and the loop's levers, on the shared server ------------------------------------------------------------


def test_variants_share_one_condition_and_each_equals_its_single_request(server, tiny_pipe, image):
    """Three variants (seeds and image guidance scales, the official script's sweep): one pass of the language
    model, QFormer and BIM (condition_batch 1), one UNet batch of 3, and each variant the image a request for it
    alone gets (up to the batched kernels' rounding; a wrong seed or scale moves pixels by tens of levels)."""
    from smartedit.serve.client import variants

    seeds, scales = [1, 2, 1], [1.4, 1.5, 1.6]
    png, t = edit(connect("grpc", server.endpoints.grpc_url, 120), image, "make it blue", seed=seeds, steps=2,
                  resolution=64, image_guidance_scale=scales)
    assert (t["condition_batch"], t["batch_size"]) == (1, 3)
    assert [(v["seed"], round(v["image_guidance_scale"], 4)) for v in t["variants"]] == list(zip(seeds, scales))
    pngs = variants(png, t)
    assert len(pngs) == 3 and b"".join(pngs) == png
    for got, seed, gi in zip(pngs, seeds, scales):
        alone = _offline(tiny_pipe, image, "make it blue", steps=2, resolution=64, seed=seed, image_guidance_scale=gi)
        diff = int(np.abs(_pixels(got) - _pixels(alone)).max())
        assert diff <= TOLERANCE, f"variant seed {seed}, image guidance {gi}: {diff} grey levels from alone"
    assert pngs[0] != pngs[2]  # seed 1 at 1.4 and at 1.6
    assert int(np.abs(_pixels(pngs[0]) - _pixels(pngs[1])).max()) > 10 * TOLERANCE  # each variant its own seed


def test_variants_run_the_language_model_qformer_and_bim_once(tiny_pipe, test_image):
    """In-process, every graph call counted: a request of 3 variants runs llava and qformer_bim once for one sample,
    the VAE encoder once, and the UNet on 3 samples (x 3 branches) per step."""
    from smartedit.serve.service import EditService, Limits

    calls: list[tuple[str, int]] = []

    class Counting:
        def __init__(self, inner):
            self.inner, self.name, self.fold_cfg, self.specs = inner, inner.name, inner.fold_cfg, inner.specs

        def run(self, graph, inputs):
            calls.append((graph, next(iter(inputs.values())).shape[0]))
            return self.inner.run(graph, inputs)

    inner = tiny_pipe.runner
    tiny_pipe.runner = Counting(inner)
    try:
        service = EditService(tiny_pipe, Limits(max_batch=4))
        request = service.parse({"image": [_png(test_image)], "instruction": [b"make it blue"], "seed": [1, 2, 3],
                                 "image_guidance_scale": [1.4, 1.5, 1.6], "steps": [2], "resolution": [64]})
        (result,) = service.run([request])
    finally:
        tiny_pipe.runner = inner
    assert [c for c in calls if c[0] != "unet"] == [("llava", 1), ("qformer_bim", 1), ("vae_encoder", 1),
                                                     ("vae_decoder", 3)], calls
    assert [c for c in calls if c[0] == "unet"] == [("unet", 9)] * 2, calls
    assert result.timings["condition_batch"] == 1 and len(result.pngs) == 3


LEVERS = [
    # (sampler, guidance interval, text-only interval)
    ("ddim", (0.2, 1.0), (0.5, 1.0)),
    ("dpm-solver++", None, None),
    ("euler-ancestral", (0.0, 0.6), None),
]


@pytest.mark.parametrize("sampler,interval,text_only", LEVERS, ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in LEVERS])
def test_a_served_lever_equals_the_offline_edit(server, tiny_pipe, image, sampler, interval, text_only):
    """A request with a sampler and a guidance schedule: alone on the server, the bytes of the offline edit with
    the same levers (pipe(..., sampler=, guidance_schedule=)), and its UNet evaluations in the timings."""
    from smartedit.guidance import GuidanceSchedule

    schedule = GuidanceSchedule(interval or (0.0, 1.0), text_only)
    steps = 6
    want = _offline(tiny_pipe, image, "make it blue", steps=steps, resolution=64, seed=9, sampler=sampler,
                    guidance_schedule=schedule)
    levers = {"sampler": sampler, **({"guidance_interval": list(interval)} if interval else {}),
              **({"text_only_interval": list(text_only)} if text_only else {})}
    png, t = edit(connect("http", server.endpoints.http_url, 120), image, "make it blue", seed=9, steps=steps,
                  resolution=64, **levers)
    assert png == want, f"{sampler} {schedule.describe()}: served differs from offline"
    assert t["sampler"] == sampler and t["unet_evaluations"] == schedule.evaluations(steps)
    assert t["guidance_schedule"] == schedule.to_dict()


def test_a_served_deepcache_edit_equals_the_offline_edit(server, tiny_pipe, image):
    """deepcache=N on the server (eager: the model builds the DeepCache graphs at its default branch): alone, the
    bytes of the offline edit with DeepCache(N), and N in the timings."""
    from smartedit.deepcache import DeepCache

    want = _offline(tiny_pipe, image, "make it blue", steps=6, resolution=64, seed=9, deepcache=DeepCache(3))
    assert want != _offline(tiny_pipe, image, "make it blue", steps=6, resolution=64, seed=9)
    png, t = edit(connect("grpc", server.endpoints.grpc_url, 120), image, "make it blue", seed=9, steps=6,
                  resolution=64, deepcache=3)
    assert png == want and t["deepcache"] == 3


def test_requests_batch_only_when_they_share_sampler_and_schedule(server, image):
    """Four requests at once: two with DDIM and one schedule run as one batch; the same with another schedule, and
    one with the default sampler, each run apart."""
    e = server.endpoints
    asks = [dict(sampler="ddim", guidance_interval=[0.2, 1.0]), dict(sampler="ddim", guidance_interval=[0.2, 1.0]),
            dict(sampler="ddim", guidance_interval=[0.4, 1.0]), dict()]
    calls = [lambda a=a, i=i: edit(connect("grpc", e.grpc_url, 120), image, "make it blue", seed=i, steps=3,
                                   resolution=64, **a) for i, a in enumerate(asks)]
    answers = _concurrently(calls)
    assert [t["batch_size"] for _, t in answers] == [2, 2, 1, 1], answers


# -- progress, priorities and the response cache: one server with all three ----------------------------------------

LOW_WAIT_S = 15.0  # the features server's longest wait below priority 1
MAX_EVALUATIONS = 3000  # the features server's UNet evaluations per request: one 1000-step edit


@pytest.fixture(scope="module")
def features():
    """smartedit-serve with the stream twin, a 16 MiB response cache and two priority levels (the second waiting at
    most LOW_WAIT_S), batches of up to 4 within 200 ms, up to 1000 steps (streams long enough to cancel)."""
    from smartedit.serve.server import Features, running, settings_for

    settings = settings_for(ModelSource(preset="tiny", seed=0), "eager", None, "cpu", "fp32", max_steps=1000,
                            max_megapixels=1.0, max_batch=4, max_variants=3, max_evaluations=MAX_EVALUATIONS)
    with running(settings, max_batch=4, queue_delay_ms=200, ready_timeout_s=300,
                 features=Features(stream=True, cache_mb=16, priority_levels=2, low_priority_wait_s=LOW_WAIT_S)) as s:
        yield s


def _outcomes(e, model: str) -> dict[str, float]:
    """smartedit_requests_total{model} by outcome."""
    import urllib.request

    with urllib.request.urlopen(e.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("smartedit_requests_total{") and f'model="{model}"' in line:
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _until(cond, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def test_a_stream_tells_every_step_then_answers_what_the_edit_answers(features, tiny_pipe, image):
    """gRPC stream of `smartedit_stream`: the start (step 0), every step in order, a preview of each variant every 2
    steps (not on the last: the answer follows), then the answer: the bytes `smartedit` answers for the same request,
    and the offline edit's."""
    from smartedit.serve.client import stream, variants

    e = features.endpoints
    messages = list(stream(connect("grpc", e.grpc_url, 120), image, "make it blue", seed=[5, 6], steps=6,
                           resolution=64, preview_every=2))
    *progress, final = messages
    assert [m["progress"]["step"] for m in progress] == list(range(7))
    assert all(m["progress"]["steps"] == 6 for m in progress)
    with_previews = [m["progress"]["step"] for m in progress if m["previews"]]
    assert with_previews == [2, 4], with_previews
    for m in progress:
        for p in m["previews"]:
            assert max(Image.open(io.BytesIO(p)).size) <= 128  # small: shrunk from the 64 px decode here
        assert len(m["previews"]) in (0, 2)
    png, t = edit(connect("grpc", e.grpc_url, 120), image, "make it blue", seed=[5, 6], steps=6, resolution=64)
    assert final["edited"] == png and final["timings"]["variants"] == t["variants"]
    want = [_offline(tiny_pipe, image, "make it blue", steps=6, resolution=64, seed=s) for s in (5, 6)]
    got = variants(png, t)
    assert max(int(np.abs(_pixels(a) - _pixels(b)).max()) for a, b in zip(got, want)) <= TOLERANCE


def test_a_cancelled_stream_stops_its_edit(features, image):
    """A client that leaves a 1000-step stream after 3 steps: the server stops the edit before its next step (counted
    `cancelled`, not `ok`), and the stream model answers the next stream."""
    from smartedit.serve.client import stream

    e = features.endpoints
    before = _outcomes(e, "smartedit_stream")
    seen = 0
    for m in stream(connect("grpc", e.grpc_url, 600), image, "make it blue", seed=1, steps=1000, resolution=64):
        seen = m["progress"]["step"]
        if seen >= 3:
            break  # leaving the loop cancels the request
    _until(lambda: _outcomes(e, "smartedit_stream").get("cancelled", 0) == before.get("cancelled", 0) + 1,
           "the stream's edit was stopped")
    last = list(stream(connect("grpc", e.grpc_url, 120), image, "make it blue", seed=2, steps=1, resolution=64))[-1]
    assert _pixels(last["edited"]).shape == (64, 64, 3)
    after = _outcomes(e, "smartedit_stream")
    assert after.get("ok", 0) - before.get("ok", 0) == 1  # the short one; the long one never answered an image


class _Blocker:
    """A 1000-step stream at 256 px holding the stream model (batch 1 per key: other requests queue behind it) until
    release(). At 64 px the tiny model's 1000 steps took ~6 s on 2 cores, less than the low priority's wait: the
    blocker ended before the bound was reached; at 256 px a step costs ~7x more."""

    def __init__(self, e, image):
        from smartedit.serve.client import stream

        self.release_now, self.running = threading.Event(), threading.Event()

        def run():
            for m in stream(connect("grpc", e.grpc_url, 600), image, "hold the model", seed=0, steps=1000,
                            resolution=256):
                if m.get("progress", {}).get("step", 0) >= 1:
                    self.running.set()
                if self.release_now.is_set():
                    break

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.running.wait(120), "the blocking stream did not start"

    def release(self) -> None:
        assert self.thread.is_alive(), "the blocking stream ended before release(): what it held was not held"
        self.release_now.set()
        self.thread.join(timeout=120)


def _pending(e, model: str) -> float:
    import urllib.request

    with urllib.request.urlopen(e.metrics_url, timeout=10) as r:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in r.read().decode().splitlines()
                   if ln.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in ln)


def _streamed(e, image, seed: int, priority: int, steps: int = 1):
    """One short stream's answer (timings) or its error."""
    from smartedit.serve.client import stream

    try:
        return list(stream(connect("grpc", e.grpc_url, 120), image, "make it blue", priority=priority, seed=seed,
                           steps=steps, resolution=64))[-1]["timings"]
    except BAD as ex:
        return ex


def test_priority_orders_the_queue(features, image):
    """Five requests at priority 2 queue behind a running edit, then one at 1, one at 3 and one at 0: once the edit
    is released the batcher takes the highest level first, so the last three (3 and 0 are out of range: Triton runs
    them at the default level, 1) are answered in the first batch of 4, before the low ones that came earlier."""
    e = features.endpoints
    blocker = _Blocker(e, image)
    order: list[str] = []
    lock = threading.Lock()

    def one(name: str, seed: int, priority: int):
        result = _streamed(e, image, seed, priority)
        with lock:
            order.append(name if not isinstance(result, Exception) else f"{name}: {result}")

    asks = [(f"low{i}", 100 + i, 2) for i in range(5)] + [("high", 200, 1), ("three", 201, 3), ("zero", 202, 0)]
    threads = []
    try:
        for name, seed, priority in asks:
            threads.append(threading.Thread(target=one, args=(name, seed, priority)))
            threads[-1].start()
            time.sleep(0.05)
        _until(lambda: _pending(e, "smartedit_stream") >= len(asks), "every request is queued", 60)
    finally:
        blocker.release()
        for t in threads:
            t.join(timeout=300)
    assert len(order) == len(asks) and not [o for o in order if ":" in o], order
    first = set(order[:4])
    assert {"high", "three", "zero"} <= first, order


def test_a_low_priority_request_waits_at_most_its_bound(features, image):
    """Behind a running edit, a priority-2 request is refused once it has waited the server's bound ("Request timeout
    expired", HTTP 503 outside a stream: retryable, nothing computed), while a priority-1 request that came after it
    waits on and is answered when the edit ends: low priority never waits forever, and nothing guarantees it a share."""
    e = features.endpoints
    blocker = _Blocker(e, image)
    results: dict = {}
    threads = [threading.Thread(target=lambda: results.update(low=_streamed(e, image, 300, 2))),
               threading.Thread(target=lambda: results.update(high=_streamed(e, image, 301, 1)))]
    try:
        for t in threads:
            t.start()
            time.sleep(0.2)
        threads[0].join(timeout=LOW_WAIT_S + 120)
        assert "high" not in results, "the high-priority request did not wait behind the running edit"
    finally:
        blocker.release()
        for t in threads:
            t.join(timeout=300)
    low = results["low"]
    assert isinstance(low, BAD) and "Request timeout expired" in str(low), low  # a stream's error has no code
    assert isinstance(results["high"], dict), results["high"]


def test_a_repeated_request_is_answered_from_the_cache(features, image):
    """The same request twice (image, instruction, seed, steps, resolution, variants): the second is Triton's cache
    hit (nv_cache_num_hits_per_model), byte for byte the first's answer, and never reaches the model
    (smartedit_requests_total counts one edit); a request that differs only in a lever is a miss."""
    e = features.endpoints
    client = connect("grpc", e.grpc_url, 120)
    ask = dict(seed=[11, 12], steps=2, resolution=64, image_guidance_scale=[1.4, 1.6])
    settled(e)
    before, outcomes = read_metrics(e), _outcomes(e, MODEL)
    first = edit(client, image, "make it blue", **ask)
    again = edit(client, image, "make it blue", **ask)
    other = edit(client, image, "make it blue", sampler="euler", **ask)
    after = read_metrics(e)
    assert again == first and other[0] != first[0]
    assert after["nv_cache_num_hits_per_model"] - before.get("nv_cache_num_hits_per_model", 0) == 1
    assert after["nv_cache_num_misses_per_model"] - before.get("nv_cache_num_misses_per_model", 0) == 2
    assert _outcomes(e, MODEL).get("ok", 0) - outcomes.get("ok", 0) == 2


def test_a_request_without_a_seed_is_never_answered_from_the_cache(features, image):
    """With the cache on, a request without a seed is refused naming it (its answer would be random, and a repeat
    would get the first one's image). Triton Inference Server 2.51 keeps the refusal in the cache as an answer
    without outputs: a repeat gets that, never an image, and the client says why."""
    from smartedit.errors import RunError

    client = connect("http", features.endpoints.http_url, 120)
    with pytest.raises(BAD) as err:
        edit(client, image, "make it blue", steps=1, resolution=64)
    assert err.value.status() == "400" and "seed is required" in str(err.value), str(err.value)
    with pytest.raises((BAD, RunError)) as again:
        edit(client, image, "make it blue", steps=1, resolution=64)
    assert "seed is required" in str(again.value) or "answered without an image" in str(again.value)


FEATURE_REFUSALS = [
    # (what, model, request pieces, what the refusal names)
    ("evaluations over the bound", MODEL, dict(seed=[1, 2], steps=1000), "6000 UNet evaluations"),
    ("a preview every step of 100", "smartedit_stream", dict(seed=1, steps=100, preview_every=1),
     "preview_every must be 0 (no previews) or from 5 to 100"),
    ("a preview interval past the steps", "smartedit_stream", dict(seed=1, steps=4, preview_every=5), "got 5"),
    ("a negative preview interval", "smartedit_stream", dict(seed=1, steps=4, preview_every=-2), "got -2"),
    ("four variants, three allowed", MODEL, dict(seed=[1, 2, 3, 4]), "at most 3 variants"),
]


@pytest.mark.parametrize("what,model,pieces,says", FEATURE_REFUSALS, ids=[r[0] for r in FEATURE_REFUSALS])
def test_the_features_bounds_are_refused_naming_the_value(features, image, what, model, pieces, says):
    from smartedit.serve.client import stream

    e = features.endpoints
    with pytest.raises(BAD) as err:
        if model == MODEL:
            edit(connect("grpc", e.grpc_url, 120), image, "make it blue", resolution=64, **pieces)
        else:
            list(stream(connect("grpc", e.grpc_url, 120), image, "make it blue", resolution=64, **pieces))
    # a stream's error carries a message only (KServe's ModelStreamInferResponse has no status code): it names its kind
    want = "StatusCode.INVALID_ARGUMENT" if model == MODEL else None
    assert err.value.status() == want and says in str(err.value), (what, err.value.status(), str(err.value))
    assert "InputError: " in str(err.value) and "Traceback" not in str(err.value)
    assert "\n" not in str(err.value).strip()


def test_what_triton_does_with_an_out_of_range_priority(features, image):
    """What Triton Inference Server 2.51 does with a priority outside 1..levels (the model never sees it): 0 and
    levels + 1 and 2^64 - 1 run at the default level (1: nothing a client could not ask for); a negative or
    non-integer value, or 2^64, is refused by Triton's own parser with HTTP 500 ("Unable to parse 'priority'")."""
    import urllib.error
    import urllib.request

    e = features.endpoints

    def infer(priority) -> tuple[int, str]:
        head = json.dumps({"inputs": [
            {"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(image) + 4}},
            {"name": "instruction", "shape": [1, 1], "datatype": "BYTES", "data": ["make it blue"]},
            {"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [21]},
            {"name": "steps", "shape": [1, 1], "datatype": "INT64", "data": [1]},
            {"name": "resolution", "shape": [1, 1], "datatype": "INT64", "data": [64]}],
            "parameters": {"priority": priority}}).encode()
        req = urllib.request.Request(f"http://{e.http_url}/v2/models/{MODEL}/infer",
                                     data=head + len(image).to_bytes(4, "little") + image, method="POST",
                                     headers={"Inference-Header-Content-Length": str(len(head))})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, ""
        except urllib.error.HTTPError as ex:
            return ex.code, ex.read().decode()

    for ok in (0, 3, 2**64 - 1):
        assert infer(ok)[0] == 200, ok
    for bad in (-1, 1.5, "high", 2**64):
        status, text = infer(bad)
        assert status == 500 and "Unable to parse 'priority'" in text, (bad, status, text)


# -- the container repository and its pods ----------------------------------------------------------------------------


def test_the_container_repository_streams_and_takes_variants_and_levers(repository_server, image):
    """Through the launcher (a container's command), the `--target triton` repository also serves
    `smartedit_stream` (derived from its checked `smartedit` config: a BLS orchestrator, no second copy of the
    graphs): a stream with two variants and the loop's levers tells its steps and answers the bytes the `smartedit`
    model answers for the same request."""
    from smartedit.serve.client import stream, variants

    e = repository_server.endpoints
    ask = dict(seed=[4, 5], steps=4, resolution=256, sampler="ddim", guidance_interval=[0.3, 1.0])
    *progress, final = list(stream(connect("grpc", e.grpc_url, 300), image, "make it blue", preview_every=2, **ask))
    assert [m["progress"]["step"] for m in progress] == list(range(5))
    assert [len(m["previews"]) for m in progress] == [0, 0, 2, 0, 0]
    png, t = edit(connect("grpc", e.grpc_url, 300), image, "make it blue", **ask)
    assert final["edited"] == png and t["backend"] == "bls" and t["condition_batch"] == 1
    assert t["unet_evaluations"] == 2 * (1 + 3 + 3 + 3) and len(variants(png, t)) == 2


def test_configs_carry_priorities_the_cache_and_the_stream_twin(triton_repository, tmp_path):
    """smartedit-serve's repository and the container's: two priority levels (a request without one runs at 1; the
    second level waits at most its bound, a request's own timeout only shortening it), a queue bound per level,
    the response cache allowed where asked (the server has one only with --cache-config), ragged variant inputs;
    the stream twin decoupled, with the same batching and its own outputs, never cached."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from smartedit.serve.repository import STREAM_MODEL, write_stream_twin

    def parse(path):
        return text_format.Parse(path.read_text(), mc.ModelConfig())

    repo = write_serving_repository(tmp_path / "repo", TINY_SETTINGS, max_batch=4, queue_delay_ms=5,
                                    instances=1, gpu=False, stream=True, cache=True, low_priority_wait_s=42)
    c, s = parse(repo / MODEL / "config.pbtxt"), parse(repo / STREAM_MODEL / "config.pbtxt")
    out, _ = triton_repository
    container = parse(out / "triton" / MODEL / "config.pbtxt")
    twin = parse(write_stream_twin(out / "triton", tmp_path / "twin") / STREAM_MODEL / "config.pbtxt")
    for config in (c, container):
        b = config.dynamic_batching
        assert (b.priority_levels, b.default_priority_level) == (2, 1)
        first = b.default_queue_policy
        assert first.max_queue_size == MAX_QUEUE and not first.default_timeout_microseconds
        low = b.priority_queue_policy[2]
        assert low.max_queue_size == MAX_QUEUE and low.timeout_action == mc.ModelQueuePolicy.REJECT
        assert config.response_cache.enable and not config.model_transaction_policy.decoupled
        assert {i.name for i in config.input if i.allow_ragged_batch} == {"seed", "guidance_scale",
                                                                         "image_guidance_scale"}
    assert c.dynamic_batching.priority_queue_policy[2].default_timeout_microseconds == 42_000_000
    for twin_config, of in ((s, c), (twin, container)):
        assert twin_config.name == STREAM_MODEL and twin_config.model_transaction_policy.decoupled
        assert not twin_config.response_cache.enable
        assert twin_config.dynamic_batching == of.dynamic_batching and twin_config.max_batch_size == of.max_batch_size
        assert {o.name for o in twin_config.output} == {"edited", "timings", "progress", "preview"}
        assert "preview_every" in {i.name for i in twin_config.input}
    settings = json.loads(twin.parameters["settings"].string_value)
    assert settings["repository"] == str((out / "triton").resolve()) and settings["runner"] == "bls"
    plain = parse(write_serving_repository(tmp_path / "plain", TINY_SETTINGS, max_batch=2, queue_delay_ms=5,
                                           instances=1, gpu=False, priority_levels=1) / MODEL / "config.pbtxt")
    assert plain.dynamic_batching.priority_levels == 0 and not plain.response_cache.enable  # one level, no cache
    assert not (tmp_path / "plain" / STREAM_MODEL).exists()


def test_the_launcher_gives_the_cache_its_library_and_tells_the_model(tmp_path):
    """A server given --cache-config (the launcher's flags, a pod's args) or a size of its own also gets the cache's
    library folder (the bundled build looks in /opt/tritonserver/caches otherwise and does not start); without a
    cache, neither."""
    from smartedit.serve.server import TritonServer, bundled

    e = free_endpoints()
    caches = f"--cache-directory={bundled() / 'caches'}"
    assert TritonServer(tmp_path, e, tmp_path, args=("--cache-config=local,size=1048576",)).cache_flags() == [caches]
    assert TritonServer(tmp_path, e, tmp_path, cache_mb=3).cache_flags() == [f"--cache-config=local,size={3 << 20}",
                                                                              caches]
    assert TritonServer(tmp_path, e, tmp_path).cache_flags() == []
    mine = "--cache-directory=/opt/caches"
    assert TritonServer(tmp_path, e, tmp_path, args=("--cache-config=local,size=1", mine)).cache_flags() == []


def test_smartedit_k8s_carries_the_cache_and_the_stream(triton_repository, tmp_path):
    """--cache-mb: the server's flag in the pod's args and that much more memory for the container; the autoscaling
    rule counts the stream twin's queue with the `smartedit` model's; the streams use the gRPC port already exposed,
    and the probes are unchanged."""
    import yaml

    from smartedit.errors import InputError
    from smartedit.serve.kubernetes import DeployOptions, recording_rule, write_manifests

    # a copy without the __pycache__ a running server of the shared repository writes (its stop removes it)
    out = Path(shutil.copytree(triton_repository[0], tmp_path / "export",
                               ignore=shutil.ignore_patterns("__pycache__", ".smartedit-export.lock")))
    opts = DeployOptions(image="registry.example.com/smartedit-triton:1", storage_uri="s3://models/triton",
                         memory="32Gi", cache_mb=512)
    write_manifests(out, tmp_path / "k8s", opts)
    pod = yaml.safe_load((tmp_path / "k8s" / "plain" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert f"--cache-config=local,size={512 << 20}" in c["args"]
    assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"] == f"{32 * 1024 + 512}Mi"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert 'model=~"smartedit|smartedit_stream"' in recording_rule(opts)["rules"][0]["expr"]
    runtime = yaml.safe_load((tmp_path / "k8s" / "kserve" / "servingruntime.yaml").read_text())
    assert f"--cache-config=local,size={512 << 20}" in runtime["spec"]["containers"][0]["args"]
    for bad, says in ((-1, "--cache-mb must be an integer from 0"), (1 << 21, "got 2097152")):
        with pytest.raises(InputError, match=says):
            write_manifests(out, tmp_path / "bad", DeployOptions(image=opts.image, storage_uri=opts.storage_uri,
                                                                 cache_mb=bad))
        assert not (tmp_path / "bad").exists()


def test_the_load_test_measures_streams_priorities_and_the_cache(features, image):
    """The load test's features part on the shared features server, a few requests each: every request answered,
    the repeats all cache hits (Triton's counters), the flood's requests counted, the report's tables written."""
    from smartedit.bench.serve import _features_markdown, measure_features

    f = measure_features(features.endpoints, image, steps=1, resolution=64, requests=2, concurrency=2,
                         flood_clients=2, timeout_s=300, progress=lambda m: None)
    assert all(r["answered"] == 2 for r in f["stream"].values()), f["stream"]
    assert all(r["answered"] == 2 for r in f["priority"].values()), f["priority"]
    assert f["priority"]["alone"]["flood"] is None and f["priority"]["over a priority-2 flood"]["flood"]["requests"] > 0
    assert (f["cache"]["nv_cache_num_misses"], f["cache"]["nv_cache_num_hits"]) == (2, 2), f["cache"]
    text = "\n".join(_features_markdown(f))
    assert "over a priority-2 flood" in text and "| hit |" in text and "p50 vs the edit" in text
