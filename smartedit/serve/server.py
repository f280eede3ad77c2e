"""Run NVIDIA Triton Inference Server on a model repository smartedit writes: `smartedit-serve`, and the launcher of
a container (serve/launch.py).

The server is the real `tritonserver` (the build PyTriton ships on PyPI, with Triton's Python backend; in NVIDIA's
container, its own): its HTTP and gRPC endpoints speak the KServe v2 protocol, its dynamic batcher groups requests,
its metrics endpoint serves Prometheus text. This module prepares what it runs on and supervises it:
- before any of the repository's code runs, every file of a recorded repository is checked against its record
  (and the record against the sha256 the caller expects), so a changed model.py or a planted __pycache__ is refused
  before Python could import it; the server writes no bytecode (PYTHONDONTWRITEBYTECODE);
- the Python backend with the stub of this interpreter's version, and a library path that puts this interpreter's
  libpython first (under a non-system interpreter, pyenv here, the stub otherwise loads the system's and fails with
  '_thread.RLock' object has no attribute '_recursion_count');
- the server's files are private (umask 077); run as root, it gets a /dev/shm of its own (a mount namespace with a
  private tmpfs), since Triton's Python backend makes its shared-memory regions, which carry every request's
  tensors, readable by every local user (mode 644, whatever the umask);
- every administrative API is closed to every client, and the server runs without model control (serve/admin.py);
- a recorded repository is served with the stream twin of its `smartedit` model, from a repository of the server's
  own; with a response cache (cache_mb, or the caller's --cache-config), the cache's library folder and CACHE_ENV
  in the environment, which tells the model its answers are cached;
- SIGTERM, SIGINT and SIGHUP drain: the `smartedit` model refuses what it has not started, the running edits
  finish, Triton exits 0 (serve/admin.py says why Triton's own SIGTERM is not enough);
- a model process (a Python backend stub) that dies stops the server with one line naming it: Triton Inference
  Server would otherwise stay "ready" while that model answers every request with an error, so the process exits
  and its supervisor (Kubernetes, systemd) starts a fresh one.
The ports are checked before start (in range, distinct, free on the host) and the server is called ready only once
its own process holds all three.
"""

from __future__ import annotations

import ctypes
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
from typing import Callable, Iterator

from smartedit.engines import registry
from smartedit.errors import ArtifactError, InputError, RunError, UnavailableError
from smartedit.files import sha256_file
from .admin import DRAIN_ENV, GRAPH_KEY_ENV, restricted_flags, start_drain
from .repository import (CACHE_ENV, LOW_PRIORITY_WAIT_S, MAX_QUEUE, MODEL, PRIORITY_LEVELS,
                         check_cache_mb, check_priority, check_repository, clear_bytecode, recorded_files,
                         write_serving_repository, write_stream_twin)
from smartedit.weights import ModelSource
from .settings import ServeSettings


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


def settings_for(source: ModelSource, backend: str, artifacts: str | None, device: str, dtype: str,
                 max_steps: int = ServeSettings.max_steps, max_megapixels: float = ServeSettings.max_megapixels,
                 max_batch: int = ServeSettings.max_batch, warm_up: str | None = None,
                 max_variants: int | None = None, max_evaluations: int | None = None) -> ServeSettings:
    """The `smartedit` model's settings (ServeSettings checks their bounds); refuses at once what the registry says
    cannot run here. warm_up: the one-step edit run before the server is ready, at the smallest request ("min") or
    at the largest it admits ("max": every request then fits the device's memory; default on a GPU, where it costs
    well under a second)."""
    reason = registry.why_not(backend, device, artifacts)
    if reason:
        raise InputError(f"--backend {backend}: {reason}")
    if source.model:
        source = ModelSource(model=Path(source.model).resolve())
    return ServeSettings(source, "registry", backend, artifacts=str(Path(artifacts).resolve()) if artifacts else None,
                         device=device, dtype=dtype, max_steps=max_steps, max_megapixels=max_megapixels,
                         max_batch=max_batch, max_variants=max_variants, max_evaluations=max_evaluations,
                         warm_up=warm_up or ("max" if device.startswith("cuda") else "min"))


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
    """The folder of the tritonserver to run (bin/, backends/, and python_backend_stubs/ in PyTriton's build): the
    install that $SMARTEDIT_TRITONSERVER names (e.g. an unpacked copy on a machine without pip access:
    bench/device/fetch_wheels.sh --serve), the one PyTriton ships, or the one on PATH (/opt/tritonserver in NVIDIA's
    container)."""
    if os.environ.get(TRITONSERVER_ENV):
        root = Path(os.environ[TRITONSERVER_ENV])
    else:
        try:
            import pytriton

            root = Path(pytriton.__file__).parent / "tritonserver"
        except ImportError as e:
            on_path = shutil.which("tritonserver")
            if not on_path:
                raise UnavailableError("the Triton server comes with nvidia-pytriton: pip install -e '.[serve]' "
                                       f"({e}), or put tritonserver on PATH") from None
            root = Path(on_path).resolve().parent.parent
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


def server_env(drain_file: Path) -> dict[str, str]:
    """This interpreter's libpython first (see the module doc), then the server's own libraries; no bytecode written
    (a repository holds exactly the files its record lists, so a __pycache__ in it is refused, never read); the
    drain flag's path; a graph key drawn for this start (serve/admin.py)."""
    root = bundled()
    libs = [sysconfig.get_config_var("LIBDIR"), str(root.parent.parent / "nvidia_pytriton.libs"), str(root / "lib")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p and Path(p).is_dir()] +
                                      [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env[DRAIN_ENV] = str(drain_file)
    env[GRAPH_KEY_ENV] = secrets.token_urlsafe(32)
    return env


# the largest request body: the 32 MB image bound, the instruction's 16 KB and the JSON around them
MAX_REQUEST_BYTES = 40 << 20


def size_flags(binary: Path) -> list[str]:
    """The flag that bounds a request's size before the server reads it, where this tritonserver has it
    (`--http-max-input-size`, NVIDIA's containers from 25.06; not the bundled 2.51, which reads a whole request
    first)."""
    try:
        text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60,
                              env=server_env(Path(os.devnull))).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [f"--http-max-input-size={MAX_REQUEST_BYTES}"] if "--http-max-input-size" in text else []


def check_before_start(repo: Path, record_sha256: str | None = None) -> None:
    """A repository that records its files (the `smartedit` model of `--target triton`: every other file's sha256 in
    its settings) is checked whole before tritonserver starts, so none of its code runs unchecked (a __pycache__
    included: TritonServer.start removes those first, see clear_bytecode); `record_sha256`,
    when given, is what the record itself must hash to (the export's manifest says it, outside the repository).
    ArtifactError naming the first file that differs or is not recorded."""
    config = Path(repo) / MODEL / "config.pbtxt"
    if record_sha256 is not None:
        if not config.is_file():
            raise ArtifactError(f"{config} is missing: the repository is not one smartedit-export --target triton "
                                "wrote")
        got = sha256_file(config)
        if got != record_sha256:
            raise ArtifactError(f"{config} has sha256 {got[:12]}..., the export recorded {record_sha256[:12]}...: "
                                "the repository's record was changed; deploy the repository as exported")
    files = recorded_files(repo)
    if files is not None:
        check_repository(repo, files, own=[f"{MODEL}/config.pbtxt"])


def recorded(repo: Path) -> bool:
    """Whether `repo` is a recorded (`--target triton`) repository."""
    return (Path(repo) / MODEL / "config.pbtxt").is_file() and recorded_files(repo) is not None


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


STUB = "triton_python_backend_stub"


def model_processes(pid: int) -> dict[int, str]:
    """The Python backend stubs under process `pid`: {pid: the model's name} (the stub's first argument is the
    model's model.py, MODEL/VERSION/model.py)."""
    out = {}
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    except OSError:
        return out
    for child in children:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(STUB.encode()) and len(argv) > 1:
            out[child] = Path(argv[1].decode(errors="replace")).parent.parent.name
    return out


def _ready(endpoints: Endpoints) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoints.http_url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _load_error(log: Path | None) -> str | None:
    """The model's own error line in the server log (build_service's one line), else Triton's."""
    lines = log.read_text(errors="replace").splitlines() if log and log.is_file() else []
    for marker in ("smartedit: ", "failed to load", "error:"):
        hit = next((ln for ln in lines if marker in ln), None)
        if hit:  # the log escapes the message's own newlines: what follows the first (the stub's "At:" frames) goes
            line = hit[hit.index(marker) + (len(marker) if marker == "smartedit: " else 0):].split("\\n", 1)[0]
            return line.strip().rstrip('"')
    return None


_CLONE_NEWNS, _MS_REC, _MS_PRIVATE, _MS_NOSUID, _MS_NODEV = 0x20000, 0x4000, 1 << 18, 2, 4


def _child_setup(private_shm: bool) -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies, even by SIGKILL, so a
    killed smartedit-serve leaves no server holding its ports; files private to its user; and, where allowed (root),
    a mount namespace whose /dev/shm is a fresh tmpfs only this user reads. A step the system refuses is skipped
    (the parent reports a shared /dev/shm)."""
    os.umask(0o077)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        if private_shm and libc.unshare(_CLONE_NEWNS) == 0:
            libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
            libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0700")
    except (OSError, AttributeError):
        pass


def shares_dev_shm(pid: int) -> bool:
    """Whether process `pid` sees the same /dev/shm as this one (same mount namespace), or /proc cannot tell."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return True


class TritonServer:
    """One tritonserver process on a repository; a context manager that stops it (SIGTERM) on exit.

    log: a file for the server's output (None: this process's own stdout and stderr, as in a container);
    args: more tritonserver flags (the launcher's); record_sha256: what the repository's record must hash to;
    cache_mb: Triton's response cache of that many MiB (0: none, unless args hold --cache-config); stream: a recorded
    (`--target triton`) repository is served with the stream twin of its `smartedit` model (write_stream_twin), from
    a repository of its own in `workdir`."""

    def __init__(self, repo: Path, endpoints: Endpoints, workdir: Path, exit_timeout_s: int = 60,
                 log: Path | None | bool = True, args: tuple[str, ...] = (), record_sha256: str | None = None,
                 cache_mb: int = 0, stream: bool = True):
        self.repo, self.endpoints, self.workdir = Path(repo), endpoints, Path(workdir)
        self.cache_mb, self.stream = check_cache_mb(cache_mb), stream
        self.log = self.workdir / "tritonserver.log" if log is True else (Path(log) if log else None)
        self.exit_timeout_s = exit_timeout_s
        self.args, self.record_sha256 = tuple(args), record_sha256
        self.drain_file = self.workdir / "drain"
        self.proc: subprocess.Popen | None = None
        self.models: dict[int, str] = {}  # the model processes seen once ready: {pid: model}
        self.recorded = False  # a `--target triton` repository, whose __pycache__ is cleared at start and stop
        self.stopping = False

    def start(self) -> "TritonServer":
        e = self.endpoints
        e.check()
        self.recorded = self.record_sha256 is not None or recorded(self.repo)
        if self.recorded:
            clear_bytecode(self.repo)  # Python's cache of an earlier run's imports (or a planted one): never run
        check_before_start(self.repo, self.record_sha256)
        backends = prepare_backends(self.workdir / "backends")
        binary = bundled() / "bin" / "tritonserver"
        repos = [self.repo]
        if self.recorded and self.stream:  # derived from the config just checked, into this server's own folder
            repos.append(write_stream_twin(self.repo, self.workdir / "stream"))
        cache = self.cache_flags()
        env = server_env(self.drain_file)
        if cache:
            env[CACHE_ENV] = "1"
        cmd = [str(binary), *(f"--model-repository={r}" for r in repos),
               f"--backend-directory={backends}", f"--http-address={e.host}", f"--http-port={e.http}",
               f"--grpc-address={e.host}", f"--grpc-port={e.grpc}", f"--metrics-address={e.host}",
               f"--metrics-port={e.metrics}", "--allow-metrics=true", "--exit-on-error=true",
               "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout_s}", "--log-verbose=0",
               *size_flags(binary), *cache, *self.args, *restricted_flags()]
        out = open(self.log, "wb") if self.log else None
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         env=env, start_new_session=True,
                                         preexec_fn=lambda: _child_setup(os.geteuid() == 0))
        finally:
            if out:
                out.close()
        return self

    def cache_flags(self) -> list[str]:
        """tritonserver's flags for the response cache: its size (cache_mb), and where its library is (the bundled
        build looks in /opt/tritonserver/caches otherwise, and fails to start); [] without a cache. The flags the
        caller gives (args) win."""
        given = {a.split("=", 1)[0] for a in self.args}
        flags = [f"--cache-config=local,size={self.cache_mb << 20}"] if self.cache_mb else []
        if not (flags or "--cache-config" in given):
            return []
        caches = bundled() / "caches"
        if "--cache-directory" not in given and caches.is_dir():
            flags.append(f"--cache-directory={caches}")
        return flags

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until the models are loaded and ready, answering on ports this server's process holds; the model's load
        error, as one line, if the server exits first. Records the model processes it then has."""
        deadline = time.monotonic() + timeout_s
        answered_at = None
        want = set(self.endpoints.ports().values())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                line = _load_error(self.log) or f"tritonserver exited with status {self.proc.returncode}"
                kind = InputError if any(k in line for k in ("InputError", "ArtifactError",
                                                              "CheckpointError")) else RunError
                raise kind(f"the server did not start: {line}" + (f" (log: {self.log})" if self.log else ""))
            if _ready(self.endpoints):
                held = listening_ports(self.proc.pid)
                if held is None or want <= held:
                    self.models = model_processes(self.proc.pid)
                    return
                answered_at = answered_at or time.monotonic()
                if time.monotonic() - answered_at > 10:  # a ready answer from a port it does not hold
                    self.stop()
                    raise RunError(f"another program answers on {self.endpoints.host} port(s) {sorted(want - held)}: "
                                   f"tritonserver does not hold them" + (f" (log: {self.log})" if self.log else ""))
            time.sleep(0.25)
        self.stop()
        raise RunError(f"the server was not ready after {timeout_s:.0f} s" + (f" (log: {self.log})" if self.log else ""))

    def dead_model(self) -> str | None:
        """The name of a model whose process has died since the server was ready (None while all live or while the
        server stops)."""
        if self.stopping or self.proc is None or self.proc.poll() is not None:
            return None
        alive = model_processes(self.proc.pid)
        return next((m for pid, m in self.models.items() if pid not in alive), None)

    def drain(self) -> None:
        """Graceful stop: the `smartedit` model refuses what it has not started (the flag), the running edits finish
        (Triton waits for them up to its exit timeout), then Triton exits."""
        self.stopping = True
        start_drain(self.drain_file)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, sig: int = signal.SIGTERM, grace_s: float | None = None) -> int:
        """Signal the server and wait for it to exit: its exit timeout (plus 30 s) by default, at most `grace_s` if
        given (an idle keep-alive HTTP connection alone holds tritonserver for its whole exit timeout); then
        SIGKILL."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=self.exit_timeout_s + 30 if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.recorded:
            clear_bytecode(self.repo)  # what this run's imports wrote: the repository is again what was exported
        return self.proc.returncode if self.proc is not None else 0

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace_s=5)  # the block is over: nothing waits for answers (supervise() drains instead)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCH_S = 1.0  # how often a ready server's model processes are looked at


def supervise(server: TritonServer, ready_timeout_s: float = 600,
              on_ready: Callable[[TritonServer], None] = lambda s: None) -> int:
    """Start `server`, wait until it is ready, then until it exits: SIGTERM, SIGINT or SIGHUP drain it (Triton exits
    0); a model process that dies stops it. Returns its exit status after a drain; raises KeyboardInterrupt when
    stopped before it was ready, InputError / RunError with the load error if it never became ready, RunError
    naming the model whose process died, or with Triton's status if it exited by itself."""
    stopping: list[int] = []

    def forward(signum, frame):
        if not stopping:
            threading.Thread(target=server.drain, daemon=True).start()
        stopping.append(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        server.start()
        try:
            server.wait_ready(ready_timeout_s)
        except (InputError, RunError):
            if stopping:  # a stop signal during start-up: an interruption, not a failed start
                raise KeyboardInterrupt from None
            raise
        if stopping:
            raise KeyboardInterrupt
        on_ready(server)
        while True:
            try:
                code = server.proc.wait(timeout=WATCH_S)
                break
            except subprocess.TimeoutExpired:
                dead = server.dead_model()
                if dead:
                    server.stop(grace_s=10)
                    raise RunError(f"the process of model `{dead}` died (see the server log"
                                   + (f" {server.log}" if server.log else "") + "): the server stopped so that its "
                                   "supervisor starts a fresh one") from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.stop()
    if code != 0 and not stopping:
        raise RunError(f"tritonserver exited with status {code}: {_load_error(server.log) or 'see its log'}")
    return code


@dataclass(frozen=True)
class Features:
    """What smartedit-serve's repository offers beyond the edit: the stream twin (`smartedit_stream`: a second model
    process with its own copy of the graphs), Triton's response cache of cache_mb MiB (0: none), the batcher's
    priority levels and the longest wait of every level below the first."""
    stream: bool = False
    cache_mb: int = 0
    priority_levels: int = PRIORITY_LEVELS
    low_priority_wait_s: float = LOW_PRIORITY_WAIT_S

    def check(self) -> "Features":
        check_cache_mb(self.cache_mb)
        check_priority(self.priority_levels, self.low_priority_wait_s)
        return self

    def repository(self, repo: Path, settings: ServeSettings, max_batch: int, queue_delay_ms: float,
                   instances: int, gpu: bool, max_queue: int) -> Path:
        return write_serving_repository(repo, settings, max_batch, queue_delay_ms, instances, gpu, max_queue,
                                        self.stream, self.cache_mb > 0, self.priority_levels,
                                        self.low_priority_wait_s)


@contextmanager
def running(settings: ServeSettings, endpoints: Endpoints | None = None, max_batch: int = 4,
            queue_delay_ms: float = 5.0, instances: int = 1, gpu: bool = False, ready_timeout_s: float = 600,
            workdir: str | Path | None = None, max_queue: int = MAX_QUEUE,
            features: Features = Features()) -> Iterator[TritonServer]:
    """A ready server on free loopback ports (or `endpoints`), stopped with SIGTERM on exit: for tests and the load
    test."""
    endpoints = endpoints or free_endpoints()
    features.check()
    with tempfile.TemporaryDirectory(prefix="smartedit-serve-", dir=workdir) as work:
        repo = features.repository(Path(work) / "repo", settings, max_batch, queue_delay_ms, instances, gpu,
                                   max_queue)
        server = TritonServer(repo, endpoints, Path(work), cache_mb=features.cache_mb).start()
        try:
            server.wait_ready(ready_timeout_s)
            yield server
        finally:
            server.stop(grace_s=5)  # nothing waits for answers any more: no drain


def serve(settings: ServeSettings, endpoints: Endpoints = Endpoints(), max_batch: int = 4,
          queue_delay_ms: float = 5.0, instances: int = 1, gpu: bool = False,
          on_ready: Callable[[TritonServer], None] = lambda s: None, workdir: str | Path | None = None,
          ready_timeout_s: float = 600, max_queue: int = MAX_QUEUE, features: Features = Features()) -> int:
    """Write the repository, run the server until SIGTERM / SIGINT / SIGHUP (see supervise()), return its exit
    status (0 after a graceful stop). The repository is removed on every way out; the server's log outlives the run
    (a file in the temporary folder, on_ready's server.log and named in errors)."""
    endpoints.check()  # before the log file and the repository are made
    features.check()
    fd, log = tempfile.mkstemp(prefix="smartedit-serve-", suffix=".log", dir=workdir)
    os.close(fd)
    with tempfile.TemporaryDirectory(prefix="smartedit-serve-", dir=workdir) as work:
        repo = features.repository(Path(work) / "repo", settings, max_batch, queue_delay_ms, instances, gpu,
                                   max_queue)
        server = TritonServer(repo, endpoints, Path(work), log=Path(log), cache_mb=features.cache_mb)
        return supervise(server, ready_timeout_s, on_ready)
