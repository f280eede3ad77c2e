"""Which denoising steps run the whole UNet and which its shallow path (DeepCache, Ma et al., 2024).

With interval N, step i runs the whole UNet (the `unet_deep` graph: eps and the feature cached at the skip branch)
when i is a multiple of N, and the shallow path (`unet_shallow`: conv_in, the branch's first down layers, the cached
feature, the last up layers) on the steps between. A step whose CFG batch has more branches than the batch the
feature was cached for (smartedit.guidance) runs the whole UNet too; one with fewer uses the feature's first rows (the
batch is branch-major). N = 1 is the plain loop: every step whole, nothing cached.

The skip branch k (0 <= k <= the UNet's layers_per_block) is fixed where the graphs are built: by
`smartedit-export --deepcache K` for exported graphs (recorded in their manifest entries), by the pipeline's runner
for the model itself (EagerRunner.cache_branch; DeepCache.branch picks another per edit there).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

DEFAULT_CACHE_BRANCH = 0  # the shallowest path: conv_in and the last up layer
DEFAULT_CACHE_INTERVAL = 3  # the whole UNet on every third step
MAX_CACHE_INTERVAL = 1000  # the samplers' largest step count: beyond it every interval is the same


@dataclass(frozen=True)
class DeepCache:
    """The whole UNet every `interval` steps, the shallow path at skip branch `branch` in between (None: the
    runner's branch). Frozen and hashable: a runner keys its captured programs by it."""

    interval: int = DEFAULT_CACHE_INTERVAL
    branch: int | None = None

    def __post_init__(self) -> None:
        n = self.interval
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CACHE_INTERVAL:
            raise InputError(f"DeepCache interval must be an integer in [1, {MAX_CACHE_INTERVAL}] (the whole UNet "
                             f"every N steps; 1: every step), got {n!r}")
        b = self.branch
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise InputError(f"DeepCache branch must be an integer >= 0 (a skip branch of the UNet's first down "
                             f"block), got {b!r}")

    @property
    def is_plain(self) -> bool:
        return self.interval == 1

    def whole_steps(self, branches: tuple[int, ...]) -> tuple[bool, ...]:
        """Per step (its CFG branches, smartedit.guidance): True where the whole UNet runs."""
        out, cached = [], 0
        for i, n in enumerate(branches):
            whole = i % self.interval == 0 or n > cached
            cached = n if whole else cached
            out.append(whole)
        return tuple(out)


def parse_deepcache(interval: int | None, branch: int | None = None) -> DeepCache | None:
    """The flags --deepcache N / --deepcache-branch K -> a DeepCache, or None (the plain loop) when N is absent."""
    if interval is None:
        if branch is not None:
            raise InputError("--deepcache-branch needs --deepcache N (the interval)")
        return None
    return DeepCache(interval, branch)
