"""EulerAncestral with everything a step reads prepared on the device up front.

diffusers' EulerAncestralDiscreteScheduler.step keeps a Python step index, reads sigmas by it and draws the ancestral
noise from the seed's generator inside each step (on the CPU for a CPU generator, then copies it over). A CUDA graph
cannot replay any of that. Here the schedule is a device table [steps, 4] = (timestep, sigma, sigma_up, dt) and the
noise for every step is drawn once, in the order diffusers draws it, into a device tensor [steps, B, 4, h, w]; a step
then reads row `idx` of both (idx: a device tensor, so the same captured step serves every step).

The step is diffusers' step op for op, with its dtype promotions (a 0-dim fp32 sigma times an fp16 tensor stays fp16;
the update runs in fp32 and is cast back), so for the same seed it gives the same latents: tests/test_denoise_loop.py
checks this against diffusers itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import EulerAncestralDiscreteScheduler

from smartedit.config import SCHEDULER_CONFIG

T, SIGMA, SIGMA_UP, DT = range(4)  # columns of AncestralPlan.table


@dataclass
class AncestralPlan:
    table: torch.Tensor  # [steps, 4] fp32 on the device: timestep, sigma, sigma_up, dt = sigma_down - sigma
    init_noise_sigma: float

    @property
    def steps(self) -> int:
        return self.table.shape[0]

    @classmethod
    def build(cls, steps: int, device: torch.device | str) -> "AncestralPlan":
        """The schedule diffusers computes for `steps` (its timesteps and sigmas), with the per-step ancestral
        constants evaluated by the same tensor expressions diffusers' step evaluates (so the same fp32 values)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        sched = EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        sched.set_timesteps(steps, device=device)
        sigma_from, sigma_to = sched.sigmas[:-1], sched.sigmas[1:]  # [steps] each; sigmas ends with 0
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        table = torch.stack([sched.timesteps.float(), sigma_from, sigma_up, sigma_down - sigma_from], dim=1)
        return cls(table.float().contiguous(), float(sched.init_noise_sigma))


def draw_ancestral_noise(generator: torch.Generator | None, steps: int, shape: tuple[int, ...],
                         dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """-> [steps, *shape] on `device`: the noise diffusers' step i draws, for every i, in its order. As diffusers'
    randn_tensor does, the noise is drawn where the generator lives (a CPU generator: on the CPU, the same numbers
    whatever the device; a CUDA generator: on its GPU) and then moved to `device`."""
    where = generator.device if generator is not None else torch.device(device)
    noise = torch.stack([torch.randn(shape, generator=generator, dtype=dtype, device=where) for _ in range(steps)])
    return noise.to(device)


def ancestral_step(latents: torch.Tensor, eps: torch.Tensor, row: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One EulerAncestral update (epsilon prediction). latents [B,4,h,w], eps [B,4,h,w] (the guided eps),
    row [4] = one table row, noise [B,4,h,w] -> latents [B,4,h,w] in eps's dtype."""
    sigma, sigma_up, dt = row[SIGMA], row[SIGMA_UP], row[DT]  # 0-dim fp32: they do not promote fp16 tensors
    sample = latents.to(torch.float32)
    pred_original = sample - sigma * eps
    derivative = (sample - pred_original) / sigma
    prev = sample + derivative * dt
    prev = prev + noise * sigma_up
    return prev.to(eps.dtype)
