"""`--precision int8 | fp8`: the UNet as a Q/DQ ONNX graph, calibrated on real edits, with a quality report.

The UNet runs `steps` x 3 CFG branches per edit, so it is the graph quantized; the others stay fp16. After the fp16
ONNX export of every graph:

1. calibration: `edits` whole edits through the fp16 ONNX graphs (ONNX Runtime, `steps` steps each, at the profile's
   opt resolution, batch 1), every UNet call's inputs kept: every timestep of the schedule, the three CFG branches
   (the CFG batch is one UNet input) and the BIM residual of each edit;
2. NVIDIA Model Optimizer's ONNX quantizer (`modelopt.onnx.quantization.quantize`, calibrated in ONNX Runtime on the
   CPU) writes the Q/DQ graph: Conv and MatMul weights per channel, activations per tensor, INT8 (entropy or max
   calibrator) or FP8 E4M3; the non-quantized parts fp16, inputs and outputs fp16 as before. Kept in fp16 by name
   (`KEPT_HIGH`): the time embedding, `conv_in` (which the BIM residual is added to), the first resnet conv the sum
   feeds, `conv_out` and the shortcut convs;
3. the quality report: `report_edits` fixed edits (fixed seeds, prompts and drawn images, none from the calibration
   set)
   with the fp16 UNet and with the quantized one, the other graphs the same: PSNR and SSIM of the final images, and
   each step's eps error of the quantized UNet on the fp16 edit's own inputs. Below `min_psnr` the export fails.

OUT/onnx/unet.onnx is the quantized graph; the fp16 graph it came from stays as OUT/onnx/unet.fp16.onnx (both in
the entry, hashed), so smartedit-verify can run the quality report again. The entry's precision stays "fp16" (its
inputs' and outputs' dtype); `options.quantization` records the mode, the calibration and the layers kept in fp16.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from smartedit.engines.artifacts import Artifacts
from smartedit.engines.onnxruntime import OnnxRuntimeRunner, session
from smartedit.errors import ExportError, InputError, RunError
from smartedit.files import move_into_place, open_image, scratch_folder
from smartedit.graphs import GRAPH_NAMES, GRAPHS, GraphRunner
from smartedit.graphs.manifest import Entry
from smartedit.pipeline import SmartEditPipeline

MODES = ("int8", "fp8")
CALIBRATORS = ("entropy", "max")  # what modelopt's ONNX path has for INT8 (no SmoothQuant, no percentile)
MODELOPT_VERSION = "0.47.0"
# Module paths (read through each node's weight name: the exported node names are generic) kept in fp16
KEPT_HIGH = re.compile(r"\.(time_embedding|conv_in|conv_out|time_emb_proj|conv_shortcut)\.|"
                       r"\.down_blocks\.0\.resnets\.0\.conv1\.")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

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
    """How the UNet is quantized, calibrated and judged (smartedit-export's --calibration-* / --min-psnr flags)."""

    FLAGS = {
        "--calibration-edits": dict(dest="calibration_edits", type=int, default=32,
                                    help="int8/fp8: calibration edits run through the fp16 graphs (every step's UNet "
                                         "inputs are kept)"),
        "--calibration-steps": dict(dest="calibration_steps", type=int, default=20,
                                    help="int8/fp8: denoising steps of each calibration and report edit"),
        "--calibration-seed": dict(dest="calibration_seed", type=int, default=0,
                                   help="int8/fp8: seed of the calibration edits (noise, template, drawn images)"),
        "--calibration-images": dict(dest="calibration_images", default=None, metavar="DIR",
                                     help="int8/fp8: PNG/JPEG/WebP images to edit (default: images drawn from the "
                                          "seed; real photos calibrate a trained model better)"),
        "--calibrator": dict(dest="calibrator", choices=list(CALIBRATORS), default="entropy",
                             help="int8: Model Optimizer's activation calibrator (fp8 uses max)"),
        "--min-psnr": dict(dest="min_psnr", type=float, default=20.0, metavar="DB",
                           help="int8/fp8: the export fails when a report edit's PSNR against the fp16 edit is "
                                "below this (20 dB catches a broken graph: black or noise images score 5-12 dB; "
                                "raise it for a trained model once its report says what it reaches)"),
        "--report-edits": dict(dest="report_edits", type=int, default=4,
                               help="int8/fp8: fixed edits of the quality report (seeds 0..N-1)"),
    }

    mode: str = "int8"
    calibration_edits: int = 32
    calibration_steps: int = 20
    calibration_seed: int = 0
    calibration_images: str | None = None
    calibrator: str = "entropy"
    min_psnr: float = 20.0
    report_edits: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"quantization mode must be one of {list(MODES)}, got {self.mode!r}")
        for flag, v in (("--calibration-edits", self.calibration_edits), ("--calibration-steps", self.calibration_steps),
                        ("--report-edits", self.report_edits)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000:
                raise InputError(f"{flag} must be an integer from 1 to 10000, got {v!r}")
        if self.calibrator not in CALIBRATORS:
            raise InputError(f"--calibrator must be one of {list(CALIBRATORS)}, got {self.calibrator!r}")
        if not math.isfinite(self.min_psnr):
            raise InputError(f"--min-psnr must be a finite number of dB, got {self.min_psnr!r}")
        if self.calibration_images is not None:
            folder = Path(self.calibration_images)
            if not folder.is_dir() or not _image_files(folder):
                raise InputError(f"--calibration-images {folder}: not a folder holding PNG, JPEG or WebP images")

    @classmethod
    def from_flags(cls, mode: str, a) -> "QuantizeOptions":
        return cls(mode=mode, **{kw["dest"]: getattr(a, kw["dest"]) for kw in cls.FLAGS.values()})

    @property
    def record(self) -> dict[str, Any]:
        """What the manifest keeps (and the entry's key hashes): the images folder by name, not by path."""
        d = asdict(self)
        d["calibration_images"] = Path(self.calibration_images).name if self.calibration_images else None
        return d


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


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
    """n (image, instruction) pairs: the user's images in name order (cycled), or pictures drawn from the seed."""
    files = _image_files(Path(opts.calibration_images)) if opts.calibration_images else []
    pairs = []
    for i in range(n):
        image = open_image(files[i % len(files)], "--calibration-images") if files else drawn_image(seed + i)
        pairs.append((image, instructions[i % len(instructions)]))
    return pairs


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


def _modelopt_quantize(src: Path, dst: Path, mode: str, calib: dict[str, np.ndarray], shapes: str,
                       exclude: list[str], calibrator: str, log: Path) -> None:
    """modelopt's quantizer, its printed output (calibration progress bars) into `log`."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise ExportError(f"--precision {mode} needs NVIDIA Model Optimizer's ONNX quantizer ({e}): "
                          "pip install -e '.[quantize]'") from None
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            quantize(onnx_path=str(src), quantize_mode=mode, calibration_data=calib, calibration_shapes=shapes,
                     calibration_method=calibrator if mode == "int8" else "max", calibration_eps=["cpu"],
                     nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude], high_precision_dtype="fp16",
                     output_path=str(dst), log_level="WARNING")
        except Exception as e:  # noqa: BLE001  (modelopt and ONNX Runtime raise many kinds)
            raise ExportError(f"Model Optimizer could not quantize {src.name} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''}); its log: {log}") from None
    if not dst.is_file():
        raise ExportError(f"Model Optimizer wrote no {dst.name}; its log: {log}")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def quality(pipe: SmartEditPipeline, base: OnnxRuntimeRunner, graph: str, fp16: Path, quantized: Path, fp8: bool,
            opts: QuantizeOptions, resolution: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """The quantized graph's edits against the fp16 graph's at fixed seeds, prompts and images (see the module)."""
    from skimage.metrics import structural_similarity

    fp16_graph, quantized_graph = session(fp16), session(quantized, basic=fp8)  # opened once for every edit
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
    q = entry.options.get("quantization")
    if not q:
        return None
    fields = {k: q[k] for k in QuantizeOptions.__dataclass_fields__ if k in q}
    return QuantizeOptions(**{**fields, "calibration_images": None})


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
    return quality(pipe, OnnxRuntimeRunner(arts), entry.graph, fp16, main, opts.mode == "fp8", opts, resolution,
                   progress)


def produce(job, opts: QuantizeOptions) -> None:
    """Quantize the graph the export marks (the per-step UNet) after every fp16 ONNX graph is there; see the module."""
    graph = next(n for n in GRAPH_NAMES if GRAPHS[n].per_step)
    entries = job.manifest.entries("onnx")
    missing = [g for g in GRAPH_NAMES if g not in entries]
    if missing:
        raise InputError(f"--precision {opts.mode} calibrates on whole edits: the onnx export lacks {missing} "
                         "(export every graph: --graphs all)")
    fp16_entry = entries[graph]
    folder = job.out / "onnx"
    main, source = folder / f"{graph}.onnx", folder / f"{graph}.fp16.onnx"
    t0 = time.perf_counter()
    pipe = SmartEditPipeline.from_weights(job.source.load("cpu", torch.float32, only=[]))
    base = OnnxRuntimeRunner(Artifacts(job.out, "onnx"))
    resolution = job.profile.opt_res
    job.progress(f"[{graph}] {opts.mode}: {opts.calibration_edits} calibration edits through the fp16 graphs "
                 f"({opts.calibration_steps} steps, {resolution} px) ...")
    recorder = _Recorder(base, graph, fp16_entry.precision)
    pipe.runner = recorder
    for i, (image, text) in enumerate(edit_set(opts, opts.calibration_edits, CALIBRATION_INSTRUCTIONS,
                                               opts.calibration_seed)):
        pipe(image, text, steps=opts.calibration_steps, resolution=resolution, seed=opts.calibration_seed + i)
    calib = {k: np.concatenate([c[k] if c[k].ndim else c[k].reshape(1) for c in recorder.calls])
             for k in recorder.calls[0]}
    first = recorder.calls[0]
    shapes = ",".join(f"{k}:{'x'.join(str(d) for d in v.shape)}" for k, v in first.items())
    job.progress(f"    {len(recorder.calls)} UNet calls kept ({sum(v.nbytes for v in calib.values()) / 1e6:.0f} MB) "
                 f"in {time.perf_counter() - t0:.1f} s")
    exclude = kept_high(main)
    job.forget("onnx", graph)
    with scratch_folder(main) as tmp:
        t1 = time.perf_counter()
        job.progress(f"    Model Optimizer {opts.mode} ({'fp8 max' if opts.mode == 'fp8' else opts.calibrator} "
                     f"calibrator), {len(exclude)} layers kept in fp16 ...")
        _modelopt_quantize(main, tmp / main.name, opts.mode, calib, shapes, exclude, opts.calibrator,
                           main.with_name(f"{graph}.quantize.log"))
        move_into_place(main, source)
        move_into_place(tmp / main.name, main)
    quantize_s = time.perf_counter() - t1
    job.progress(f"    quantized in {quantize_s:.1f} s; quality report: {opts.report_edits} fixed edits ...")
    report = quality(pipe, base, graph, source, main, opts.mode == "fp8", opts, resolution, job.progress)
    rels = [f"onnx/{main.name}", f"onnx/{source.name}"]
    settings = {"mode": opts.mode, **opts.record, "kept_fp16": exclude, "kept_fp16_modules": KEPT_HIGH.pattern,
                "tool": f"nvidia-modelopt {MODELOPT_VERSION} (modelopt.onnx.quantization)",
                "calibration_calls": len(recorder.calls), "calibration_resolution": resolution}
    entry = Entry("onnx", graph, job.key(graph), fp16_entry.spec, {**fp16_entry.options, "quantization": settings},
                  {rel: job.manifest.file_record(rel) for rel in rels},
                  record={**fp16_entry.record, "quantize_s": quantize_s})
    entry.verified = report["passed"]
    job.record(entry, {**job.report.get("onnx", {}).get(graph, {}), "quantization": report})
    job.progress(f"    worst PSNR {report['worst_psnr_db']} dB, SSIM {report['worst_ssim']}, eps error max "
                 f"{report['eps_rel_error_max']}: {'PASS' if report['passed'] else 'FAIL'} (--min-psnr "
                 f"{opts.min_psnr:g})")
    if not report["passed"]:
        raise ExportError(f"the {opts.mode} UNet's edits fall below --min-psnr {opts.min_psnr:g} dB against the fp16 "
                          f"edits (worst {report['worst_psnr_db']}); see {job.out / 'report.json'}")
