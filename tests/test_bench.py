"""smartedit-bench on the tiny preset, CPU, 2 steps: every requested backend is measured or skipped with a reason."""

import json
import subprocess

import pytest
import torch

from smartedit.bench.run import BACKENDS, run_bench


@pytest.fixture(scope="module")
def cpu_bench(tmp_path_factory, onnx_export):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run(["smartedit-bench", "--preset", "tiny", "--random-weights", "--backends", ",".join(BACKENDS),
                        "--steps", "2", "--repeats", "2", "--resolution", "256,320", "--dtype", "fp32",
                        "--artifacts", str(onnx_export("fp16")), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_every_backend_is_measured_or_skipped_with_a_reason(cpu_bench):
    res = json.loads((cpu_bench / "cpu-tiny.json").read_text())
    measured = {r["backend"] for r in res["runs"]}
    assert res["failed"] == []
    assert measured | set(res["skipped"]) == set(BACKENDS) and not measured & set(res["skipped"])
    assert all(isinstance(why, str) and why for why in res["skipped"].values())
    assert {"official", "eager", "onnxruntime"} <= measured  # onnxruntime runs on the CPU from the artifacts
    if not torch.cuda.is_available():
        assert res["skipped"]["cudagraph"] == "needs a CUDA device"
    for r in res["runs"]:
        e = r["e2e_ms"]
        assert 0 < e["min"] <= e["median"] <= e["p90"] <= e["max"]
        assert r["resolution"] in (256, 320) and r["images_per_s"] > 0 and len(r["warmup_ms"]) == 1
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_official"] > 0
        assert r["stage_ms"]["unet_step"] > 0 and "vae_decode" in r["stage_ms"]
        assert set(r["edit_stage_ms"]) == {"condition", "vae_encode", "denoise", "vae_decode"}
        assert 0 < r["edit_stage_ms"]["denoise"] < e["max"]
    eager = [r for r in res["runs"] if r["backend"] == "eager"][0]
    assert eager["stage_tflop"]["unet"] > 0 and eager["stage_tflop"]["vision+llm"] > 0
    assert eager["e2e_tflop"] > 2 * eager["stage_tflop"]["unet"]  # 2 steps of UNet plus the rest
    assert set(eager["stage_tflops_achieved"]) == {"vision+llm", "qformer_bim", "vae_encode", "unet", "vae_decode"}
    assert res["command"] and res["torch"] and res["device"].startswith("cpu")
    assert res["versions"]["diffusers"] == "0.42.1" and res["versions"]["torch"] == torch.__version__


def test_markdown_and_chart_are_written(cpu_bench):
    md = (cpu_bench / "cpu-tiny.md").read_text()
    assert "| eager | 256 |" in md and "skipped: no AOTInductor packages in" in md
    assert "Work per edit at 256x256" in md
    assert (cpu_bench / "cpu-tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_requests():
    with pytest.raises(ValueError, match=r"unknown backend\(s\) \['fast'\]"):
        run_bench(preset="tiny", backends=("fast",))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU here"):
            run_bench(preset="tiny", device="cuda")


def test_a_failing_backend_is_reported_not_dropped(onnx_export):
    res = run_bench(preset="tiny", backends=("onnxruntime",), resolutions=(128,), steps=1, repeats=1, warmup=0,
                    dtype="fp32", artifacts=str(onnx_export("fp16")), progress=lambda m: None)
    assert res["runs"] == []
    [f] = res["failed"]
    assert (f["backend"], f["resolution"]) == ("onnxruntime", 128)
    assert f["error"].startswith("ValueError: vae_encoder: dimension h = 16 is outside")


def test_any_exception_of_one_backend_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    """triton's OutOfResources derives from Exception, not RuntimeError: it once ended the whole benchmark before
    eager ran, with nothing written. Any failure is a result: recorded with its type, written at once, and the
    other backends and resolutions still measured."""
    from triton.runtime.errors import OutOfResources

    import smartedit.bench.run as bench_run

    def out_of_shared_memory(pipe, dtype):
        def encode_condition(images, *args, **kwargs):
            if images[0].size != (512, 512):
                raise AssertionError("the benchmark image changed")
            raise OutOfResources(425_984, 232_448, "shared memory")
        return encode_condition

    real_pipeline = bench_run._pipeline

    def pipeline(backend, *args):
        if backend == "cudagraph":  # a load failure: a plain Exception
            raise Exception("plain failure while loading")
        return real_pipeline(backend, *args)

    monkeypatch.setattr(bench_run, "_official_condition", out_of_shared_memory)
    monkeypatch.setattr(bench_run, "_pipeline", pipeline)
    monkeypatch.setattr(bench_run, "_why_unavailable", lambda *a: None)  # let cudagraph reach its load on a CPU
    written = []
    res = run_bench(preset="tiny", backends=("official", "cudagraph", "eager"), resolutions=(64, 128), steps=1,
                    repeats=1, warmup=0, dtype="fp32", progress=lambda m: None,
                    checkpoint=lambda r: written.append(json.loads(json.dumps(r, default=str))))
    assert [(f["backend"], f["resolution"]) for f in res["failed"]] == [("official", 64), ("official", 128),
                                                                        ("cudagraph", None)]
    assert res["failed"][0]["error"].startswith("OutOfResources: out of resource: shared memory")
    assert res["failed"][2]["error"] == "Exception: plain failure while loading"
    assert [(r["backend"], r["resolution"]) for r in res["runs"]] == [("eager", 64), ("eager", 128)]
    # written as they came: the first failure was on disk before anything was measured
    assert written[0]["failed"] and not written[0]["runs"]
    assert len(written) >= 5 and written[-1]["runs"] == json.loads(json.dumps(res["runs"], default=str))
    from smartedit.bench.run import to_markdown

    md = to_markdown(res)
    assert "| official | 64 | FAILED: OutOfResources: out of resource: shared memory" in md
    assert "| cudagraph | load | FAILED: Exception: plain failure while loading" in md


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudagraph_backend_matches_eager_fp16(test_image):
    import numpy as np

    from smartedit.engines.cudagraph import CudaGraphBackend
    from smartedit.pipeline import SmartEditPipeline

    eager = SmartEditPipeline.from_preset("tiny", seed=0, device="cuda", dtype=torch.float16)
    fast = SmartEditPipeline.from_preset("tiny", seed=0, device="cuda", dtype=torch.float16)
    fast.backend = CudaGraphBackend(fast)
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
        run_bench(preset="tiny", backends=("official", "eager"), resolutions=(64,), steps=1, repeats=1, warmup=0,
                  dtype="fp32", progress=progress)
    finally:
        gc.enable()
    assert live == [1]
