"""Measure a SmartEdit model on the held-out shapes edits (tools/synthetic_edits.py), against two baselines measured
the same way: the input returned unchanged, and the same architecture with random weights.

Per edit, against the renderer's ground truth:
  - PSNR and SSIM inside the edit mask (the pixels that should change) and outside it (those that should not);
    PSNR in dB over 8-bit RGB; SSIM as scikit-image computes it (7x7 windows, per channel), averaged over the region;
  - success: the mean colour of the edited shape's inner pixels is nearest, among the palette and the scene's
    background, to the colour asked for (the background for a removal) and within SUCCESS_DISTANCE of it, and every
    other shape's inner pixels keep their own colour by the same rule.
Per pair (one picture, two edits of two different shapes, the same noise seed): the instruction matters when each
result is closer (MSE over both masks) to its own ground truth than to the other instruction's.

    python tools/evaluate.py --model models/tiny-shapes --out bench/results/tiny-shapes-heldout
    python tools/evaluate.py --model models/tiny-shapes --backend onnxruntime --artifacts out/ --count 20 --no-baselines
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see tools/train_tiny.py

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_edits as task  # noqa: E402

STEPS = 20  # the Quickstart's steps; guidance scales are the pipeline's defaults (7.5 text, 1.5 image)
SUCCESS_DISTANCE = 60.0  # RGB units: a third of the closest pair of palette colours apart (yellow / white: 215)
PAIRS = 100  # instruction-matters pairs, from the held-out seeds after the single edits'
BATCH = 8

Editor = Callable[[Sequence[Image.Image], Sequence[str], Sequence[int]], list[Image.Image]]


def _rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR (dB, peak 255) over the pixels where `where` holds; inf for identical pixels."""
    mse = float(((a - b) ** 2)[where].mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    _, full = structural_similarity(a, b, channel_axis=2, data_range=255.0, full=True)
    return full.mean(axis=2)  # [H, W]


def nearest(colour: np.ndarray, scene: task.Scene) -> tuple[tuple[int, int, int], float]:
    """The palette colour or background nearest to `colour` [3], and the distance to it."""
    candidates = list(task.COLOURS.values()) + [scene.background]
    d = [float(np.linalg.norm(colour - np.array(c))) for c in candidates]
    return candidates[int(np.argmin(d))], min(d)


def judged(ex: task.Example, out: Image.Image) -> dict:
    """The rule of the module docstring -> {"target_ok", "others_ok", "success"}."""
    o = _rgb(out)

    def keeps(region: np.ndarray, colour: tuple[int, int, int]) -> bool:
        got, dist = nearest(o[region].mean(axis=0), ex.scene)
        return got == tuple(colour) and dist <= SUCCESS_DISTANCE

    target_ok = keeps(ex.core, ex.asked)
    others = [s for i, s in enumerate(ex.scene.shapes) if i != ex.edit.target]
    others_ok = all(keeps(region, task.COLOURS[s.colour]) for region, s in zip(ex.others, others))
    return {"target_ok": target_ok, "others_ok": others_ok, "success": target_ok and others_ok}


def scores(ex: task.Example, out: Image.Image) -> dict:
    o, g = _rgb(out), _rgb(ex.target)
    s = ssim_map(o, g)
    return {"psnr_in": psnr(o, g, ex.mask), "psnr_out": psnr(o, g, ~ex.mask),
            "ssim_in": float(s[ex.mask].mean()), "ssim_out": float(s[~ex.mask].mean()), **judged(ex, out)}


def closer_to_own(a: task.Example, b: task.Example, out_a: Image.Image, out_b: Image.Image) -> bool:
    """Each result nearer (MSE over both masks) to its own ground truth than to the other's."""
    m = a.mask | b.mask
    ga, gb, oa, ob = _rgb(a.target), _rgb(b.target), _rgb(out_a), _rgb(out_b)

    def d(x, y):
        return float(((x - y) ** 2)[m].mean())

    return d(oa, ga) < d(oa, gb) and d(ob, gb) < d(ob, ga)


def pipeline_editor(pipe, steps: int = STEPS, batch: int = BATCH, **levers) -> Editor:
    """Edits through a SmartEditPipeline at the task's resolution, `batch` at a time, each with its own seed;
    `levers`: more arguments of the edit (deepcache=...)."""
    def edit(images, instructions, seeds):
        out: list[Image.Image] = []
        for i in range(0, len(images), batch):
            out += pipe(list(images[i:i + batch]), list(instructions[i:i + batch]), steps=steps,
                        resolution=task.RESOLUTION, seed=[int(s) for s in seeds[i:i + batch]], **levers)
        return out
    return edit


def unchanged(images, instructions, seeds):
    return [im.copy() for im in images]


def pair_cases(count: int = PAIRS) -> list[tuple[task.Example, task.Example]]:
    start = task.HELDOUT_SEEDS.start + task.HELDOUT_COUNT
    return [task.pair(s) for s in range(start, start + count)]


@dataclass
class Result:
    name: str
    rows: list[dict]  # one per held-out edit
    pairs: list[bool]  # one per pair: the instruction matters
    seconds: float

    def summary(self) -> dict:
        def mean(k: str) -> float:
            v = np.array([r[k] for r in self.rows], dtype=np.float64)
            return float(np.mean(np.minimum(v, 100.0)))  # identical pixels: PSNR capped at 100 dB

        out = {k: mean(k) for k in ("psnr_in", "psnr_out", "ssim_in", "ssim_out")}
        for k in ("success", "target_ok", "others_ok"):
            out[k] = float(np.mean([r[k] for r in self.rows]))
        for kind in ("recolour", "remove"):
            rows = [r for r in self.rows if r["kind"] == kind]
            out[f"success_{kind}"] = float(np.mean([r["success"] for r in rows])) if rows else None
        out["instruction_matters"] = float(np.mean(self.pairs)) if self.pairs else None
        return {"name": self.name, "edits": len(self.rows), "pairs": len(self.pairs), **out,
                "seconds": round(self.seconds, 1)}


def run(name: str, editor: Editor, examples: list[task.Example], pairs: list[tuple[task.Example, task.Example]],
        progress: Callable[[str], None] = print) -> Result:
    t0 = time.perf_counter()
    outs = editor([e.image for e in examples], [e.instruction for e in examples], [e.seed for e in examples])
    rows = [{"seed": e.seed, "instruction": e.instruction, "kind": "remove" if e.edit.new_colour is None else
             "recolour", **scores(e, o)} for e, o in zip(examples, outs)]
    flat = [e for p in pairs for e in p]
    pouts = editor([e.image for e in flat], [e.instruction for e in flat], [e.seed for e in flat]) if flat else []
    matters = [closer_to_own(a, b, pouts[2 * i], pouts[2 * i + 1]) for i, (a, b) in enumerate(pairs)]
    r = Result(name, rows, matters, time.perf_counter() - t0)
    progress(f"{name}: success {r.summary()['success']:.1%} in {r.seconds:.0f} s")
    return r


def finite(row: dict) -> dict:
    """JSON has no inf: identical pixels' PSNR is written as null."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in row.items()}


def markdown(results: list[Result], meta: dict) -> str:
    s = [r.summary() for r in results]
    cols = [("success", "success", "{:.1%}"), ("success_recolour", "recolour", "{:.1%}"),
            ("success_remove", "removal", "{:.1%}"), ("instruction_matters", "instruction matters", "{:.1%}"),
            ("psnr_in", "PSNR in mask (dB)", "{:.2f}"), ("psnr_out", "PSNR outside (dB)", "{:.2f}"),
            ("ssim_in", "SSIM in mask", "{:.3f}"), ("ssim_out", "SSIM outside", "{:.3f}")]
    lines = [f"# {meta['model']} on the held-out shapes edits", "",
             f"{meta['edits']} held-out edits (seeds {meta['seeds']}), {meta['pairs']} instruction pairs; "
             f"{meta['steps']} steps at {meta['resolution']} px, guidance 7.5 / 1.5, backend {meta['backend']}, "
             f"noise seed = the example's seed. PSNR capped at 100 dB (identical pixels). Success: the edited "
             f"shape's mean colour nearest to the asked colour (the background for a removal) and within "
             f"{SUCCESS_DISTANCE:g} RGB units, and the other shapes keep theirs.", "",
             "| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in s:
        lines.append(f"| {row['name']} | " + " | ".join("-" if row[k] is None else f.format(row[k])
                                                       for k, _, f in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import torch

    from smartedit.deepcache import parse_deepcache
    from smartedit.pipeline import SmartEditPipeline
    from smartedit.weights import ModelSource

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the model folder (e.g. models/tiny-shapes)")
    ap.add_argument("--backend", default="eager", help="smartedit-edit's --backend (default eager)")
    ap.add_argument("--artifacts", type=Path, help="an export folder, for backends that run exported graphs")
    ap.add_argument("--count", type=int, default=task.HELDOUT_COUNT, help="held-out edits (default all 200)")
    ap.add_argument("--pairs", type=int, default=PAIRS, help="instruction pairs (default 100)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH, help=f"edits per call (default {BATCH}; an export's "
                    "--max-batch or less)")
    ap.add_argument("--deepcache", type=int, help="DeepCache: the whole UNet every N steps (default: every step)")
    ap.add_argument("--deepcache-branch", type=int, help="DeepCache's skip branch (default: the backend's)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the unchanged-input and random-weights rows")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    examples, pairs = task.heldout(a.count), pair_cases(a.pairs)
    pipe = SmartEditPipeline.on_backend(a.backend, ModelSource(model=a.model), artifacts=a.artifacts)
    levers = {"deepcache": parse_deepcache(a.deepcache, a.deepcache_branch)}
    name = a.model.name + ("" if levers["deepcache"] is None else f" (DeepCache every {a.deepcache} steps, branch "
                           f"{pipe.cache_runner(levers['deepcache']).cache_branch})")
    results = [run(name, pipeline_editor(pipe, a.steps, a.batch, **levers), examples, pairs)]
    if not a.no_baselines:
        results.append(run("input unchanged", unchanged, examples, pairs))
        random_pipe = SmartEditPipeline.from_preset("tiny", seed=0)
        results.append(run("random weights (tiny, seed 0)", pipeline_editor(random_pipe, a.steps, a.batch), examples,
                           pairs))
    meta = {"model": str(a.model), "backend": a.backend, "edits": len(examples), "pairs": len(pairs),
            "seeds": f"{examples[0].seed}..{examples[-1].seed}" if examples else "-", "steps": a.steps,
            "resolution": task.RESOLUTION, **({"deepcache": {"interval": a.deepcache, "branch": a.deepcache_branch}}
                                              if a.deepcache else {})}
    md = markdown(results, meta)
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "summary": [r.summary() for r in results],
             "rows": {r.name: [finite(row) for row in r.rows] for r in results},
            "pairs": {r.name: r.pairs for r in results}}, indent=1, allow_nan=False) + "\n")
        a.out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
