"""Requests to the `smartedit` model with tritonclient (HTTP or gRPC): what the load test and the tests send, and
the shortest correct way to call the server from Python.

    import tritonclient.grpc as grpc
    png, timings = edit(grpc.InferenceServerClient("127.0.0.1:8001"), open("in.png", "rb").read(), "make it blue",
                        seed=0, steps=50)
    pngs = variants(*edit(client, image, "make it blue", seed=[0, 0, 0], image_guidance_scale=[1.4, 1.5, 1.6]))
    png, timings = edit_stream(grpc.InferenceServerClient("127.0.0.1:8001"), image, "make it blue", seed=0,
                               preview_every=10)   # a progress bar while it runs (gRPC: the smartedit_stream model)
"""

from __future__ import annotations

import json
import queue
from typing import Any, Callable, Iterator

import numpy as np

from smartedit.errors import RunError

from .repository import MODEL, REQUEST_INPUTS, STREAM_INPUTS, STREAM_MODEL

_NP = {"TYPE_STRING": object, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32,
       "TYPE_FP64": np.float64}
_WIRE = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_INT32": "INT32", "TYPE_FP32": "FP32",
         "TYPE_FP64": "FP64"}


def protocol_of(client) -> Any:
    """tritonclient.http or tritonclient.grpc: the module whose InferInput this client takes."""
    import importlib

    return importlib.import_module(type(client).__module__.rsplit(".", 1)[0])


def edit_inputs(protocol, image: bytes, instruction: str | bytes, stream: bool = False, **params: Any) -> list:
    """The request's inputs, each [1, N] (one edit); params: seed, steps, guidance_scale, image_guidance_scale,
    resolution, sampler, guidance_interval, text_only_interval, deepcache (the whole UNet every N steps; the server's
    graphs need the DeepCache pair), and for a stream preview_every (omitted: the
    model's defaults). seed and the guidance scales may be lists: one value per variant."""
    kinds = {name: kind for name, kind, *_ in (*REQUEST_INPUTS, *(STREAM_INPUTS if stream else ()))}
    unknown = set(params) - set(kinds)
    if unknown:
        raise TypeError(f"unknown request inputs {sorted(unknown)}; the model takes {sorted(kinds)}")
    values = {"image": image, "instruction": instruction.encode() if isinstance(instruction, str) else instruction,
              **params}
    inputs = []
    for name, value in values.items():
        kind = kinds[name]
        if isinstance(value, str):
            value = value.encode()
        row = np.array([list(value) if isinstance(value, (list, tuple)) else [value]], dtype=_NP[kind])
        x = protocol.InferInput(name, list(row.shape), _WIRE[kind])
        x.set_data_from_numpy(row)
        inputs.append(x)
    return inputs


def connect(protocol: str, url: str, timeout_s: float = 600.0):
    """A client of `protocol` ("http" or "grpc") whose calls give up after timeout_s (gRPC: per call, in edit)."""
    if protocol == "http":
        import tritonclient.http as http

        return http.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    if protocol == "grpc":
        import tritonclient.grpc as grpc

        client = grpc.InferenceServerClient(url)
        client.smartedit_timeout_s = timeout_s
        return client
    raise ValueError(f"protocol must be http or grpc, got {protocol!r}")


def _answer(result) -> tuple[bytes, dict[str, Any]]:
    edited, timings = result.as_numpy("edited"), result.as_numpy("timings")
    if edited is None or timings is None:  # see the README: Triton 2.51's response cache keeps errors as empty answers
        raise RunError("the server answered without an image: a repeat of a request it refused or failed, answered "
                       "from Triton's response cache (which keeps errors as empty answers); send the request without "
                       "its error")
    return edited.tobytes(), json.loads(timings.tobytes())  # UINT8 rows [1, N]


def edit(client, image: bytes, instruction: str | bytes, parameters: dict | None = None, priority: int = 0,
         **params: Any) -> tuple[bytes, dict[str, Any]]:
    """One edit: (the edited PNG's bytes, the request's timings); with several variants, their PNGs one after another
    (variants() splits them). Errors are tritonclient's InferenceServerException, whose message names the bad value.
    `priority`: the batcher's level (1 is the highest, 0 the model's default); `parameters`: KServe request
    parameters (the model takes none; they are refused)."""
    timeout = getattr(client, "smartedit_timeout_s", None)  # gRPC's is per call; HTTP's is the client's
    kw = {"client_timeout": timeout} if timeout is not None else {}
    r = client.infer(MODEL, edit_inputs(protocol_of(client), image, instruction, **params), parameters=parameters,
                     priority=priority, **kw)
    return _answer(r)


def variants(png: bytes, timings: dict[str, Any]) -> list[bytes]:
    """The PNG of each variant of an answer (edit's output), in the order of the request's values."""
    out, at = [], 0
    for v in timings["variants"]:
        out.append(png[at:at + v["bytes"]])
        at += v["bytes"]
    return out


def stream(client, image: bytes, instruction: str | bytes, priority: int = 0, **params: Any) -> Iterator[dict]:
    """One edit as a stream (a tritonclient.grpc client; the `smartedit_stream` model): yields each message as it
    comes, {"progress": {"step", "steps", "preview_bytes"}, "previews": [PNG per variant, on preview steps]}, then
    {"edited": bytes, "timings": dict}. An error ends it with InferenceServerException. Leaving the loop early
    (break, an exception) cancels the request: the server stops the edit before its next step."""
    messages: queue.Queue = queue.Queue()
    timeout = getattr(client, "smartedit_timeout_s", None)
    client.start_stream(callback=lambda result, error: messages.put((result, error)), stream_timeout=timeout)
    done = False
    try:
        client.async_stream_infer(STREAM_MODEL, edit_inputs(protocol_of(client), image, instruction, stream=True,
                                                            **params), priority=priority)
        while True:
            result, error = messages.get(timeout=timeout)
            if error is not None:
                done = True
                raise error
            if result.as_numpy("edited") is not None:
                done = True
                png, timings = _answer(result)
                yield {"edited": png, "timings": timings}
                return
            progress = json.loads(result.as_numpy("progress").tobytes())
            preview = result.as_numpy("preview")
            previews, at = [], 0
            for n in progress["preview_bytes"]:
                previews.append(preview.tobytes()[at:at + n])
                at += n
            yield {"progress": progress, "previews": previews}
    finally:
        client.stop_stream(cancel_requests=not done)


def edit_stream(client, image: bytes, instruction: str | bytes, show: bool = True,
                on_preview: Callable[[int, list[bytes]], None] | None = None, **params: Any
                ) -> tuple[bytes, dict[str, Any]]:
    """One edit through the stream, with a progress bar (tqdm, on stderr) of its denoising steps; on_preview(step,
    PNGs) for each preview (params: preview_every=N). -> (the edited PNG's bytes, the timings), as edit()."""
    from tqdm.auto import tqdm

    bar = None
    try:
        for message in stream(client, image, instruction, **params):
            if "edited" in message:
                return message["edited"], message["timings"]
            p = message["progress"]
            if bar is None:
                bar = tqdm(total=p["steps"], desc="smartedit", unit="step", disable=not show)
            bar.update(p["step"] - bar.n)
            if message["previews"] and on_preview is not None:
                on_preview(p["step"], message["previews"])
    finally:
        if bar is not None:
            bar.close()
    raise RunError("the stream ended without an answer")
