"""smartedit-export --precision int8 / fp8: the tiny UNet quantized by Model Optimizer's ONNX path, calibrated on
edits, judged by its quality report; an INT8 edit end to end in ONNX Runtime, FP8 built by TensorRT-RTX for SM89.

Both exports start from the session's fp16 ONNX export (a copy): only the unet is exported again and quantized, with
a small calibration (2 edits x 4 steps) and a one-edit report, so the file costs about a minute and a half.
"""

import json
import shutil

import numpy as np
import onnx
import pytest

pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is not installed (pip install -e '.[test]')")

from conftest import SMALL_PROFILE, run_cli  # noqa: E402

from smartedit.errors import InputError  # noqa: E402
from smartedit.export.quantize import KEPT_HIGH, QuantizeOptions, verify_quality  # noqa: E402
from smartedit.export.run import run_export  # noqa: E402
from smartedit.graphs.manifest import Manifest  # noqa: E402
from smartedit.graphs.spec import ProfileOptions  # noqa: E402
from smartedit.weights import ModelSource  # noqa: E402

SMALL = dict(calibration_edits=2, calibration_steps=4, report_edits=1)


def _quantized(onnx_export, tmp_path_factory, mode: str, **kw):
    out = tmp_path_factory.mktemp(f"quantized_{mode}") / "export"
    shutil.copytree(onnx_export("fp16"), out)
    said = []
    run_export(out, preset="tiny", precision=mode, profile=ProfileOptions(**SMALL_PROFILE),
               quantize=QuantizeOptions(mode=mode, **SMALL), progress=said.append, **kw)
    return out, said


@pytest.fixture(scope="module")
def int8(onnx_export, tmp_path_factory):
    return _quantized(onnx_export, tmp_path_factory, "int8")


@pytest.fixture(scope="module")
def fp8_rtx(onnx_export, tmp_path_factory):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[test]')")
    from smartedit.export.trt import BuildOptions

    return _quantized(onnx_export, tmp_path_factory, "fp8", target="trt-rtx",
                      target_options=BuildOptions(compute_capabilities=("89",), static_res=()))


def _qdq(path) -> tuple[dict[str, str], set[str]]:
    """(zero-point dtype of each QuantizeLinear, the nodes that read a DequantizeLinear output) of an ONNX file."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in m.graph.initializer}
    zero_points = {n.name: inits.get(n.input[2], "?") for n in m.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    fed = {n.name for n in m.graph.node if n.op_type != "QuantizeLinear" and set(n.input) & dq_out}
    return zero_points, fed


def test_int8_unet_is_qdq_with_the_named_layers_kept_in_fp16(int8):
    out, said = int8
    assert not any(m.startswith(("[1/", "[2/")) and "llava" in m for m in said), "other graphs were up to date"
    e = Manifest.read(out).entries("onnx")["unet"]
    q = e.options["quantization"]
    assert (e.precision, q["mode"], e.verified) == ("fp16", "int8", True)
    assert sorted(e.files) == ["onnx/unet.fp16.onnx", "onnx/unet.onnx"]
    assert q["calibration_calls"] == SMALL["calibration_edits"] * SMALL["calibration_steps"]
    zero_points, fed = _qdq(out / "onnx" / "unet.onnx")
    assert zero_points and set(zero_points.values()) == {"INT8"}
    # the kept layers, found here from the fp16 graph's weight names (not from the list the export wrote)
    source = onnx.load(str(out / "onnx" / "unet.fp16.onnx"), load_external_data=False)
    kept = {n.name for n in source.graph.node if n.op_type in ("Conv", "Gemm")
            and any(KEPT_HIGH.search(i) for i in n.input)}
    convs = {n.name for n in source.graph.node if n.op_type == "Conv"}
    assert any("conv_in" in i for n in source.graph.node if n.name in kept for i in n.input)
    assert kept and not kept & fed, f"kept layers read quantized tensors: {sorted(kept & fed)}"
    assert (convs - kept) & fed, "no other Conv was quantized"
    assert kept <= set(q["kept_fp16"])


def test_int8_quality_report_and_an_edit_end_to_end_in_onnx_runtime(int8, test_image, tmp_path, capsys):
    out, _ = int8
    report = json.loads((out / "report.json").read_text())["onnx"]["unet"]["quantization"]
    assert report["passed"] and report["worst_psnr_db"] >= report["min_psnr_db"] == 20.0
    assert 0 < report["worst_ssim"] <= 1 and len(report["eps_rel_error_per_step"]) == SMALL["calibration_steps"]
    assert all(np.isfinite(report["eps_rel_error_per_step"])) and report["edits"][0]["finite"]
    from smartedit.cli import edit_cli

    test_image.save(tmp_path / "in.png")
    code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--backend", "onnxruntime",
                                      "--artifacts", out, "--image", tmp_path / "in.png", "--instruction",
                                      "make it blue", "--steps", 3, "--out", tmp_path / "o.png"], capsys)
    assert code == 0, err
    assert np.asarray(__import__("PIL.Image").Image.open(tmp_path / "o.png")).std() > 0  # an image, not a flat fill


def test_a_rerun_skips_and_verify_runs_the_report_again_with_its_threshold(int8, onnx_export, tmp_path_factory):
    out, first = int8
    said = []
    run_export(out, preset="tiny", precision="int8", profile=ProfileOptions(**SMALL_PROFILE),
               quantize=QuantizeOptions(mode="int8", **SMALL), progress=said.append)
    assert "unet: up to date, skipped" in said and not any("Model Optimizer" in m for m in said)
    e = Manifest.read(out).entries("onnx")["unet"]
    again = verify_quality(out, ModelSource(preset="tiny"), e, lambda m: None)
    recorded = json.loads((out / "report.json").read_text())["onnx"]["unet"]["quantization"]
    assert again["worst_psnr_db"] == pytest.approx(recorded["worst_psnr_db"], abs=1e-6)
    e.options["quantization"]["min_psnr"] = 99.0  # a threshold no quantized edit reaches
    assert not verify_quality(out, ModelSource(preset="tiny"), e, lambda m: None)["passed"]


def test_fp8_exports_and_builds_for_sm89_with_tensorrt_rtx(fp8_rtx):
    out, _ = fp8_rtx
    m = Manifest.read(out)
    zero_points, _ = _qdq(out / "onnx" / "unet.onnx")
    assert set(zero_points.values()) == {"FLOAT8E4M3FN"}
    plan = m.entries("trt-rtx")["unet"]
    assert plan.options["quantization"]["mode"] == "fp8" and plan.requires["compute_capability"] == ["89"]
    assert (out / "trt-rtx" / "unet.plan").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp8", "--target", "trt-rtx", "--compute-capability", "86"],
     "--precision fp8 needs a GPU with FP8 (compute capability 89 or newer); SM86 has none"),
    (["--precision", "int8", "--target", "aoti"], "--target aoti takes --precision fp16 or fp32"),
    (["--precision", "int8", "--calibration-edits", "0"], "--calibration-edits must be an integer from 1 to 10000"),
    (["--precision", "int8", "--calibration-images", "/nonexistent"], "--calibration-images /nonexistent: not a"),
    (["--precision", "int8", "--min-psnr", "nan"], "--min-psnr must be a finite number"),
])
def test_bad_quantization_options_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    from smartedit.export.cli import main

    code, _, err = run_cli(main, ["--preset", "tiny", "--random-weights", "--out", tmp_path / "o", *argv], capsys)
    assert (code, err.count("error:")) == (2, 1) and message in err, err
    assert not (tmp_path / "o").exists()


def test_options_refuse_a_mode_they_do_not_know():
    with pytest.raises(InputError, match="quantization mode must be one of"):
        QuantizeOptions(mode="int4")


def test_int8_engine_builds_for_sm86_from_the_quantized_graph(int8):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[test]')")
    from smartedit.export.trt import BuildOptions

    out, _ = int8
    said = []
    run_export(out, preset="tiny", precision="int8", target="trt-rtx", graph_names="unet",
               profile=ProfileOptions(**SMALL_PROFILE), quantize=QuantizeOptions(mode="int8", **SMALL),
               target_options=BuildOptions(compute_capabilities=("86",), static_res=()), progress=said.append)
    assert "unet: up to date, skipped" in said  # the quantized ONNX is reused, not quantized again
    plan = Manifest.read(out).entries("trt-rtx")["unet"]
    assert plan.options["quantization"]["mode"] == "int8" and plan.requires["compute_capability"] == ["86"]


def test_calibration_edits_take_the_users_images_in_name_order(tmp_path):
    from PIL import Image

    from smartedit.export.quantize import CALIBRATION_INSTRUCTIONS, edit_set

    for name, colour in (("b.png", (0, 0, 255)), ("a.jpg", (255, 0, 0))):
        Image.new("RGB", (64, 48), colour).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    pairs = edit_set(QuantizeOptions(calibration_images=str(tmp_path)), 3, CALIBRATION_INSTRUCTIONS, 0)
    assert [p[0].getpixel((0, 0))[0] > 200 for p in pairs] == [True, False, True]  # a.jpg (red), b.png, a.jpg
    assert [p[1] for p in pairs] == list(CALIBRATION_INSTRUCTIONS[:3])


def test_fp8_stage_models_run_their_graph_in_onnx_runtime(fp8_rtx, tmp_path):
    """--target triton on the FP8 export: Triton's onnxruntime stage asks for BASIC optimisations (level -1), and the
    Python stage model (what the bundled server runs), given the config Triton would pass it, opens and runs the FP8
    graph (ONNX Runtime's default optimisations refuse it)."""
    from google.protobuf import json_format

    from smartedit.export.triton import TritonOptions, stage_config
    from smartedit.serve.stage import TritonPythonModel

    out = tmp_path / "export"
    shutil.copytree(fp8_rtx[0], out, ignore=shutil.ignore_patterns("trt-rtx"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"].pop("trt-rtx")
    (out / "manifest.json").write_text(json.dumps(manifest))
    said = []
    run_export(out, preset="tiny", precision="fp8", target="triton", profile=ProfileOptions(**SMALL_PROFILE),
               quantize=QuantizeOptions(mode="fp8", **SMALL), target_options=TritonOptions(stages="python"),
               progress=said.append)
    assert "unet: up to date, skipped" in said
    entry = Manifest.read(out).entries("onnx")["unet"]
    assert stage_config(entry, "onnx").optimization.graph.level == -1
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    written = text_format.Parse((out / "triton" / "unet" / "config.pbtxt").read_text(), mc.ModelConfig())
    config = json_format.MessageToDict(written, preserving_proto_field_name=True)  # as Triton hands it over
    assert config["parameters"]["basic_optimizations"]["string_value"] == "1"
    stage = TritonPythonModel()
    stage.initialize({"model_config": json.dumps(config), "model_repository": str(out / "triton" / "unet"),
                      "model_version": "1"})
    feed = {t.name: v.numpy() for t, v in zip(entry.spec.inputs, entry.spec.sample_inputs(
        entry.spec.point("opt"), "fp16").values())}
    (eps,) = stage.session.run(None, feed)
    assert np.isfinite(eps).all() and eps.dtype == np.float16
