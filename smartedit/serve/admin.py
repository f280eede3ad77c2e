"""Triton's administrative APIs, closed to clients: which API groups need the key, the header that carries it, and
the one call this project makes with it (unloading a model to drain). Imports nothing heavy: the pre-stop hook of a
pod (python -m smartedit.serve.drain) loads only this."""

from __future__ import annotations

import urllib.error
import urllib.request

# API groups only the server's own process may call (with ADMIN_HEADER); health, metadata and inference stay open
RESTRICTED = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "smartedit-admin-key"  # gRPC clients would send it as triton-grpc-protocol-smartedit-admin-key
ADMIN_KEY_ENV = "SMARTEDIT_ADMIN_KEY"  # where a Kubernetes pod finds the key (from a Secret)


def restricted_flags(key: str) -> list[str]:
    """tritonserver's flags that restrict every RESTRICTED group, on HTTP and gRPC, to requests carrying `key`; the
    SageMaker and Vertex AI frontends off (they would ignore the restriction)."""
    value = f"{','.join(RESTRICTED)}:{ADMIN_HEADER}={key}"
    return [f"--http-restricted-api={value}", f"--grpc-restricted-protocol={value}", "--allow-sagemaker=false",
            "--allow-vertex-ai=false"]


def unload(http_url: str, models: tuple[str, ...], admin_key: str, timeout_s: float) -> None:
    """Unload `models` through the restricted model-repository API: Triton lets their in-flight requests finish and
    refuses new ones on every endpoint. Errors are ignored (a server already going: its SIGTERM does the rest). The
    drain of smartedit-serve, and the pre-stop hook of a Kubernetes pod."""
    for m in models:
        req = urllib.request.Request(f"http://{http_url}/v2/repository/models/{m}/unload", data=b"{}",
                                     method="POST", headers={ADMIN_HEADER: admin_key})
        try:
            urllib.request.urlopen(req, timeout=timeout_s).close()
        except (urllib.error.URLError, OSError):
            pass
