"""The command-line arguments every command shares, in one place: argparse types that refuse a bad value with its
name before any work, and the model source (--model DIR, or --preset P --random-weights with --seed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import DEFAULT_SEED, PRESETS, check_resolution, check_seed
from .errors import InputError
from .deepcache import DEFAULT_CACHE_BRANCH, DeepCache, parse_deepcache
from .guidance import GuidanceSchedule, parse_interval
from .scheduler import SAMPLERS
from .weights import ModelSource

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def seed(text: str) -> int:
    try:
        return check_seed(_int(text))
    except InputError:
        raise argparse.ArgumentTypeError(f"must be in 0..2^63-1, got {text}") from None


def resolution(text: str) -> int:
    """One image side in px (a multiple of the resolution step, within the limits)."""
    try:
        return check_resolution(_int(text))
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _listed(text: str, each, what: str) -> tuple:
    values = tuple(each(v.strip()) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return values


def resolutions(text: str) -> tuple[int, ...]:
    """Comma-separated image sides, each a valid resolution (e.g. 256,512)."""
    return _listed(text, resolution, "image sides")


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names (e.g. backends official,eager), parsed once; the caller checks them against its list."""
    return _listed(text, str, "names")


def counts(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers (e.g. concurrency levels 1,2,4,8)."""
    return _listed(text, positive, "integers >= 1")


def add_model_source(p: argparse.ArgumentParser, required: bool = True, what: str = "") -> None:
    """--model DIR | --preset NAME, --random-weights, --seed: where the weights come from."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--model", help="a converted SmartEdit folder (smartedit-convert output)" + what)
    src.add_argument("--preset", choices=sorted(PRESETS, key=["tiny", "7b", "13b"].index),
                     help="this preset with random weights" + what)
    p.add_argument("--random-weights", action="store_true",
                   help="required with --preset: outputs are noise (latency does not depend on weight values)")
    p.add_argument("--seed", type=seed, default=DEFAULT_SEED,
                   help="seed of the random weights (and of the noise of an edit)")


def require_random_weights(preset: str | None, random_weights: bool) -> None:
    """A preset's weights are random: it is taken only when asked for with --random-weights."""
    if preset and not random_weights:
        raise InputError("--preset builds random weights: add --random-weights to say that is what you want, "
                         "or load a converted checkpoint with --model DIR")


def model_source(p: argparse.ArgumentParser, a: argparse.Namespace) -> ModelSource | None:
    """The ModelSource of parsed arguments (None when neither was given and the group is optional)."""
    try:
        require_random_weights(a.preset, a.random_weights)
    except InputError as e:
        p.error(str(e))
    if a.model:
        return ModelSource(model=Path(a.model))
    return ModelSource(preset=a.preset, seed=a.seed) if a.preset else None



def _interval(name: str):
    def parse(text: str) -> tuple[float, float]:
        try:
            return parse_interval(text, name)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_denoise_levers(p: argparse.ArgumentParser) -> None:
    """--sampler, --guidance-interval, --text-only-guidance, --deepcache, --deepcache-branch: what the denoising loop
    costs (defaults: the official loop, the model folder's sampler, 3-way guidance and the whole UNet on every
    step)."""
    g = p.add_argument_group("denoising loop (defaults: the official one; see the README's frontier before choosing)")
    g.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="the sampler (default: the model folder's, euler-ancestral unless it says otherwise)")
    g.add_argument("--guidance-interval", type=_interval("--guidance-interval"), default=None, metavar="START,END",
                   help="guide (3-way CFG batch) only on the steps whose fraction i/(steps-1) of the schedule is in "
                        "[START, END]; the others run the conditional branch alone (1 UNet evaluation, not 3)")
    g.add_argument("--text-only-guidance", type=_interval("--text-only-guidance"), default=None, metavar="START,END",
                   help="on the guided steps whose fraction is in [START, END], the 2-way text-only batch "
                        "[cond; null text + image] (image guidance 1: 2 evaluations, not 3)")
    g.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="DeepCache: the whole UNet every N steps, its shallow path on the cached deep feature between "
                        "(1: every step whole); an exported backend needs smartedit-export --deepcache")
    g.add_argument("--deepcache-branch", type=int, default=None, metavar="K",
                   help="DeepCache's skip branch (0: the shallowest path; default: the exported graphs' branch, "
                        f"{DEFAULT_CACHE_BRANCH} for the model itself)")


def deepcache(a: argparse.Namespace) -> DeepCache | None:
    """The DeepCache of parsed --deepcache / --deepcache-branch (None: the plain loop)."""
    return parse_deepcache(a.deepcache, a.deepcache_branch)


def guidance_schedule(a: argparse.Namespace) -> GuidanceSchedule | None:
    """The GuidanceSchedule of parsed --guidance-interval / --text-only-guidance (None: the default)."""
    if a.guidance_interval is None and a.text_only_guidance is None:
        return None
    return GuidanceSchedule(a.guidance_interval or (0.0, 1.0), a.text_only_guidance)
