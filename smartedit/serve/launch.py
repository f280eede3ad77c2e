"""`python -m smartedit.serve.launch [--record-sha256 HEX] -- TRITONSERVER_FLAGS`: start Triton Inference Server on a
model repository of `smartedit-export --target triton`, as a container's command (smartedit-k8s's pods).

What it adds to a bare `tritonserver` (the same supervision as smartedit-serve, serve/server.py):
- every file of the repository is checked against the record of its `smartedit` model before tritonserver starts,
  so no model.py, config or planted __pycache__ runs unchecked, and the record itself against --record-sha256 (the
  sha256 the export's manifest gives for smartedit/config.pbtxt, which an attacker who rewrote the repository
  cannot also rewrite in the pod's spec); no bytecode is written;
- the administrative APIs closed to every client, no model control, a graph key for the Python graph models;
- `smartedit_stream`, the stream twin of the `smartedit` model (serve/repository.py write_stream_twin), derived from
  its checked config into a repository of the launcher's own (a BLS orchestrator: no second copy of the graphs);
- with --cache-config (Triton's response cache), the cache's library folder, and the `smartedit` model told that
  its answers are cached (requests must then name their seed);
- SIGTERM (what Kubernetes sends), SIGINT and SIGHUP drain: new requests are refused with UNAVAILABLE, the running
  edits finish, then Triton exits;
- a model process that dies ends the launcher with status 1, so the kubelet restarts the container rather than
  keep a pod that answers every edit with an error.
Exit status: Triton's (0 after a drain), 2 for a bad flag or a repository that is not what was exported, 1 if it
failed, 130 when interrupted before it was ready.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from smartedit.errors import InputError, run_command

from .server import Endpoints, TritonServer, supervise

# flags the launcher decides: what it closes, and the model control it runs without
OWN_FLAGS = ("--model-control-mode", "--load-model", "--http-restricted-api", "--grpc-restricted-protocol",
             "--allow-sagemaker", "--allow-vertex-ai", "--repository-poll-secs")
PLACE_FLAGS = {"--http-address": "host", "--grpc-address": "host", "--metrics-address": "host",
               "--http-port": "http", "--grpc-port": "grpc", "--metrics-port": "metrics",
               "--model-repository": "repo", "--exit-timeout-secs": "exit_timeout_s"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_triton_flags(flags: list[str]) -> tuple[dict[str, str], list[str]]:
    """({place: value} of the flags that say where the server listens and what it serves, the other flags).
    InputError for a flag the launcher decides, a value given twice, or a flag not in --name=value form."""
    place: dict[str, str] = {}
    rest: list[str] = []
    for flag in flags:
        if not flag.startswith("--") or "=" not in flag:
            raise InputError(f"tritonserver flags must be given as --name=value, got {flag!r}")
        name, value = flag.split("=", 1)
        if name in OWN_FLAGS:
            raise InputError(f"{name} is the launcher's: it closes the administrative APIs and runs without model "
                             "control; leave it out")
        if name in PLACE_FLAGS:
            key = PLACE_FLAGS[name]
            if key == "host" and place.get("host", value) != value:
                raise InputError(f"{name}={value}: the HTTP, gRPC and metrics addresses must be the same "
                                 f"(got {place['host']} before)")
            if key != "host" and key in place:
                raise InputError(f"{name} is given twice")
            place[key] = value
        else:
            rest.append(flag)
    return place, rest


def _port(place: dict[str, str], key: str, default: int) -> int:
    value = place.get(key, str(default))
    if not value.isdigit():
        raise InputError(f"--{key}-port must be a TCP port from 1 to 65535, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m smartedit.serve.launch", description=__doc__.split("\n")[0],
                                usage="%(prog)s [--record-sha256 HEX] [--ready-timeout-s S] -- TRITONSERVER_FLAGS")
    p.add_argument("--record-sha256", help="the sha256 the export's manifest records for smartedit/config.pbtxt "
                   "(repositories.triton); without it the record is trusted as found")
    p.add_argument("--ready-timeout-s", type=float, default=1800, help="longest start, hash check and model load "
                   "(default 1800)")
    a = p.parse_args(own)

    def body() -> None:
        if a.record_sha256 is not None and not _SHA256.fullmatch(a.record_sha256):
            raise InputError(f"--record-sha256 must be 64 lowercase hex digits, got {a.record_sha256!r}")
        if not a.ready_timeout_s > 0:
            raise InputError(f"--ready-timeout-s must be a number of seconds > 0, got {a.ready_timeout_s}")
        place, rest = parse_triton_flags(flags)
        repo = place.get("repo")
        if not repo or not Path(repo).is_dir():
            raise InputError(f"--model-repository=DIR is required and must be a folder, got {repo!r}")
        endpoints = Endpoints(place.get("host", "0.0.0.0"), _port(place, "http", 8000), _port(place, "grpc", 8001),
                              _port(place, "metrics", 8002))
        exit_s = place.get("exit_timeout_s", "30")
        if not exit_s.isdigit():
            raise InputError(f"--exit-timeout-secs must be a whole number of seconds, got {exit_s!r}")
        with tempfile.TemporaryDirectory(prefix="smartedit-launch-") as work:
            server = TritonServer(Path(repo), endpoints, Path(work), exit_timeout_s=int(exit_s), log=None,
                                  args=tuple(rest), record_sha256=a.record_sha256)
            code = supervise(server, a.ready_timeout_s, lambda s: print(
                f"smartedit-launch: ready on http :{endpoints.http}, grpc :{endpoints.grpc}, metrics "
                f":{endpoints.metrics}", flush=True))
        print(f"smartedit-launch: stopped (status {code})", flush=True)
        if code:
            raise SystemExit(code)

    run_command("smartedit-launch", body)


if __name__ == "__main__":
    main()
