"""smartedit-export --precision int8 / fp8: the tiny UNet quantized by Model Optimizer's ONNX path, calibrated on
edits, judged by its quality report; an INT8 edit end to end in ONNX Runtime, FP8 built by TensorRT-RTX for SM89.

Both exports start from the session's fp16 ONNX export (a copy): only the unet is exported again and quantized, with
a small calibration (2 edits x 4 steps) and a one-edit report, so the file costs about a minute and a half.
"""

import json
import shutil
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx
import pytest

pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is not installed (pip install -e '.[test]')")

from conftest import SMALL_PROFILE, run_cli  # noqa: E402

from smartedit.errors import InputError, RunError  # noqa: E402
from smartedit.export.quantize import KEPT_HIGH, QuantizeOptions, calibration_images, verify_quality  # noqa: E402
from smartedit.export.run import run_export  # noqa: E402
from smartedit.graphs.manifest import Manifest  # noqa: E402
from smartedit.graphs.spec import ProfileOptions  # noqa: E402
from smartedit.weights import ModelSource  # noqa: E402

SMALL = dict(calibration_edits=2, calibration_steps=4, report_edits=1)


def _quantized(onnx_export, tmp_path_factory, mode: str, **kw):
    out = tmp_path_factory.mktemp(f"quantized_{mode}") / "export"
    shutil.copytree(onnx_export("fp16"), out)
    said = []
    run_export(out, ModelSource(preset="tiny"), precision=mode, profile=ProfileOptions(**SMALL_PROFILE),
               quantize=QuantizeOptions(precision=mode, **SMALL), progress=said.append, **kw)
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
    assert (e.precision, e.verified) == ("int8", True) and "mode" not in q  # the entry says what it is, once
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
    run_export(out, ModelSource(preset="tiny"), precision="int8", profile=ProfileOptions(**SMALL_PROFILE),
               quantize=QuantizeOptions(precision="int8", **SMALL), progress=said.append)
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
    assert plan.precision == "fp8" and plan.requires["compute_capability"] == ["89"]
    assert (out / "trt-rtx" / "unet.plan").stat().st_size > 0


def test_options_refuse_a_precision_that_does_not_quantize_naming_it():
    with pytest.raises(InputError, match="unknown precision 'int3'"):
        QuantizeOptions(precision="int3")
    with pytest.raises(InputError, match=r"--precision fp16 quantizes nothing; quantizing: \['int8', 'fp8'\]"):
        QuantizeOptions(precision="fp16")


def test_int8_engine_builds_for_sm86_from_the_quantized_graph(int8):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[test]')")
    from smartedit.export.trt import BuildOptions

    out, _ = int8
    said = []
    run_export(out, ModelSource(preset="tiny"), precision="int8", target="trt-rtx", graph_names="unet",
               profile=ProfileOptions(**SMALL_PROFILE), quantize=QuantizeOptions(precision="int8", **SMALL),
               target_options=BuildOptions(compute_capabilities=("86",), static_res=()), progress=said.append)
    assert "unet: up to date, skipped" in said  # the quantized ONNX is reused, not quantized again
    plan = Manifest.read(out).entries("trt-rtx")["unet"]
    assert plan.precision == "int8" and plan.requires["compute_capability"] == ["86"]


def test_calibration_edits_take_the_users_images_in_name_order_decoded_once_and_downscaled(tmp_path):
    """Each image the edits use is decoded once and kept at the side the edit reads (here 256 px): an 80-megapixel
    photo costs its decode, then 196 KB, whatever the number of edits."""
    from PIL import Image

    from smartedit.export.quantize import CALIBRATION_INSTRUCTIONS, edit_set

    Image.new("RGB", (64, 48), (0, 0, 255)).save(tmp_path / "b.png")
    Image.new("RGB", (2000, 1500), (255, 0, 0)).save(tmp_path / "a.jpg")
    opts = QuantizeOptions("int8", calibration_images=str(tmp_path), calibration_edits=3)
    with pytest.raises(RunError, match="quantize.prepare comes first"):
        edit_set(opts, 3, CALIBRATION_INSTRUCTIONS, 0)
    loaded = replace(opts, images=calibration_images(opts, 256))
    assert [im.size for im in loaded.images] == [(256, 256), (256, 256)]  # two files, each kept once, downscaled
    pairs = edit_set(loaded, 3, CALIBRATION_INSTRUCTIONS, 0)
    assert [p[0].getpixel((0, 0))[0] > 200 for p in pairs] == [True, False, True]  # a.jpg (red), b.png, a.jpg
    assert pairs[0][0] is pairs[2][0]  # cycled, not decoded again
    assert [p[1] for p in pairs] == list(CALIBRATION_INSTRUCTIONS[:3])


def test_fp8_stage_models_run_their_graph_in_onnx_runtime(fp8_rtx, tmp_path, monkeypatch):
    """--target triton on the FP8 export: Triton's onnxruntime stage asks for BASIC optimisations (level -1), and the
    Python graph model (what the bundled server runs), given the config Triton would pass it, opens and runs the FP8
    graph (ONNX Runtime's default optimisations refuse it)."""
    from google.protobuf import json_format

    from smartedit.export.triton import TritonOptions, graph_model_config
    from smartedit.serve.graph_model import TritonPythonModel

    out = tmp_path / "export"
    shutil.copytree(fp8_rtx[0], out, ignore=shutil.ignore_patterns("trt-rtx"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"].pop("trt-rtx")
    (out / "manifest.json").write_text(json.dumps(manifest))
    said = []
    run_export(out, ModelSource(preset="tiny"), precision="fp8", target="triton", profile=ProfileOptions(**SMALL_PROFILE),
               quantize=QuantizeOptions(precision="fp8", **SMALL), target_options=TritonOptions(graph_models="python"),
               progress=said.append)
    assert "unet: up to date, skipped" in said
    entry = Manifest.read(out).entries("onnx")["unet"]
    assert graph_model_config(entry, "onnx").optimization.graph.level == -1
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    written = text_format.Parse((out / "triton" / "unet" / "config.pbtxt").read_text(), mc.ModelConfig())
    config = json_format.MessageToDict(written, preserving_proto_field_name=True)  # as Triton hands it over
    assert config["parameters"]["precision"]["string_value"] == "fp8"  # its row: ONNX Runtime up to BASIC
    monkeypatch.setenv("SMARTEDIT_GRAPH_KEY", "a key the launcher would draw")  # a graph model answers to it
    stage = TritonPythonModel()
    stage.initialize({"model_config": json.dumps(config), "model_repository": str(out / "triton" / "unet"),
                      "model_version": "1"})
    feed = {t.name: v.numpy() for t, v in zip(entry.spec.inputs, entry.spec.sample_inputs(
        entry.spec.point("opt"), "fp16").values())}
    (eps,) = stage.session.run(None, feed)
    assert np.isfinite(eps).all() and eps.dtype == np.float16


# -- every quantization option refused before any work ---------------------------------------------------------------

PROFILE_FLAGS = ["--max-batch", str(SMALL_PROFILE["max_batch"]), "--max-res", str(SMALL_PROFILE["max_res"]),
                 "--max-prompt", str(SMALL_PROFILE["max_prefix"])]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header: nothing past it is decodable)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _images(*files: tuple[str, object]):
    """A setup making an images folder under the row's folder: (name, PIL image | bytes | None for a folder)."""
    def make(d):
        folder = d / "images"
        folder.mkdir()
        for name, what in files:
            if what is None:
                (folder / name).mkdir()
            elif isinstance(what, bytes):
                (folder / name).write_bytes(what)
            else:
                what.save(folder / name)
        return folder
    return make


def _ok(size=(64, 48)):
    from PIL import Image

    return Image.new("RGB", size, (10, 200, 30))


def _truncated_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]  # the header whole, the scan cut


def _tiff() -> bytes:
    import io

    buf = io.BytesIO()
    _ok().save(buf, "TIFF")
    return buf.getvalue()


def _manifest_edit(change):
    def make(d, out):
        m = json.loads((out / "manifest.json").read_text())
        change(m["artifacts"]["onnx"])
        (out / "manifest.json").write_text(json.dumps(m))
    return make


@dataclass
class Refusal:
    id: str
    argv: list  # after the tiny preset, the profile and --out; {images} is the folder `images` made
    code: int
    says: list[str]  # in the one stderr line
    images: Callable | None = None  # (row folder) -> the images folder
    out: Callable | None = None  # (row folder, out) -> None: changes to the export folder (a copy of the fp16 one)
    fresh_out: bool = False  # --out is a new folder, not the fp16 export
    when: bool = True


def _no_cuda_provider() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" not in onnxruntime.get_available_providers()


INT8 = ["--precision", "int8"]
REFUSALS = [
    Refusal("calibration-steps-5000", [*INT8, "--calibration-steps", "5000"], 2,
            ["--calibration-steps must be an integer from 1 to 1000, got 5000"]),
    Refusal("calibration-steps-0", [*INT8, "--calibration-steps", "0"], 2, ["--calibration-steps", "got 0"]),
    Refusal("calibration-edits-0", [*INT8, "--calibration-edits", "0"], 2,
            ["--calibration-edits must be an integer from 1 to 1000, got 0"]),
    Refusal("calibration-edits-1001", [*INT8, "--calibration-edits", "1001"], 2, ["--calibration-edits", "got 1001"]),
    Refusal("calibration-memory", [*INT8, "--calibration-edits", "1000", "--calibration-steps", "1000"], 2,
            ["--calibration-edits 1000 x --calibration-steps 1000 keeps 1000000 UNet calls", "over the 4 GiB bound",
             "at most"]),
    Refusal("report-edits-0", [*INT8, "--report-edits", "0"], 2, ["--report-edits must be an integer from 1 to 100"]),
    Refusal("report-edits-101", [*INT8, "--report-edits", "101"], 2, ["--report-edits", "got 101"]),
    Refusal("min-psnr-nan", [*INT8, "--min-psnr", "nan"], 2, ["--min-psnr must be a number of dB from 0 to 100",
                                                              "got nan"]),
    Refusal("min-psnr-inf", [*INT8, "--min-psnr", "inf"], 2, ["--min-psnr", "got inf"]),
    Refusal("min-psnr-negative", [*INT8, "--min-psnr=-1"], 2, ["--min-psnr", "got -1.0"]),
    Refusal("min-psnr-101", [*INT8, "--min-psnr", "101"], 2, ["--min-psnr", "got 101.0"]),
    Refusal("calibration-seed-negative", [*INT8, "--calibration-seed=-1"], 2,
            ["--calibration-seed must be an integer in 0..2^63-1, got -1"]),
    Refusal("calibration-seed-overflows", [*INT8, "--calibration-seed", str(2**63 - 1)], 2,
            [f"--calibration-seed {2**63 - 1} + 8 edits passes 2^63-1"]),
    Refusal("fp8-entropy", ["--precision", "fp8", "--calibrator", "entropy"], 2,
            ["--calibrator entropy: --precision fp8 calibrates with max only"]),
    Refusal("option-without-quantizing", ["--calibration-edits", "4", "--min-psnr", "30"], 2,
            ["--calibration-edits, --min-psnr: for --precision int8 or fp8", "--precision fp16"]),
    Refusal("device-tpu", [*INT8, "--device", "tpu"], 2, ["--device 'tpu': quantization calibrates on cpu, cuda"]),
    Refusal("device-cuda-without-the-provider", [*INT8, "--device", "cuda"], 1,
            ["--device cuda: this onnxruntime", "has no CUDA provider", "--device cpu"], when=_no_cuda_provider()),
    Refusal("images-no-such-folder", [*INT8, "--calibration-images", "/nonexistent/photos"], 2,
            ["--calibration-images /nonexistent/photos: no such folder"]),
    Refusal("images-a-file", [*INT8, "--calibration-images", "{images}/a.png"], 2, ["a.png: not a folder"],
            images=_images(("a.png", _ok()))),
    Refusal("images-empty-folder", [*INT8, "--calibration-images", "{images}"], 2, ["images: not a folder holding",
                                                                                    "it is empty"],
            images=_images()),
    Refusal("images-a-text-file", [*INT8, "--calibration-images", "{images}"], 2,
            ["notes.txt is not a PNG, JPEG or WebP image file"],
            images=_images(("a.png", _ok()), ("notes.txt", b"not an image"))),
    Refusal("images-a-subfolder", [*INT8, "--calibration-images", "{images}"], 2,
            ["more is not a PNG, JPEG or WebP image file"], images=_images(("a.png", _ok()), ("more", None))),
    Refusal("images-undecodable", [*INT8, "--calibration-images", "{images}"], 2,
            ["b.png cannot be decoded: not a PNG, JPEG or WebP image"],
            images=_images(("a.png", _ok()), ("b.png", b"\x89PNG garbage" * 10))),
    Refusal("images-truncated-jpeg", [*INT8, "--calibration-images", "{images}"], 2,
            ["cut.jpg cannot be decoded: a damaged image"], images=_images(("cut.jpg", _truncated_jpeg()))),
    Refusal("images-tiff-named-png", [*INT8, "--calibration-images", "{images}"], 2,
            ["t.png cannot be decoded: not a PNG, JPEG or WebP image"], images=_images(("t.png", _tiff()))),
    Refusal("images-decompression-bomb", [*INT8, "--calibration-images", "{images}"], 2,
            ["bomb.png is too large to decode"], images=_images(("bomb.png", _png_header(30000, 30000)))),
    Refusal("images-bad-one-past-the-edits-used", [*INT8, "--calibration-edits", "1", "--calibration-images",
                                                   "{images}"], 2, ["z.png cannot be decoded"],
            images=_images(("a.png", _ok()), ("z.png", b"garbage"))),
    Refusal("graphs-unet-alone-into-an-empty-folder", [*INT8, "--graphs", "unet"], 2,
            ["calibrates on whole edits", "has no onnx ['llava', 'qformer_bim', 'vae_encoder', 'vae_decoder']",
             "--graphs all"], fresh_out=True),
    Refusal("graphs-unet-beside-a-failed-graph", [*INT8, "--graphs", "unet"], 2,
            ["leaves vae_decoder (onnx/vae_decoder failed its check at export"],
            out=_manifest_edit(lambda a: a["vae_decoder"].__setitem__("verified", False))),
    Refusal("graphs-unet-beside-an-fp32-graph", [*INT8, "--graphs", "unet"], 2,
            ["leaves vae_encoder (precision fp32)"],
            out=_manifest_edit(lambda a: a["vae_encoder"]["options"].__setitem__("precision", "fp32"))),
]


def test_the_refusal_table_has_every_option():
    for flag in QuantizeOptions.FLAGS:
        assert any(a.split("=")[0] == flag for r in REFUSALS for a in r.argv), flag
    assert len({r.id for r in REFUSALS}) == len(REFUSALS) >= 30


@pytest.mark.parametrize("row", REFUSALS, ids=[r.id for r in REFUSALS])
def test_bad_quantization_input_is_refused_before_any_work(row, onnx_export, tmp_path, capsys, monkeypatch):
    """One stderr line naming the value, the exit status, no traceback, the export folder byte for byte as it was
    (not even a lock file), and no model loaded: nothing was exported, calibrated or quantized."""
    if not row.when:
        pytest.skip("this machine does not show it")
    from smartedit.export.cli import main
    from smartedit.weights import ModelSource

    out = tmp_path / "out"
    if not row.fresh_out:
        shutil.copytree(onnx_export("fp16"), out)
        if row.out:
            row.out(tmp_path, out)
    images = row.images(tmp_path) if row.images else None
    before = _snapshot(out)

    def loaded(*a, **k):
        raise AssertionError(f"{row.id}: the model was loaded: work started before the refusal")

    monkeypatch.setattr(ModelSource, "load", loaded)
    argv = [a.format(images=images) for a in row.argv]
    code, stdout, err = run_cli(main, ["--preset", "tiny", "--random-weights", *PROFILE_FLAGS, "--out", out, *argv],
                                capsys)
    lines = err.strip().splitlines()
    assert (code, len(lines)) == (row.code, 1), (code, err[-2000:])
    assert lines[0].startswith("smartedit-export: error: ") and "Traceback" not in err
    for s in row.says:
        assert s in lines[0], (s, lines[0])
    assert "exporting" not in stdout and "Model Optimizer" not in stdout
    assert _snapshot(out) == before


def _snapshot(path) -> dict:
    import hashlib

    if not path.exists():
        return {}
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


# -- Ctrl-C inside Model Optimizer's step, a report that fails, external data ---------------------------------------

def test_ctrl_c_inside_model_optimizer_exits_130_and_keeps_the_fp16_entry(onnx_export, tmp_path):
    """A real SIGINT to smartedit-export while Model Optimizer calibrates (inside ONNX Runtime's C++ calls, where it
    once ended in "terminate called" and 134): exit 130, one line, no traceback; the quantizer's process gone; the
    fp16 unet entry intact and loadable; no staging folder, log or temporary file left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from smartedit.engines.artifacts import Artifacts

    out = tmp_path / "out"
    shutil.copytree(onnx_export("fp16"), out)
    tmp = tmp_path / "tmp"  # the export's TMPDIR: temporary graphs left outside OUT would show here
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartedit.export.cli", "--preset", "tiny", "--random-weights", *PROFILE_FLAGS,
         "--precision", "int8", "--calibration-edits", "1", "--calibration-steps", "2", "--report-edits", "1",
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
        # Ctrl-C as a terminal gives it: a pytest started in the background (`cmd &`, nohup) inherits SIGINT
        # ignored, and Python keeps an ignored SIGINT ignored, so the export never saw the signal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    worker, said = None, []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        said.append(line)
        if "Model Optimizer: starting (process " in line:
            worker = int(line.split("(process ")[1].split(")")[0])
        if "Model Optimizer: calibration call 1/" in line:  # inside ONNX Runtime's calibration
            assert proc.poll() is None, "the export ended before the signal: " + "".join(said)[-3000:]
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline and proc.poll() is None, "".join(said)[-3000:]
    else:
        pytest.fail("the export ended before Model Optimizer calibrated:\n" + "".join(said)[-3000:])
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert err.strip().splitlines()[-1:] == ["smartedit-export: error: interrupted"], err[-3000:]
    assert [line for line in err.splitlines() if "error" in line.lower()] == ["smartedit-export: error: interrupted"]
    assert "Traceback" not in err and "terminate called" not in err
    assert worker is not None
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    entry = Artifacts(out, "onnx").entry("unet")  # the fp16 entry as the fp16 export recorded it, its hash checked
    assert entry.verified is True and "quantization" not in entry.options
    assert sorted(p.name for p in (out / "onnx").iterdir()) == sorted(
        p.name for p in (onnx_export("fp16") / "onnx").iterdir())
    assert not list(out.rglob(".*.tmp-*"))
    assert [p.name for p in tmp.iterdir() if p.is_dir() or ".onnx" in p.name] == []  # modelopt's and ORT's own temps


@pytest.fixture(scope="module")
def failed_external(onnx_export, tmp_path_factory):
    """An INT8 export whose fp16 unet and quantized unet are both written with external data (the ONNX export's 2 GB
    rule forced down to 0 bytes), and whose quality report fails (--min-psnr 100: no quantized edit reaches it): -> (folder,
    progress, the error)."""
    import smartedit.export.onnx as onnx_export_module
    from smartedit.errors import ExportError

    out = tmp_path_factory.mktemp("failed_external") / "export"
    shutil.copytree(onnx_export("fp16"), out)
    said = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export_module, "TWO_GB", 0)  # the quantized graph takes external data from its source
        with pytest.raises(ExportError) as failed:
            run_export(out, ModelSource(preset="tiny"), precision="int8", profile=ProfileOptions(**SMALL_PROFILE),
                       quantize=QuantizeOptions(precision="int8", calibration_edits=1, calibration_steps=2,
                                                report_edits=1, min_psnr=100.0), progress=said.append)
    return out, said, str(failed.value)


def test_external_data_moves_with_both_graphs_and_both_run(failed_external):
    """The quantizer reads an fp16 graph with external data and writes the quantized one with it; the fp16 data is
    renamed with its graph (unet.fp16.onnx.data, the graph's references rewritten); every file is in the entry with
    its hash, and both graphs load and run in ONNX Runtime from where they landed."""
    import onnx

    from smartedit.engines.onnxruntime import session

    out, said, _ = failed_external
    m = Manifest.read(out)
    e = m.entries("onnx")["unet"]
    assert sorted(e.files) == ["onnx/unet.fp16.onnx", "onnx/unet.fp16.onnx.data", "onnx/unet.onnx",
                               "onnx/unet.onnx_data"]
    assert m.damaged(e) == [] and not (out / "onnx" / "unet.onnx.data").exists()
    for name, data in (("unet.onnx", "unet.onnx_data"), ("unet.fp16.onnx", "unet.fp16.onnx.data")):
        graph = onnx.load(str(out / "onnx" / name), load_external_data=False)
        locations = {x.value for t in graph.graph.initializer for x in t.external_data if x.key == "location"}
        assert locations == {data}, (name, locations)
        feed = {t.name: v.numpy() for t, v in zip(e.spec.inputs, e.spec.sample_inputs(
            {**e.spec.point("opt"), "B": 1}, "fp16").values())}
        (eps,) = session(out / "onnx" / name).run(None, feed)
        assert np.isfinite(eps).all()
    assert not list(out.rglob(".*.tmp-*"))


def test_a_failed_report_is_recorded_failed_and_never_run(failed_external, test_image, tmp_path, capsys):
    """--min-psnr no edit reaches: the export fails (the message says the entry is recorded as failed), the entry is
    verified false with its report, and smartedit-edit refuses it by name before any graph is opened."""
    from smartedit.cli import edit_cli

    out, said, error = failed_external
    assert "fall below --min-psnr 100 dB" in error and "recorded as failed, which no runner runs" in error
    e = Manifest.read(out).entries("onnx")["unet"]
    assert e.verified is False and e.options["quantization"]["min_psnr"] == 100.0
    report = json.loads((out / "report.json").read_text())["onnx"]["unet"]["quantization"]
    assert report["passed"] is False and 0 < report["worst_psnr_db"] < 100
    test_image.save(tmp_path / "in.png")
    code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--backend", "onnxruntime",
                                      "--artifacts", out, "--image", tmp_path / "in.png", "--instruction",
                                      "make it blue", "--steps", 1, "--out", tmp_path / "o.png"], capsys)
    lines = err.strip().splitlines()
    assert (code, len(lines)) == (2, 1) and "Traceback" not in err, err[-2000:]
    assert "onnx/unet failed its check at export (its quality report fell below --min-psnr" in lines[0]
    assert not (tmp_path / "o.png").exists()


def test_the_quantizer_step_says_its_phase_and_calls_and_a_heartbeat_when_silent(monkeypatch):
    """What the quantizer's process sends (its protocol: one JSON object a line) becomes progress lines: each phase,
    the first and last calibration call (and others at most every CALL_PROGRESS_S), and while it is silent a
    heartbeat naming where it is; its error line is handed back."""
    import os
    import subprocess
    import sys

    import smartedit.export.quantize as q

    monkeypatch.setattr(q, "HEARTBEAT_S", 0.3)
    read, write = os.pipe()
    script = ("import json, os, sys, time\n"
              "out = os.fdopen(int(sys.argv[1]), 'w', buffering=1)\n"
              "for m in ({'phase': 'calibrating'}, {'call': 1, 'calls': 3, 'pass': 1}):\n"
              "    out.write(json.dumps(m) + '\\n')\n"
              "time.sleep(1.2)\n"
              "for m in ({'call': 2, 'calls': 3, 'pass': 1}, {'call': 3, 'calls': 3, 'pass': 1}, {'error': 'X: y'}):\n"
              "    out.write(json.dumps(m) + '\\n')\n"
              "sys.exit(1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(write)], pass_fds=(write,))
    os.close(write)
    said = []
    try:
        error = q._follow(proc, read, said.append)
    finally:
        os.close(read)
    assert error == "X: y" and proc.returncode == 1
    assert said[0].startswith(f"    Model Optimizer: starting (process {proc.pid})")
    assert any("Model Optimizer: calibrating (" in m for m in said)
    assert any("Model Optimizer: calibration call 1/3" in m for m in said)
    assert any("Model Optimizer: still calibrating (call 1/3) (" in m and "s in this step)" in m for m in said)
    assert any("Model Optimizer: calibration call 3/3" in m for m in said)
    assert not any("call 2/3" in m and "calibration call" in m for m in said)  # within CALL_PROGRESS_S of call 1
