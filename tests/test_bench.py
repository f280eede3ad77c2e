"""smartedit-bench on the tiny preset, CPU, 2 steps: every requested backend is measured or skipped with a reason."""

import json

import pytest
import torch

from smartedit.bench.run import run_bench
from smartedit.engines.registry import BACKENDS
from smartedit.errors import InputError
from smartedit.weights import ModelSource

TINY = ModelSource(preset="tiny")


@pytest.fixture(scope="module")
def cpu_bench(tmp_path_factory, onnx_export):
    from smartedit.bench.cli import main

    out = tmp_path_factory.mktemp("bench")
    main(["--preset", "tiny", "--random-weights", "--backends", ",".join(BACKENDS), "--steps", "2", "--repeats", "2",
          "--resolution", "256,320", "--precision", "fp32", "--artifacts", str(onnx_export("fp16")), "--out", str(out)])
    return out


def test_every_backend_is_measured_or_skipped_with_a_reason(cpu_bench):
    res = json.loads((cpu_bench / "cpu-tiny.json").read_text())
    measured = {r["backend"] for r in res["runs"]}
    assert res["failed"] == []
    assert measured | set(res["skipped"]) == set(BACKENDS) and not measured & set(res["skipped"])
    assert all(isinstance(why, str) and why for why in res["skipped"].values())
    assert {"official", "eager", "onnxruntime"} <= measured  # onnxruntime runs on the CPU from the artifacts
    if not torch.cuda.is_available():
        assert res["skipped"]["cudagraph"] == "runs on cuda, not cpu"
    for r in res["runs"]:
        e = r["e2e_ms"]
        assert 0 < e["min"] <= e["median"] <= e["p90"] <= e["max"]
        assert r["resolution"] in (256, 320) and r["images_per_s"] > 0 and len(r["warmup_ms"]) == 1
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_official"] > 0
        assert r["phase_ms"]["unet_step"] > 0 and "vae_decode" in r["phase_ms"]
        assert set(r["edit_phase_ms"]) == {"condition", "vae_encode", "denoise", "vae_decode"}
        assert 0 < r["edit_phase_ms"]["denoise"] < e["max"]
    eager = [r for r in res["runs"] if r["backend"] == "eager"][0]
    assert eager["graph_tflop"]["unet"] > 0 and eager["graph_tflop"]["vision+llm"] > 0
    assert eager["e2e_tflop"] > 2 * eager["graph_tflop"]["unet"]  # 2 steps of UNet plus the rest
    assert set(eager["graph_tflops_achieved"]) == {"vision+llm", "qformer_bim", "vae_encode", "unet", "vae_decode"}
    assert res["command"] and res["torch"] and res["device"].startswith("cpu")
    assert res["versions"]["diffusers"] == "0.42.1" and res["versions"]["torch"] == torch.__version__


def test_markdown_and_chart_are_written(cpu_bench):
    md = (cpu_bench / "cpu-tiny.md").read_text()
    assert "| eager | 256 |" in md and "| aoti | - | skipped: no aoti artifacts in" in md
    assert "Work per edit at 256x256" in md
    assert (cpu_bench / "cpu-tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_requests():
    with pytest.raises(InputError, match=r"unknown backend\(s\) \['fast'\]"):
        run_bench(TINY, backends=("fast",))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU here"):
            run_bench(TINY, device="cuda")


def test_a_failing_backend_is_reported_not_dropped(onnx_export):
    res = run_bench(TINY, backends=("onnxruntime",), resolutions=(128,), steps=1, repeats=1, warmup=0,
                    dtype="fp32", artifacts=str(onnx_export("fp16")), progress=lambda m: None)
    assert res["runs"] == []
    [f] = res["failed"]
    assert (f["backend"], f["resolution"]) == ("onnxruntime", 128)
    assert f["error"].startswith("InputError: vae_encoder: image height 128 px is outside the exported range")


def test_any_exception_of_one_backend_is_recorded_and_the_others_still_run(monkeypatch):
    """triton's OutOfResources derives from Exception, not RuntimeError: it once ended the whole benchmark before
    eager ran, with nothing written. Any failure is a result: recorded with its type, written at once, and the
    other backends and resolutions still measured. Two stand-in backends join the registry for this."""
    from triton.runtime.errors import OutOfResources

    from smartedit.engines import registry
    from smartedit.engines.backend import Backend, Loaded
    from smartedit.graphs import EagerRunner

    def out_of_shared_memory(source, device, dtype, artifacts):
        w = source.load(device, dtype)
        inner = EagerRunner(w.stages, w.config)

        class Runner:  # the BIM's Triton kernel failing to launch, at 128 px only
            name, fold_cfg, specs = "oom", False, {}

            def run(self, graph, inputs):
                if graph == "vae_encoder" and inputs["image"].shape[-1] == 128:
                    raise OutOfResources(425_984, 232_448, "shared memory")
                return inner.run(graph, inputs)

        return Loaded(w, Runner())

    def plain_failure(source, device, dtype, artifacts):
        raise Exception("plain failure while loading")

    always = lambda device: None  # noqa: E731
    monkeypatch.setitem(registry.BACKENDS, "oom", Backend("oom", "test", ("cpu",), None, always, out_of_shared_memory))
    monkeypatch.setitem(registry.BACKENDS, "broken", Backend("broken", "test", ("cpu",), None, always, plain_failure))
    written = []
    res = run_bench(TINY, backends=("oom", "broken", "eager"), resolutions=(64, 128), steps=1,
                    repeats=1, warmup=0, dtype="fp32", progress=lambda m: None,
                    checkpoint=lambda r: written.append(json.loads(json.dumps(r, default=str))))
    assert [(f["backend"], f["resolution"]) for f in res["failed"]] == [("oom", 128), ("broken", None)]
    assert res["failed"][0]["error"].startswith("OutOfResources: out of resource: shared memory")
    assert res["failed"][1]["error"] == "Exception: plain failure while loading"
    assert [(r["backend"], r["resolution"]) for r in res["runs"]] == [("oom", 64), ("eager", 64), ("eager", 128)]
    # written as they came: the first row, then the failure, were on disk before eager was measured
    assert [len(w["runs"]) for w in written[:2]] == [1, 1] and written[1]["failed"]
    assert written[-1]["runs"] == json.loads(json.dumps(res["runs"], default=str))
    from smartedit.bench.run import to_markdown

    md = to_markdown(res)
    assert "| oom | 128 | FAILED: OutOfResources: out of resource: shared memory" in md
    assert "| broken | load | FAILED: Exception: plain failure while loading" in md


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudagraph_backend_matches_eager_fp16(test_image):
    import numpy as np

    from smartedit.engines.cudagraph import CudaGraphRunner
    from smartedit.pipeline import SmartEditPipeline

    eager = SmartEditPipeline.from_preset("tiny", seed=0, device="cuda", dtype=torch.float16)
    fast = SmartEditPipeline.from_preset("tiny", seed=0, device="cuda", dtype=torch.float16)
    fast.runner = CudaGraphRunner(fast.stages, fast.config)
    a = np.asarray(eager(test_image, "make it blue", steps=10, seed=1), dtype=np.float64)
    b = np.asarray(fast(test_image, "make it blue", steps=10, seed=1), dtype=np.float64)
    assert 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12)) >= 35


def test_each_backend_is_freed_before_the_next_one_loads():
    """Pipelines and backends reference each other (a cycle): without a collection between backends, the next one's
    peak memory would include the previous one's weights."""
    import gc

    from smartedit.pipeline import SmartEditPipeline

    live = []
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, SmartEditPipeline)}  # other tests' pipelines

    def progress(msg):
        if msg.startswith("eager @"):
            live.append(sum(isinstance(o, SmartEditPipeline) and id(o) not in before for o in gc.get_objects()))

    gc.disable()  # only the explicit collection may free the official pipeline
    try:
        run_bench(TINY, backends=("official", "eager"), resolutions=(64,), steps=1, repeats=1, warmup=0,
                  dtype="fp32", progress=progress)
    finally:
        gc.enable()
    assert live == [1]


def test_rows_say_how_the_loop_was_captured_and_each_resolution_starts_clean(monkeypatch):
    """A loop runner's row records the capture each program got (a loop capture that fell back to per-step replay
    would say so there, not only in a silenced log), and its programs of one resolution are released before the
    next is measured (their graph pools would count in the next one's peak memory). On the CPU the runner runs its
    program uncaptured: the stand-in backend below."""
    from smartedit.engines import registry
    from smartedit.engines.cudagraph import CudaGraphRunner
    from smartedit.engines.backend import Backend, Loaded

    runners = []

    def load(source, device, dtype, artifacts):
        w = source.load(device, dtype)
        runners.append(CudaGraphRunner(w.stages, w.config, capture="none"))
        return Loaded(w, runners[-1])

    monkeypatch.setitem(registry.BACKENDS, "loop-cpu", Backend("loop-cpu", "test", ("cpu",), None,
                                                               lambda device: None, load))
    res = run_bench(TINY, backends=("loop-cpu",), resolutions=(64, 128), steps=2, repeats=1, warmup=0,
                    dtype="fp32", progress=lambda m: None)
    rows = {r["resolution"]: r for r in res["runs"]}
    assert rows[64]["capture_asked"] == "none"
    assert rows[64]["capture_used"] == {"latents [1, 4, 8, 8], 2 steps": "none"}
    assert list(rows[128]["capture_used"].values()) == ["none", "none"]  # 64's program, then 128's
    assert [k[0] for k in runners[0]._loops] == [(1, 4, 16, 16)]  # 64's buffers were released before 128 ran


def test_results_of_a_model_folder_are_named_by_its_last_part():
    """--model /abs/path/models/tiny-shapes once wrote OUT/cpu-/abs/path/models/tiny-shapes.md (nested folders)."""
    from smartedit.bench.run import model_stem

    assert [model_stem(m) for m in ("tiny (random)", "/x/models/tiny-shapes", "models/tiny-shapes/", "a b/c d")] \
        == ["tiny", "tiny-shapes", "tiny-shapes", "c-d"]
