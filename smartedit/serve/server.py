"""Run NVIDIA Triton Inference Server on a model repository smartedit writes: `smartedit-serve`.

The server is the real `tritonserver` (the build PyTriton ships on PyPI, with Triton's Python backend): its HTTP and
gRPC endpoints speak the KServe v2 protocol, its dynamic batcher groups requests, its metrics endpoint serves
Prometheus text. This module only prepares what it runs on: the Python backend with the stub of this interpreter's
version, a library path that puts this interpreter's libpython first (under a non-system interpreter, pyenv here,
the stub otherwise loads the system's and fails with '_thread.RLock' object has no attribute '_recursion_count'),
and the repository; then it starts the server, waits until it is ready, and passes SIGTERM / SIGINT on (Triton then
finishes the requests in flight, refuses new ones, and exits 0).

What the server exposes: its HTTP and gRPC ports serve health, metadata and inference; every other API group
(model-repository: load and unload, model-config, shared-memory, statistics, trace, logging) is restricted to
requests carrying a key this process draws at start and never prints (serve/admin.py): a client cannot
load code into the server (a load request may carry a model.py), unload the model, register shared memory or read
the settings. Only the drain on SIGTERM uses the key. The metrics port serves Prometheus text. The ports are
checked before start (in range, distinct, free on the host) and the server is called ready only once its own
process holds all three.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from smartedit.engines import registry
from smartedit.errors import InputError, RunError, UnavailableError
from .admin import restricted_flags, unload
from .repository import MAX_QUEUE, MODEL, write_serving_repository
from smartedit.weights import ModelSource


@dataclass(frozen=True)
class Endpoints:
    host: str = "127.0.0.1"
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics}/metrics"

    def ports(self) -> dict[str, int]:
        return {"--http-port": self.http, "--grpc-port": self.grpc, "--metrics-port": self.metrics}

    def check(self) -> None:
        """Before anything starts: each port in 1..65535, the three distinct, each free on the host (nothing listens
        on it now). InputError naming the flag and the value."""
        seen: dict[int, str] = {}
        for flag, port in self.ports().items():
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise InputError(f"{flag} must be a TCP port from 1 to 65535, got {port!r}")
            if port in seen:
                raise InputError(f"{flag} {port} is also {seen[port]}: the three ports must differ")
            seen[port] = flag
        try:
            family = socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM)[0][0]
        except (socket.gaierror, UnicodeError) as e:
            raise InputError(f"--host {self.host!r} is not an address of this machine ({e})") from None
        for flag, port in self.ports().items():
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is not "taken"
                try:
                    probe.bind((self.host, port))
                except OSError as e:
                    why = "another program listens on it" if e.errno == 98 else (e.strerror or str(e))
                    raise InputError(f"{flag} {port} cannot be used on {self.host}: {why}") from None


def settings_for(source: ModelSource, backend: str, artifacts: str | None, device: str, dtype: str, max_steps: int,
                 max_megapixels: float, max_batch: int) -> dict:
    """The `smartedit` model's settings; refuses at once what the registry says cannot run here."""
    reason = registry.why_not(backend, device, artifacts)
    if reason:
        raise InputError(f"--backend {backend}: {reason}")
    src = {"model": str(Path(source.model).resolve())} if source.model else {"preset": source.preset,
                                                                               "seed": source.seed}
    return {"runner": "registry", "backend": backend, "source": src,
            "artifacts": str(Path(artifacts).resolve()) if artifacts else None, "device": device, "dtype": dtype,
            "max_steps": max_steps, "max_megapixels": max_megapixels, "max_batch": max_batch}


def free_endpoints(host: str = "127.0.0.1") -> Endpoints:
    """Three ports free on `host` now (the OS picks them): for tests and the load test, which must not collide."""
    import socket

    socks = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return Endpoints(host, *(s.getsockname()[1] for s in socks))
    finally:
        for s in socks:
            s.close()


def read_metrics(endpoints: Endpoints, model: str = "smartedit") -> dict[str, float]:
    """Triton's Prometheus counters of `model`, summed over versions: nv_inference_count (inferences, one per
    request), nv_inference_exec_count (executions, one per batch), nv_inference_request_success / _failure, ..."""
    with urllib.request.urlopen(endpoints.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or f'model="{model}"' not in line:
            continue
        name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
        out[name] = out.get(name, 0.0) + float(value)
    return out


TRITONSERVER_ENV = "SMARTEDIT_TRITONSERVER"  # another tritonserver install to use (a folder with bin/tritonserver)


def bundled() -> Path:
    """The folder of the tritonserver to run (bin/, backends/, and python_backend_stubs/ in PyTriton's build): the one
    PyTriton ships, or the install that $SMARTEDIT_TRITONSERVER names (e.g. /opt/tritonserver in NVIDIA's container,
    or an unpacked copy on a machine without pip access: bench/device/fetch_wheels.sh --serve)."""
    if os.environ.get(TRITONSERVER_ENV):
        root = Path(os.environ[TRITONSERVER_ENV])
    else:
        try:
            import pytriton
        except ImportError as e:
            raise UnavailableError("the Triton server comes with nvidia-pytriton: pip install -e '.[serve]' "
                                   f"({e})") from None
        root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise UnavailableError(f"no tritonserver binary in {root / 'bin'}")
    return root


def prepare_backends(dst: Path) -> Path:
    """backends/python with the stub for this Python: PyTriton's build has one stub per version (3.8 to 3.13) beside
    the backend; an install built for one Python has its stub in place."""
    root = bundled()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = root / "python_backend_stubs"
    if not stubs.is_dir():
        return root / "backends"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UnavailableError(f"{root} has no Python backend stub for Python {version}")
    python = dst / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, python / f.name)
    shutil.copy2(stub, python / "triton_python_backend_stub")
    (python / "triton_python_backend_stub").chmod(0o755)
    return dst


def server_env() -> dict[str, str]:
    """This interpreter's libpython first (see the module doc), then the server's own libraries."""
    root = bundled()
    libs = [sysconfig.get_config_var("LIBDIR"), str(root.parent.parent / "nvidia_pytriton.libs"), str(root / "lib")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p and Path(p).is_dir()] +
                                      [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def listening_ports(pid: int) -> set[int] | None:
    """The TCP ports process `pid` listens on (Linux /proc: its socket inodes against /proc/net/tcp{,6}), or None
    where /proc cannot tell."""
    try:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                    ports.add(int(f[1].rsplit(":", 1)[1], 16))
        return ports
    except OSError:
        return None


def _ready(endpoints: Endpoints) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoints.http_url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _load_error(log: Path) -> str | None:
    """The model's own error line in the server log (build_service's one line), else Triton's."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    for marker in ("smartedit: ", "failed to load", "error:"):
        hit = next((ln for ln in lines if marker in ln), None)
        if hit:  # the log escapes the message's own newlines: what follows the first (the stub's "At:" frames) goes
            line = hit[hit.index(marker) + (len(marker) if marker == "smartedit: " else 0):].split("\\n", 1)[0]
            return line.strip().rstrip('"')
    return None


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies, even by SIGKILL, so a
    killed smartedit-serve or load test leaves no server holding its ports."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class TritonServer:
    """One tritonserver process on a repository; a context manager that stops it (SIGTERM) on exit."""

    def __init__(self, repo: Path, endpoints: Endpoints, workdir: Path, exit_timeout_s: int = 60,
                 log: Path | None = None, models: tuple[str, ...] = ()):
        """models: load only these, under explicit model control, so that drain() can unload them (None: Triton
        loads the whole repository, and nothing can load or unload models)."""
        self.models = models
        self.repo, self.endpoints, self.workdir = Path(repo), endpoints, Path(workdir)
        self.log = Path(log) if log else self.workdir / "tritonserver.log"
        self.exit_timeout_s = exit_timeout_s
        self.proc: subprocess.Popen | None = None
        self._admin_key = secrets.token_urlsafe(32)  # the restricted APIs' header value: this process's only

    def start(self) -> "TritonServer":
        e = self.endpoints
        e.check()
        backends = prepare_backends(self.workdir / "backends")
        cmd = [str(bundled() / "bin" / "tritonserver"), f"--model-repository={self.repo}",
               f"--backend-directory={backends}", f"--http-address={e.host}", f"--http-port={e.http}",
               f"--grpc-address={e.host}", f"--grpc-port={e.grpc}", f"--metrics-address={e.host}",
               f"--metrics-port={e.metrics}", "--allow-metrics=true", "--exit-on-error=true",
               "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout_s}", "--log-verbose=0",
               *restricted_flags(self._admin_key)]
        if self.models:
            cmd += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in self.models]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                                         start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until the model is loaded and ready, answering on ports this server's process holds; the model's load
        error, as one line, if the server exits first."""
        deadline = time.monotonic() + timeout_s
        answered_at = None
        want = set(self.endpoints.ports().values())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                line = _load_error(self.log) or f"tritonserver exited with status {self.proc.returncode}"
                kind = InputError if any(k in line for k in ("InputError", "ArtifactError",
                                                              "CheckpointError")) else RunError
                raise kind(f"the server did not start: {line} (log: {self.log})")
            if _ready(self.endpoints):
                held = listening_ports(self.proc.pid)
                if held is None or want <= held:
                    return
                answered_at = answered_at or time.monotonic()
                if time.monotonic() - answered_at > 10:  # a ready answer from a port it does not hold
                    self.stop()
                    raise RunError(f"another program answers on {self.endpoints.host} port(s) {sorted(want - held)}: "
                                   f"tritonserver does not hold them (log: {self.log})")
            time.sleep(0.25)
        self.stop()
        raise RunError(f"the server was not ready after {timeout_s:.0f} s (log: {self.log})")

    def drain(self) -> None:
        """Graceful stop: unload the models first (Triton lets their in-flight requests finish and refuses new ones
        on every endpoint, HTTP and gRPC alike), then SIGTERM. A bare SIGTERM stops new HTTP connections, but this
        Triton build's gRPC endpoint still takes requests while HTTP connections drain."""
        unload(self.endpoints.http_url, self.models, self._admin_key, self.exit_timeout_s)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, sig: int = signal.SIGTERM, grace_s: float | None = None) -> int:
        """Signal the server and wait for it to exit: its exit timeout (plus 30 s) by default, at most `grace_s` if
        given (an idle keep-alive HTTP connection alone holds tritonserver for its whole exit timeout); then
        SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=self.exit_timeout_s + 30 if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc is not None else 0

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace_s=5)  # the block is over: nothing waits for answers (serve() drains instead)


@contextmanager
def running(settings: dict[str, Any], endpoints: Endpoints | None = None, max_batch: int = 4,
            queue_delay_ms: float = 5.0, instances: int = 1, gpu: bool = False, ready_timeout_s: float = 600,
            workdir: str | Path | None = None, max_queue: int = MAX_QUEUE) -> Iterator[TritonServer]:
    """A ready server on free loopback ports (or `endpoints`), stopped with SIGTERM on exit: for tests and the load
    test."""
    endpoints = endpoints or free_endpoints()
    with tempfile.TemporaryDirectory(prefix="smartedit-serve-", dir=workdir) as work:
        repo = write_serving_repository(Path(work) / "repo", settings, max_batch, queue_delay_ms, instances, gpu,
                                        max_queue)
        server = TritonServer(repo, endpoints, Path(work), models=(MODEL,)).start()
        try:
            server.wait_ready(ready_timeout_s)
            yield server
        finally:
            server.stop(grace_s=5)  # nothing waits for answers any more: no drain


def serve(settings: dict[str, Any], endpoints: Endpoints = Endpoints(), max_batch: int = 4,
          queue_delay_ms: float = 5.0, instances: int = 1, gpu: bool = False,
          on_ready: Callable[[Endpoints, Path], None] = lambda e, log: None, workdir: str | Path | None = None,
          ready_timeout_s: float = 600, max_queue: int = MAX_QUEUE) -> int:
    """Write the repository, run the server until SIGTERM / SIGINT, return its exit status (0 after a graceful
    stop). Raises InputError / RunError with the model's load error if it never becomes ready, KeyboardInterrupt
    when stopped before it was. The server's log outlives the run (a file in the temporary folder, named to on_ready
    and in errors)."""
    endpoints.check()  # before the log file and the repository are made
    fd, log = tempfile.mkstemp(prefix="smartedit-serve-", suffix=".log", dir=workdir)
    os.close(fd)
    with tempfile.TemporaryDirectory(prefix="smartedit-serve-", dir=workdir) as work:
        work = Path(work)
        repo = write_serving_repository(work / "repo", settings, max_batch, queue_delay_ms, instances, gpu,
                                        max_queue)
        server = TritonServer(repo, endpoints, work, log=Path(log), models=(MODEL,)).start()
        stopping = []

        def forward(signum, frame):  # the requests in flight finish, new ones are refused, Triton exits 0
            if not stopping:
                threading.Thread(target=server.drain, daemon=True).start()
            stopping.append(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                server.wait_ready(ready_timeout_s)
            except (InputError, RunError):
                if stopping:  # Ctrl-C / SIGTERM during start-up: an interruption, not a failed start
                    raise KeyboardInterrupt from None
                raise
            if stopping:
                raise KeyboardInterrupt
            on_ready(endpoints, server.log)
            code = server.proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            server.stop()
        if code != 0 and not stopping:
            raise RunError(f"tritonserver exited with status {code}: {_load_error(server.log) or 'see its log'}")
        return code
