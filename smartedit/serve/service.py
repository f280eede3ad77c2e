"""The edit as a service: each request's inputs checked and decoded, requests batched, each one answered as if alone.

Nothing here knows Triton (serve/model.py is the glue): a request is a dict of plain values, an answer is a PNG and
its timings, so the rules are testable in-process.

- A request is refused, with a message naming the field and its value, before any batch work: an empty or
  undecodable image (PNG, JPEG or WebP only, decoded in memory: no request reads or writes a file), an image over
  the byte or megapixel limit (checked from its header, before decoding), an instruction over
  MAX_INSTRUCTION_BYTES (before decoding), not UTF-8 or longer than the exported prompt profile, steps out of
  [1, max_steps], a resolution that is not a multiple of 64 or is outside the exported profile, a guidance scale
  that is not finite or past +-GUIDANCE_LIMIT, a negative seed.
- Requests that share resolution and steps (and, for a folded-CFG unet, guidance) run as one batch through the
  graphs, up to the batch limit; each keeps its own seed (its own noise generator), instruction and guidance, so it
  gets the image it gets alone (up to the batched kernels' rounding). Requests that cannot share a batch never do.
- Work nobody waits for is dropped: a request whose client has gone (`gone`) is not started, and a batch whose
  clients have all gone stops before its next denoising step (asked at most every STOP_POLL_S).
"""

from __future__ import annotations

import io
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from smartedit.config import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_RESOLUTION,
    DEFAULT_STEPS,
    RESOLUTION_STEP,
    check_guidance,
    check_resolution,
    check_seed,
)
from smartedit.errors import Cancelled, InputError, SmartEditError
from smartedit.files import open_image
from smartedit.mllm import MAX_INSTRUCTION_BYTES, tokenize_prompt
from smartedit.pipeline import SmartEditPipeline

DEFAULTS = {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE, "resolution": DEFAULT_RESOLUTION}
STOP_POLL_S = 0.1  # how often a running batch asks whether its clients are still there (each ask is an IPC call)


@dataclass(frozen=True)
class Limits:
    max_steps: int = 100
    max_megapixels: float = 16.0
    max_image_bytes: int = 32 << 20
    min_resolution: int = RESOLUTION_STEP
    max_resolution: int = 768
    max_prefix: int = 512  # prompt ids before / after the image (the llava graph's Lp, Ls)
    max_suffix: int = 512
    max_batch: int = 4


@dataclass(frozen=True)
class EditRequest:
    image: Image.Image
    instruction: str
    seed: int
    steps: int
    guidance_scale: float
    image_guidance_scale: float
    resolution: int

    def batch_key(self, fold_cfg: bool) -> tuple:
        """Requests with the same key can run as one batch."""
        return (self.resolution, self.steps) + ((self.guidance_scale, self.image_guidance_scale) if fold_cfg else ())


@dataclass
class EditResult:
    png: bytes
    timings: dict[str, Any]


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    return value


class EditService:
    def __init__(self, pipe: SmartEditPipeline, limits: Limits):
        self.pipe, self.limits = pipe, limits

    @staticmethod
    def limits_for(pipe: SmartEditPipeline, max_steps: int, max_megapixels: float, max_batch: int) -> Limits:
        """The limits of this pipeline's runner: an exported backend's profiles bound resolution, prompt and batch."""
        lim = Limits(max_steps=max_steps, max_megapixels=max_megapixels, max_batch=max_batch)
        specs = pipe.runner.specs.values()  # an exported backend's: every graph's profile bounds the requests
        sides = [(s.dims[hw[0]], hw[2]) for s in specs if (hw := s.image_dims())]  # (image height range, px/unit)
        if sides:
            lim = _replace(lim, min_resolution=max(r.min * px for r, px in sides),
                           max_resolution=min(r.max * px for r, px in sides))
        ranges = {n: min(s.dims[n].max for s in specs if n in s.dims) for n in ("B", "Lp", "Ls")
                  if any(n in s.dims for s in specs)}
        return _replace(lim, max_batch=min(max_batch, ranges.get("B", max_batch)),
                        max_prefix=ranges.get("Lp", lim.max_prefix), max_suffix=ranges.get("Ls", lim.max_suffix))

    # -- one request ------------------------------------------------------------------------------------------------

    def parse(self, values: dict[str, Any]) -> EditRequest:
        """values: input name -> the request's value (bytes for image / instruction, numbers for the rest)."""
        lim = self.limits
        for name in ("image", "instruction"):
            if values.get(name) is None:
                raise InputError(f"missing input {name!r}")
        image = self._image(values["image"])
        raw = values["instruction"]
        if len(raw) > MAX_INSTRUCTION_BYTES:  # before decoding and tokenizing it
            raise InputError(f"instruction is {len(raw)} bytes, over the {MAX_INSTRUCTION_BYTES}-byte limit")
        try:
            instruction = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        except UnicodeDecodeError as e:
            raise InputError(f"instruction is not UTF-8 text ({e})") from None
        if not instruction.strip():
            raise InputError("instruction is empty")
        ids = tokenize_prompt(self.pipe.tokenizer, instruction, forced=True)
        if len(ids.prefix) > lim.max_prefix or len(ids.suffix) > lim.max_suffix:
            raise InputError(f"instruction is too long: {len(ids.suffix)} prompt tokens after the image, the "
                             f"exported profile takes at most {lim.max_suffix}")
        get = {k: values.get(k) if values.get(k) is not None else v for k, v in DEFAULTS.items()}
        steps = _integer("steps", get["steps"])
        if not 1 <= steps <= lim.max_steps:
            raise InputError(f"steps must be from 1 to {lim.max_steps}, got {steps}")
        resolution = check_resolution(_integer("resolution", get["resolution"]))
        if not lim.min_resolution <= resolution <= lim.max_resolution:
            raise InputError(f"resolution must be a multiple of {RESOLUTION_STEP} from {lim.min_resolution} to "
                             f"{lim.max_resolution} px, got {resolution}")
        seed = values.get("seed")
        seed = random.randrange(2**31) if seed is None else check_seed(_integer("seed", seed))
        g, gi = (check_guidance(k, get[k]) for k in ("guidance_scale", "image_guidance_scale"))
        return EditRequest(image, instruction, seed, steps, g, gi, resolution)

    def _image(self, data: Any) -> Image.Image:
        lim = self.limits
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InputError("image is empty: send the PNG, JPEG or WebP file's bytes")
        if len(data) > lim.max_image_bytes:
            raise InputError(f"image is {len(data) / 2**20:.1f} MB, over the {lim.max_image_bytes / 2**20:.0f} MB "
                             "limit")
        return open_image(data, "image", lim.max_megapixels)

    # -- a batch of requests ----------------------------------------------------------------------------------------

    def run(self, requests: list[EditRequest], gone: list[Callable[[], bool]] | None = None
            ) -> list[EditResult | SmartEditError]:
        """Each request's result, in order: requests are grouped by batch key (in arrival order), each group runs in
        chunks of at most max_batch; a failing chunk fails only its own requests. `gone[i]()` says whether request
        i's client has left: such a request is answered Cancelled without work, and a chunk stops when all of its
        clients have left."""
        gone = gone or [lambda: False] * len(requests)
        fold = self.pipe.runner.fold_cfg
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.batch_key(fold), []).append(i)
        results: list[EditResult | SmartEditError | None] = [None] * len(requests)
        for idx in groups.values():
            for start in range(0, len(idx), self.limits.max_batch):
                chunk = []
                for i in idx[start:start + self.limits.max_batch]:
                    if gone[i]():
                        results[i] = Cancelled("cancelled before it started: the client has gone")
                    else:
                        chunk.append(i)
                if not chunk:
                    continue
                try:
                    stop = _Poll(lambda c=chunk: all(gone[i]() for i in c))
                    for i, res in zip(chunk, self._edit([requests[i] for i in chunk], stop)):
                        results[i] = res
                except SmartEditError as e:
                    e.__traceback__ = None  # its frames hold the batch's images: keep only the message
                    for i in chunk:
                        results[i] = e
        return results  # type: ignore[return-value]

    def _edit(self, batch: list[EditRequest], stop: Callable[[], bool] | None = None) -> list[EditResult]:
        first = batch[0]
        stage_ms: dict[str, float] = {}
        t0 = time.perf_counter()
        images = self.pipe([r.image for r in batch], [r.instruction for r in batch], steps=first.steps,
                           resolution=first.resolution, seed=[r.seed for r in batch],
                           guidance_scale=[r.guidance_scale for r in batch],
                           image_guidance_scale=[r.image_guidance_scale for r in batch], timings=stage_ms, stop=stop)
        wall = (time.perf_counter() - t0) * 1e3
        out = []
        for r, img in zip(batch, images):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append(EditResult(buf.getvalue(), {
                "stage_ms": stage_ms, "wall_ms": wall, "batch_size": len(batch), "seed": r.seed, "steps": r.steps,
                "resolution": r.resolution, "backend": self.pipe.runner.name}))
        return out


class _Poll:
    """`ask()`, answered from a cache younger than STOP_POLL_S: a check before every step costs one IPC call per
    STOP_POLL_S, not per step."""

    def __init__(self, ask: Callable[[], bool]):
        self.ask, self.at, self.last = ask, float("-inf"), False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.at >= STOP_POLL_S:
            self.at, self.last = now, bool(self.ask())
        return self.last


def _replace(lim: Limits, **changes) -> Limits:
    from dataclasses import replace

    return replace(lim, **changes)


def timings_json(result: EditResult) -> bytes:
    return json.dumps(result.timings, sort_keys=True).encode()
