"""Triton Inference Server's administrative APIs, closed to everyone, and the drain flag that replaces the one call
this project made with them. Imports nothing heavy: a pod's launcher (serve/launch.py) loads it before anything else.

Nothing here holds a key. Every API group but health, metadata and inference is restricted to requests carrying a
header value that no HTTP or gRPC client can send (it holds a line feed: HTTP/1.1 ends a header line there, HTTP/2
and gRPC refuse it in metadata), so reading the server's command line in /proc gives a local user nothing: the
model repository cannot be loaded or unloaded (the server also runs without model control), shared memory cannot
be registered, settings, statistics, trace and logging cannot be read or changed, by any client.

Draining needs no API either: the server's environment names a flag file (DRAIN_ENV, in a folder only the server's
user can write); once it exists, the `smartedit` model answers every request it has not started with UNAVAILABLE
(retryable: nothing was computed), while the edits it is running finish; then SIGTERM stops Triton Inference
Server, which waits for them. Triton's own SIGTERM alone is not a drain: its HTTP frontend stops taking
connections, but its gRPC frontend still queues and computes new requests until the running ones are done.
"""

from __future__ import annotations

import os
from pathlib import Path

# API groups closed to every client; health, metadata and inference stay open
RESTRICTED = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
CLOSED_HEADER = "smartedit-closed-api"
_UNSENDABLE = "closed\nto every client"  # a line feed: no HTTP/1.1 header and no HTTP/2 / gRPC metadata value holds one
DRAIN_ENV = "SMARTEDIT_DRAIN_FILE"  # the flag file's path, in the server's environment (its Python models inherit it)
# Triton Inference Server restricts by API, not by model: a client may call a graph model (`llava`, `unet`, ...) of a
# BLS repository directly. Its Python graph models answer only calls carrying this parameter with the key that the
# server's environment holds (drawn at each start; an environment is readable by its own user and root only).
GRAPH_KEY = "smartedit-graph-key"
GRAPH_KEY_ENV = "SMARTEDIT_GRAPH_KEY"


def restricted_flags() -> list[str]:
    """tritonserver's flags that close every RESTRICTED group on HTTP and gRPC; the SageMaker and Vertex AI frontends
    off (they would ignore the restriction)."""
    value = f"{','.join(RESTRICTED)}:{CLOSED_HEADER}={_UNSENDABLE}"
    return [f"--http-restricted-api={value}", f"--grpc-restricted-protocol={value}", "--allow-sagemaker=false",
            "--allow-vertex-ai=false"]


def draining() -> bool:
    """Whether the flag file that this process's environment names exists (about 2 us: one stat)."""
    path = os.environ.get(DRAIN_ENV)
    return bool(path) and os.path.exists(path)


def start_drain(path: str | Path) -> None:
    """Raise the flag: the `smartedit` model refuses what it has not started."""
    Path(path).touch()
