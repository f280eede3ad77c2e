"""`smartedit-bench`: every backend against eager (and the official-style baseline) in one run, on one device.

Per backend and resolution: end-to-end latency over `repeats` timed edits (median, p90, min, max) after warm-up
edits that are timed separately (they carry compile / capture / engine-load time); per-phase times from one extra
instrumented edit (each graph call synchronised: vision+LLM, qformer_bim, vae encode, one UNet step, the scheduler
and CFG work in between, vae decode) and per phase of the timed edits themselves (condition, vae encode,
denoise, vae decode: for `cudagraph` the denoise is the captured loop, which the instrumented edit's per-call path
cannot show); peak GPU memory; images/s; FLOPs per graph (PyTorch's flop counter, on the
eager run) and achieved TFLOP/s against the card's fp16 matmul rate measured in the same run. Backends that cannot
run here are listed with the reason, never dropped. Writes <out>/<device>-<preset>.{json,md,png}.

Settings of the denoising loop (smartedit/bench/settings.py): every row runs the first (default: the official loop,
or --sampler / --guidance-interval / --text-only-guidance); each further setting adds a row per backend at the first
resolution (the `official` baseline excepted: it stands for the official loop), with its UNet evaluations and its
speed-up over the same backend's first setting.
"""

from __future__ import annotations

import gc
import io
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smartedit.config import DEFAULT_STEPS, dtype_named
from smartedit.engines import registry
from smartedit.errors import InputError
from smartedit.files import write_atomic, write_json
from smartedit.graphs import DENOISER, GRAPH_NAMES, GRAPHS, graph_with_role
from smartedit.pipeline import SmartEditPipeline
from smartedit.weights import ModelSource

from .settings import Setting


class _TimedRunner:
    """Wraps a runner: synchronised wall time and, optionally, FLOPs per graph call."""

    def __init__(self, inner, device: torch.device, count_flops: bool = False):
        self.inner, self.device, self.count_flops = inner, device, count_flops
        self.name, self.fold_cfg, self.specs = inner.name, inner.fold_cfg, getattr(inner, "specs", {})
        self.ms: dict[str, list[float]] = {}
        self.flops: dict[str, int] = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, graph, inputs):
        from torch.utils.flop_counter import FlopCounterMode

        self._sync()
        t0 = time.perf_counter()
        if self.count_flops:
            with FlopCounterMode(display=False) as fc:
                out = self.inner.run(graph, inputs)
            self.flops[graph] = self.flops.get(graph, 0) + fc.get_total_flops()
        else:
            out = self.inner.run(graph, inputs)
        self._sync()
        self.ms.setdefault(graph, []).append((time.perf_counter() - t0) * 1e3)
        return out


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "p90": xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))],
            "min": xs[0], "max": xs[-1]}


def library_versions() -> dict[str, str | None]:
    """Installed versions of what the backends run on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "triton", "transformers", "diffusers", "peft", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "tensorrt", "tensorrt-rtx-cu13"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _driver_version() -> str | None:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def measured_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def run_bench(source: ModelSource, backends: tuple[str, ...] = ("official", "eager"),
              resolutions: tuple[int, ...] = (256,), steps: int = DEFAULT_STEPS, batch: int = 1, repeats: int = 3,
              warmup: int = 1, device: str = "cpu", dtype: str = "fp16", artifacts: str | None = None, progress=print,
              checkpoint=None, settings: tuple[Setting, ...] | None = None) -> dict:
    """`checkpoint(result)`, if given, is called after every measured or failed (backend, resolution) with the results
    so far (smartedit-bench writes them out: a run cut short by a time limit keeps what it measured).

    A backend that cannot run here is listed in "skipped" with the reason; one that raises while loading or at a
    resolution (any Exception: triton's OutOfResources, CUDA out of memory, a shape outside an exported profile) is
    listed in "failed" with the error, and the other backends and resolutions still run.

    `settings`: the denoising loop's settings (default: `steps` of the official loop); the first runs on every row,
    the others at the first resolution on every backend but `official`."""
    dev = torch.device(device)
    torch_dtype = dtype_named(dtype)
    unknown = [b for b in backends if b not in registry.BACKENDS]
    if unknown:
        raise InputError(f"unknown backend(s) {unknown}; choose from {list(registry.BACKENDS)}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU here")
    settings = tuple(settings) if settings else (Setting(steps=steps),)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(512, 512, 3) * 255).astype(np.uint8))
    images, texts = [image] * batch, ["replace the smaller cat with a rabbit"] * batch
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "driver": _driver_version() if dev.type == "cuda" else None,
              "cuda_runtime": torch.version.cuda if dev.type == "cuda" else None, "torch": torch.__version__,
              "versions": library_versions(),
              "python": platform.python_version(), "command": sys.argv, "model": str(source.model or f"{source.preset} (random)"),
              "dtype": dtype, "steps": settings[0].steps, "batch": batch, "repeats": repeats, "warmup": warmup,
              "settings": [x.label for x in settings],
              "peak_fp16_tflops": measured_peak_tflops(dev), "runs": [], "skipped": {}, "failed": []}

    def save() -> None:
        _ratios(result)
        if checkpoint is not None:
            checkpoint(result)

    def failed(backend: str, resolution: int | None, e: Exception) -> None:
        error = f"{type(e).__name__}: {e}".strip()
        result["failed"].append({"backend": backend, "resolution": resolution, "error": error})
        progress(f"{backend}{f' @ {resolution}' if resolution else ''}: FAILED ({error.splitlines()[0][:300]})")
        _free(dev)
        save()

    for backend in backends:
        reason = registry.why_not(backend, dev, artifacts)
        if reason:
            result["skipped"][backend] = reason
            progress(f"{backend}: skipped ({reason})")
            continue
        try:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            pipe = SmartEditPipeline.on_backend(backend, source, dev, torch_dtype, artifacts)
            load_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  (any failure of one backend is a result, not the end of the run)
            failed(backend, None, e)
            continue
        # the first setting at every resolution, then the others at the first: a run cut short keeps the first's
        rows = [(res, settings[0]) for res in resolutions]
        rows += [(resolutions[0], x) for x in settings[1:]] if backend != "official" else []
        for res, setting in rows:
            try:
                _bench_resolution(result, backend, pipe, load_s, res, dev, setting, images, texts, warmup,
                                  repeats, batch, progress)
            except Exception as e:  # noqa: BLE001
                failed(backend, res, e)
                continue
            save()
        # pipeline <-> backend references are cycles: collect them, or the next backend's peak memory includes this
        # one's weights (7b: 14 GB fp16, 28 GB for official's fp32 LLM)
        del pipe
        _free(dev)
    save()
    return result


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _bench_resolution(result, backend, pipe, load_s, res, dev, setting: Setting, images, texts, warmup, repeats,
                      batch, progress) -> None:
    release = getattr(pipe.runner, "release", None)  # a runner's captured programs of earlier resolutions
    if release is not None:
        release()
    _free(dev)
    if dev.type == "cuda":  # peak per resolution: weights and this resolution's activations and graphs
        torch.cuda.reset_peak_memory_stats(dev)
    kw = dict(resolution=res, seed=0, **setting.kwargs())
    steps = setting.steps
    warm = []
    for _ in range(warmup):  # first calls carry compile / capture / engine load / autotuning
        t = {}
        pipe(images, texts, timings=t, **kw)
        warm.append(t["total"])
    e2e, parts = [], []
    for _ in range(repeats):
        t = {}
        pipe(images, texts, timings=t, **kw)
        e2e.append(t["total"])
        parts.append(t)
    inner = pipe.runner
    timed = _TimedRunner(inner, dev, count_flops=backend == "eager")
    pipe.runner = timed
    phase_t: dict[str, float] = {}
    try:
        pipe(images, texts, timings=phase_t, **kw)
    finally:
        pipe.runner = inner
    unet = graph_with_role(DENOISER)  # its time is reported per step, with the loop's time around it
    phases = {GRAPHS[g].label: statistics.median(v) for g, v in timed.ms.items() if g != unet}
    if unet in timed.ms:
        phases[GRAPHS[unet].step_label] = statistics.median(timed.ms[unet])
        phases["scheduler+cfg_per_step"] = (phase_t["denoise"] - sum(timed.ms[unet])) / steps
    if backend == "official":
        phases["vision+llm+qformer_bim (fp32 decode)"] = phase_t["condition"]
    row = {"backend": backend, "resolution": res, "setting": setting.label, "steps": steps,
           "unet_evaluations": setting.evaluations(batch), "load_s": load_s, "warmup_ms": warm,
           "e2e_ms": _stats(e2e), "phase_ms": phases,
           # the timed edits themselves, per phase (the backend's real path: e.g. the captured loop)
           "edit_phase_ms": {k: statistics.median(p[k] for p in parts) for k in parts[0] if k != "total"},
           "images_per_s": batch / (statistics.median(e2e) / 1e3),
           "peak_gpu_GB": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
           **getattr(inner, "record", {})}  # e.g. cudagraph: the capture each program got
    if timed.flops:
        row["graph_tflop"] = {GRAPHS[g].label: f / 1e12 / (len(timed.ms[g]) if GRAPHS[g].per_step else 1)
                              for g, f in timed.flops.items()}
    result["runs"].append(row)
    progress(f"{backend} @ {res}, {setting.label}: median {row['e2e_ms']['median']:.1f} ms end to end, spread "
             f"{spread(row):.0%}"
             + (" (noisy: take more --repeats)" if spread(row) > NOISY else ""))


def _ratios(result: dict) -> None:
    first = result["settings"][0]
    by = {(r["backend"], r["resolution"]): r["e2e_ms"]["median"] for r in result["runs"] if r["setting"] == first}
    for r in result["runs"]:
        for base in ("eager", "official"):
            if (base, r["resolution"]) in by and r["setting"] == first:
                r[f"speedup_vs_{base}"] = by[(base, r["resolution"])] / r["e2e_ms"]["median"]
        if r["setting"] != first and (r["backend"], r["resolution"]) in by:  # a lever against its own backend
            r["speedup_vs_first_setting"] = by[(r["backend"], r["resolution"])] / r["e2e_ms"]["median"]
    runs = [r for r in result["runs"] if r["setting"] == first]
    flops = {r["resolution"]: r.get("graph_tflop") for r in runs if r["backend"] == "eager"}
    peak = result["peak_fp16_tflops"]
    unet = GRAPHS[graph_with_role(DENOISER)]
    ms_label = {GRAPHS[g].label: GRAPHS[g].step_label or GRAPHS[g].label for g in GRAPH_NAMES}  # FLOPs -> time key
    for r in runs:
        tf = flops.get(r["resolution"])
        if not tf:
            continue
        if unet.label in tf and unet.step_label in r["phase_ms"]:
            achieved = r[f"{unet.step_label}_tflops_achieved"] = tf[unet.label] / (r["phase_ms"][unet.step_label] / 1e3)
            if peak:
                r[f"{unet.step_label}_frac_peak"] = achieved / peak
        r["graph_tflops_achieved"] = {g: tf[g] / (r["phase_ms"][ms_label[g]] / 1e3)
                                      for g in tf  # in the order the edit calls the graphs
                                      if g in ms_label and r["phase_ms"].get(ms_label[g])}
        # the whole edit's work (eager's count: every backend does the same math) and its time at the measured peak
        r["e2e_tflop"] = (sum(v for k, v in tf.items() if k != unet.label)
                          + tf.get(unet.label, 0.0) * result["steps"])
        if peak:
            r["floor_ms_at_peak"] = r["e2e_tflop"] / peak * 1e3


NOISY = 0.20  # spread (max - min) / median above which a row's timings are called noisy


def spread(row: dict) -> float:
    e = row["e2e_ms"]
    return (e["max"] - e["min"]) / e["median"] if e["median"] else 0.0


def to_markdown(res: dict) -> str:
    lines = [f"# smartedit-bench on {res['device']}", "",
             f"{res['model']}, {res['dtype']}, {res.get('settings', [str(res['steps']) + ' steps'])[0]}, batch "
             f"{res['batch']}, {res['repeats']} timed runs "
             f"after {res['warmup']} warm-up; torch {res['torch']}"
             + (f"; measured fp16 matmul peak {res['peak_fp16_tflops']:.0f} TFLOP/s" if res["peak_fp16_tflops"] else "")
             + (f"; driver {res['driver']}, CUDA {res['cuda_runtime']}" if res.get("driver") else ""),
             "", "versions: " + ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items() if v),
             "", "| backend | res | e2e median ms | p90 | min | max | spread | x eager | x official | denoise ms | "
             "UNet step ms | peak GB | img/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first = res.get("settings", [None])[0]
    def num(v, fmt):
        return "-" if v is None else fmt.format(v)

    for r in res["runs"]:
        if r.get("setting", first) != first:
            continue
        e = r["e2e_ms"]
        lines.append(f"| {r['backend']} | {r['resolution']} | {e['median']:.1f} | {e['p90']:.1f} | {e['min']:.1f} | "
                     f"{e['max']:.1f} | {spread(r):.0%} | {num(r.get('speedup_vs_eager'), '{:.2f}')} | "
                     f"{num(r.get('speedup_vs_official'), '{:.2f}')} | "
                     f"{num(r.get('edit_phase_ms', {}).get('denoise'), '{:.1f}')} | "
                     f"{num(r['phase_ms'].get('unet_step'), '{:.2f}')} | "
                     f"{num(r['peak_gpu_GB'], '{:.1f}')} | {r['images_per_s']:.2f} |")
    for b, why in res["skipped"].items():
        lines.append(f"| {b} | - | skipped: {why} | | | | | | | | | | |")
    for f in res.get("failed", []):
        error = f["error"].splitlines()[0][:200].replace("|", "/")
        lines.append(f"| {f['backend']} | {f['resolution'] or 'load'} | FAILED: {error} | | | | | | | | | | |")
    lines += ["", "spread: (max - min) / median of the timed edits. x eager / x official: the median's speed-up over "
              "that backend at the same resolution, in this run. denoise ms: the whole denoising loop within the "
              "timed edits. UNet step ms: one UNet call (the 3-way CFG batch), median over the steps of one extra, "
              "instrumented edit in which every graph call is timed alone with a device sync."]
    levers = [r for r in res["runs"] if r.get("setting", first) != first]
    if levers:
        lines += ["", f"Settings of the denoising loop against the first ({first}), on the same backend at "
                  f"{levers[0]['resolution']} px:", "",
                  "| backend | setting | UNet evals | e2e median ms | spread | x first setting | denoise ms |",
                  "|---|---|---|---|---|---|---|"]
        for r in levers:
            lines.append(f"| {r['backend']} | {r['setting']} | {r['unet_evaluations']} | {r['e2e_ms']['median']:.1f} "
                         f"| {spread(r):.0%} | {num(r.get('speedup_vs_first_setting'), '{:.2f}')} | "
                         f"{num(r.get('edit_phase_ms', {}).get('denoise'), '{:.1f}')} |")
    noisy = [f"{r['backend']} @ {r['resolution']} ({spread(r):.0%})" for r in res["runs"] if spread(r) > NOISY]
    if noisy:
        lines += ["", f"**Warning: noisy timings** (spread over {NOISY:.0%}): {', '.join(noisy)}. Ratios between "
                  "backends are not reliable at this spread: take more --repeats, or a quieter machine."]
    for r in res["runs"]:
        if r["backend"] == "eager" and "e2e_tflop" in r:
            floor = (f"; at the measured fp16 peak that is {r['floor_ms_at_peak']:.1f} ms, the physical floor"
                     if "floor_ms_at_peak" in r else "")
            lines.append(f"\nWork per edit at {r['resolution']}x{r['resolution']} (PyTorch flop counter, batch "
                         f"{res['batch']}): {r['e2e_tflop']:.3f} TFLOP{floor}.")
    return "\n".join(lines) + "\n"


def model_stem(model: str) -> str:
    """A file-name part for a result's model: a preset's name ("tiny (random weights ...)" -> "tiny"), a model
    folder's last part ("/x/models/tiny-shapes" -> "tiny-shapes"; the whole path once made nested folders)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", Path(model.split(" (")[0]).name).strip("-") or "model"


def write_outputs(res: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = res["device"].split(" (")[0].replace(" ", "-").replace("/", "-") + f"-{model_stem(res['model'])}"
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    write_json(paths[0], res)
    write_atomic(paths[1], to_markdown(res))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    first = res.get("settings", [None])[0]
    runs = [r for r in res["runs"] if r.get("setting", first) == first]
    labels = [f"{r['backend']}\n{r['resolution']}px" for r in runs]
    med = [r["e2e_ms"]["median"] for r in runs]
    err = [[m - r["e2e_ms"]["min"] for m, r in zip(med, runs)], [r["e2e_ms"]["max"] - m for m, r in zip(med, runs)]]
    bars = ax.bar(labels, med, yerr=err, capsize=3, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{m:.0f}" for m in med], fontsize=7, padding=2)
    missing = [(b, "skipped") for b in res["skipped"]] + [(f["backend"], "failed") for f in res.get("failed", [])]
    for b, why in missing:  # an empty slot, so a missing backend is seen, not silently dropped
        ax.bar(f"{b}\n{why}", 0)
    ax.set_ylabel("end-to-end ms (median; bar: min to max)")
    ax.set_title(f"{res['model']} on {res['device']}, {res['steps']} steps, {res['repeats']} timed runs",
                 fontsize=9)
    write_figure(fig, paths[2])
    return paths


def write_figure(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG, written atomically, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return write_atomic(path, png.getvalue())
