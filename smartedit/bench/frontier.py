"""The quality frontier of the denoising loop's levers: a fixed set of edits run with the official loop and with each
setting (smartedit/bench/settings.py: samplers at 10-50 steps, guidance schedules, combinations), in one process on
one device.

Per setting: the UNet evaluations of one edit (counted on the runner's unet calls, rows of the CFG batch; DeepCache's
shallow-path rows apart), its FLOPs (PyTorch's flop counter on one edit of one step: the graphs run once per edit, and
one UNet row's FLOPs times the rows counted; a shallow row's FLOPs from one DeepCache edit of two steps per branch), the wall time of the whole set edited as one batch (median of `repeats` rounds, the first of which
makes the images; the settings take turns within each round, so a machine that slows down slows every setting
alike) and its ratio to the official loop's in the same run, the denoising loop's share, and the quality of the images:
PSNR and SSIM (scikit-image, 8-bit RGB) against the official loop's image of the same edit, and against the ground
truth where the set has one. Every edit of a setting draws the same seed as under the official loop.

The figures belong to the model, the images and the machine they were measured on: a user runs this on their own
checkpoint and edits before choosing a setting (`smartedit-bench --frontier --model DIR --edits edits.json`).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from smartedit.deepcache import DeepCache
from smartedit.errors import InputError
from smartedit.files import open_image, write_atomic, write_json
from smartedit.graphs import DEEPCACHE_SHALLOW, DEEPCACHE_WHOLE, DENOISER, graph_with_role
from smartedit.graphs.manifest import load_json
from smartedit.pipeline import SmartEditPipeline

from .run import library_versions, write_figure
from .settings import FRONTIER_SETTINGS, Setting


@dataclass
class EditCase:
    """One edit of the fixed set: the input, the instruction, and the ground truth where there is one."""

    name: str
    image: Image.Image
    instruction: str
    target: Image.Image | None = None


def read_edits(path: str | Path) -> list[EditCase]:
    """A JSON list of {"image": FILE, "instruction": TEXT, "target": FILE (optional), "name": (optional)}, the files
    relative to the JSON's folder (InputError naming the entry otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--edits {path} does not exist: give a JSON list of {{image, instruction, target}}")
    items = load_json(path, list)
    if not items:
        raise InputError(f"--edits {path} lists no edits")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) \
                or not isinstance(item.get("instruction"), str) or set(item) - {"image", "instruction", "target",
                                                                                "name"}:
            raise InputError(f"--edits {path}: entry {i} must be {{\"image\": FILE, \"instruction\": TEXT, "
                             f"\"target\": FILE (optional), \"name\": TEXT (optional)}}, got {item!r}")
        target = item.get("target")
        out.append(EditCase(str(item.get("name", i)), open_image(path.parent / item["image"], f"edit {i} image"),
                            item["instruction"],
                            None if target is None else open_image(path.parent / target, f"edit {i} target")))
    return out


def default_edits() -> list[EditCase]:
    """Without --edits: the bench's random image with one instruction (no ground truth)."""
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(512, 512, 3) * 255).astype(np.uint8))
    return [EditCase("random", image, "replace the smaller cat with a rabbit")]


_WHOLE_UNET = (graph_with_role(DENOISER), graph_with_role(DEEPCACHE_WHOLE))  # a call is UNet evaluations
_SHALLOW_UNET = graph_with_role(DEEPCACHE_SHALLOW)


class _CountingRunner:
    """Wraps a runner: the rows of every whole-UNet call (unet, unet_deep: UNet evaluations), of every shallow-path
    call (unet_shallow) and, with `flops`, the FLOPs of every call. Where the inner runner builds any DeepCache
    branch (the model itself), `for_branch` hands back a wrapper of its other branch that counts into this one."""

    def __init__(self, inner, flops: bool, counts: "_CountingRunner | None" = None):
        self.inner, self.count_flops, self.counts = inner, flops, counts or self
        self.name, self.fold_cfg, self.specs = inner.name, inner.fold_cfg, getattr(inner, "specs", {})
        self.cache_branch = getattr(inner, "cache_branch", None)
        self.unet_rows, self.shallow_rows, self.flops, self.graph_flops = 0, 0, 0, {}
        if hasattr(inner, "for_branch"):  # an exported runner has one branch: the pipeline refuses others by name
            self.for_branch = lambda branch: _CountingRunner(inner.for_branch(branch), flops, self.counts)

    def run(self, graph, inputs):
        c = self.counts
        if graph in _WHOLE_UNET:
            c.unet_rows += (inputs["sample"] if "sample" in inputs else inputs["latents"]).shape[0] * \
                (1 if "sample" in inputs else 3)
        elif graph == _SHALLOW_UNET:
            c.shallow_rows += inputs["sample"].shape[0]
        if not self.count_flops:
            return self.inner.run(graph, inputs)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            out = self.inner.run(graph, inputs)
        c.flops += fc.get_total_flops()
        c.graph_flops[graph] = c.graph_flops.get(graph, 0) + fc.get_total_flops()
        return out


def _rgb(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    im = im.convert("RGB")
    return np.asarray(im if im.size == size else im.resize(size, Image.BICUBIC), dtype=np.float64)


def _quality(a: Image.Image, b: Image.Image) -> tuple[float | None, float]:
    """(PSNR in dB, None where identical; SSIM), 8-bit RGB, b resized to a's size when they differ."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    x, y = _rgb(a, a.size), _rgb(b, a.size)
    psnr = None if np.array_equal(x, y) else float(peak_signal_noise_ratio(y, x, data_range=255.0))
    ssim = float(structural_similarity(y, x, channel_axis=2, data_range=255.0))
    return psnr, ssim


def _mean(xs: Sequence[float | None]) -> float | None:
    """Mean PSNR over edits; None (identical images) counts as no error, so a mean over only identical ones is None."""
    finite = [x for x in xs if x is not None]
    return statistics.fmean(finite) if finite else None


def run_frontier(pipe: SmartEditPipeline, edits: Sequence[EditCase], settings: Sequence[Setting] = FRONTIER_SETTINGS,
                 resolution: int = 256, seed: int = 0, repeats: int = 3, model: str = "",
                 progress: Callable[[str], None] = print, checkpoint: Callable[[dict], None] | None = None,
                 reference: Setting = Setting()) -> dict:
    """Edit `edits` with every setting and measure each against `reference` (the official loop unless given; run
    first, added if missing); -> the result dict that write_outputs writes. `checkpoint(result)`, if given, is
    called after each setting's images and each timing round (a run cut short keeps what it measured)."""
    import torch

    if not edits:
        raise InputError("the frontier needs at least one edit")
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    default = reference
    settings = [default] + [s for s in dict.fromkeys(settings) if s != default]
    images = [e.image for e in edits]
    texts = [e.instruction for e in edits]
    seeds = [seed + i for i in range(len(edits))]
    device = pipe.device
    result: dict[str, Any] = {
        "model": model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "versions": library_versions(), "backend": pipe.runner.name,
        "dtype": str(pipe.dtype).replace("torch.", ""), "resolution": resolution, "edits": len(edits),
        "with_ground_truth": sum(e.target is not None for e in edits), "seed": seed, "repeats": repeats,
        "rows": [],
    }

    def edit(setting: Setting, timings: dict | None = None):
        return pipe(images, texts, seed=seeds, resolution=resolution, timings=timings, **setting.kwargs())

    inner = pipe.runner
    # the work of one edit: every graph once, and one step of the 3-way batch (3 UNet rows), flop-counted; the
    # allocator and kernels warm up on it too
    flop = _CountingRunner(inner, flops=True)
    pipe.runner = flop
    try:
        pipe(images[0], texts[0], seed=seeds[0], resolution=resolution, steps=1)
    finally:
        pipe.runner = inner
    unet_flops = flop.graph_flops.get(graph_with_role(DENOISER), 0)
    per_row, once = unet_flops / flop.unet_rows, flop.flops - unet_flops
    result["tflop_per_unet_evaluation"], result["tflop_per_edit_outside_the_loop"] = per_row / 1e12, once / 1e12
    def branch_of(s: Setting) -> int | None:  # the skip branch a DeepCache setting runs at (None: the runner's)
        return s.deepcache.branch if s.deepcache.branch is not None else getattr(inner, "cache_branch", None)

    per_shallow_row = {}  # DeepCache branch -> FLOPs of one shallow-path row: a 2-step edit, whole then shallow
    for branch in dict.fromkeys(branch_of(s) for s in settings if s.deepcache and not s.deepcache.is_plain):
        flop = _CountingRunner(inner, flops=True)
        pipe.runner = flop
        try:
            pipe(images[0], texts[0], seed=seeds[0], resolution=resolution, steps=2,
                 deepcache=DeepCache(2, branch))
        finally:
            pipe.runner = inner
        per_shallow_row[branch] = flop.graph_flops.get(_SHALLOW_UNET, 0) / max(1, flop.shallow_rows)
    if per_shallow_row:
        result["tflop_per_shallow_evaluation"] = {str(k): v / 1e12 for k, v in per_shallow_row.items()}
    outputs: dict[Setting, list[Image.Image]] = {}
    ms: dict[Setting, list[dict[str, float]]] = {s: [] for s in settings}
    for n, s in enumerate(settings):  # round 1 makes the images
        counting = _CountingRunner(inner, flops=False)
        pipe.runner = counting
        t: dict[str, float] = {}
        try:
            outputs[s] = edit(s, t)
        finally:
            pipe.runner = inner
        ms[s].append(t)
        rows, shallow = counting.unet_rows // len(edits), counting.shallow_rows // len(edits)
        shallow_flop = shallow * per_shallow_row[branch_of(s)] if shallow else 0.0
        row = {**s.to_dict(), "is_default": s == default, "unet_evaluations": rows,
               "unet_evaluations_planned": s.evaluations(), "shallow_evaluations": shallow,
               "tflop_per_edit": (once + rows * per_row + shallow_flop) / 1e12}
        row.update(_quality_row(outputs[s], outputs[default], edits))
        result["rows"].append(row)
        _timing_rows(result, settings[:n + 1], ms)
        progress(f"[{n + 1}/{len(settings)}] {s.label}: {rows} UNet evaluations per edit"
                 + (f" and {shallow} shallow" if shallow else "") + f", {t['total'] / 1e3:.1f} s")
        if checkpoint:
            checkpoint(result)
    for r in range(1, repeats):  # the settings take turns within each round
        for s in settings:
            t = {}
            edit(s, t)
            ms[s].append(t)
        _timing_rows(result, settings, ms)
        progress(f"timing round {r + 1}/{repeats} done")
        if checkpoint:
            checkpoint(result)
    return result


def _quality_row(got: list[Image.Image], ref: list[Image.Image], edits: Sequence[EditCase]) -> dict[str, Any]:
    vs_default = [_quality(r, g) for r, g in zip(ref, got)]
    out: dict[str, Any] = {"psnr_vs_default_db": _mean([p for p, _ in vs_default]),
                           "ssim_vs_default": statistics.fmean(s for _, s in vs_default)}
    truth = [_quality(e.target, g) for e, g in zip(edits, got) if e.target is not None]
    if truth:
        out["psnr_vs_truth_db"] = _mean([p for p, _ in truth])
        out["ssim_vs_truth"] = statistics.fmean(s for _, s in truth)
    return out


def _timing_rows(result: dict, settings: Sequence[Setting], ms: dict[Setting, list[dict[str, float]]]) -> None:
    base = ms[settings[0]]
    base_total = statistics.median(t["total"] for t in base)
    base_denoise = statistics.median(t["denoise"] for t in base)
    base_flop = result["rows"][0]["tflop_per_edit"]
    for s, row in zip(settings, result["rows"]):
        if not ms[s]:
            continue
        total = statistics.median(t["total"] for t in ms[s])
        denoise = statistics.median(t["denoise"] for t in ms[s])
        row.update({"total_ms": total, "denoise_ms": denoise, "time_ratio": total / base_total,
                    "denoise_time_ratio": denoise / base_denoise, "rounds": len(ms[s]),
                    "flop_ratio": row["tflop_per_edit"] / base_flop if base_flop else None})


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def to_markdown(res: dict) -> str:
    truth = res["with_ground_truth"] > 0
    ref = res["rows"][0]["label"] if res["rows"] else "-"
    lines = [f"# Quality frontier of the denoising loop: {res['model']}", "",
             f"{res['edits']} edits ({res['with_ground_truth']} with ground truth) at {res['resolution']} px, edited "
             f"as one batch per setting on {res['device']} ({res['backend']}, {res['dtype']}), seeds {res['seed']}.."
             f"{res['seed'] + res['edits'] - 1}; times: median of {res['repeats']} rounds in which the settings take "
             f"turns; torch {res['torch']}." + (f" The edits: {res['edit_set']}." if res.get("edit_set") else ""),
             "",
             "| setting | UNet evals / edit (+ shallow) | TFLOP / edit | x FLOPs | x time | x denoise time | PSNR vs default dB | "
             "SSIM vs default |" + (" PSNR vs truth dB | SSIM vs truth |" if truth else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if truth else "")]
    for r in res["rows"]:
        lines.append(
            f"| {r['label']}{' (default)' if r['is_default'] else ''} | {r['unet_evaluations']}"
            f"{' + ' + str(r['shallow_evaluations']) if r.get('shallow_evaluations') else ''} | "
            f"{r['tflop_per_edit']:.4f} | {_fmt(r.get('flop_ratio'), '.2f')} | {_fmt(r.get('time_ratio'), '.2f')} | "
            f"{_fmt(r.get('denoise_time_ratio'), '.2f')} | {_fmt(r['psnr_vs_default_db'], '.1f', 'identical')} | "
            f"{r['ssim_vs_default']:.3f} |"
            + (f" {_fmt(r.get('psnr_vs_truth_db'), '.1f')} | {_fmt(r.get('ssim_vs_truth'), '.3f')} |" if truth else ""))
    lines += ["", f"x FLOPs / x time / x denoise time: this setting's over the default's ({ref}), measured in this "
              "run; the time is the whole edit of the set (condition, VAE, denoising), the denoise time the loop "
              "alone. PSNR/SSIM: mean over the edits, 8-bit RGB; against the default's image of the same edit and "
              "seed, and against the ground truth. An EulerAncestral setting draws other noise than the default at "
              "other step counts, so its image differs even where its quality does not: read the ground-truth "
              "columns where there are some. DeepCache rows (deepcache=N[/BRANCH]) count the whole-UNet rows and, "
              "after +, the shallow-path rows; their FLOPs count both."]
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out: Path) -> list[Path]:
    """<out>/frontier-<model>.{json,md,png}: the rows, the table, quality against time."""
    out.mkdir(parents=True, exist_ok=True)
    name = "frontier-" + (re.sub(r"[^A-Za-z0-9_.]+", "-", Path(res["model"]).name).strip("-") or "model")
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    write_json(paths[0], res)
    write_atomic(paths[1], to_markdown(res))
    rows = [r for r in res["rows"] if r.get("time_ratio") is not None]
    if not rows:
        return paths[:2]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, what = (("ssim_vs_truth", "SSIM against the ground truth") if res["with_ground_truth"] else
                 ("ssim_vs_default", "SSIM against the default's image"))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = {"euler-ancestral": "#4c72b0", "euler": "#55a868", "ddim": "#c44e52", "dpm-solver++": "#8172b2",
               "unipc": "#ccb974"}
    for r in rows:
        lever = r["label"].count(":") > 1
        marker = "^" if "deepcache" in r else "s" if lever else "o"
        ax.scatter(r["time_ratio"], r[key], c=colours.get(r["sampler"], "k"), marker=marker,
                   s=60 if r["is_default"] else 30, edgecolors="k" if r["is_default"] else "none")
        ax.annotate(r["label"].replace("euler-ancestral", "EA") + (" (default)" if r["is_default"] else ""),
                    (r["time_ratio"], r[key]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for sampler, c in colours.items():
        ax.scatter([], [], c=c, label=sampler)
    ax.scatter([], [], c="w", edgecolors="k", marker="s", label="with a guidance lever")
    ax.scatter([], [], c="w", edgecolors="k", marker="^", label="with DeepCache")
    ax.legend(fontsize=7, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("wall time of the edit / the default's (same run, log scale)")
    ax.set_ylabel(what)
    ax.set_title(f"{res['model']}: {res['edits']} edits at {res['resolution']} px on {res['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    write_figure(fig, paths[2])
    return paths
