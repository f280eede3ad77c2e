"""Which classifier-free guidance each denoising step runs: the 3-way batch, a 2-way text-only batch, or the
conditional branch alone.

SmartEdit guides with three UNet branches per step, [cond; null text + image; null text + zero image], combined as
eps = u + g_t (t - i) + g_i (i - u). A guidance schedule spends fewer evaluations on some steps:

    3 branches  [cond; null+img; null+zero-img]   eps = u + g_t (t - i) + g_i (i - u)    (the default, every step)
    2 branches  [cond; null+img]                  eps = i + g_t (t - i)                  (text-only: image scale 1)
    1 branch    [cond]                            eps = t                                (no guidance)

Step i of n sits at the fraction f = i / (n - 1) of the schedule (0 for the first step, 1 for the last; 0 when n = 1).
Steps with f in `interval` [start, end] are guided (3 branches, or 2 where f is also in `text_only`); the others run
the conditional branch alone. The default, interval [0, 1] and no text-only range, guides every step with 3 branches:
the official loop, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InputError

BRANCHES = (1, 2, 3)  # UNet evaluations per sample on one step
Interval = tuple[float, float]


def _check_interval(name: str, value: object) -> Interval:
    """(start, end) with 0 <= start <= end <= 1, finite numbers (InputError naming `name` and the value)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InputError(f"{name} must be a pair (start, end) of fractions of the schedule, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"{name} must hold two finite numbers in [0, 1], got {list(value)!r}")
    start, end = float(value[0]), float(value[1])
    if not 0.0 <= start <= end <= 1.0:
        raise InputError(f"{name} must satisfy 0 <= start <= end <= 1, got [{start:g}, {end:g}]")
    return start, end


@dataclass(frozen=True)
class GuidanceSchedule:
    """Which CFG batch each step evaluates (see the module's docstring). Frozen and hashable: a runner keys its
    captured programs by the branches per step, and a server may batch requests that share one."""

    interval: Interval = (0.0, 1.0)  # guided on the steps whose fraction f is in [start, end]
    text_only: Interval | None = None  # of those, 2-way text-only on the steps whose f is in [start, end]

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", _check_interval("guidance interval", self.interval))
        if self.text_only is not None:
            object.__setattr__(self, "text_only", _check_interval("text-only guidance interval", self.text_only))

    @property
    def is_default(self) -> bool:
        """3-way guidance on every step, for any number of steps."""
        return self.interval == (0.0, 1.0) and self.text_only is None

    def branches(self, steps: int) -> tuple[int, ...]:
        """The UNet branches of each step (3, 2 or 1), [steps]."""
        out = []
        for i in range(steps):
            f = i / (steps - 1) if steps > 1 else 0.0
            if not self.interval[0] <= f <= self.interval[1]:
                out.append(1)
            elif self.text_only is not None and self.text_only[0] <= f <= self.text_only[1]:
                out.append(2)
            else:
                out.append(3)
        return tuple(out)

    def evaluations(self, steps: int, batch: int = 1) -> int:
        """UNet evaluations (one sample through the UNet once) of an edit of `steps` steps, for `batch` samples."""
        return sum(self.branches(steps)) * batch

    def to_dict(self) -> dict[str, Any]:
        return {"interval": list(self.interval), "text_only": None if self.text_only is None else list(self.text_only)}

    @classmethod
    def from_dict(cls, d: object) -> "GuidanceSchedule":
        if not isinstance(d, dict) or set(d) - {"interval", "text_only"}:
            raise InputError(f"a guidance schedule is {{'interval': [start, end], 'text_only': [start, end] or "
                             f"null}}, got {d!r}")
        return cls(tuple(d.get("interval", (0.0, 1.0))),
                   None if d.get("text_only") is None else tuple(d["text_only"]))

    def describe(self) -> str:
        """A short label: "3-way", "3-way in [0.2, 1], else cond", "... text-only in [0.5, 1]"."""
        if self.is_default:
            return "3-way"
        parts = ["3-way" if self.interval == (0.0, 1.0) else
                 f"guided in [{self.interval[0]:g}, {self.interval[1]:g}], else cond only"]
        if self.text_only is not None:
            parts.append(f"text-only in [{self.text_only[0]:g}, {self.text_only[1]:g}]")
        return "; ".join(parts)


DEFAULT_GUIDANCE = GuidanceSchedule()


def parse_interval(text: str, name: str) -> Interval:
    """"0.2,1" -> (0.2, 1.0), for the command lines (InputError naming `name` otherwise)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"{name} must be two fractions START,END in [0, 1], got {text!r}") from None
    return _check_interval(name, values)
