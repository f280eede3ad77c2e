"""The edit as a service: each request's inputs checked and decoded, requests batched, each one answered as if alone.

Nothing here knows Triton (serve/model.py is the glue): a request is a dict of plain values, an answer is PNGs and
their timings, so the rules are testable in-process.

- A request is refused, with a message naming the field and its value, before any batch work: numbers first (steps
  out of [1, max_steps] or past its sampler's bound, a resolution that is not a multiple of 64 or is outside the
  exported profile, a sampler this project does not have, a guidance interval that is not 0 <= start <= end <= 1, a
  guidance scale that is not finite or past +-GUIDANCE_LIMIT, a negative seed, more variants than max_variants, more
  UNet evaluations than max_evaluations, a preview interval that would decode more than MAX_PREVIEWS previews),
  then the image (empty or undecodable: PNG, JPEG or WebP only, decoded in memory: no request reads or writes a file;
  over the byte or megapixel limit, checked from its header before decoding) and the instruction (over
  MAX_INSTRUCTION_BYTES before decoding, not UTF-8 or longer than the exported prompt profile).
- Variants: `seed`, `guidance_scale` and `image_guidance_scale` may each hold one value per variant (or one for
  all). The language model, QFormer and BIM run once per request; its conditions are repeated for its variants, and
  the UNet loop runs every variant of the batch as one batch, each with its own noise generator and guidance, so each
  variant gets the image a request for it alone gets (up to the batched kernels' rounding).
- Requests that share resolution, steps, sampler and guidance schedule (and, for a folded-CFG unet, guidance) run as
  one batch through the graphs, up to max_batch samples; each keeps its own seeds, instruction and guidance.
  Requests that cannot share a batch never do.
- Work nobody waits for is dropped: a request whose client has gone (`gone`) is not started, and a batch whose
  clients have all gone stops before its next denoising step (asked at most every STOP_POLL_S).
- Progress (`watch`): after each denoising step, each request hears the step, and every `preview_every` steps gets a
  small preview decoded from the predicted clean latents (one VAE decode of its samples). A runner that replays the
  whole loop as one program (the CUDA-graph loop) reports no steps: its requests hear the start and the answer.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
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
from smartedit.deepcache import DeepCache
from smartedit.errors import Cancelled, InputError, RunError, SmartEditError
from smartedit.files import open_image
from smartedit.graphs.spec import ProfileOptions
from smartedit.guidance import GuidanceSchedule
from smartedit.mllm import MAX_INSTRUCTION_BYTES, tokenize_prompt
from smartedit.pipeline import SmartEditPipeline, PhaseClock
from smartedit.scheduler import SIGMA, T, get_sampler
from smartedit.vae import postprocess

from .settings import MAX_VARIANTS, ServeSettings

DEFAULTS = {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE, "resolution": DEFAULT_RESOLUTION}
STOP_POLL_S = 0.1  # how often a running batch asks whether its clients are still there (each ask is an IPC call)
MAX_PREVIEWS = 20  # previews per edit, at most: each is one VAE decode of the request's samples
PREVIEW_SIDE = 128  # a preview's longer side, px
VARIANT_INPUTS = ("seed", "guidance_scale", "image_guidance_scale")  # one value per variant, or one for all


@dataclass(frozen=True)
class Limits:
    max_steps: int = ServeSettings.max_steps
    max_megapixels: float = ServeSettings.max_megapixels
    max_image_bytes: int = 32 << 20
    min_resolution: int = RESOLUTION_STEP
    max_resolution: int = ProfileOptions.max_res  # the export's default profile, on every backend
    max_prefix: int = ProfileOptions.max_prefix  # prompt ids before / after the image (the llava graph's Lp, Ls)
    max_suffix: int = ProfileOptions.max_suffix
    max_batch: int = ServeSettings.max_batch  # samples through the graphs at once (each variant counts one)
    max_variants: int = MAX_VARIANTS
    max_evaluations: int | None = None  # UNet evaluations per request, all variants (None: what steps and variants
    # allow); an evaluation is one sample through the UNet once: 3 per guided step by default (GuidanceSchedule)
    seed_required: bool = False  # answers are cached: a request without a seed would get another's random image


@dataclass(frozen=True)
class EditRequest:
    image: Image.Image
    instruction: str
    steps: int
    resolution: int
    sampler: str
    schedule: GuidanceSchedule
    seeds: tuple[int, ...]  # one per variant
    guidance_scales: tuple[float, ...]  # one per variant
    image_guidance_scales: tuple[float, ...]  # one per variant
    preview_every: int = 0  # a stream's preview every N steps (0: none)
    deepcache: DeepCache | None = None  # the whole UNet every N steps, the shallow path between (None: every step)

    @property
    def variants(self) -> int:
        return len(self.seeds)

    def batch_key(self, fold_cfg: bool) -> tuple:
        """Requests with the same key can run as one batch."""
        key = (self.resolution, self.steps, self.sampler, self.schedule, self.deepcache)
        return key + ((self.guidance_scales[0], self.image_guidance_scales[0]) if fold_cfg else ())


@dataclass
class EditResult:
    png: bytes  # the variants' PNGs, one after another (timings["variants"][i]["bytes"] each)
    timings: dict[str, Any]
    pngs: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    """What a request hears after a denoising step: the step done, of `steps`; `previews` (small PNGs of the
    predicted clean image, one per variant) on every preview_every-th step."""
    step: int
    steps: int
    previews: tuple[bytes, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps({"step": self.step, "steps": self.steps,
                           "preview_bytes": [len(p) for p in self.previews]}).encode()


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    return value


def _one(values: dict[str, Any], name: str, default: Any = None) -> Any:
    """The one value of input `name` (a list of the request's values, or None), or `default`."""
    v = values.get(name)
    if v is None or (isinstance(v, list) and not v):
        return default
    if isinstance(v, list):
        if len(v) != 1:
            raise InputError(f"{name} must hold one value, got {len(v)}")
        return v[0]
    return v


def _many(values: dict[str, Any], name: str) -> list:
    v = values.get(name)
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _text(name: str, value: Any) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
    except UnicodeDecodeError as e:
        raise InputError(f"{name} is not UTF-8 text ({e})") from None


class EditService:
    def __init__(self, pipe: SmartEditPipeline, limits: Limits):
        self.pipe, self.limits = pipe, limits
        self._alphas: dict[str, torch.Tensor] = {}  # sampler -> alphas_cumprod (the previews of VP samplers)

    @staticmethod
    def limits_for(pipe: SmartEditPipeline, max_steps: int, max_megapixels: float, max_batch: int,
                   **more: Any) -> Limits:
        """The limits of this pipeline's runner: an exported backend's profiles bound resolution, prompt and batch;
        `more`: the other Limits fields (max_variants, max_evaluations, seed_required)."""
        lim = Limits(max_steps=max_steps, max_megapixels=max_megapixels, max_batch=max_batch, **more)
        specs = pipe.runner.specs.values()  # an exported backend's: every graph's profile bounds the requests
        sides = [(s.dims[hw[0]], hw[2]) for s in specs if (hw := s.image_dims())]  # (image height range, px/unit)
        if sides:
            lim = _replace(lim, min_resolution=max(r.min * px for r, px in sides),
                           max_resolution=min(r.max * px for r, px in sides))
        ranges = {n: min(s.dims[n].max for s in specs if n in s.dims) for n in ("B", "Lp", "Ls")
                  if any(n in s.dims for s in specs)}
        lim = _replace(lim, max_batch=min(max_batch, ranges.get("B", max_batch)),
                       max_prefix=ranges.get("Lp", lim.max_prefix), max_suffix=ranges.get("Ls", lim.max_suffix))
        return _replace(lim, max_variants=min(lim.max_variants, lim.max_batch))  # a request's variants: one batch

    # -- one request ------------------------------------------------------------------------------------------------

    def parse(self, values: dict[str, Any]) -> EditRequest:
        """values: input name -> the request's values (a list, or one value; bytes for image, instruction and
        sampler, numbers for the rest; None or [] for an input not sent)."""
        lim = self.limits
        for name in ("image", "instruction"):
            if _one(values, name) is None:
                raise InputError(f"missing input {name!r}")
        steps = _integer("steps", _one(values, "steps", DEFAULTS["steps"]))
        if not 1 <= steps <= lim.max_steps:
            raise InputError(f"steps must be from 1 to {lim.max_steps}, got {steps}")
        raw_sampler = _one(values, "sampler")
        sampler = get_sampler(self.pipe.sampler if raw_sampler is None else _text("sampler", raw_sampler))
        sampler.check_steps(steps)  # a sampler may take fewer (ddim: 999)
        resolution = check_resolution(_integer("resolution", _one(values, "resolution", DEFAULTS["resolution"])))
        if not lim.min_resolution <= resolution <= lim.max_resolution:
            raise InputError(f"resolution must be a multiple of {RESOLUTION_STEP} from {lim.min_resolution} to "
                             f"{lim.max_resolution} px, got {resolution}")
        interval, text_only = _many(values, "guidance_interval"), _many(values, "text_only_interval")
        schedule = GuidanceSchedule(tuple(interval) if interval else (0.0, 1.0), tuple(text_only) or None)
        interval = _integer("deepcache", _one(values, "deepcache", 1))
        deepcache = DeepCache(interval) if interval != 1 else None  # 0, negative, > 1000: InputError naming it
        if deepcache is not None:
            self.pipe.cache_runner(deepcache)  # the served graphs include the DeepCache pair
        seeds, g, gi = self._variants(values)
        evaluations = schedule.evaluations(steps, len(seeds))  # DeepCache's shallow steps counted as whole: a bound
        if lim.max_evaluations is not None and evaluations > lim.max_evaluations:
            raise InputError(f"the request costs {evaluations} UNet evaluations ({steps} steps, {schedule.describe()}"
                             f", {len(seeds)} variant(s)), over this server's {lim.max_evaluations}: fewer steps, "
                             "variants or guided steps")
        preview_every = _integer("preview_every", _one(values, "preview_every", 0))
        fewest = math.ceil(steps / MAX_PREVIEWS)
        if preview_every != 0 and not fewest <= preview_every <= steps:
            raise InputError(f"preview_every must be 0 (no previews) or from {fewest} to {steps} (at most "
                             f"{MAX_PREVIEWS} previews per edit, each a VAE decode), got {preview_every}")
        image = self._image(_one(values, "image"))
        instruction = self._instruction(_one(values, "instruction"))
        return EditRequest(image, instruction, steps, resolution, sampler.name, schedule, seeds, g, gi,
                           preview_every, deepcache)

    def _variants(self, values: dict[str, Any]) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
        """(seeds, guidance scales, image guidance scales), one of each per variant."""
        lim = self.limits
        given = {name: _many(values, name) for name in VARIANT_INPUTS}
        n = max(1, *(len(v) for v in given.values()))
        for name, v in given.items():
            if len(v) > lim.max_variants:
                raise InputError(f"{name} holds {len(v)} values: at most {lim.max_variants} variants per request")
            if len(v) not in (0, 1, n):
                counts = ", ".join(f"{k} {len(x)}" for k, x in given.items() if x)
                raise InputError(f"{name} holds {len(v)} values for {n} variants ({counts}): give each one value, "
                                 "or one per variant")
        scales = {k: tuple(check_guidance(k, x) for x in given[k]) or (DEFAULTS[k],)
                  for k in ("guidance_scale", "image_guidance_scale")}
        if not given["seed"] and lim.seed_required:
            raise InputError("seed is required by this server: it answers repeated requests from its response cache "
                             "(--cache-mb), and a request without a seed would be answered with another's random "
                             "image; send a seed per variant")
        seeds = tuple(check_seed(_integer("seed", s)) for s in given["seed"]) or tuple(
            random.randrange(2**31) for _ in range(n))
        spread = {k: v * n if len(v) == 1 else v for k, v in (("seed", seeds), *scales.items())}
        if self.pipe.runner.fold_cfg and len(set(zip(spread["guidance_scale"], spread["image_guidance_scale"]))) > 1:
            raise InputError("this server's unet graph folds the guidance in (--fold-cfg) and takes one pair of "
                             "guidance scales per batch: variants may differ in seed only")
        return spread["seed"], spread["guidance_scale"], spread["image_guidance_scale"]

    def _image(self, data: Any) -> Image.Image:
        lim = self.limits
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InputError("image is empty: send the PNG, JPEG or WebP file's bytes")
        if len(data) > lim.max_image_bytes:
            raise InputError(f"image is {len(data) / 2**20:.1f} MB, over the {lim.max_image_bytes / 2**20:.0f} MB "
                             "limit")
        return open_image(data, "image", lim.max_megapixels)

    def _instruction(self, raw: Any) -> str:
        lim = self.limits
        if len(raw) > MAX_INSTRUCTION_BYTES:  # before decoding and tokenizing it
            raise InputError(f"instruction is {len(raw)} bytes, over the {MAX_INSTRUCTION_BYTES}-byte limit")
        instruction = _text("instruction", raw)
        if not instruction.strip():
            raise InputError("instruction is empty")
        ids = tokenize_prompt(self.pipe.tokenizer, instruction, forced=True)
        if len(ids.prefix) > lim.max_prefix or len(ids.suffix) > lim.max_suffix:
            raise InputError(f"instruction is too long: {len(ids.suffix)} prompt tokens after the image, the "
                             f"exported profile takes at most {lim.max_suffix}")
        return instruction

    # -- a batch of requests ----------------------------------------------------------------------------------------

    def run(self, requests: list[EditRequest], gone: list[Callable[[], bool]] | None = None,
            watch: Callable[[int, Progress], None] | None = None) -> list[EditResult | SmartEditError]:
        """Each request's result, in order: requests are grouped by batch key (in arrival order), each group runs in
        chunks of at most max_batch samples (a request's variants stay together); a failing chunk fails only its
        own requests. `gone[i]()` says whether request i's client has left: such a request is answered Cancelled
        without work, and a chunk stops when all of its clients have left. `watch(i, progress)`: request i's
        progress after each denoising step (see the module doc)."""
        gone = gone or [lambda: False] * len(requests)
        fold = self.pipe.runner.fold_cfg
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.batch_key(fold), []).append(i)
        results: list[EditResult | SmartEditError | None] = [None] * len(requests)
        for idx in groups.values():
            for chunk in _chunks(idx, [requests[i].variants for i in idx], self.limits.max_batch):
                live = []
                for i in chunk:
                    if gone[i]():
                        results[i] = Cancelled("cancelled before it started: the client has gone")
                    else:
                        live.append(i)
                if not live:
                    continue
                try:
                    stop = _Poll(lambda c=live: all(gone[i]() for i in c))
                    tell = None if watch is None else (lambda j, p, c=live: watch(c[j], p))
                    for i, res in zip(live, self._edit([requests[i] for i in live], stop, tell)):
                        results[i] = res
                except SmartEditError as e:
                    e.__traceback__ = None  # its frames hold the batch's images: keep only the message
                    for i in live:
                        results[i] = e
        return results  # type: ignore[return-value]

    def _edit(self, batch: list[EditRequest], stop: Callable[[], bool] | None = None,
              watch: Callable[[int, Progress], None] | None = None) -> list[EditResult]:
        """The pipeline's phases on the batch (SmartEditPipeline.__call__'s order and calls): the conditions and the
        image latents once per request, repeated for its variants; one denoising loop over every sample."""
        pipe, first = self.pipe, batch[0]
        pil, texts = [r.image for r in batch], [r.instruction for r in batch]
        seeds = [s for r in batch for s in r.seeds]
        g = [x for r in batch for x in r.guidance_scales]
        gi = [x for r in batch for x in r.image_guidance_scales]
        phase_ms: dict[str, float] = {}
        clock = PhaseClock(pipe.device, phase_ms)
        with clock("condition"):
            prompt_embeds, bim_residual = pipe.encode_condition(pil, texts, seed=[r.seeds[0] for r in batch])
        with clock("vae_encode"):
            image_latents = pipe.encode_image(pil, first.resolution)
        if len(seeds) > len(batch):  # variants: each request's condition and image latents, repeated
            rows = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor([r.variants for r in batch]))
            rows = rows.to(prompt_embeds.device)
            prompt_embeds, bim_residual, image_latents = (x[rows] for x in (prompt_embeds, bim_residual,
                                                                            image_latents))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        watched = self._watched(batch, watch, phase_ms) if watch else contextlib.nullcontext()
        with clock("denoise"), watched:
            latents = pipe.denoise(prompt_embeds, bim_residual, image_latents, first.steps, g, gi, generators,
                                   stop=stop, sampler=first.sampler, guidance_schedule=first.schedule,
                                   deepcache=first.deepcache)
        _check_finite(pipe, latents, f"the latents are not finite after {first.steps} steps")
        with clock("vae_decode"):
            decoded = pipe.decode(latents)
        _check_finite(pipe, decoded, "the decoded image is not finite")
        images = postprocess(decoded)
        clock.finish()
        wall = phase_ms["total"]
        out, at = [], 0
        for r in batch:
            pngs = [_png(img) for img in images[at:at + r.variants]]
            variants = [{"seed": s, "guidance_scale": a, "image_guidance_scale": b, "bytes": len(p)}
                        for s, a, b, p in zip(r.seeds, r.guidance_scales, r.image_guidance_scales, pngs)]
            at += r.variants
            out.append(EditResult(b"".join(pngs), {
                "phase_ms": phase_ms, "wall_ms": wall, "batch_size": len(seeds), "condition_batch": len(batch),
                "seed": r.seeds[0], "variants": variants, "steps": r.steps, "resolution": r.resolution,
                "sampler": r.sampler, "guidance_schedule": r.schedule.to_dict(),
                "deepcache": None if r.deepcache is None else r.deepcache.interval,
                "unet_evaluations": r.schedule.evaluations(r.steps, r.variants), "backend": pipe.runner.name},
                pngs))
        return out

    @contextlib.contextmanager
    def _watched(self, batch: list[EditRequest], watch: Callable[[int, Progress], None], phase_ms: dict):
        """The pipeline's own denoising loop, watched: SmartEditPipeline.denoise evaluates each step's guided eps
        through pipe.guided_eps (pipe.cached_eps with DeepCache), once per step; while this is open, that call also
        tells every request of `batch` its step and decodes the previews that are due (phase_ms["previews"]: their
        time, within "denoise")."""
        pipe, first = self.pipe, batch[0]
        inner, inner_cached, done = pipe.guided_eps, pipe.cached_eps, [0]
        starts = [sum(r.variants for r in batch[:j]) for j in range(len(batch))]

        def guided_eps(latents, image_latents, row, *args, **kw):
            return report(latents, row, inner(latents, image_latents, row, *args, **kw))

        def cached_eps(runner, latents, image_latents, row, *args, **kw):
            eps, feature = inner_cached(runner, latents, image_latents, row, *args, **kw)
            return report(latents, row, eps), feature

        def report(latents, row, eps):
            done[0] += 1
            step = done[0]
            due = [j for j, r in enumerate(batch) if r.preview_every and step % r.preview_every == 0
                   and step < first.steps]
            previews: dict[int, tuple[bytes, ...]] = {}
            if due:
                t0 = time.perf_counter()
                rows = [starts[j] + v for j in due for v in range(batch[j].variants)]
                pics = self._previews(latents[rows], row, eps[rows], first.sampler)
                at = 0
                for j in due:
                    previews[j] = tuple(pics[at:at + batch[j].variants])
                    at += batch[j].variants
                phase_ms["previews"] = phase_ms.get("previews", 0.0) + (time.perf_counter() - t0) * 1e3
            for j in range(len(batch)):
                watch(j, Progress(step, first.steps, previews.get(j, ())))
            return eps

        for j in range(len(batch)):
            watch(j, Progress(0, first.steps))  # started
        pipe.guided_eps, pipe.cached_eps = guided_eps, cached_eps  # this instance only; the class's again after
        try:
            yield
        finally:
            del pipe.guided_eps, pipe.cached_eps

    def _previews(self, latents: torch.Tensor, row: torch.Tensor, eps: torch.Tensor, sampler: str) -> list[bytes]:
        """Small PNGs of the clean image the step predicts: x0 = x - sigma eps for the samplers whose latents carry
        sigma (Euler), x0 = (x - sqrt(1 - a) eps) / sqrt(a) (a = alphas_cumprod at the timestep) for the others,
        decoded by the VAE and shrunk to PREVIEW_SIDE px."""
        x, e = latents.float(), eps.float()
        sigma = float(row[SIGMA])
        if sigma > 0:
            x0 = x - sigma * e
        else:
            if sampler not in self._alphas:
                self._alphas[sampler] = get_sampler(sampler).diffusers_scheduler().alphas_cumprod.float()
            a = self._alphas[sampler][int(round(float(row[T])))].item()
            x0 = (x - (1 - a) ** 0.5 * e) / a ** 0.5
        out = []
        for img in postprocess(self.pipe.decode(x0.to(latents.dtype))):
            img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            out.append(_png(img))
        return out


def _chunks(idx: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """idx split, in order, into runs whose sizes sum to at most `limit` (a size over it runs alone)."""
    out: list[list[int]] = []
    total = 0
    for i, n in zip(idx, sizes):
        if out and total + n <= limit:
            out[-1].append(i)
            total += n
        else:
            out.append([i])
            total = n
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _check_finite(pipe: SmartEditPipeline, x: torch.Tensor, what: str) -> None:
    """RunError naming the samples of x [B, ...] that hold NaN/inf: they would be written as black or white images
    that look like answers."""
    bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise RunError(f"sample(s) {bad}: {what} on backend {pipe.runner.name!r}: no image written")


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
