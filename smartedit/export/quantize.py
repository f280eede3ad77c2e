"""`--precision` of a quantized row of config.PRECISIONS (int8, fp8): the UNet as a Q/DQ ONNX graph, calibrated
on real edits, with a quality report.

The UNet runs `steps` x 3 CFG branches per edit, so it is the graph quantized; the others stay fp16. Before any
work (`prepare`, called by run_export before the output folder is touched): every option in range, the calibration
inputs' memory bounded (MAX_CALIBRATION_BYTES), every calibration image's header read and the images an edit uses
decoded once and downscaled to what the edit reads (the profile's opt resolution, at least the vision tower's side),
the device's ONNX Runtime provider and Model Optimizer present. Then, after the fp16 ONNX export of every graph:

1. calibration: `edits` whole edits through the fp16 ONNX graphs (ONNX Runtime on the export's --device, `steps`
   steps each, at the profile's opt resolution, batch 1), every UNet call's inputs kept: every timestep of the
   schedule, the three CFG branches (the CFG batch is one UNet input) and the BIM residual of each edit;
2. NVIDIA Model Optimizer's ONNX quantizer (`modelopt.onnx.quantization.quantize`, calibrating in ONNX Runtime on the
   same device) writes the Q/DQ graph: Conv and MatMul weights per channel, activations per tensor, in the row's
   quantize_mode with one of its calibrators (INT8: entropy or max; FP8 E4M3: max); the non-quantized parts fp16,
   inputs and outputs fp16 as before; external data when the fp16 graph has it or the graph passes protobuf's 2 GB.
   Kept in fp16 by name (`KEPT_HIGH`): the time embedding, `conv_in` (which the BIM residual is added to), the first
   resnet conv the sum feeds, `conv_out` and the shortcut convs. It runs in a process of its own (quantizer.py), in a
   scratch folder beside OUT/onnx/unet.onnx with its temporary files there too: its phases and each calibration call
   come back over a pipe as progress lines (a heartbeat when it is silent), and Ctrl-C or any failure kills it and
   removes the folder, so nothing it half-wrote is left, and the fp16 entry stays as it was until the quantized graph
   is done;
3. the quality report: `report_edits` fixed edits (fixed seeds, prompts and drawn images, none from the calibration
   set) with the fp16 UNet and with the quantized one, the other graphs the same: PSNR and SSIM of the final images,
   and each step's eps error of the quantized UNet on the fp16 edit's own inputs. Below `min_psnr` the export fails
   and the entry is recorded as failed (verified false), which no runner runs.

OUT/onnx/unet.onnx is the quantized graph; the fp16 graph it came from stays as OUT/onnx/unet.fp16.onnx (both in
the entry, hashed, with their external data files), so smartedit-verify can run the quality report again. The
entry's precision is the quantized one (its row gives the fp16 inputs and outputs); `options.quantization` records
the calibration and the layers kept in fp16.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from smartedit.config import MAX_SEED, PRECISIONS, QUANTIZED_PRECISIONS, Precision, check_seed, precision_named
from smartedit.engines.artifacts import Artifacts
from smartedit.engines.onnxruntime import OnnxRuntimeRunner, session
from smartedit.errors import ExportError, InputError, RunError, UnavailableError
from smartedit.files import IMAGE_FORMATS, move_into_place, open_image, scratch_folder
from smartedit.graphs import DENOISER, GRAPH_NAMES, GraphRunner, graph_with_role
from smartedit.graphs.manifest import Entry
from smartedit.graphs.spec import GraphSpec
from smartedit.pipeline import SmartEditPipeline
from smartedit.scheduler import MAX_STEPS
from smartedit.vision import to_rgb

CALIBRATORS = tuple(dict.fromkeys(c for n in QUANTIZED_PRECISIONS for c in PRECISIONS[n].calibrators))
QUANTIZING = "/".join(QUANTIZED_PRECISIONS)  # the flags' help: "int8/fp8"
MODELOPT_VERSION = "0.47.0"
# Module paths (read through each node's weight name: the exported node names are generic) kept in fp16
KEPT_HIGH = re.compile(r"\.(time_embedding|conv_in|conv_out|time_emb_proj|conv_shortcut)\.|"
                       r"\.down_blocks\.0\.resnets\.0\.conv1\.")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_CALIBRATION_EDITS = 1000
MAX_REPORT_EDITS = 100
MAX_PSNR_DB = 100.0  # 8-bit images that differ by one level in one pixel of 256x256 score 101 dB
# The calibration inputs are kept in host memory and written once for the quantizer's process: a 7b UNet call at
# 256 px is 0.57 MB (1.6 MB at 512 px), so the defaults keep 46 MB; this bound refuses what would not fit.
MAX_CALIBRATION_BYTES = 4 << 30
EXTERNAL_DATA_BYTES = int(0.9 * (1 << 31))  # protobuf's 2 GB limit, with the headroom the ONNX export uses
HEARTBEAT_S = 30.0  # the longest the quantizer's step stays silent
CALL_PROGRESS_S = 10.0  # calibration calls are reported at most this often (and the first and the last)

# Calibration instructions (edits of the kinds SmartEdit is trained on: colour, object, style, count, position) and
# the quality report's own, disjoint from them.
CALIBRATION_INSTRUCTIONS = (
    "make it blue", "turn the sky red", "remove the person on the left", "add a hat to the dog",
    "make it look like winter", "change the car to green", "make the photo black and white", "add sunglasses",
    "replace the apple with an orange", "make it night time", "turn the grass into sand", "add snow on the roof",
    "make the cat orange", "remove the tree", "make it a watercolor painting", "add a rainbow in the sky",
    "change the season to autumn", "make the water purple", "add two birds", "remove the text",
    "make the wall brick", "turn the house into a castle", "make it foggy", "add flowers in the vase",
    "change the shirt to striped", "make the image brighter", "put a boat on the lake", "remove the shadow",
    "make the leaves yellow", "turn day into sunset", "add a moon", "make it look like a sketch",
)
REPORT_INSTRUCTIONS = ("make the door red", "add a cloud above the building", "remove the cup on the table",
                       "make it look like spring", "change the ball to a cube", "make the road wet")


@dataclass(frozen=True)
class QuantizeOptions:
    """How the UNet is quantized, calibrated and judged (smartedit-export's --calibration-* / --min-psnr flags, and
    its --device); every value checked at construction, the images and the machine by `prepare`."""

    FLAGS = {
        "--calibration-edits": dict(dest="calibration_edits", type=int, default=8,
                                    help=f"{QUANTIZING}: calibration edits run through the fp16 graphs (every step's "
                                         f"UNet inputs are kept), 1 to {MAX_CALIBRATION_EDITS}"),
        "--calibration-steps": dict(dest="calibration_steps", type=int, default=10,
                                    help=f"{QUANTIZING}: denoising steps of each calibration and report edit, 1 to "
                                         f"{MAX_STEPS}"),
        "--calibration-seed": dict(dest="calibration_seed", type=int, default=0,
                                   help=f"{QUANTIZING}: seed of the calibration edits (noise, template, drawn images)"),
        "--calibration-images": dict(dest="calibration_images", default=None, metavar="DIR",
                                     help=f"{QUANTIZING}: a folder of PNG/JPEG/WebP images only, used in name order "
                                          "(default: images drawn from the seed; real photos calibrate a trained "
                                          "model better)"),
        "--calibrator": dict(dest="calibrator", choices=list(CALIBRATORS), default=None,
                             help="Model Optimizer's activation calibrator, the precision's first by default: "
                                  + "; ".join(f"{n}: {', '.join(PRECISIONS[n].calibrators)}"
                                              for n in QUANTIZED_PRECISIONS)),
        "--min-psnr": dict(dest="min_psnr", type=float, default=20.0, metavar="DB",
                           help=f"{QUANTIZING}: the export fails when a report edit's PSNR against the fp16 edit is "
                                "below this, 0 to 100 (20 dB catches a broken graph: black or noise images score "
                                "5-12 dB; raise it for a trained model once its report says what it reaches)"),
        "--report-edits": dict(dest="report_edits", type=int, default=4,
                               help=f"{QUANTIZING}: fixed edits of the quality report (seeds 0..N-1), 1 to "
                                    f"{MAX_REPORT_EDITS}"),
    }

    precision: Precision  # a quantized row of config.PRECISIONS (its name is taken too)
    calibration_edits: int = 8
    calibration_steps: int = 10
    calibration_seed: int = 0
    calibration_images: str | None = None
    calibrator: str | None = None  # None: the precision's first calibrator
    min_psnr: float = 20.0
    report_edits: int = 4
    device: str = "cpu"  # the export's --device: the calibration and report edits and Model Optimizer's calibration
    images: tuple = field(default=(), compare=False, repr=False)  # `prepare`: the calibration images, downscaled

    def __post_init__(self) -> None:
        p = precision_named(self.precision) if isinstance(self.precision, str) else self.precision
        if not p.quantized:
            raise InputError(f"--precision {p.name} quantizes nothing; quantizing: {list(QUANTIZED_PRECISIONS)}")
        object.__setattr__(self, "precision", p)
        for flag, v, top in (("--calibration-edits", self.calibration_edits, MAX_CALIBRATION_EDITS),
                             ("--calibration-steps", self.calibration_steps, MAX_STEPS),
                             ("--report-edits", self.report_edits, MAX_REPORT_EDITS)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise InputError(f"{flag} must be an integer from 1 to {top}, got {v!r}")
        check_seed(self.calibration_seed, "--calibration-seed")
        if self.calibration_seed > MAX_SEED - self.calibration_edits:  # edit i is seeded calibration_seed + i
            raise InputError(f"--calibration-seed {self.calibration_seed} + {self.calibration_edits} edits passes "
                             "2^63-1 (edit i takes seed + i): use a smaller seed")
        calibrator = self.calibrator or p.calibrators[0]
        if calibrator not in CALIBRATORS:
            raise InputError(f"--calibrator must be one of {list(CALIBRATORS)}, got {self.calibrator!r}")
        if calibrator not in p.calibrators:
            raise InputError(f"--calibrator {calibrator}: --precision {p.name} calibrates with "
                             f"{' or '.join(p.calibrators)} only")
        object.__setattr__(self, "calibrator", calibrator)
        m = self.min_psnr
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= MAX_PSNR_DB:  # NaN fails too
            raise InputError(f"--min-psnr must be a number of dB from 0 to {MAX_PSNR_DB:g}, got {m!r}")
        try:
            kind = torch.device(self.device).type
        except (RuntimeError, TypeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise InputError(f"--device {self.device!r}: quantization calibrates on cpu, cuda or cuda:N")
        if self.calibration_images is not None:
            _image_files(Path(self.calibration_images))  # the folder's listing now; its images in `prepare`

    @classmethod
    def from_flags(cls, precision: Precision, a) -> "QuantizeOptions":
        """The options of parsed flags; a flag left at None takes the default here."""
        given = {kw["dest"]: getattr(a, kw["dest"]) for kw in cls.FLAGS.values()
                 if getattr(a, kw["dest"], None) is not None}
        return cls(precision=precision, device=getattr(a, "device", None) or "cpu", **given)

    @property
    def record(self) -> dict[str, Any]:
        """What the manifest keeps (and the entry's key hashes): the images folder by name, not by path; not the
        precision (the entry's own) nor the device (it changes how fast, not what)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("precision", "images", "device")}
        d["calibration_images"] = Path(self.calibration_images).name if self.calibration_images else None
        return d


def _image_files(folder: Path) -> list[Path]:
    """The images of a --calibration-images folder in name order; InputError naming the folder, or the first entry
    that is not a PNG/JPEG/WebP file by its name (hidden files are skipped)."""
    flag = "--calibration-images"
    if not folder.is_dir():
        raise InputError(f"{flag} {folder}: " + ("not a folder" if folder.exists() else "no such folder"))
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    other = [p for p in entries if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)]
    if other:
        raise InputError(f"{flag} {folder}: {other[0].name} is not a PNG, JPEG or WebP image file (the folder holds "
                         "only the images to calibrate on)")
    if not entries:
        raise InputError(f"{flag} {folder}: not a folder holding PNG, JPEG or WebP images (it is empty)")
    return entries


def _check_header(path: Path) -> None:
    """The image's header (format and size, within PIL's decompression-bomb limit), without decoding it."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            img.size  # noqa: B018  (the header is read by open)
    except Image.DecompressionBombError as e:
        raise InputError(f"--calibration-images {path} is too large to decode ({e})") from None
    except (PermissionError, IsADirectoryError) as e:
        raise InputError(f"--calibration-images {path} cannot be read ({e.strerror})") from None
    except Exception:  # PIL raises many types for data it cannot identify
        raise InputError(f"--calibration-images {path} cannot be decoded: not a PNG, JPEG or WebP image") from None


def calibration_images(opts: QuantizeOptions, side: int) -> tuple[Image.Image, ...]:
    """The images the calibration edits read: every file's header checked, the first `calibration_edits` in name
    order decoded once each (within PIL's decompression-bomb limit, as the edit command), turned upright and RGB,
    and resized to side x side (what the edit resizes to anyway): only those small copies are kept."""
    if opts.calibration_images is None:
        return ()
    files = _image_files(Path(opts.calibration_images))
    for f in files:
        _check_header(f)
    kept = []
    for f in files[:opts.calibration_edits]:
        img = open_image(f, "--calibration-images")
        small = to_rgb(ImageOps.exif_transpose(img)).resize((side, side), Image.Resampling.BICUBIC)
        img.close()
        kept.append(small)
    return tuple(kept)


def calibration_point(spec: GraphSpec) -> dict[str, int]:
    """The unet's dims in a calibration call: the profile's opt size, one image (its three CFG branches)."""
    return {**spec.point("opt"), **({"B": 1} if "B" in spec.dims else {})}


def call_bytes(spec: GraphSpec) -> int:
    """The bytes of one UNet call's inputs as calibration keeps them (fp16 floats)."""
    point = calibration_point(spec)
    return sum(math.prod(spec.shape(t, point)) * torch.empty((), dtype=t.torch_dtype("fp16")).element_size()
               for t in spec.inputs)


def providers(device: str) -> list:
    """ONNX Runtime's providers for `device`: cuda needs onnxruntime's CUDA provider (UnavailableError naming it
    otherwise: calibrating a 7b UNet on a GPU machine's CPU would take hours)."""
    d = torch.device(device)
    if d.type == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UnavailableError(f"--device {device}: this onnxruntime ({ort.__version__}) has no CUDA provider "
                               f"(it has {ort.get_available_providers()}): install onnxruntime-gpu, or calibrate on "
                               "--device cpu")
    return [("CUDAExecutionProvider", {"device_id": d.index or 0}), "CPUExecutionProvider"]


def prepare(opts: QuantizeOptions, spec: GraphSpec, resolution: int, vision_side: int) -> QuantizeOptions:
    """Everything checked before any work, and the calibration images loaded: Model Optimizer present, the device's
    provider, the calibration inputs within MAX_CALIBRATION_BYTES, every image readable. `spec`: the unet's;
    `resolution`: the edits' (the profile's opt); `vision_side`: the vision tower's input side."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as e:
        raise UnavailableError(f"--precision {opts.precision.name} needs NVIDIA Model Optimizer's ONNX quantizer "
                               f"({e}): pip install -e '.[quantize]'") from None
    providers(opts.device)
    calls = opts.calibration_edits * opts.calibration_steps
    need = calls * call_bytes(spec)
    if need > MAX_CALIBRATION_BYTES:
        most = MAX_CALIBRATION_BYTES // call_bytes(spec)
        raise InputError(f"--calibration-edits {opts.calibration_edits} x --calibration-steps "
                         f"{opts.calibration_steps} keeps {calls} UNet calls, {need / 2**30:.1f} GiB at the profile's "
                         f"opt size, over the {MAX_CALIBRATION_BYTES >> 30} GiB bound: at most {most} calls here")
    return replace(opts, images=calibration_images(opts, max(resolution, vision_side)))


def drawn_image(seed: int, size: int = 256) -> Image.Image:
    """A deterministic test picture: a smooth colour field with a few shapes (calibration without user images)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        x1, y1 = x0 + int(rng.integers(size // 8, size // 3)), y0 + int(rng.integers(size // 8, size // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img


def edit_set(opts: QuantizeOptions, n: int, instructions: tuple[str, ...], seed: int) -> list[tuple[Image.Image, str]]:
    """n (image, instruction) pairs: the calibration images `prepare` loaded (cycled), or pictures drawn from the
    seed."""
    if opts.calibration_images and not opts.images:
        raise RunError("the calibration images were not loaded: quantize.prepare comes first")
    return [(opts.images[i % len(opts.images)] if opts.images else drawn_image(seed + i),
             instructions[i % len(instructions)]) for i in range(n)]


class _Recorder:
    """A runner that passes every call to `inner` and keeps the inputs of `graph`'s calls as the graph takes them
    (numpy, in its dtypes at `precision`)."""

    def __init__(self, inner: GraphRunner, graph: str, precision: str):
        self.inner, self.graph, self.precision = inner, graph, precision
        self.name, self.fold_cfg, self.specs = inner.name, inner.fold_cfg, inner.specs
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if graph == self.graph:
            self.calls.append({t.name: inputs[t.name].detach().to("cpu", t.torch_dtype(self.precision)).numpy()
                               for t in self.specs[graph].inputs})
        return self.inner.run(graph, inputs)


class _Swapped:
    """A runner whose `graph` runs in `main` (an ONNX Runtime session of the fp16 or the quantized UNet), the rest as
    `inner`; with `other`, each call of `graph` also runs there on the same inputs and the relative L2 error of
    `other`'s output is kept (the per-step eps error of the quantized UNet on the fp16 edit's own inputs)."""

    def __init__(self, inner: OnnxRuntimeRunner, graph: str, main, other=None):
        self.inner, self.graph = inner, graph
        self.name, self.fold_cfg, self.specs = inner.name, inner.fold_cfg, inner.specs
        self._session, self._other = main, other
        self.step_errors: list[float] = []
        self.finite = True

    def _call(self, sess, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
        spec = self.specs[self.graph]
        feed = {t.name: inputs[t.name].detach().to("cpu", t.torch_dtype("fp16")).numpy() for t in spec.inputs}
        return sess.run([t.name for t in spec.outputs], feed)

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if graph != self.graph:
            return self.inner.run(graph, inputs)
        spec = self.specs[graph]
        outs = self._call(self._session, inputs)
        if self._other is not None:
            ref, got = outs[0].astype(np.float64), self._call(self._other, inputs)[0].astype(np.float64)
            self.finite &= bool(np.isfinite(got).all())
            self.step_errors.append(float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)))
        device = next(iter(inputs.values())).device
        return {t.name: torch.from_numpy(o).to(device) for t, o in zip(spec.outputs, outs)}


def kept_high(onnx_path: Path) -> list[str]:
    """The Conv/Gemm/MatMul nodes whose weights belong to a KEPT_HIGH module, by node name."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and any(KEPT_HIGH.search(i) for i in n.input)]


def _external_files(src: Path) -> list[Path]:
    """The external data files an ONNX file refers to (beside it)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    names = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return [src.parent / n for n in sorted(names)]


def modelopt_quantize(src: Path, work: Path, mode: str, calib: dict[str, np.ndarray], shapes: str,
                      exclude: list[str], calibrator: str, device: str, log: Path,
                      progress: Callable[[str], None], external: bool | None = None) -> Path:
    """Model Optimizer's quantizer on `src` in a process of its own, everything it writes inside the folder `work`
    (its input copy, its temporary files, the output); its printed output into `log`, which is written in `work`
    and moved to `log` once the process has ended (not when it is killed). -> the quantized .onnx (its external
    data beside it, `<name>_data`). Its phases and calibration calls come back as progress lines, with a heartbeat
    every HEARTBEAT_S; an exception here (Ctrl-C included) kills the process at once. `external`: external data for
    the output (default: when `src` has it or is over EXTERNAL_DATA_BYTES)."""
    inp, out, tmp = work / "in", work / "out", work / "tmp"
    for d in (inp, out, tmp):
        d.mkdir()
    shutil.copyfile(src, inp / src.name)  # a copy: modelopt rewrites its input in place (shape inference)
    data = _external_files(src)
    for f in data:  # copied too: onnx refuses external data with several hard links
        shutil.copyfile(f, inp / f.name)
    if external is None:
        external = bool(data) or src.stat().st_size > EXTERNAL_DATA_BYTES
    arrays = {}
    for i, (name, value) in enumerate(calib.items()):
        np.save(work / f"calib-{i}.npy", value)
        arrays[name] = str(work / f"calib-{i}.npy")
    # WAR: modelopt names its intermediate graphs path.replace(".onnx", "_named.onnx") on the whole path, so the
    # graphs are named relative to `work` (its working folder), where only the file name holds ".onnx"
    job = {"src": f"in/{src.name}", "dst": f"out/{src.name}", "mode": mode, "arrays": arrays,
           "calls": int(next(iter(calib.values())).shape[0]), "shapes": shapes,
           "exclude": [f"^{re.escape(n)}$" for n in exclude], "calibrator": calibrator,
           "eps": ["cpu"] if torch.device(device).type == "cpu" else [f"cuda:{torch.device(device).index or 0}"],
           "external": external}
    (work / "job.json").write_text(json.dumps(job))
    read, write = os.pipe()
    printing = work / log.name
    try:
        with open(printing, "wb") as printed:
            proc = subprocess.Popen([sys.executable, "-m", "smartedit.export.quantizer", str(work / "job.json"),
                                     str(write)], cwd=work, stdin=subprocess.DEVNULL, stdout=printed,
                                    stderr=subprocess.STDOUT, pass_fds=(write,), start_new_session=True,
                                    env={**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"})
        os.close(write)
        write = -1
        try:
            error = _follow(proc, read, progress)
        except BaseException:  # Ctrl-C (KeyboardInterrupt) or a failure here: the process goes at once
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    move_into_place(printing, log)
    if proc.returncode != 0:
        why = error or (f"its process was killed by signal {-proc.returncode} (out of memory?)"
                        if proc.returncode < 0 else f"its process exited with status {proc.returncode}")
        raise ExportError(f"Model Optimizer could not quantize {src.name} ({why}); its log: {log}")
    if not (out / src.name).is_file():
        raise ExportError(f"Model Optimizer wrote no {src.name}; its log: {log}")
    return out / src.name


def _follow(proc: subprocess.Popen, read: int, progress: Callable[[str], None]) -> str | None:
    """Print the quantizer's progress lines until it closes the pipe and exits; -> its error line, if it sent one."""
    t0 = last = time.monotonic()
    phase, error, pending = "starting", None, b""
    progress(f"    Model Optimizer: {phase} (process {proc.pid}) ...")
    while True:
        ready, _, _ = select.select([read], [], [], max(0.0, HEARTBEAT_S - (time.monotonic() - last)))
        now = time.monotonic()
        if not ready:
            progress(f"    Model Optimizer: still {phase} ({now - t0:.0f} s in this step)")
            last = now
            continue
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if "error" in msg:
                error = msg["error"]
            elif "phase" in msg:
                phase = msg["phase"]
                progress(f"    Model Optimizer: {phase} ({now - t0:.0f} s)")
                last = now
            elif "call" in msg:
                done, total = msg["call"], msg["calls"]
                phase = f"calibrating (call {done}/{total}{', pass ' + str(msg['pass']) if msg['pass'] > 1 else ''})"
                if done in (1, total) or now - last >= CALL_PROGRESS_S:
                    progress(f"    Model Optimizer: calibration call {done}/{total}"
                             f"{' (pass ' + str(msg['pass']) + ')' if msg['pass'] > 1 else ''} ({now - t0:.0f} s)")
                    last = now
    proc.wait()
    return error


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def quality(pipe: SmartEditPipeline, base: OnnxRuntimeRunner, graph: str, fp16: Path, quantized: Path,
            opts: QuantizeOptions, resolution: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """The quantized graph's edits against the fp16 graph's at fixed seeds, prompts and images (see the module)."""
    from skimage.metrics import structural_similarity

    fp16_graph = session(fp16, base.providers)  # both opened once for every edit
    quantized_graph = session(quantized, base.providers, basic=opts.precision.onnxruntime_basic)
    edits, per_step = [], []
    report_set = [(drawn_image(10_000 + i), REPORT_INSTRUCTIONS[i % len(REPORT_INSTRUCTIONS)])
                  for i in range(opts.report_edits)]  # drawn, never the user's: smartedit-verify redraws them
    for i, (image, text) in enumerate(report_set):
        kw = dict(steps=opts.calibration_steps, resolution=resolution, seed=i)
        pipe.runner = _Swapped(base, graph, fp16_graph, other=quantized_graph)
        want = np.asarray(pipe(image, text, **kw))
        per_step.append(pipe.runner.step_errors)
        finite = pipe.runner.finite
        pipe.runner = _Swapped(base, graph, quantized_graph)
        try:
            got = np.asarray(pipe(image, text, **kw))
        except RunError:  # non-finite latents or image: refused as everywhere
            got, finite = None, False
        row = {"seed": i, "instruction": text, "finite": finite,
               "psnr_db": _psnr(want, got) if got is not None else None,
               "ssim": float(structural_similarity(want, got, channel_axis=2, data_range=255))
               if got is not None else None}
        edits.append(row)
        progress(f"    quality edit {i + 1}/{opts.report_edits} ({text!r}): "
                 + (f"PSNR {row['psnr_db']:.1f} dB, SSIM {row['ssim']:.4f}" if got is not None else "NOT FINITE"))
    steps = np.array(per_step)  # [edits, steps * calls per step]
    worst = min((e["psnr_db"] for e in edits if e["psnr_db"] is not None), default=None)
    passed = all(e["finite"] for e in edits) and worst is not None and worst >= opts.min_psnr
    return {"passed": passed, "min_psnr_db": opts.min_psnr, "worst_psnr_db": worst,
            "worst_ssim": min((e["ssim"] for e in edits if e["ssim"] is not None), default=None),
            "steps": opts.calibration_steps, "resolution": resolution,
            "eps_rel_error_per_step": [float(v) for v in steps.mean(0)] if steps.size else [],
            "eps_rel_error_max": float(steps.max()) if steps.size else None, "edits": edits,
            "reference": "the same edit with the fp16 UNet graph (onnx/unet.fp16.onnx), other graphs the same"}


def options_of(entry: Entry) -> QuantizeOptions | None:
    """The QuantizeOptions an entry was quantized with (None: not quantized)."""
    if not PRECISIONS[entry.precision].quantized:
        return None
    q = entry.options["quantization"]
    fields = {k: q[k] for k in QuantizeOptions.__dataclass_fields__
              if k in q and k not in ("precision", "images", "device")}
    return QuantizeOptions(precision=entry.precision, **{**fields, "calibration_images": None})


def verify_quality(out: Path, source, entry: Entry, progress: Callable[[str], None]) -> dict[str, Any]:
    """smartedit-verify's check of a quantized onnx entry: its quality report again, against the fp16 graph kept
    beside it, with the options and threshold it was exported with."""
    opts = options_of(entry)
    arts = Artifacts(out, "onnx")
    main, fp16 = arts.file(entry.graph, ".onnx"), out / "onnx" / f"{entry.graph}.fp16.onnx"
    if f"onnx/{fp16.name}" not in entry.files:
        raise ExportError(f"the quantized {entry.graph} entry lists no {fp16.name}: re-run the export")
    pipe = SmartEditPipeline.from_weights(source.load("cpu", torch.float32, only=[]))
    resolution = entry.options["quantization"]["calibration_resolution"]
    return quality(pipe, OnnxRuntimeRunner(arts), entry.graph, fp16, main, opts, resolution, progress)


def produce(job, opts: QuantizeOptions) -> None:
    """Quantize the graph the export marks (the per-step UNet) after every fp16 ONNX graph is there; see the module.
    `opts` come from `prepare` (run_export calls it before any work)."""
    graph = graph_with_role(DENOISER)
    entries = job.manifest.entries("onnx")
    missing = [g for g in GRAPH_NAMES if g not in entries]
    if missing:  # run_export refuses this before any work; here it would be a bug
        raise ExportError(f"--precision {opts.precision.name} calibrates on whole edits: the onnx export lacks "
                          f"{missing}")
    fp16_entry = entries[graph]
    folder = job.out / "onnx"
    main, kept = folder / f"{graph}.onnx", folder / f"{graph}.fp16.onnx"
    t0 = time.perf_counter()
    job._pipe = None  # the exported PyTorch model is not needed again: its memory goes before calibration
    _release_memory()
    pipe = SmartEditPipeline.from_weights(job.source.load("cpu", torch.float32, only=[]))
    base = OnnxRuntimeRunner(Artifacts(job.out, "onnx"), providers(opts.device))
    resolution = job.profile.opt_res
    job.progress(f"[{graph}] {opts.precision.name}: {opts.calibration_edits} calibration edits through the fp16 graphs "
                 f"({opts.calibration_steps} steps, {resolution} px, ONNX Runtime on {opts.device}) ...")
    recorder = _Recorder(base, graph, fp16_entry.precision)
    pipe.runner = recorder
    for i, (image, text) in enumerate(edit_set(opts, opts.calibration_edits, CALIBRATION_INSTRUCTIONS,
                                               opts.calibration_seed)):
        pipe(image, text, steps=opts.calibration_steps, resolution=resolution, seed=opts.calibration_seed + i)
    calls = recorder.calls
    pipe.runner = recorder = base = None  # the calibration's sessions (the fp16 unet's among them) go before the step
    _release_memory()
    shapes = ",".join(f"{k}:{'x'.join(str(d) for d in v.shape)}" for k, v in calls[0].items())
    calib = {}
    for k in list(calls[0]):  # one input at a time: the calls' memory is not held twice
        calib[k] = np.stack([c.pop(k) for c in calls])
    job.progress(f"    {len(calls)} UNet calls kept ({sum(v.nbytes for v in calib.values()) / 1e6:.0f} MB) "
                 f"in {time.perf_counter() - t0:.1f} s")
    exclude = kept_high(main)
    calibrator = opts.calibrator
    with scratch_folder(folder / graph) as work:  # .unet.tmp-*: no ".onnx" in the quantizer's paths (see above)
        t1 = time.perf_counter()
        mode = opts.precision.quantize_mode
        job.progress(f"    Model Optimizer {mode} ({calibrator} calibrator, {len(calls)} calls on {opts.device}), "
                     f"{len(exclude)} layers kept in fp16 ...")
        quantized = modelopt_quantize(main, work, mode, calib, shapes, exclude, calibrator, opts.device,
                                      folder / f"{graph}.quantize.log", job.progress)
        del calib
        quantize_s = time.perf_counter() - t1
        job.progress(f"    quantized in {quantize_s:.1f} s; quality report: {opts.report_edits} fixed edits ...")
        base = OnnxRuntimeRunner(Artifacts(job.out, "onnx"), providers(opts.device))  # its unet is never opened
        report = quality(pipe, base, graph, main, quantized, opts, resolution, job.progress)
        # the fp16 entry goes only now, and the files move in: nothing runs an entry whose files are moving
        job.forget("onnx", graph)
        fp16_files = _keep_fp16(main, kept, work)
        for f in [*_external_files(quantized), quantized]:  # data first, the graph last
            move_into_place(f, folder / f.name)
    rels = [f"onnx/{main.name}", *(f"onnx/{f.name}" for f in _external_files(main)), *fp16_files]
    settings = {**opts.record, "kept_fp16": exclude, "kept_fp16_modules": KEPT_HIGH.pattern,
                "tool": f"nvidia-modelopt {MODELOPT_VERSION} (modelopt.onnx.quantization)",
                "calibration_calls": len(calls), "calibration_resolution": resolution,
                "calibration_device": opts.device}
    options = {**job.entry_options(graph), "quantization": settings}  # the precision: the quantized one
    entry = Entry("onnx", graph, job.key(graph), fp16_entry.spec, options,
                  {rel: job.manifest.file_record(rel) for rel in rels},
                  record={**fp16_entry.record, "quantize_s": quantize_s})
    entry.verified = report["passed"]
    job.record(entry, {**job.report.get("onnx", {}).get(graph, {}), "quantization": report})
    job.progress(f"    worst PSNR {report['worst_psnr_db']} dB, SSIM {report['worst_ssim']}, eps error max "
                 f"{report['eps_rel_error_max']}: {'PASS' if report['passed'] else 'FAIL'} (--min-psnr "
                 f"{opts.min_psnr:g})")
    if not report["passed"]:
        raise ExportError(f"the {opts.precision.name} UNet's edits fall below --min-psnr {opts.min_psnr:g} dB "
                          f"against the fp16 edits (worst {report['worst_psnr_db']}): recorded as failed, which no "
                          f"runner runs; see {job.out / 'report.json'}")


def _release_memory() -> None:
    """Collect garbage and hand the freed heap back to the system (glibc keeps it otherwise), so that Model
    Optimizer's process, which holds about 9x the fp16 graph (16 GB at the 7b UNet's 1.7 GB), has it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _keep_fp16(main: Path, kept: Path, work: Path) -> list[str]:
    """Move the fp16 graph `main` to `kept` (unet.onnx -> unet.fp16.onnx), its external data renamed with it
    (<kept>.data, the graph's references rewritten). -> the moved files, relative to OUT."""
    import onnx

    data = _external_files(main)
    if not data:
        move_into_place(main, kept)
        return [f"onnx/{kept.name}"]
    model = onnx.load(str(main), load_external_data=False)
    new = f"{kept.name}.data"
    if len(data) > 1:
        raise ExportError(f"{main} keeps its weights in {len(data)} files; the ONNX export writes one")
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = new
    onnx.save(model, str(work / kept.name))  # the graph only: its data stays where it is
    move_into_place(data[0], kept.with_name(new))
    move_into_place(work / kept.name, kept)
    main.unlink()
    return [f"onnx/{new}", f"onnx/{kept.name}"]

