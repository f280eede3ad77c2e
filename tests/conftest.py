import importlib.util
import os
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))


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

    made = {}

    def get(precision: str):
        if precision not in made:
            out = tmp_path_factory.mktemp(f"onnx_{precision}")
            run_export(out, preset="tiny", precision=precision, profile=ProfileOptions(**SMALL_PROFILE),
                       progress=lambda m: None)
            made[precision] = out
        return made[precision]

    return get


@pytest.fixture(scope="session")
def aoti_export(tmp_path_factory):
    """The tiny preset's AOTInductor packages for the CPU (seed 0, small profile): all five graphs in fp32, made once
    per session (~75 s on 2 cores)."""
    from smartedit.export.run import run_export
    from smartedit.graphs.spec import ProfileOptions

    out = tmp_path_factory.mktemp("aoti_fp32")
    run_export(out, preset="tiny", target="aoti", precision="fp32", profile=ProfileOptions(**SMALL_PROFILE),
               progress=lambda m: None)
    return out


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

    out = tmp_path_factory.mktemp("trt_rtx")
    shutil.copytree(onnx_export("fp16"), out, dirs_exist_ok=True)
    said = []
    run_export(out, preset="tiny", precision="fp16", target="trt-rtx", profile=ProfileOptions(**SMALL_PROFILE),
               target_options=BuildOptions(compute_capabilities=TRT_RTX_CAPS), progress=said.append)
    return out, said


@pytest.fixture(scope="session")
def triton_repository(onnx_export, tmp_path_factory):
    """-> (export folder, progress messages): the fp16 ONNX export plus its `--target triton --triton-stages python`
    repository (OUT/triton), made once per session; tests that change it work on a copy."""
    import shutil

    from smartedit.export.run import run_export
    from smartedit.export.triton import TritonOptions
    from smartedit.graphs.spec import ProfileOptions

    out = tmp_path_factory.mktemp("triton") / "export"
    shutil.copytree(onnx_export("fp16"), out)
    said = []
    run_export(out, preset="tiny", target="triton", precision="fp16", profile=ProfileOptions(**SMALL_PROFILE),
               target_options=TritonOptions(stages="python"), progress=said.append)
    return out, said


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


@pytest.fixture(scope="session")
def repository_server(triton_repository, tmp_path_factory):
    """The bundled tritonserver on the shared `--target triton --triton-stages python` repository (its BLS
    orchestrator and five Python stage models), started once per session."""
    from smartedit.serve.server import TritonServer, free_endpoints

    out, _ = triton_repository
    with TritonServer(out / "triton", free_endpoints(), tmp_path_factory.mktemp("repository_server")) as s:
        s.wait_ready(300)
        yield s
