import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smartedit.weights import ModelSource

# pytest-xdist's workers (pyproject's addopts: -n auto, --dist loadfile) share the cores: each worker and the commands
# it starts take cores / workers threads (1 each on 2 cores), as oversubscribed OpenMP threads spin 10-30x slower
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


def pytest_xdist_auto_num_workers(config) -> int:
    """-n auto: one worker per core, at most 4 (each holds its own model copies and servers)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def made_once(tmp_path_factory, name: str, make):
    """-> (folder, what make(folder) returned): a folder made once per test run. Under pytest-xdist the workers share
    it: the first to ask makes it while the others wait on its lock, so an export or a build is never made twice.
    make's return value must be JSON (it is kept beside the folder for the workers that did not make it)."""
    import json
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "made_once"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what an attempt that failed left
            folder.mkdir()
            done.write_text(json.dumps({"made": make(folder)}))
    return folder, json.loads(done.read_text())["made"]


# tests/kernels/ runs where the Triton kernel can: on a GPU, or under TRITON_INTERPRET=1 in the fresh process that
# test_kernels_interpreter.py starts. Elsewhere it is not collected (rather than listed as a few hundred skips).
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    collect_ignore = ["kernels"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, msg: str = "") -> None:
    """One comparison helper: reports the max error, where it is, and how many elements miss (never whole tensors)."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bool(bad.any()) or bool(torch.isnan(a).any() != torch.isnan(e).any()):
        idx = np.unravel_index(int(err.argmax()), tuple(err.shape))
        raise AssertionError(f"{msg}: {int(bad.sum())}/{err.numel()} elements exceed atol={atol} rtol={rtol}; "
                             f"max abs err {err.max().item():.3e} at {tuple(int(i) for i in idx)} "
                             f"(actual {a[idx].item():.6g}, expected {e[idx].item():.6g})")


def load_sam_modeling():
    """segment_anything.modeling without the package __init__ (which imports torchvision, absent with CPU torch)."""
    if "segment_anything.modeling" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None:
            pytest.skip("segment-anything is not installed (pip install -e '.[test]')")
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["segment_anything"] = pkg
    import segment_anything.modeling.prompt_encoder as pe
    import segment_anything.modeling.transformer as tr

    return tr, pe


def readme_block(marker: str) -> str:
    """The one fenced block of README.md that contains `marker`: tests run the README's examples as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    hits = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if marker in b]
    assert len(hits) == 1, f"README.md has {len(hits)} fenced blocks with {marker!r}"
    return hits[0]


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """A command's main(argv) in this process (its typed function underneath): -> (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def tiny_pipe():
    from smartedit.pipeline import SmartEditPipeline

    return SmartEditPipeline.from_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def test_image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(96, 128, 3) * 255).astype(np.uint8))


SMALL_PROFILE = dict(max_batch=3, max_res=512, max_prefix=400, max_suffix=400)


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """precision -> an ONNX export folder of the tiny preset (seed 0, small profile), made once per session."""
    from smartedit.export.run import run_export
    from smartedit.graphs.spec import ProfileOptions

    def get(precision: str):
        def make(out):
            run_export(out, ModelSource(preset="tiny"), precision=precision, profile=ProfileOptions(**SMALL_PROFILE),
                       progress=lambda m: None)

        return made_once(tmp_path_factory, f"onnx_{precision}", make)[0]

    return get


AOTI_CACHE_BRANCH = 0  # the skip branch of the shared AOTI export's DeepCache graphs (smartedit-export --deepcache)


@pytest.fixture(scope="session")
def aoti_export(tmp_path_factory):
    """The tiny preset's AOTInductor packages for the CPU (seed 0, small profile): all five graphs in fp32 and the
    DeepCache pair (unet_deep, unet_shallow) at AOTI_CACHE_BRANCH, made once per session (~75 s on 2 cores, and
    ~70 s more for the pair)."""
    from smartedit.export.run import run_export
    from smartedit.graphs.spec import ProfileOptions

    def make(out):
        run_export(out, ModelSource(preset="tiny"), target="aoti", precision="fp32", profile=ProfileOptions(**SMALL_PROFILE),
                   progress=lambda m: None, cache_branch=AOTI_CACHE_BRANCH)

    return made_once(tmp_path_factory, "aoti_fp32", make)[0]


TRT_RTX_CAPS = ("86", "80")


@pytest.fixture(scope="session")
def trt_rtx_export(onnx_export, tmp_path_factory):
    """-> (folder, progress messages): the fp16 ONNX export plus TensorRT-RTX engines of all five tiny graphs for
    SM86 and SM80, built on this CPU (tensorrt-rtx-cu13), made once per session."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[test]')")
    import shutil

    from smartedit.export.run import run_export
    from smartedit.export.trt import BuildOptions
    from smartedit.graphs.spec import ProfileOptions

    def make(out):
        shutil.copytree(onnx_export("fp16"), out, dirs_exist_ok=True)
        said = []
        run_export(out, ModelSource(preset="tiny"), precision="fp16", target="trt-rtx", profile=ProfileOptions(**SMALL_PROFILE),
                   target_options=BuildOptions(compute_capabilities=TRT_RTX_CAPS), progress=said.append)
        return said

    return made_once(tmp_path_factory, "trt_rtx", make)


@pytest.fixture(scope="session")
def triton_repository(onnx_export, tmp_path_factory):
    """-> (export folder, progress messages): the fp16 ONNX export plus its `--target triton --graph-models python`
    repository (OUT/triton), made once per session; tests that change it work on a copy."""
    import shutil

    from smartedit.export.run import run_export
    from smartedit.export.triton import TritonOptions
    from smartedit.graphs.spec import ProfileOptions

    def make(out):
        shutil.copytree(onnx_export("fp16"), out, dirs_exist_ok=True)
        said = []
        run_export(out, ModelSource(preset="tiny"), target="triton", precision="fp16", profile=ProfileOptions(**SMALL_PROFILE),
                   target_options=TritonOptions(graph_models="python"), progress=said.append)
        return said

    return made_once(tmp_path_factory, "triton_export", make)


def settled(e, timeout_s: float = 120.0) -> dict[str, float]:
    """The server's counters once nothing is queued or running: the shared server may still be finishing a request
    an earlier test left behind (a burst past the queue bound, a client that stopped waiting)."""
    from smartedit.serve.server import read_metrics

    deadline = time.monotonic() + timeout_s
    last = read_metrics(e)
    while True:
        time.sleep(1.0)
        now = read_metrics(e)
        done = ("nv_inference_count", "nv_inference_request_failure", "nv_inference_request_success")
        if now.get("nv_inference_pending_request_count", 0) == 0 and all(now.get(k) == last.get(k) for k in done):
            return now
        assert time.monotonic() < deadline, f"the server did not settle in {timeout_s:.0f} s: {now}"
        last = now


@pytest.fixture(scope="session")
def tiny_server():
    """smartedit-serve's Triton server, eager tiny on the CPU, shared by the tests of the server: batches of up to 4
    within 400 ms (long enough that concurrent test requests meet), images up to 1 MP."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install -e '.[test]')")
    from smartedit.weights import ModelSource
    from smartedit.serve.server import running, settings_for

    settings = settings_for(ModelSource(preset="tiny", seed=0), "eager", None, "cpu", "fp32", max_steps=100,
                            max_megapixels=1.0, max_batch=4)
    with running(settings, max_batch=4, queue_delay_ms=400, ready_timeout_s=300) as s:
        yield s


class Launched:
    """A `python -m smartedit.serve.launch` process (a container's command) and its endpoints; its output is read
    into `lines` as it comes (a full pipe would stop the server)."""

    def __init__(self, args: list[str], endpoints, timeout_s: float = 300):
        import collections
        import subprocess
        import threading

        self.endpoints = endpoints
        self.lines: collections.deque = collections.deque(maxlen=2000)
        self.proc = subprocess.Popen([sys.executable, "-m", "smartedit.serve.launch", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("smartedit-launch: ready"):
                    self.ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.5):
            assert self.proc.poll() is None, "the launcher exited: " + "".join(list(self.lines)[-20:])
            assert time.monotonic() < deadline, "the launcher was not ready: " + "".join(list(self.lines)[-20:])

    def server_env(self) -> dict[str, str]:
        """The environment of the tritonserver under the launcher (root or the same user may read it)."""
        from pathlib import Path

        kids = [int(c) for t in Path(f"/proc/{self.proc.pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
        env = Path(f"/proc/{kids[0]}/environ").read_bytes().split(b"\0")
        return dict(kv.decode().split("=", 1) for kv in env if b"=" in kv)

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def launch_args(repo, endpoints, record_sha256: str | None = None) -> list[str]:
    own = ["--record-sha256", record_sha256] if record_sha256 else []
    return [*own, "--", f"--model-repository={repo}", f"--http-address={endpoints.host}",
            f"--grpc-address={endpoints.host}", f"--metrics-address={endpoints.host}", f"--http-port={endpoints.http}",
            f"--grpc-port={endpoints.grpc}", f"--metrics-port={endpoints.metrics}", "--exit-timeout-secs=30"]


def record_sha256(export) -> str:
    """The sha256 the export's manifest records for its repository's `smartedit` config (what a pod is given)."""
    import json
    from pathlib import Path

    m = json.loads((Path(export) / "manifest.json").read_text())
    return m["repositories"]["triton"]["files"]["triton/smartedit/config.pbtxt"]["sha256"]


@pytest.fixture(scope="session")
def repository_server(triton_repository):
    """The shared `--target triton --graph-models python` repository (its BLS orchestrator and five Python stage
    models) on the bundled tritonserver, started as a container starts it (python -m smartedit.serve.launch with the
    record's sha256), once per session."""
    from smartedit.serve.server import free_endpoints

    out, _ = triton_repository
    e = free_endpoints()
    server = Launched(launch_args(out / "triton", e, record_sha256(out)), e)
    yield server
    server.stop()  # a drain; under a loaded CPU the five stage stubs may outlast Triton's exit timeout (exit 1)


TRAINED_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-shapes"  # tools/train_tiny.py's output
# examples/demo.sh's PROFILE: the trained model's 64 px pictures, batches of up to 4
TRAINED_PROFILE = dict(max_batch=4, min_res=64, opt_res=64, max_res=320, max_prefix=400, max_suffix=400)


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory):
    """The shipped trained model exported for the CPU backends once per session: ONNX and AOTInductor, fp32, in one
    folder with examples/demo.sh's profile, as the demo's two exports leave it (the README test's demo reuses it),
    the ONNX graphs with the DeepCache pair at skip branch 1 (test_deepcache.py; the AOTInductor pair is
    aoti_export's)."""
    from smartedit.export.run import run_export
    from smartedit.graphs.spec import ProfileOptions

    def make(out):
        for target in ("onnx", "aoti"):
            run_export(out, ModelSource(model=TRAINED_MODEL), target=target, precision="fp32",
                       profile=ProfileOptions(**TRAINED_PROFILE), progress=lambda m: None,
                       cache_branch=1 if target == "onnx" else None)

    return made_once(tmp_path_factory, "trained_export", make)[0]
