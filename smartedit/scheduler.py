"""The sampler: EulerAncestral (InstructPix2Pix's scheduler), with everything a step reads prepared up front.

diffusers' EulerAncestralDiscreteScheduler.step keeps a Python step index, reads sigmas by it and draws the ancestral
noise from the seed's generator inside each step. Here the schedule is a table [steps, 4] = (timestep, sigma,
sigma_up, dt) on the device and the noise for every step is drawn once, in the order diffusers draws it, into
[steps, B, 4, h, w]; step i reads row i of both. The eager pipeline loops over it in Python; the CUDA-graph runner
reads the row through a device counter, so one captured step serves every step; the C++ runtime
(runtime/src/euler_ancestral.cpp) builds the same table.

The step is diffusers' step op for op, with its dtype promotions (a 0-dim fp32 sigma times an fp16 tensor stays fp16;
the update runs in fp32 and is cast back), so for the same seed it gives the same latents: tests/test_denoise_loop.py
checks this against diffusers itself, bit for bit, in fp32 and fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from diffusers import EulerAncestralDiscreteScheduler

from .config import SCHEDULER_CONFIG
from .errors import InputError

T, SIGMA, SIGMA_UP, DT = range(4)  # columns of AncestralPlan.table
# one generator for the batch, or one per sample (each sample then draws what it would draw alone: a batched request
# of a server gives the image the same request gets alone)
Generators = Union[torch.Generator, Sequence[torch.Generator], None]
MAX_STEPS = 1000  # the schedule's training timesteps: more steps than that repeat timesteps


def check_steps(steps: object) -> int:
    """A number of denoising steps: an integer in 1..MAX_STEPS (InputError naming it otherwise)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    return steps


@dataclass
class AncestralPlan:
    table: torch.Tensor  # [steps, 4] fp32 on the device: timestep, sigma, sigma_up, dt = sigma_down - sigma
    init_noise_sigma: torch.Tensor  # 0-dim fp32, as diffusers' scheduler.init_noise_sigma

    @property
    def steps(self) -> int:
        return self.table.shape[0]

    @classmethod
    def build(cls, steps: int, device: torch.device | str = "cpu") -> "AncestralPlan":
        """The schedule diffusers computes for `steps` (its timesteps and sigmas), with the per-step ancestral
        constants evaluated by the same tensor expressions diffusers' step evaluates (so the same fp32 values)."""
        check_steps(steps)
        sched = EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        sched.set_timesteps(steps, device=device)
        sigma_from, sigma_to = sched.sigmas[:-1], sched.sigmas[1:]  # [steps] each; sigmas ends with 0
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        table = torch.stack([sched.timesteps.float(), sigma_from, sigma_up, sigma_down - sigma_from], dim=1)
        init = torch.as_tensor(sched.init_noise_sigma, dtype=torch.float32).to(device)
        return cls(table.float().contiguous(), init)


def initial_latents(generator: Generators, shape: tuple[int, ...], plan: AncestralPlan,
                    device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The starting latents [B,4,h,w]: fp32 noise from the seed's generator (on the CPU for a CPU generator), times
    the schedule's initial sigma, as diffusers' pipelines prepare them; with one generator per sample, each sample's
    noise from its own."""
    if isinstance(generator, (list, tuple)):
        noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device, dtype) * plan.init_noise_sigma


def draw_ancestral_noise(generator: Generators, steps: int, shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """-> [steps, *shape] on `device`: the noise diffusers' step i draws, for every i, in its order. As diffusers'
    randn_tensor does, the noise is drawn where the generator lives (a CPU generator: on the CPU, the same numbers
    whatever the device; a CUDA generator: on its GPU) and then moved to `device`. One generator per sample: each
    sample's steps from its own, [steps, B, ...] with B the samples."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([draw_ancestral_noise(g, steps, shape[1:], dtype, device) for g in generator], dim=1)
    where = generator.device if generator is not None else torch.device(device)
    noise = torch.stack([torch.randn(shape, generator=generator, dtype=dtype, device=where) for _ in range(steps)])
    return noise.to(device)


def scale_model_input(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """EulerAncestral's scale_model_input: x / sqrt(sigma^2 + 1), sigma a 0-dim fp32 tensor (it does not promote)."""
    return latents / ((sigma**2 + 1) ** 0.5)


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
