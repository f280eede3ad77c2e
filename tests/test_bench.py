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
    assert res["skipped"]["onnxruntime"].startswith("failed: vae_encoder: dimension h = 16 is outside")


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
