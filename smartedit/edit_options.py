"""What one edit is asked for besides its image and instruction, as one checked object: the command line builds it
once from its flags, the edit passes it to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_RESOLUTION,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    check_guidance,
    check_resolution,
    check_seed,
)
from .deepcache import DeepCache
from .guidance import GuidanceSchedule
from .scheduler import DEFAULT_SAMPLER, get_sampler


@dataclass(frozen=True)
class EditOptions:
    """The official test script's defaults; checked at construction, before anything loads (InputError naming the
    value): steps within the sampler's bound (1..MAX_STEPS; 999 for some), the resolution, the seed, the guidance
    scales. `sampler`: a name of smartedit.scheduler.SAMPLERS (the command line resolves the model folder's)."""

    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    resolution: int = DEFAULT_RESOLUTION
    seed: int = DEFAULT_SEED
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE
    img_token_mode: str = "forced"
    template: int | str = 0  # a prompt template index, or "random" (the official script's choice)
    guidance: GuidanceSchedule | None = None  # None: 3-way guidance on every step
    deepcache: DeepCache | None = None  # None: the whole UNet on every step

    def __post_init__(self) -> None:
        get_sampler(self.sampler).check_steps(self.steps)
        check_resolution(self.resolution)
        check_seed(self.seed)
        for name in ("guidance_scale", "image_guidance_scale"):
            check_guidance(name, getattr(self, name))

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of SmartEditPipeline.__call__ for these options."""
        return dict(steps=self.steps, guidance_scale=self.guidance_scale,
                    image_guidance_scale=self.image_guidance_scale, resolution=self.resolution, seed=self.seed,
                    img_token_mode=self.img_token_mode, template=self.template, sampler=self.sampler,
                    guidance_schedule=self.guidance, deepcache=self.deepcache)
