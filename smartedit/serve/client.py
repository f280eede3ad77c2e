"""Requests to the `smartedit` model with tritonclient (HTTP or gRPC): what the load test and the tests send, and
the shortest correct way to call the server from Python.

    import tritonclient.grpc as grpc
    png, timings = edit(grpc.InferenceServerClient("127.0.0.1:8001"), open("in.png", "rb").read(), "make it blue",
                        seed=0, steps=50)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .repository import MODEL, REQUEST_INPUTS

_NP = {"TYPE_STRING": object, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32}
_WIRE = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_INT32": "INT32", "TYPE_FP32": "FP32"}


def protocol_of(client) -> Any:
    """tritonclient.http or tritonclient.grpc: the module whose InferInput this client takes."""
    import importlib

    return importlib.import_module(type(client).__module__.rsplit(".", 1)[0])


def edit_inputs(protocol, image: bytes, instruction: str | bytes, **params: Any) -> list:
    """The request's inputs, each [1, 1] (one edit); params: seed, steps, guidance_scale, image_guidance_scale,
    resolution (omitted: the model's defaults)."""
    kinds = {name: kind for name, kind, _ in REQUEST_INPUTS}
    unknown = set(params) - set(kinds)
    if unknown:
        raise TypeError(f"unknown request inputs {sorted(unknown)}; the model takes {sorted(kinds)}")
    values = {"image": image, "instruction": instruction.encode() if isinstance(instruction, str) else instruction,
              **params}
    inputs = []
    for name, value in values.items():
        kind = kinds[name]
        x = protocol.InferInput(name, [1, 1], _WIRE[kind])
        x.set_data_from_numpy(np.array([[value]], dtype=_NP[kind]))
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


def edit(client, image: bytes, instruction: str | bytes, parameters: dict | None = None,
         **params: Any) -> tuple[bytes, dict[str, Any]]:
    """One edit: (the edited PNG's bytes, the request's timings). Errors are tritonclient's
    InferenceServerException, whose message names the bad value. `parameters`: KServe request parameters (the model
    takes none; they are refused)."""
    timeout = getattr(client, "smartedit_timeout_s", None)  # gRPC's is per call; HTTP's is the client's
    kw = {"client_timeout": timeout} if timeout is not None else {}
    r = client.infer(MODEL, edit_inputs(protocol_of(client), image, instruction, **params), parameters=parameters,
                     **kw)
    return r.as_numpy("edited").tobytes(), json.loads(r.as_numpy("timings").tobytes())  # UINT8 rows [1, N]
