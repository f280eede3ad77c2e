"""`python -m smartedit.serve.drain --model smartedit`: the pre-stop hook of a Triton pod (smartedit-k8s's manifests).

Kubernetes runs it in the container before it sends SIGTERM: it unloads the model through Triton's restricted
model-repository API with the key the pod was started with ($SMARTEDIT_ADMIN_KEY, from a Secret), so the requests in
flight finish and new ones are refused on HTTP and gRPC alike, as smartedit-serve drains; it returns when the model
is unloaded (or after --timeout-s). Exit status 0 either way: a hook that fails would only delay the stop. It imports
only smartedit.serve.admin, so it starts in well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys

from .admin import ADMIN_KEY_ENV, unload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m smartedit.serve.drain", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the model to unload (the repository's orchestrating model)")
    p.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP port in this pod (default 8000)")
    p.add_argument("--timeout-s", type=float, default=600, help="longest wait for the in-flight edits (default 600)")
    a = p.parse_args(argv)
    key = os.environ.get(ADMIN_KEY_ENV)
    if not key:
        print(f"smartedit-drain: ${ADMIN_KEY_ENV} is not set: nothing unloaded", file=sys.stderr)
        return
    unload(f"127.0.0.1:{a.http_port}", (a.model,), key, a.timeout_s)


if __name__ == "__main__":
    main()
