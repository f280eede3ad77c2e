"""The reliability catalogue of the server, as a hostile network client sees it: smartedit-serve (the real
tritonserver, tiny preset, eager, CPU) and the `--target triton` repository's graph models on the bundled server.

Every request row asserts the status (HTTP code or gRPC status), one line naming the value, no traceback, what the
server computed (its own counters, `smartedit_requests_total{outcome}`) and that it still serves. The principles,
numbered as the tests below cite them: 1 the inference port serves inference and nothing else; 2 what is served is
what was verified; 3 every request is bounded before work, and work nobody waits for is dropped; 4 a refused request
costs nothing afterwards; 5 non-finite numbers never reach an image; 6 a bad request is the client's error, said as
such; 7 the server says only what is true about itself; 8 outputs never destroy, change or alias inputs; 9 only the
formats the README names are decoded.

Servers are shared: `tiny_server` (conftest, also test_serve.py's), one strict server here (batch 1, a queue of 2,
up to 1000 steps) for the queue, cancellation and memory rows, and one server on the shared triton repository.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install -e '.[test]')")
tritonclient = pytest.importorskip("tritonclient.grpc")

from conftest import run_cli, settled  # noqa: E402
from smartedit.serve.repository import MODEL  # noqa: E402
from smartedit.serve.client import connect, edit, edit_inputs  # noqa: E402
from smartedit.serve.server import TritonServer, free_endpoints, running, settings_for  # noqa: E402
from smartedit.weights import ModelSource  # noqa: E402

BAD = pytest.importorskip("tritonclient.utils").InferenceServerException
pytestmark = pytest.mark.filterwarnings("ignore")


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


IMAGE = _png(Image.new("RGB", (96, 64), (120, 40, 200)))


def _outcomes(endpoints) -> dict[str, float]:
    """smartedit_requests_total by outcome, read from the metrics port."""
    with urllib.request.urlopen(endpoints.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("smartedit_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _delta(before: dict, after: dict) -> dict[str, int]:
    return {k: int(after.get(k, 0) - before.get(k, 0)) for k in ("ok", "refused", "cancelled", "failed")
            if after.get(k, 0) != before.get(k, 0)}


def _http(endpoints, method: str, path: str, body: bytes | None = None, headers: dict | None = None
          ) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{endpoints.http_url}{path}", data=body, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _one_line(text: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text, text


def _serves(endpoints) -> None:
    png, _ = edit(connect("http", endpoints.http_url, 120), IMAGE, "make it blue", steps=1, resolution=64, seed=0)
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def _rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (tritonserver and its Python backend stubs)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


# -- 1 and 6: what the ports answer, on smartedit-serve ------------------------------------------------------------

MARKER = Path("/tmp/smartedit-uploaded-code-ran")
EVIL_MODEL_PY = f"open({str(MARKER)!r}, 'w').write('ran')\n"


def _load_with_code(e) -> tuple[int, str]:
    """Remote code execution through the model API: a load request carrying a model.py (base64 `file:` parameter)."""
    cfg = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                      "input": [{"name": "x", "data_type": "TYPE_INT32", "dims": [1]}],
                      "output": [{"name": "y", "data_type": "TYPE_INT32", "dims": [1]}]})
    body = json.dumps({"parameters": {"config": cfg, "file:1/model.py":
                                      base64.b64encode(EVIL_MODEL_PY.encode()).decode()}}).encode()
    return _http(e, "POST", "/v2/repository/models/evil/load", body)


HTTP_RESTRICTED = [
    # (id, method, path, body)
    ("load-with-uploaded-code", None, None, None),
    ("unload-the-model", "POST", f"/v2/repository/models/{MODEL}/unload", b"{}"),
    ("repository-index", "POST", "/v2/repository/index", b"{}"),
    ("model-config-with-settings", "GET", f"/v2/models/{MODEL}/config", None),
    ("statistics", "GET", f"/v2/models/{MODEL}/stats", None),
    ("register-shared-memory", "POST", "/v2/systemsharedmemory/region/x/register",
     json.dumps({"key": "/dev/shm/x", "offset": 0, "byte_size": 1 << 30}).encode()),
    ("trace-setting", "POST", "/v2/trace/setting", json.dumps({"trace_level": ["TIMESTAMPS"]}).encode()),
    ("logging-setting", "POST", "/v2/logging", json.dumps({"log_verbose_level": 1}).encode()),
]


@pytest.mark.parametrize("what,method,path,body", HTTP_RESTRICTED, ids=[r[0] for r in HTTP_RESTRICTED])
def test_http_serves_inference_and_nothing_else(tiny_server, what, method, path, body):
    e = tiny_server.endpoints
    MARKER.unlink(missing_ok=True)
    before = _outcomes(e)
    status, text = _load_with_code(e) if method is None else _http(e, method, path, body)
    assert status == 403, (what, status, text)
    assert "restricted" in text and "smartedit-closed-api" in text, text
    _one_line(text)
    assert not MARKER.exists(), "uploaded code ran"
    assert _http(e, "GET", f"/v2/models/{MODEL}/ready")[0] == 200  # still loaded, for everyone
    assert _http(e, "GET", "/v2/models/evil/ready")[0] != 200
    _serves(e)
    assert _delta(before, _outcomes(e)) == {"ok": 1}


GRPC_RESTRICTED = [
    ("load", lambda c: c.load_model("evil", config="{}", files={"file:1/model.py": EVIL_MODEL_PY.encode()})),
    ("unload", lambda c: c.unload_model(MODEL)),
    ("model-config", lambda c: c.get_model_config(MODEL)),
    ("register-shared-memory", lambda c: c.register_system_shared_memory("x", "/x", 1 << 20)),
    ("statistics", lambda c: c.get_inference_statistics(MODEL)),
    ("log-settings", lambda c: c.update_log_settings({"log_verbose_level": 1})),
]


@pytest.mark.parametrize("what,call", GRPC_RESTRICTED, ids=[r[0] for r in GRPC_RESTRICTED])
def test_grpc_serves_inference_and_nothing_else(tiny_server, what, call):
    e = tiny_server.endpoints
    MARKER.unlink(missing_ok=True)
    client = tritonclient.InferenceServerClient(e.grpc_url)
    with pytest.raises(BAD) as err:
        call(client)
    assert err.value.status() == "StatusCode.UNAVAILABLE" and "restricted" in str(err.value), str(err.value)
    _one_line(str(err.value))
    assert not MARKER.exists()
    assert client.is_model_ready(MODEL)
    _serves(e)


def _server_pid(server) -> int:
    return server.proc.pid


def test_a_largest_request_that_does_not_fit_stops_the_start(monkeypatch):
    """2: with --warm-up max (the default on a GPU) the largest request the server admits runs before it is ready:
    one that does not fit (ONNX Runtime's unfused UNet attention at 768 px asked 32 GiB for one MatMul here) stops the
    start with one line naming the batch and resolution, instead of the first such request stopping the service."""
    from smartedit.errors import RunError
    from smartedit.serve.model import _warm_up
    from smartedit.serve.service import Limits

    calls = []

    def pipe(images, instructions, steps, resolution, seed):
        calls.append((len(images), resolution))
        if resolution > 256:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul "
                               "node.\n Status Message: Failed to allocate memory for requested buffer of size 34359738368")

    limits = Limits(max_resolution=768, max_batch=4)
    _warm_up(pipe, limits, "min")
    with pytest.raises(RunError) as err:
        _warm_up(pipe, limits, "max")
    assert calls == [(1, 64), (4, 768)]
    assert "the largest request this server admits (4 x 768 px) failed at warm-up" in str(err.value), str(err.value)
    assert "34359738368" in str(err.value) and "--max-batch" in str(err.value)
    _one_line(str(err.value))


def test_a_server_that_can_bound_request_sizes_is_told_to(tmp_path, monkeypatch):
    """4: a tritonserver that has --http-max-input-size (NVIDIA's containers from 25.06) gets the request bound
    (40 MB: the 32 MB image and the rest); the bundled 2.51 has none, and gets no flag it would refuse."""
    from smartedit.serve.server import MAX_REQUEST_BYTES, TRITONSERVER_ENV, bundled, size_flags

    assert size_flags(bundled() / "bin" / "tritonserver") == []  # the bundled 2.51
    newer = tmp_path / "tritonserver"
    (newer / "bin").mkdir(parents=True)
    (newer / "bin" / "tritonserver").write_text("#!/bin/sh\necho '  --http-max-input-size <integer>'\n")
    (newer / "bin" / "tritonserver").chmod(0o755)
    monkeypatch.setenv(TRITONSERVER_ENV, str(newer))
    assert size_flags(newer / "bin" / "tritonserver") == [f"--http-max-input-size={MAX_REQUEST_BYTES}"]


def test_no_key_in_the_command_line_and_no_model_control(tiny_server):
    """1: what a local user reads in /proc/PID/cmdline opens nothing: every restricted API is closed by a value that
    holds a line feed (no HTTP or gRPC client can send one), and the server runs without model control."""
    argv = Path(f"/proc/{_server_pid(tiny_server)}/cmdline").read_bytes().decode().split("\0")
    restricted = [a for a in argv if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    assert len(restricted) == 2 and all("\n" in a for a in restricted), restricted
    assert not any(a.startswith(("--model-control-mode", "--load-model")) for a in argv), argv


CLOSED_VALUES = [
    # (id, the header line a client sends, built from what /proc shows)
    ("value-as-shown", b"smartedit-closed-api: closed\nto every client"),
    ("value-with-crlf", b"smartedit-closed-api: closed\r\nto every client"),
    ("value-folded", b"smartedit-closed-api: closed\r\n to every client"),
    ("value-first-line", b"smartedit-closed-api: closed"),
]


@pytest.mark.parametrize("what,header", CLOSED_VALUES, ids=[r[0] for r in CLOSED_VALUES])
def test_the_closed_apis_open_to_no_header(tiny_server, what, header):
    """1: a raw HTTP request carrying the closing value the ways a client could try: never answered 200 (refused
    403, or the connection dropped as malformed); the model is still loaded and serving."""
    e = tiny_server.endpoints
    with socket.create_connection((e.host, e.http), timeout=30) as c:
        c.sendall(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nContent-Length: 0\r\n\r\n")
        answer = c.recv(200)
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
    _serves(e)


def test_the_closed_apis_open_to_no_grpc_metadata(tiny_server):
    """1: the same value as gRPC metadata cannot even be sent."""
    client = tritonclient.InferenceServerClient(tiny_server.endpoints.grpc_url)
    for value in ("closed\nto every client", "closed"):
        with pytest.raises(BAD) as err:
            client.get_model_repository_index(headers={"triton-grpc-protocol-smartedit-closed-api": value})
        assert err.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.INTERNAL"), str(err.value)
    assert client.is_model_ready(MODEL)


@pytest.mark.skipif(os.geteuid() != 0, reason="a private /dev/shm needs root (a mount namespace)")
def test_request_tensors_are_not_in_the_machines_dev_shm(tiny_server):
    """1: run as root, the server's /dev/shm is its own (mode 0700): Triton's Python backend makes its regions,
    which carry every request's tensors, mode 644, so in the machine's /dev/shm any local user could read them."""
    pid = _server_pid(tiny_server)
    _serves(tiny_server.endpoints)
    theirs = set(os.listdir(f"/proc/{pid}/root/dev/shm"))
    assert theirs and not theirs & set(os.listdir("/dev/shm")), theirs
    assert (os.stat(f"/proc/{pid}/root/dev/shm").st_mode & 0o777) == 0o700


CLASSIFICATION = [
    # (id, protocol, output): Triton Inference Server 2.51 died (SIGFPE) classifying a BYTES output
    ("edited-http", "http", "edited"), ("timings-http", "http", "timings"), ("edited-grpc", "grpc", "edited"),
]


@pytest.mark.parametrize("what,protocol,output", CLASSIFICATION, ids=[r[0] for r in CLASSIFICATION])
def test_a_classification_request_does_not_stop_the_server(tiny_server, what, protocol, output):
    """2: the classification extension on an output: answered (the outputs are UINT8, whose class indices are
    harmless), and the server still serves."""
    e = tiny_server.endpoints
    module = __import__(f"tritonclient.{protocol}", fromlist=["x"])
    client = connect(protocol, e.http_url if protocol == "http" else e.grpc_url, 120)
    r = client.infer(MODEL, edit_inputs(module, IMAGE, "make it blue", steps=1, resolution=64, seed=0),
                     outputs=[module.InferRequestedOutput(output, class_count=2)])
    assert r.as_numpy(output).shape == (1, 2)
    _serves(e)


def test_json_integers_are_not_narrowed(tiny_server):
    """9: a JSON request's steps of 2^32 + 1 reach the model as they were sent (INT64 inputs; Triton narrowed an
    INT32 input to 1 step) and are refused naming the value; an old client's INT32 steps are refused by Triton's
    datatype check, before the model."""
    e = tiny_server.endpoints
    def request(steps_value, dtype="INT64"):
        head = json.dumps({"inputs": [
            {"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(IMAGE) + 4}},
            {"name": "instruction", "shape": [1, 1], "datatype": "BYTES", "data": ["make it blue"]},
            {"name": "steps", "shape": [1, 1], "datatype": dtype, "data": [steps_value]},
            {"name": "resolution", "shape": [1, 1], "datatype": "INT64", "data": [64]}]}).encode()
        body = head + len(IMAGE).to_bytes(4, "little") + IMAGE
        return _http(e, "POST", f"/v2/models/{MODEL}/infer", body,
                     {"Inference-Header-Content-Length": str(len(head))})

    before = _outcomes(e)
    status, text = request(2**32 + 1)
    assert status == 400 and "steps must be from 1 to 100, got 4294967297" in text, (status, text)
    status, text = request(1, "INT32")
    assert status == 400 and "steps" in text and "INT64" in text, (status, text)
    assert _delta(before, _outcomes(e)) == {"refused": 1}  # the INT32 one never reached the model
    status, text = request(1)
    assert status == 200, text


def test_an_exif_rotated_upload_edits_like_the_upright_picture(tiny_server):
    """9: a JPEG stored sideways with an EXIF orientation is edited as the picture it shows: the same bytes as the
    upright picture's edit (every stage sees it upright)."""
    upright = Image.fromarray((np.random.RandomState(1).rand(64, 96, 3) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    sideways = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, format="PNG", exif=exif)
    client = connect("http", tiny_server.endpoints.http_url, 120)
    a, _ = edit(client, _png(upright), "make it blue", steps=1, resolution=64, seed=5)
    b, _ = edit(client, sideways.getvalue(), "make it blue", steps=1, resolution=64, seed=5)
    assert a == b


@dataclass
class Req:
    """A request row: what differs from a good 1-step 64 px request, and what the refusal must say."""
    id: str
    principle: int
    pieces: dict
    says: str
    protocol: str = "http"
    status: str = "400"  # HTTP code; gRPC: the status name


def _eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\n%%EOF\n"


def _truncated_png() -> bytes:
    data = _png(Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)))
    return data[: len(data) // 2]


REQUESTS = [
    # 3: bounded before work
    Req("instruction-4-MB", 3, dict(instruction=b"a" * (4 << 20)), "4194304 bytes, over the 16384-byte limit"),
    Req("instruction-4-MB-grpc", 3, dict(instruction=b"a" * (4 << 20)), "over the 16384-byte limit", "grpc",
        "StatusCode.INVALID_ARGUMENT"),
    Req("instruction-multibyte-over-the-limit", 3, dict(instruction=("改" * 6000).encode()), "18000 bytes"),
    Req("image-33-MB", 3, dict(image=b"\x89PNG" + b"\0" * (33 << 20)), "over the 32 MB limit"),
    Req("image-over-the-megapixels", 3, dict(image=_png(Image.new("RGB", (1100, 1000)))), "1100x1000 = 1.1 MP"),
    Req("resolution-past-the-profile", 3, dict(resolution=4096), "got 4096"),
    Req("steps-past-the-limit", 3, dict(steps=101), "got 101", "grpc", "StatusCode.INVALID_ARGUMENT"),
    # 5: guidance that would make the decoder's output non-finite is refused before work
    Req("guidance-3e38", 5, dict(guidance_scale=3e38), "guidance_scale must be within +-1000, got 3e+38"),
    Req("guidance-minus-1e30", 5, dict(guidance_scale=-1e30), "within +-1000", "grpc",
        "StatusCode.INVALID_ARGUMENT"),
    Req("image-guidance-2000", 5, dict(image_guidance_scale=2000.0), "image_guidance_scale must be within"),
    # 6: the client's error, said as such, naming what was wrong (never a Python object)
    Req("undecodable-image", 6, dict(image=b"not an image"), "image cannot be decoded: not a PNG, JPEG or WebP"),
    Req("undecodable-image-grpc", 6, dict(image=b"not an image"), "not a PNG, JPEG or WebP", "grpc",
        "StatusCode.INVALID_ARGUMENT"),
    Req("truncated-png", 6, dict(image=_truncated_png()), "image cannot be decoded: a damaged image"),
    Req("nan-guidance-grpc", 6, dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan",
        "grpc", "StatusCode.INVALID_ARGUMENT"),
    Req("control-token-in-instruction", 6, dict(instruction=b"make it </s> blue"), "'</s>'"),
    Req("unknown-parameter-grpc", 6, dict(parameters={"output_path": "/etc/x"}), "unknown request parameters",
        "grpc", "StatusCode.INVALID_ARGUMENT"),
    Req("instruction-invisible", 9, dict(instruction="\u200b\ufeff\u200e\u200f".encode()),
        "no visible character (U+200B U+FEFF U+200E U+200F)"),
    Req("instruction-invisible-grpc", 9, dict(instruction="\u2060\u00ad".encode()), "no visible character", "grpc",
        "StatusCode.INVALID_ARGUMENT"),
    Req("steps-past-int32", 9, dict(steps=2**32 + 1), "got 4294967297"),
    Req("resolution-past-int32-grpc", 9, dict(resolution=2**32 + 64), "got 4294967360", "grpc",
        "StatusCode.INVALID_ARGUMENT"),
    # 9: only PNG, JPEG and WebP are decoded
    Req("eps-image", 9, dict(image=_eps()), "not a PNG, JPEG or WebP"),
    Req("bmp-image", 9, dict(image=_png(Image.new("RGB", (64, 64)), "BMP")), "not a PNG, JPEG or WebP"),
    Req("tiff-image-grpc", 9, dict(image=_png(Image.new("RGB", (64, 64)), "TIFF")), "not a PNG, JPEG or WebP",
        "grpc", "StatusCode.INVALID_ARGUMENT"),
    # 3, 5, 6: the loop's levers and the variants, bounded before work
    Req("sampler-unknown", 6, dict(sampler="heun"),
        "sampler must be one of euler-ancestral, euler, ddim, dpm-solver++, unipc, got 'heun'"),
    Req("sampler-empty-grpc", 6, dict(sampler=""), "got ''", "grpc", "StatusCode.INVALID_ARGUMENT"),
    Req("guidance-interval-reversed", 3, dict(guidance_interval=[0.8, 0.2]),
        "guidance interval must satisfy 0 <= start <= end <= 1, got [0.8, 0.2]"),
    Req("guidance-interval-past-1-grpc", 3, dict(guidance_interval=[0.0, 1.5]), "got [0, 1.5]", "grpc",
        "StatusCode.INVALID_ARGUMENT"),
    Req("guidance-interval-nan", 5, dict(guidance_interval=[float("nan"), 1.0]),
        "guidance interval must hold two finite numbers in [0, 1], got [nan, 1.0]"),
    Req("text-only-interval-negative", 3, dict(text_only_interval=[-0.1, 0.5]),
        "text-only guidance interval must satisfy 0 <= start <= end <= 1, got [-0.1, 0.5]"),
    Req("five-variants", 3, dict(seed=[1, 2, 3, 4, 5]), "seed holds 5 values: at most 4 variants per request"),
    Req("variant-counts-disagree-grpc", 6, dict(seed=[1, 2], image_guidance_scale=[1.4, 1.5, 1.6]),
        "seed holds 2 values for 3 variants", "grpc", "StatusCode.INVALID_ARGUMENT"),
    Req("variant-guidance-nan", 5, dict(image_guidance_scale=[1.5, float("nan")]),
        "image_guidance_scale must be a finite number, got nan"),
    Req("variant-guidance-3e38", 5, dict(guidance_scale=[7.5, 3e38]), "guidance_scale must be within +-1000"),
    Req("variant-seed-negative", 9, dict(seed=[1, -3]), "got -3"),
]


@pytest.mark.parametrize("row", REQUESTS, ids=[r.id for r in REQUESTS])
def test_a_bad_request_is_the_clients_error_and_costs_no_edit(tiny_server, row):
    e = tiny_server.endpoints
    pieces = dict(row.pieces)
    image, text = pieces.pop("image", IMAGE), pieces.pop("instruction", b"make it blue")
    params = pieces.pop("parameters", None)
    client = connect(row.protocol, e.http_url if row.protocol == "http" else e.grpc_url, 120)
    before = _outcomes(e)
    with pytest.raises(BAD) as err:
        edit(client, image, text, parameters=params, **{"steps": 1, "resolution": 64, **pieces})
    msg = str(err.value)
    assert err.value.status() == row.status, (row.id, err.value.status(), msg[:300])
    assert row.says in msg, (row.id, msg[:300])
    _one_line(msg)
    assert "BytesIO" not in msg and " at 0x" not in msg, msg
    assert _delta(before, _outcomes(e)) == {"refused": 1}, "a refused request was computed or miscounted"
    _serves(e)


def test_webp_is_decoded_like_png(tiny_server, tiny_pipe):
    """9: the third format the README names is served, with the image the offline pipeline gives."""
    img = Image.new("RGB", (64, 64), (30, 160, 90))
    png, _ = edit(connect("http", tiny_server.endpoints.http_url, 120), _png(img, "WEBP"), "make it blue", steps=1,
                  resolution=64, seed=3)
    want = _png(tiny_pipe(Image.open(io.BytesIO(_png(img, "WEBP"))), "make it blue", steps=1, resolution=64, seed=3))
    assert png == want


def test_refusals_and_answers_are_counted_apart(tiny_server):
    """6: one good and three refused requests: the server's counters say 1 ok, 3 refused (Triton's own
    nv_inference_request_success counts every answered request; see the README)."""
    e = tiny_server.endpoints
    client = connect("http", e.http_url, 120)
    settled(e)  # nothing an earlier test left is still being answered
    before = _outcomes(e)
    edit(client, IMAGE, "make it blue", steps=1, resolution=64)
    for bad in (dict(steps=0), dict(resolution=100), dict(guidance_scale=float("inf"))):
        with pytest.raises(BAD):
            edit(client, IMAGE, "make it blue", **{"steps": 1, "resolution": 64, **bad})
    assert _delta(before, _outcomes(e)) == {"ok": 1, "refused": 3}


# -- 3 and 4: the queue, clients that leave, refused requests' memory ----------------------------------------------


@pytest.fixture(scope="module")
def strict():
    """One request at a time (batch 1), at most 2 waiting, up to 1000 steps: a long edit holds the model."""
    settings = settings_for(ModelSource(preset="tiny", seed=0), "eager", None, "cpu", "fp32", max_steps=1000,
                            max_megapixels=1.0, max_batch=1)
    with running(settings, max_batch=1, queue_delay_ms=0, max_queue=2, ready_timeout_s=300) as s:
        yield s


def _long(e, protocol: str = "grpc", timeout_s: float = 600, **kw):
    """A 1000-step edit (minutes on this CPU): it holds the model until it is stopped."""
    return edit(connect(protocol, e.grpc_url if protocol == "grpc" else e.http_url, timeout_s), IMAGE,
                "make it blue", steps=1000, resolution=64, **kw)


def _wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def _pending(e) -> float:
    with urllib.request.urlopen(e.metrics_url, timeout=10) as r:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in r.read().decode().splitlines()
                   if ln.startswith("nv_inference_pending_request_count{") and f'model="{MODEL}"' in ln)


def test_steps_past_the_samplers_own_bound_are_refused(strict):
    """3: the server admits 1000 steps, DDIM's schedule 999: a DDIM request of 1000 is refused naming both, before
    work (a default-sampler request of 1000 would be taken)."""
    e = strict.endpoints
    before = _outcomes(e)
    with pytest.raises(BAD) as err:
        edit(connect("http", e.http_url, 120), IMAGE, "make it blue", steps=1000, resolution=64, sampler="ddim")
    assert err.value.status() == "400" and "steps must be an integer from 1 to 999, got 1000 (sampler 'ddim')" in \
        str(err.value), str(err.value)
    assert _delta(before, _outcomes(e)) == {"refused": 1}


def test_a_cancelled_grpc_call_stops_its_edit(strict):
    """3: the client gives up (gRPC deadline, 2 s) on a 1000-step edit: the server stops it between steps and the
    next request is served, not queued behind minutes of work nobody waits for."""
    e = strict.endpoints
    before = _outcomes(e)
    with pytest.raises(BAD, match="Deadline"):
        _long(e, timeout_s=2)
    _wait_until(lambda: _delta(before, _outcomes(e)).get("cancelled") == 1, "the edit was stopped")
    _serves(e)
    assert _delta(before, _outcomes(e)) == {"cancelled": 1, "ok": 1}


def test_a_request_past_its_own_timeout_is_stopped(strict):
    """3: over HTTP (whose closed connections Triton 2.51 does not report) a client states how long it waits: the
    KServe `timeout` parameter (1 s here); the edit is stopped once it has passed and the answer says so."""
    import tritonclient.http as http

    e = strict.endpoints
    before = _outcomes(e)
    client = connect("http", e.http_url, 600)
    with pytest.raises(BAD) as err:
        client.infer(MODEL, edit_inputs(http, IMAGE, "make it blue", steps=1000, resolution=64), timeout=1_000_000)
    assert "Cancelled: stopped before step" in str(err.value) and "timeout" in str(err.value), str(err.value)
    _one_line(str(err.value))
    assert _delta(before, _outcomes(e)) == {"cancelled": 1}
    _serves(e)


def test_a_full_queue_answers_busy_at_once(strict):
    """3: one edit running (it stops itself after its 15 s timeout), two waiting (the bound), the rest refused at
    once with 503 / UNAVAILABLE naming the queue; the admitted ones are answered."""
    import tritonclient.http as http

    e = strict.endpoints
    long_client = connect("http", e.http_url, 600)
    t = threading.Thread(target=lambda: _catch(lambda: long_client.infer(
        MODEL, edit_inputs(http, IMAGE, "make it blue", steps=1000, resolution=64), timeout=15_000_000)))
    t.start()
    time.sleep(1.0)
    _wait_until(lambda: _pending(e) == 0, "the long edit runs")
    results: list = [None] * 5

    def one(i):
        protocol = "http" if i % 2 else "grpc"
        results[i] = _catch(lambda: edit(connect(protocol, e.http_url if protocol == "http" else e.grpc_url, 600),
                                         IMAGE, "make it blue", steps=1, resolution=64, seed=i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for th in threads:
        th.start()
    for th in [t, *threads]:
        th.join(timeout=600)
    busy = [r for r in results if isinstance(r, BAD)]
    # 3 refused (2 admitted behind the running edit); 4 if the long edit was still queued when they came
    assert len(busy) in (3, 4), [str(r)[:100] for r in results]
    for r in busy:
        assert r.status() in ("503", "StatusCode.UNAVAILABLE") and "Exceeds maximum queue size" in str(r), str(r)
        _one_line(str(r))
    answered = [r for r in results if isinstance(r, tuple)]
    assert len(answered) == 5 - len(busy) and all(Image.open(io.BytesIO(png)).size == (64, 64) for png, _ in answered)


def _catch(call):
    try:
        return call()
    except BAD as ex:
        return ex


def test_refused_requests_leave_no_memory_behind(strict):
    """4: 250 requests of 4 MB each (1 GB in all), each refused for its instruction's size: the server and its
    model process grow by far less than the requests carried (they kept every refused request, ~20 MB each, before;
    the bound leaves room for the allocator's and shared memory's own growth)."""
    e = strict.endpoints
    client = connect("http", e.http_url, 120)
    big = b"a" * (4 << 20)

    def refuse(n):
        for _ in range(n):
            with pytest.raises(BAD, match="over the 16384-byte limit"):
                edit(client, IMAGE, big, steps=1, resolution=64)

    refuse(20)  # warm: pools and arenas reach their working size
    before = _rss_kb(strict.proc.pid)
    refuse(250)
    grown_mb = (_rss_kb(strict.proc.pid) - before) / 1024
    assert grown_mb < 150, f"the server grew by {grown_mb:.0f} MB over 250 refused 4 MB requests"
    _serves(e)


# -- 1, 2: the --target triton repository's graph models on the bundled server -------------------------------------


def _graph_call(e, graph: str, tensors: dict[str, np.ndarray], key: str | None = None, protocol: str = "http"):
    """A direct call to a graph model; `key`: the server's graph key (what the `smartedit` model's BLS calls carry)."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    from smartedit.serve.admin import GRAPH_KEY

    module = http if protocol == "http" else grpc
    inputs = []
    for name, x in tensors.items():
        i = module.InferInput(name, list(x.shape), {np.float16: "FP16", np.float32: "FP32",
                                                    np.int64: "INT64"}[x.dtype.type])
        i.set_data_from_numpy(x)
        inputs.append(i)
    url = e.http_url if protocol == "http" else e.grpc_url
    return connect(protocol, url, 120).infer(graph, inputs, parameters={GRAPH_KEY: key} if key is not None else None)


def _graph_key(server) -> str:
    from smartedit.serve.admin import GRAPH_KEY_ENV

    return server.server_env()[GRAPH_KEY_ENV]


STAGES = [
    # (id, graph, inputs, what the refusal names)
    ("llava-1500-prompt-ids", "llava", lambda: {"pixel_values": np.zeros((1, 3, 224, 224), np.float16),
                                                "prefix_ids": np.ones((1, 5), np.int64),
                                                "suffix_ids": np.ones((1, 1500), np.int64)},
     "dimension Ls = 1500 is outside the exported profile [33, 400]"),
    ("vae-decoder-112x112-latents", "vae_decoder", lambda: {"latents": np.zeros((1, 4, 112, 112), np.float16)},
     "image height 896 px is outside the exported range 256-512 px"),
    ("vae-decoder-200x200-latents", "vae_decoder", lambda: {"latents": np.zeros((1, 4, 200, 200), np.float16)},
     "image height 1600 px"),
    ("qformer-batch-of-9", "qformer_bim", lambda: {"img_hidden": np.zeros((9, 32, 64), np.float16),
                                                   "clip_feats": np.zeros((9, 256, 64), np.float16)},
     "dimension B = 9 is outside the exported profile [1, 3]"),
    ("unet-sample-not-3B", "unet", lambda: {"sample": np.zeros((2, 8, 32, 32), np.float16),
                                            "timestep": np.zeros((1,), np.float32),
                                            "prompt_embeds": np.zeros((2, 77, 32), np.float16),
                                            "bim_residual": np.zeros((1, 32, 16, 16), np.float16)},
     "is not a multiple of 3"),
]


@pytest.mark.parametrize("what,graph,inputs,says", STAGES, ids=[r[0] for r in STAGES])
def test_a_stage_model_refuses_shapes_outside_its_profile_before_work(repository_server, what, graph, inputs, says):
    """3: even a call with the graph key (as the `smartedit` model's are) is checked against the profile first."""
    e = repository_server.endpoints
    key = _graph_key(repository_server)
    before = _rss_kb(repository_server.proc.pid)
    with pytest.raises(BAD) as err:
        _graph_call(e, graph, inputs(), key)
    assert err.value.status() == "400" and says in str(err.value), (what, str(err.value)[:300])
    _one_line(str(err.value))
    grown_mb = (_rss_kb(repository_server.proc.pid) - before) / 1024
    assert grown_mb < 300, f"{what}: the server grew by {grown_mb:.0f} MB for a refused call"  # 200x200: +13.6 GB
    assert _http(e, "POST", "/v2/repository/models/llava/unload", b"{}")[0] == 403  # 1: no model control either
    ok = _graph_call(e, "vae_decoder", {"latents": np.zeros((1, 4, 32, 32), np.float16)}, key)
    assert ok.as_numpy("image").shape == (1, 3, 256, 256)


CALLERS = [
    # (id, protocol, the key sent: None = no parameter)
    ("no-key-http", "http", None), ("no-key-grpc", "grpc", None), ("wrong-key-http", "http", "guess"),
    ("empty-key-grpc", "grpc", ""),
]


@pytest.mark.parametrize("what,protocol,key", CALLERS, ids=[r[0] for r in CALLERS])
def test_a_stage_model_answers_only_the_smartedit_model(repository_server, what, protocol, key):
    """4: a client calling a graph model directly (Triton Inference Server restricts by API, not by model) is
    refused before its tensors are read, even with a valid shape."""
    with pytest.raises(BAD) as err:
        _graph_call(repository_server.endpoints, "vae_decoder", {"latents": np.zeros((1, 4, 32, 32), np.float16)},
                    key, protocol)
    assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), str(err.value)
    assert "answers only the `smartedit` model" in str(err.value), str(err.value)
    _one_line(str(err.value))


def test_a_flood_of_direct_stage_calls_costs_the_edit_nothing(repository_server, image_bytes=IMAGE):
    """4: 40 direct calls to the unet graph model at once, with an edit among them: every direct call is refused
    before its tensors are read (80 such calls were all computed before, holding an edit 32 s), and the edit is
    answered."""
    e = repository_server.endpoints
    tensors = {"sample": np.zeros((3, 8, 32, 32), np.float16), "timestep": np.zeros((1,), np.float32),
               "prompt_embeds": np.zeros((3, 77, 32), np.float16),
               "bim_residual": np.zeros((1, 32, 16, 16), np.float16)}
    results: list = [None] * 40
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _catch(
        lambda: _graph_call(e, "unet", tensors)))) for i in range(40)]
    edited: dict = {}
    for t in threads[:20]:
        t.start()
    editor = threading.Thread(target=lambda: edited.update(r=edit(connect("grpc", e.grpc_url, 300), image_bytes,
                                                                  "make it blue", seed=1, steps=1, resolution=256)))
    editor.start()
    for t in threads[20:]:
        t.start()
    for t in [*threads, editor]:
        t.join(timeout=300)
    assert all(isinstance(r, BAD) and "answers only the `smartedit` model" in str(r) for r in results), \
        [str(r)[:100] for r in results if not isinstance(r, BAD)]
    assert Image.open(io.BytesIO(edited["r"][0])).size == (256, 256)


def _copy_export(triton_repository, dst: Path) -> Path:
    out, _ = triton_repository
    return Path(shutil.copytree(out, dst, ignore=shutil.ignore_patterns("__pycache__", ".smartedit-export.lock")))


def _swap_unet_for_another_graph(out: Path) -> str:
    """Another graph's (valid) ONNX file put where the repository's unet is: what a hand-assembled repository gets."""
    dst = out / "triton" / "unet" / "1" / "model.onnx"
    dst.unlink()
    shutil.copyfile(out / "onnx" / "vae_decoder.onnx", dst)
    return "unet/1/model.onnx"


def _foreign_model(out: Path) -> str:
    d = out / "triton" / "my_detector" / "1"
    d.mkdir(parents=True)
    (d / "model.py").write_text("raise SystemExit('not ours')\n")
    (d.parent / "config.pbtxt").write_text('name: "my_detector"\nbackend: "python"\n')
    return "my_detector/"


def _edited_graph_model_config(out: Path) -> str:
    cfg = out / "triton" / "vae_decoder" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("count: 1", "count: 4"))
    return "vae_decoder/config.pbtxt"


RAN = Path("/tmp/smartedit-repository-code-ran")


def _changed_model_py(out: Path) -> str:
    """A graph model's model.py that runs code of its own when Triton imports it."""
    f = out / "triton" / "llava" / "1" / "model.py"
    f.write_text(f"open({str(RAN)!r}, 'w').write('ran')\n" + f.read_text())
    return "llava/1/model.py"


def _planted_bytecode(out: Path) -> str:
    """A compiled model.py that Python would run in place of the source beside it (its header matches the source)."""
    import importlib.util
    import py_compile

    src = out / "triton" / MODEL / "1" / "model.py"
    evil = out / "evil.py"
    evil.write_text(f"open({str(RAN)!r}, 'w').write('ran')\n")
    pyc = Path(importlib.util.cache_from_source(str(src)))
    py_compile.compile(str(evil), cfile=str(pyc), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    evil.unlink()
    return str(pyc.relative_to(out / "triton"))


SERVED = [("another-graph-as-the-unet", _swap_unet_for_another_graph),
          ("a-model-the-export-did-not-write", _foreign_model),
          ("a-stage-config-edited", _edited_graph_model_config),
          ("a-stage-model-py-changed", _changed_model_py),
          ("a-planted-pycache", _planted_bytecode)]


@pytest.mark.parametrize("what,change", SERVED, ids=[r[0] for r in SERVED])
def test_what_is_served_is_what_was_exported(triton_repository, tmp_path, capsys, what, change):
    """2, 3: a repository changed after export is refused by smartedit-verify (exit 1, naming the file) and by the
    server before tritonserver starts: none of the repository's code runs, not even once (one line naming the
    file)."""
    from smartedit.errors import InputError
    from smartedit.export.verify import main as verify_main

    RAN.unlink(missing_ok=True)
    out = _copy_export(triton_repository, tmp_path / "export")
    names = change(out)
    code, text, err = run_cli(verify_main, [out], capsys)
    assert code == 1 and f"triton/{names}" in text + err and "Traceback" not in err, (code, text[-2000:], err)
    from smartedit.serve.repository import clear_bytecode
    from smartedit.serve.server import check_before_start

    with pytest.raises(InputError) as refused:  # a bad repository: exit 2 from smartedit's commands
        check_before_start(out / "triton")
    assert names.rstrip("/") in str(refused.value), str(refused.value)
    _one_line(str(refused.value))
    if what == "a-planted-pycache":  # a server's start removes every __pycache__ before its check: never run
        clear_bytecode(out / "triton")
        check_before_start(out / "triton")
    else:
        server = TritonServer(out / "triton", free_endpoints(), tmp_path)
        with pytest.raises(InputError):
            server.start()
        assert server.proc is None, "tritonserver was started on a repository that is not what was exported"
    assert not RAN.exists(), "the repository's code ran"


LAUNCH = [
    # (id, how the repository or the flags differ, what the line names)
    ("record-rewritten-with-its-files", "record", "the repository's record was changed"),
    ("model-control-mode-explicit", "--model-control-mode=explicit", "--model-control-mode is the launcher's"),
    ("restricted-api-with-a-key", "--http-restricted-api=model-repository:k=v", "--http-restricted-api"),
    ("load-model", "--load-model=llava", "--load-model"),
    ("port-not-a-number", "--grpc-port=80a", "got '80a'"),
    ("port-given-twice", "+--http-port=1", "--http-port is given twice"),
    ("flag-without-a-value", "--strict-readiness", "--name=value"),
    ("record-sha256-not-hex", "sha:xyz", "64 lowercase hex digits"),
    ("repository-missing", "repo:/nonexistent/models", "/nonexistent/models"),
]


@pytest.mark.parametrize("what,change,says", LAUNCH, ids=[r[0] for r in LAUNCH])
def test_the_launcher_refuses_before_anything_starts(triton_repository, tmp_path, what, change, says):
    """2, 3, 6: a container's launcher (python -m smartedit.serve.launch) refuses a repository whose record was
    rewritten along with its files (the pod's spec holds the record's sha256), and the flags it decides, before
    tritonserver starts: exit 2, one line."""
    from conftest import launch_args, record_sha256

    out = _copy_export(triton_repository, tmp_path / "export")
    e = free_endpoints()
    repo, record, extra = out / "triton", record_sha256(out), []
    if change == "record":  # the attacker rewrites a stage config and the record that lists its sha256
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        from smartedit.files import sha256_file
        from smartedit.serve.server import check_before_start

        _edited_graph_model_config(out)
        cfg = repo / MODEL / "config.pbtxt"
        c = text_format.Parse(cfg.read_text(), model_config_pb2.ModelConfig())
        settings = json.loads(c.parameters["settings"].string_value)
        settings["files"]["vae_decoder/config.pbtxt"] = sha256_file(repo / "vae_decoder" / "config.pbtxt")
        c.parameters["settings"].string_value = json.dumps(settings)
        cfg.write_text(text_format.MessageToString(c))
        check_before_start(repo)  # the repository agrees with its (rewritten) record: only the pod's sha256 knows
    elif change.startswith("sha:"):
        record = change[4:]
    elif change.startswith("repo:"):
        repo = Path(change[5:])
    elif change.startswith("+"):
        extra = [change[1:]]
    else:
        extra = [change]
    args = launch_args(repo, e, record)
    if extra and "=" in extra[0] and not change.startswith("+"):  # a flag launch_args gives: this value instead
        args = [a for a in args if a.split("=", 1)[0] != extra[0].split("=", 1)[0]]
    r = subprocess.run([sys.executable, "-m", "smartedit.serve.launch", *args, *extra], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr, (what, r.returncode, r.stderr[-1500:])
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "ready" not in r.stdout
    assert not any(_listening(port) for port in (e.http, e.grpc, e.metrics))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_entry_from_another_export_is_refused(onnx_export, tmp_path, capsys):
    """2: a graph's entry (and file) copied in from another export: its source is another model's. The edit refuses
    it (exit 2, naming the entry) and smartedit-verify fails it, without --model."""
    from smartedit.cli import edit_cli
    from smartedit.export.verify import main as verify_main

    out = Path(shutil.copytree(onnx_export("fp16"), tmp_path / "export"))
    m = json.loads((out / "manifest.json").read_text())
    m["artifacts"]["onnx"]["unet"]["source"] = "f" * 64  # as exported from another checkpoint
    (out / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "in.png").write_bytes(IMAGE)
    code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--backend", "onnxruntime",
                                      "--artifacts", out, "--image", tmp_path / "in.png", "--instruction", "make it",
                                      "--out", tmp_path / "o.png", "--steps", "1", "--resolution", "256", "--quiet"],
                           capsys)
    assert code == 2 and "[onnx][unet] was exported from another source" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.png").exists()
    code, out_text, err = run_cli(verify_main, [out], capsys)
    assert code == 1 and "onnx/unet" in out_text + err and "another source" in out_text + err, out_text[-1500:]


# -- 7: the server says only what is true about itself ---------------------------------------------------------------


def _serve(args: list, tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smartedit.serve.cli", "--preset", "tiny", "--random-weights",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp_path)), start_new_session=True)


def _ports(e, **over) -> list:
    p = {"http": e.http, "grpc": e.grpc, "metrics": e.metrics, **over}
    return ["--http-port", p["http"], "--grpc-port", p["grpc"], "--metrics-port", p["metrics"]]


def _held(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


FLAGS = [
    # (id, ports given the free endpoints e, a port to hold, what the line names)
    ("http-port-70000", lambda e: _ports(e, http=70000), None, "--http-port must be a TCP port from 1 to 65535, "
                                                               "got 70000"),
    ("grpc-port-0", lambda e: _ports(e, grpc=0), None, "--grpc-port must be a TCP port from 1 to 65535, got 0"),
    ("same-port-twice", lambda e: _ports(e, grpc=e.http), None, "is also --http-port"),
    ("http-port-taken", lambda e: _ports(e), "http", "cannot be used on 127.0.0.1: another program listens on it"),
    ("metrics-port-taken", lambda e: _ports(e), "metrics", "--metrics-port"),
    ("max-queue-0", lambda e: [*_ports(e), "--max-queue", 0], None, "--max-queue"),
    ("host-not-an-address", lambda e: [*_ports(e), "--host", "no.such.host.invalid"], None, "--host"),
    ("queue-delay-inf", lambda e: [*_ports(e), "--max-queue-delay-ms", "inf"], None, "--max-queue-delay-ms"),
    ("queue-delay-1e20", lambda e: [*_ports(e), "--max-queue-delay-ms", "1e20"], None, "got 1e+20"),
    ("queue-delay-nan", lambda e: [*_ports(e), "--max-queue-delay-ms", "nan"], None, "got nan"),
    ("max-steps-past-the-sampler", lambda e: [*_ports(e), "--max-steps", "5000"], None, "the sampler's 1000, got 5000"),
    ("cache-mb-negative", lambda e: [*_ports(e), "--cache-mb", "-1"], None,
     "--cache-mb must be an integer from 0 (no cache) to 1048576, got -1"),
    ("cache-mb-past-a-tib", lambda e: [*_ports(e), "--cache-mb", str(1 << 21)], None, "got 2097152"),
    ("priority-levels-0", lambda e: [*_ports(e), "--priority-levels", "0"], None,
     "--priority-levels must be an integer from 1 to 16, got 0"),
    ("priority-levels-17", lambda e: [*_ports(e), "--priority-levels", "17"], None, "got 17"),
    ("low-priority-wait-nan", lambda e: [*_ports(e), "--low-priority-wait-s", "nan"], None,
     "--low-priority-wait-s must be a number of seconds from 1 to 86400, got nan"),
    ("low-priority-wait-0", lambda e: [*_ports(e), "--low-priority-wait-s", "0"], None, "got 0.0"),
    ("variants-over-the-batch", lambda e: [*_ports(e), "--max-variants", "8", "--max-batch", "4"], None,
     "--max-variants 8 is over --max-batch 4"),
    ("unet-evaluations-0", lambda e: [*_ports(e), "--max-unet-evaluations", "0"], None,
     "--max-unet-evaluations: must be >= 1, got 0"),
]


@pytest.mark.parametrize("what,args,hold,says", FLAGS, ids=[r[0] for r in FLAGS])
def test_bad_server_flags_are_refused_before_anything_starts(tmp_path, what, args, hold, says):
    e = free_endpoints()
    held = _held(getattr(e, hold)) if hold else None
    try:
        p = _serve(args(e), tmp_path)
        out, err = p.communicate(timeout=300)
    finally:
        if held:
            held.close()
    lines = [ln for ln in err.splitlines() if "error:" in ln]  # argparse's own refusals print their usage first
    assert p.returncode == 2 and len(lines) == 1 and says in lines[0], (what, p.returncode, err[-1500:])
    assert lines[0].startswith("smartedit-serve: error: ") and err.strip().endswith(lines[0].strip())
    assert "ready" not in out and "Traceback" not in err
    if hold:
        assert f"--{hold}-port {getattr(e, hold)}" in lines[0], lines[0]


def test_a_second_server_on_a_running_servers_ports_says_so(tiny_server, tmp_path):
    """7: the ports of a running server: refused before start (it used to print "ready" because the first server
    answered its health check), and the running server is untouched."""
    p = _serve(_ports(tiny_server.endpoints), tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and f"--http-port {tiny_server.endpoints.http} cannot be used" in err, err[-1500:]
    assert "ready" not in out and len(err.strip().splitlines()) == 1
    _serves(tiny_server.endpoints)


def test_ctrl_c_during_start_up_is_an_interruption(tmp_path):
    """7: SIGINT while the server is starting: exit 130, 'interrupted', and no tritonserver left on the ports."""
    e = free_endpoints()
    p = _serve(_ports(e), tmp_path)
    try:
        assert "starting Triton" in p.stdout.readline()
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and "interrupted" in err and "ready:" not in out, (p.returncode, err[-1500:])
    assert "Traceback" not in err
    _wait_until(lambda: subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True).returncode != 0,
                "the server's process group is gone", 60)


def _ready_serve(tmp_path: Path) -> tuple[subprocess.Popen, object]:
    e = free_endpoints()
    p = _serve(_ports(e), tmp_path)
    deadline = time.monotonic() + 300
    while "ready:" not in (line := p.stdout.readline()):
        assert line or p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline, "not ready"
    return p, e


def _own_temporaries(tmp_path: Path) -> list[str]:
    """What a run leaves in its TMPDIR besides the server's log (which outlives the run, by design)."""
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log") and p.name != "torchinductor_root")


def test_sighup_stops_the_server_cleanly(tmp_path):
    """4 (round 2): SIGHUP (the terminal closing) drains like SIGTERM: exit 0, the temporary repository removed."""
    p, e = _ready_serve(tmp_path)
    try:
        p.send_signal(signal.SIGHUP)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0 and "stopped (status 0)" in out and "Traceback" not in err, (p.returncode, err[-1500:])
    assert _own_temporaries(tmp_path) == [], _own_temporaries(tmp_path)
    assert not any(_listening(port) for port in (e.http, e.grpc, e.metrics))


def test_a_model_process_that_dies_stops_the_server(tmp_path):
    """2: the `smartedit` model's process killed (what an out-of-memory kill does): the server stops at once with one
    line naming the model and exit 1, so that its supervisor starts a fresh one, rather than stay "ready" while
    every edit answers 500; nothing left behind."""
    from smartedit.serve.server import model_processes

    p, e = _ready_serve(tmp_path)
    try:
        (server,) = [int(c) for t in Path(f"/proc/{p.pid}/task").iterdir()
                     for c in (t / "children").read_text().split()]  # tritonserver, in a session of its own
        (stub, model), = model_processes(server).items()
        assert model == MODEL
        os.kill(stub, signal.SIGKILL)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert p.returncode == 1 and len(lines) == 1 and f"the process of model `{MODEL}` died" in lines[0], err[-1500:]
    assert "Traceback" not in err
    assert _own_temporaries(tmp_path) == [], _own_temporaries(tmp_path)
    assert not any(_listening(port) for port in (e.http, e.grpc, e.metrics))


# -- 8: outputs never destroy, change or alias inputs ---------------------------------------------------------------


def test_a_re_export_never_deletes_a_model_it_did_not_write(triton_repository, tmp_path, capsys):
    from smartedit.export.cli import main as export_main

    out = _copy_export(triton_repository, tmp_path / "export")
    mine = out / "triton" / "my_detector" / "1"
    mine.mkdir(parents=True)
    (mine / "model.onnx").write_bytes(b"the user's own model")
    code, _, err = run_cli(export_main, ["--preset", "tiny", "--random-weights", "--target", "triton",
                                         "--graph-models", "python", "--out", out], capsys)
    assert code == 2 and "triton/my_detector/" in err and len(err.strip().splitlines()) == 1, err
    assert (mine / "model.onnx").read_bytes() == b"the user's own model"


def test_the_repository_never_links_or_changes_the_model_folder(tiny_pipe, onnx_export, tmp_path):
    """8: from a checkpoint, the repository copies config, tokenizer and null-text embedding: no hard link into the
    user's folder, and the folder's files keep their modes (the export's chmod reached them through links before)."""
    from smartedit.export.triton import write_container_repository
    from smartedit.graphs.manifest import Manifest

    model = tiny_pipe.save_pretrained(tmp_path / "model")
    (model / "config.json").chmod(0o600)
    (model / "null_text.safetensors").chmod(0o444)
    modes = {p: p.stat().st_mode for p in model.rglob("*")}
    out = Path(shutil.copytree(onnx_export("fp16"), tmp_path / "export"))
    manifest = Manifest.read(out)
    manifest.source = {"kind": "checkpoint", "path": str(model), "sha256": manifest.source["sha256"]}
    write_container_repository(manifest, out / "triton", "python", 2, 5.0, "cpu")
    copied = out / "triton" / MODEL / "1" / "model"
    for name in ("config.json", "null_text.safetensors", "tokenizer/tokenizer.json"):
        assert (copied / name).read_bytes() == (model / name).read_bytes()
        assert os.stat(copied / name).st_ino != os.stat(model / name).st_ino, f"{name} is a link into the model"
    assert {p: p.stat().st_mode for p in model.rglob("*")} == modes


# -- 9: formats; 5: the decoded image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["edit", "tensors-pack"])
def test_only_png_jpeg_webp_are_decoded_by_the_commands(tmp_path, capsys, monkeypatch, command):
    """9: an .eps given to a command is refused by name and Ghostscript never runs (a `gs` on PATH that would leave a
    marker stands in for it)."""
    from smartedit.cli import edit_cli, tensors_cli

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {tmp_path / 'gs-ran'}\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "in.eps").write_bytes(_eps())
    common = ["--preset", "tiny", "--random-weights", "--image", tmp_path / "in.eps", "--instruction", "make it blue"]
    main, argv = ((edit_cli, [*common, "--out", tmp_path / "o.png", "--steps", "1", "--quiet"]) if command == "edit"
                  else (tensors_cli, ["pack", *common, "--out", tmp_path / "o.safetensors"]))
    code, _, err = run_cli(main, argv, capsys)
    assert code == 2 and "in.eps cannot be decoded: not a PNG, JPEG or WebP image" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "gs-ran").exists()
    assert not list(tmp_path.glob("o.*"))


def test_a_non_finite_decoded_image_is_never_written(tiny_pipe, test_image, tmp_path):
    """5: the latents stay finite but the decoder's output does not (what a huge guidance did): RunError naming the
    decoded image, no image returned."""
    from smartedit.errors import RunError

    class NaNDecoder:
        name, fold_cfg, specs = "nan-decoder", False, {}

        def __init__(self, inner):
            self.inner = inner

        def run(self, graph, inputs):
            out = self.inner.run(graph, inputs)
            if graph == "vae_decoder":
                out = {k: v.clone().fill_(float("nan")) for k, v in out.items()}
            return out

    inner = tiny_pipe.runner
    tiny_pipe.runner = NaNDecoder(inner)
    try:
        with pytest.raises(RunError, match=r"sample\(s\) \[0\]: the decoded image is not finite"):
            tiny_pipe(test_image, "make it blue", steps=1, resolution=64, seed=0)
    finally:
        tiny_pipe.runner = inner


def test_the_catalogue_has_at_least_80_server_rows():
    rows = (len(HTTP_RESTRICTED) + len(GRPC_RESTRICTED) + len(REQUESTS) + len(STAGES) + len(SERVED) + len(FLAGS)
            + len(CALLERS) + len(CLOSED_VALUES) + len(CLASSIFICATION) + len(LAUNCH)
            + 21)  # + a sampler's own steps, max warm-up, size bound, webp, counters, cancelled gRPC, timeout, full
    # queue, memory, foreign entry, Ctrl-C, second server, re-export, no key, gRPC metadata, /dev/shm, JSON integers,
    # EXIF, flood, SIGHUP, dead process
    assert rows >= 100, rows
