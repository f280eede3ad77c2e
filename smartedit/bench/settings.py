"""A setting of the denoising loop: a sampler, its steps, a guidance schedule and DeepCache, as the benchmarks name and
run them.

Written on a command line as SAMPLER:STEPS[:guided=START-END][:text-only=START-END][:deepcache=N[/BRANCH]], e.g.
`euler-ancestral:100` (the official loop), `dpm-solver++:20`, `ddim:30:guided=0-0.6` (3-way guidance on the first 60%
of the steps, the conditional branch alone after), `euler-ancestral:100:text-only=0.5-1`,
`euler-ancestral:100:deepcache=3` (the whole UNet every third step, the shallow path between, at the runner's skip
branch), `dpm-solver++:20:deepcache=2/1` (at skip branch 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smartedit.config import DEFAULT_STEPS
from smartedit.deepcache import DeepCache
from smartedit.errors import InputError
from smartedit.guidance import DEFAULT_GUIDANCE, GuidanceSchedule
from smartedit.scheduler import DEFAULT_SAMPLER, get_sampler


@dataclass(frozen=True)
class Setting:
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    guidance: GuidanceSchedule = DEFAULT_GUIDANCE
    deepcache: DeepCache | None = None  # None: the plain loop

    def __post_init__(self) -> None:
        get_sampler(self.sampler).check_steps(self.steps)

    @property
    def is_default(self) -> bool:
        """The official loop: EulerAncestral, 100 steps, 3-way guidance on every step."""
        return self == Setting()

    @property
    def label(self) -> str:
        g = self.guidance
        return ":".join([self.sampler, str(self.steps)]
                        + ([] if g.interval == (0.0, 1.0) else [f"guided={g.interval[0]:g}-{g.interval[1]:g}"])
                        + ([] if g.text_only is None else [f"text-only={g.text_only[0]:g}-{g.text_only[1]:g}"])
                        + ([] if self.deepcache is None else [f"deepcache={self.deepcache.interval}" + (
                            "" if self.deepcache.branch is None else f"/{self.deepcache.branch}")]))

    def evaluations(self, batch: int = 1) -> int:
        """Whole UNet evaluations of one edit of `batch` samples (the default: 300 per sample); DeepCache's shallow
        steps are not counted."""
        if self.deepcache is None:
            return self.guidance.evaluations(self.steps, batch)
        branches = self.guidance.branches(self.steps)
        return batch * sum(n for n, whole in zip(branches, self.deepcache.whole_steps(branches)) if whole)

    def kwargs(self) -> dict[str, Any]:
        """The arguments of SmartEditPipeline.__call__ / denoise this setting sets."""
        return {"steps": self.steps, "sampler": self.sampler, "guidance_schedule": self.guidance,
                "deepcache": self.deepcache}

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "sampler": self.sampler, "steps": self.steps, "guidance": self.guidance.to_dict()}
        if self.deepcache is not None:
            out["deepcache"] = {"interval": self.deepcache.interval, "branch": self.deepcache.branch}
        return out

    @classmethod
    def parse(cls, text: str) -> "Setting":
        """"dpm-solver++:20:guided=0-0.6" -> Setting (InputError naming the text otherwise)."""
        parts = [p.strip() for p in text.strip().split(":")]
        form = "SAMPLER:STEPS[:guided=START-END][:text-only=START-END][:deepcache=N[/BRANCH]]"
        if len(parts) < 2 or not parts[1].isdigit():
            raise InputError(f"a setting is {form}, got {text!r}")
        ranges: dict[str, tuple[float, float]] = {}
        deepcache = None
        for p in parts[2:]:
            key, _, value = p.partition("=")
            if key == "deepcache" and deepcache is None:
                n, _, b = value.partition("/")
                if not n.isdigit() or (b and not b.isdigit()):
                    raise InputError(f"setting {text!r}: deepcache takes N or N/BRANCH (integers), got {value!r}")
                deepcache = DeepCache(int(n), int(b) if b else None)
                continue
            lo, _, hi = value.partition("-")
            if key not in ("guided", "text-only") or key in ranges:
                raise InputError(f"setting {text!r}: expected guided=START-END, text-only=START-END or "
                                 f"deepcache=N[/BRANCH], got {p!r}")
            try:
                ranges[key] = (float(lo), float(hi))
            except ValueError:
                raise InputError(f"setting {text!r}: {key} takes two fractions START-END, got {value!r}") from None
        guidance = GuidanceSchedule(ranges.get("guided", (0.0, 1.0)), ranges.get("text-only"))
        return cls(get_sampler(parts[0]).name, int(parts[1]), guidance, deepcache)


def parse_settings(text: str) -> tuple[Setting, ...]:
    """Settings separated by spaces or commas: "euler-ancestral:100 dpm-solver++:20"."""
    items = [t for t in text.replace(",", " ").split() if t]
    if not items:
        raise InputError(f"expected settings SAMPLER:STEPS[...] separated by spaces, got {text!r}")
    return tuple(Setting.parse(t) for t in items)


# The frontier's sweep: the official loop first, each sampler at 10-50 steps, each guidance lever on the official
# sampler, DeepCache at intervals 2, 3, 5 on skip branches 0 and 1, and the combinations of a fast sampler with a
# lever.
FRONTIER_SETTINGS = parse_settings(
    "euler-ancestral:100 "
    + " ".join(f"{s}:{n}" for s in ("euler-ancestral", "euler", "ddim", "dpm-solver++", "unipc")
               for n in (10, 20, 30, 50))
    + " euler-ancestral:100:guided=0-0.8 euler-ancestral:100:guided=0-0.6 euler-ancestral:100:guided=0-0.4"
      " euler-ancestral:100:guided=0.2-1 euler-ancestral:100:text-only=0.5-1 euler-ancestral:100:text-only=0-1"
      " euler-ancestral:50:guided=0-0.6 ddim:30:guided=0-0.6 dpm-solver++:20:guided=0-0.6"
      " dpm-solver++:20:text-only=0.5-1 unipc:20:guided=0-0.6 dpm-solver++:10:guided=0-0.6"
    + " " + " ".join(f"euler-ancestral:100:deepcache={n}/{b}" for b in (0, 1) for n in (2, 3, 5))
    + " euler-ancestral:100:guided=0-0.6:deepcache=3/1 euler-ancestral:20:deepcache=2/1 dpm-solver++:20:deepcache=2/1"
      " dpm-solver++:20:guided=0-0.6:deepcache=2/1 dpm-solver++:10:deepcache=2/1")
