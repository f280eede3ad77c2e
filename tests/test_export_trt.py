"""smartedit-export --target trt-rtx: every tiny graph builds for SM86 and SM80 on a CPU (TensorRT-RTX)."""

import shutil

import pytest
import torch

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[test]')")

from conftest import SMALL_PROFILE, run_cli  # noqa: E402

from smartedit.errors import ExportError, UnavailableError  # noqa: E402
from smartedit.export.run import run_export  # noqa: E402
from smartedit.export.trt import (  # noqa: E402
    BuildOptions,
    Flavor,
    TensorRTError,
    build_engine,
    engine_profiles,
)
from smartedit.files import sha256_file  # noqa: E402
from smartedit.graphs.manifest import Manifest  # noqa: E402
from smartedit.graphs.spec import ProfileOptions  # noqa: E402
from smartedit.weights import ModelSource

NO_GPU = not torch.cuda.is_available()
from conftest import TRT_RTX_CAPS as CAPS  # noqa: E402


@pytest.fixture(scope="module")
def built(trt_rtx_export):
    return trt_rtx_export


def test_all_tiny_graphs_build_for_sm86_and_sm80(built):
    out, said = built
    assert not any("exporting" in m for m in said), "the ONNX graphs were up to date: no re-export"
    manifest = Manifest.read(out)
    engines = manifest.entries("trt-rtx")
    assert sorted(engines) == sorted(["llava", "qformer_bim", "unet", "vae_encoder", "vae_decoder"])
    for name, e in engines.items():
        [(rel, f)] = e.files.items()
        plan = out / rel
        assert rel == f"trt-rtx/{name}.plan" and plan.stat().st_size == f["bytes"] > 0
        assert sha256_file(plan) == f["sha256"]
        assert e.requires == {"tensorrt": trt.__version__, "compute_capability": list(CAPS)}
        assert (out / "trt-rtx" / e.record["log"]).is_file()
        assert e.profiles[-1]["name"] == "dynamic"
    assert [p["name"] for p in engines["unet"].profiles] == ["256x256", "512x512", "dynamic"]
    assert engines["unet"].profile_specs()[0].profile()["sample"] == ((3, 8, 32, 32),) * 3
    assert not (out / "trt-rtx" / "timing.cache").exists()  # TensorRT-RTX: timing caches are deprecated no-ops


def test_rebuild_is_skipped_when_nothing_changed(built):
    out, _ = built
    said = []
    run_export(out, ModelSource(preset="tiny"), precision="fp16", target="trt-rtx", graph_names="qformer_bim,unet",
               profile=ProfileOptions(**SMALL_PROFILE), target_options=BuildOptions(compute_capabilities=CAPS),
               progress=said.append)
    assert said == ["qformer_bim: up to date, skipped", "unet: up to date, skipped",
                    "qformer_bim: trt-rtx engine up to date, skipped", "unet: trt-rtx engine up to date, skipped"]


def test_profiles_and_build_options(onnx_export):
    onnx = Manifest.read(onnx_export("fp16")).entries("onnx")
    unet = onnx["unet"].spec
    names = [n for n, _ in engine_profiles(unet, BuildOptions(static_res=(256, 448)))]
    assert names == ["256x256", "448x448", "dynamic"]
    exact = dict(engine_profiles(unet, BuildOptions(static_res=(448,))))["448x448"]
    assert exact.profile()["sample"] == ((3, 8, 56, 56),) * 3  # B at opt (1), 448 px = 56 latent
    with pytest.raises(ValueError, match=r"static resolution 768 is outside the exported range \[256, 512\]"):
        engine_profiles(unet, BuildOptions(static_res=(768,)))
    qb = onnx["qformer_bim"].spec
    assert [n for n, _ in engine_profiles(qb, BuildOptions())] == ["dynamic"]
    for bad, msg in [(dict(opt_level=7), "0..5, got 7"), (dict(workspace_gb=0), "> 0 GB"),
                     (dict(static_res=(300,)), "300 is not a multiple of 64")]:
        with pytest.raises(ValueError, match=msg):
            BuildOptions(**bad)


def test_targets_are_checked_before_building():
    fl = Flavor(trt, "trt-rtx")
    assert fl.resolve_targets(("80", "120")) == ["80", "120"]
    with pytest.raises(ValueError, match=r"\['90'\] is not one TensorRT-RTX .*no SM90"):
        fl.resolve_targets(("90",))
    if NO_GPU:
        with pytest.raises(ValueError, match="--compute-capability"):
            fl.resolve_targets(())


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU-only refusal")
def test_refit_needs_a_gpu_with_tensorrt_rtx(onnx_export, tmp_path):
    spec = Manifest.read(onnx_export("fp16")).entries("onnx")["qformer_bim"].spec
    with pytest.raises(TensorRTError, match="cannot build refittable or weight-stripped engines without a GPU"):
        build_engine(Flavor(trt, "trt-rtx"), onnx_export("fp16") / "onnx" / "qformer_bim.onnx", spec,
                     tmp_path / "x.plan", BuildOptions(compute_capabilities=("86",), refit=True))
    assert not (tmp_path / "x.plan").exists()


def test_corrupt_and_missing_onnx_are_named(onnx_export, tmp_path):
    spec = Manifest.read(onnx_export("fp16")).entries("onnx")["qformer_bim"].spec
    bad = tmp_path / "qformer_bim.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf")
    opts = BuildOptions(compute_capabilities=("86",))
    with pytest.raises(TensorRTError, match="ONNX parser rejected qformer_bim.onnx"):
        build_engine(Flavor(trt, "trt-rtx"), bad, spec, tmp_path / "q.plan", opts)
    with pytest.raises(ExportError, match="missing: run the ONNX export first"):
        build_engine(Flavor(trt, "trt-rtx"), tmp_path / "none.onnx", spec, tmp_path / "q.plan", opts)
    assert not (tmp_path / "q.plan").exists()


def test_trt_target_without_tensorrt_says_how_to_install(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("the full tensorrt is installed here")
    except ImportError:
        pass
    from smartedit.export.run import run_export as run

    with pytest.raises(UnavailableError, match=r"`tensorrt` is not installed.*--target trt-rtx"):
        run(tmp_path, ModelSource(preset="tiny"), target="trt", progress=lambda m: None)
    assert not (tmp_path / "onnx").exists()  # refused before any export work


def test_verify_reports_what_it_cannot_run_and_catches_damage(built, tmp_path, capsys):
    from smartedit.export.verify import main as verify

    out, _ = built
    code, stdout, err = run_cli(verify, [out], capsys)
    assert code == 0 and "not run: parity with PyTorch: no source model given" in stdout, err
    code, stdout, err = run_cli(verify, [out, "--preset", "tiny", "--random-weights"], capsys)
    assert code == 0, err
    assert stdout.count(" onnxruntime vs PyTorch at 2 shapes: PASS") == 5
    if NO_GPU:
        assert "not run: trt-rtx (llava, qformer_bim, unet, vae_encoder, vae_decoder) vs PyTorch: needs a CUDA GPU " \
               "and there is none here" in stdout
        assert "not run: trt-rtx (llava, qformer_bim, unet, vae_encoder, vae_decoder) vs ONNX Runtime through " \
               "Polygraphy: needs a CUDA GPU and there is none here" in stdout
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / "trt-rtx" / "unet.plan").write_bytes(b"broken")
    code, stdout, err = run_cli(verify, [damaged], capsys)
    assert code == 1 and "trt-rtx/unet: 1 files DAMAGED: ['trt-rtx/unet.plan']" in stdout
    assert "FAILED: integrity of trt-rtx/unet" in err


@pytest.mark.cuda
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU (and an engine built for it)")
def test_tensorrt_backend_edit_matches_eager(tmp_path, test_image):
    import numpy as np

    from smartedit.pipeline import SmartEditPipeline
    from smartedit.weights import ModelSource

    run_export(tmp_path, ModelSource(preset="tiny"), precision="fp16", target="trt-rtx", progress=lambda m: None)
    eager = SmartEditPipeline.from_preset("tiny", seed=0, device="cuda")
    fast = SmartEditPipeline.on_backend("trt-rtx", ModelSource(preset="tiny"), "cuda", artifacts=tmp_path)
    a = np.asarray(eager(test_image, "make it blue", steps=8, seed=3), dtype=np.float64)
    b = np.asarray(fast(test_image, "make it blue", steps=8, seed=3), dtype=np.float64)
    assert 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12)) >= 35
