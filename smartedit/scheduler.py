"""The samplers: diffusers' schedulers with everything a step reads prepared up front.

diffusers' schedulers keep a Python step index, compute each step's constants from it and (EulerAncestral) draw the
step's noise from the seed's generator inside `step`. Here a sampler's whole schedule is a table [steps, K] on the
device, row i holding every constant step i reads, evaluated by the tensor expressions diffusers' `step` evaluates
(so the same fp32 values); an ancestral sampler's noise for every step is drawn once, in the order diffusers draws
it, into [steps, B, 4, h, w]; a multistep solver's history (its earlier predictions, the sample it last started
from) lives in a device tensor [slots, B, 4, h, w] that its step reads and updates in place. Step i reads row i of
each, so the eager pipeline loops over them in Python and the CUDA-graph runner reads them through a device
counter: one captured step serves every step of every sampler. Where diffusers branches on the step index (a
multistep solver's first-order start and end), the row holds a flag and the step selects with `torch.where`.

    name               diffusers class                    history  per-step noise  C++ runtime
    euler-ancestral    EulerAncestralDiscreteScheduler    -        yes             yes (the official sampler)
    euler              EulerDiscreteScheduler             -        -               yes
    ddim               DDIMScheduler (eta 0)              -        -               yes
    dpm-solver++       DPMSolverMultistepScheduler (2M)   1        -               refused by name
    unipc              UniPCMultistepScheduler (bh2, 2)   3        -               refused by name

Every step is diffusers' step op for op, with its dtype promotions (a 0-dim fp32 constant times an fp16 tensor stays
fp16; the Euler updates run in fp32 and are cast back), so for the same seed it gives the same latents: the tests
drive diffusers' own classes with the same model outputs and compare bit for bit in fp32. Each sampler's diffusers
config is InstructPix2Pix's (SCHEDULER_CONFIG) plus the few keys of its own listed in SAMPLERS: the config a model
folder records and an export's manifest carries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from .config import SCHEDULER_CONFIG
from .errors import InputError

# one generator for the batch, or one per sample (each sample then draws what it would draw alone: a batched request
# of a server gives the image the same request gets alone)
Generators = Union[torch.Generator, Sequence[torch.Generator], None]
MAX_STEPS = 1000  # the schedule's training timesteps: no sampler takes more steps than that
T, SIGMA = 0, 1  # every table's first columns: the UNet's timestep; the sigma its input is scaled by (0: unscaled)
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
                  torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """One sampler: its diffusers class (the reference), its config, its bounds and its step on a table row.

    step(latents [B,4,h,w], eps [B,4,h,w] (the guided eps), row [K] fp32, noise [B,4,h,w] or None,
         history [slots,B,4,h,w] or None, updated in place) -> latents [B,4,h,w] in eps's dtype
    """

    name: str
    scheduler: type  # the diffusers class whose step this is
    options: dict[str, Any]  # its config keys beyond SCHEDULER_CONFIG
    columns: tuple[str, ...]  # the table's columns (the first two: timestep, sigma)
    rows: Callable[[Any, int], list[list[torch.Tensor]]]  # (diffusers scheduler after set_timesteps, steps) -> rows
    step: StepFn
    max_steps: int = MAX_STEPS  # diffusers' own limit for this class and config
    noise: bool = False  # draws one noise tensor per step (ancestral)
    history: int = 0  # slots of device history a step reads and updates

    @property
    def config(self) -> dict[str, Any]:
        """The diffusers config of this sampler: InstructPix2Pix's schedule and this sampler's own keys."""
        return {**SCHEDULER_CONFIG, **self.options}

    def diffusers_scheduler(self):
        """A fresh instance of diffusers' class with this config (the reference the tests drive)."""
        return self.scheduler.from_config(self.config)

    def record(self) -> dict[str, Any]:
        """What a model folder saves and an export's manifest carries: name, diffusers class and the config it runs
        with, as diffusers' class fills it in (config plus its defaults: timestep_spacing, trained_betas, ...), so
        that a reader without diffusers (the C++ runtime) builds the same schedule from it. A value JSON cannot
        hold (dpm-solver++'s lambda_min_clipped -inf) is left out: an absent key is the class's default."""
        full = self.diffusers_scheduler().config
        config = {k: v for k, v in full.items() if not k.startswith("_") and _json_finite(v)}
        return {"name": self.name, "class": self.scheduler.__name__, "config": config}

    def check_steps(self, steps: object) -> int:
        """A number of steps this sampler takes: an integer in 1..max_steps (InputError naming it otherwise)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.max_steps:
            raise InputError(f"steps must be an integer from 1 to {self.max_steps}, got {steps!r} (sampler "
                             f"{self.name!r})")
        return steps

    def plan(self, steps: int, device: torch.device | str = "cpu") -> "Plan":
        """The schedule diffusers computes for `steps` (its timesteps and sigmas), with every constant a step reads
        evaluated by diffusers' own expressions on the CPU (where its schedulers keep their sigmas), then moved."""
        self.check_steps(steps)
        sched = self.diffusers_scheduler()
        sched.set_timesteps(steps)
        table = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in row])
                             for row in self.rows(sched, steps)])
        assert table.shape == (steps, len(self.columns)), (self.name, table.shape)
        init = torch.as_tensor(sched.init_noise_sigma, dtype=torch.float32)
        return Plan(self, table.contiguous().to(device), init.to(device))


@dataclass
class Plan:
    """One edit's schedule: the sampler, its table [steps, K] fp32 and init_noise_sigma (0-dim fp32), on the device."""

    sampler: Sampler
    table: torch.Tensor
    init_noise_sigma: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.table.shape[0]

    def history(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
        """A zeroed history [slots, *shape] for one edit (None for a sampler without one)."""
        if not self.sampler.history:
            return None
        return torch.zeros((self.sampler.history, *shape), dtype=dtype, device=device)


# -- EulerAncestral (the official sampler) ----------------------------------------------------------------------------

EA_COLUMNS = ("timestep", "sigma", "sigma_up", "dt")  # dt = sigma_down - sigma (the C++ runtime's table too)
SIGMA_UP, DT = 2, 3


def _ancestral_rows(sched, steps: int) -> list[list[torch.Tensor]]:
    sigma_from, sigma_to = sched.sigmas[:-1], sched.sigmas[1:]  # [steps] each; sigmas ends with 0
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return [list(r) for r in torch.stack([sched.timesteps.float(), sigma_from, sigma_up, sigma_down - sigma_from], 1)]


def ancestral_step(latents: torch.Tensor, eps: torch.Tensor, row: torch.Tensor, noise: torch.Tensor,
                   history: torch.Tensor | None = None) -> torch.Tensor:
    """EulerAncestral (epsilon prediction): row = (timestep, sigma, sigma_up, dt), noise [B,4,h,w]."""
    sigma, sigma_up, dt = row[SIGMA], row[SIGMA_UP], row[DT]  # 0-dim fp32: they do not promote fp16 tensors
    sample = latents.to(torch.float32)
    pred_original = sample - sigma * eps
    derivative = (sample - pred_original) / sigma
    prev = sample + derivative * dt
    prev = prev + noise * sigma_up
    return prev.to(eps.dtype)


# -- Euler --------------------------------------------------------------------------------------------------------

def _euler_rows(sched, steps: int) -> list[list[torch.Tensor]]:
    rows = []
    for i in range(steps):
        sigma = sched.sigmas[i]
        sigma_hat = sigma * (0.0 + 1)  # s_churn 0: gamma 0
        rows.append([sched.timesteps[i].float(), sigma, sched.sigmas[i + 1] - sigma_hat])
    return rows


def euler_step(latents: torch.Tensor, eps: torch.Tensor, row: torch.Tensor, noise: torch.Tensor | None = None,
               history: torch.Tensor | None = None) -> torch.Tensor:
    """Euler (epsilon prediction, no churn): row = (timestep, sigma, dt)."""
    sigma, dt = row[1], row[2]
    sample = latents.to(torch.float32)
    pred_original = sample - sigma * eps
    derivative = (sample - pred_original) / sigma
    prev = sample + derivative * dt
    return prev.to(eps.dtype)


# -- DDIM (eta 0) -------------------------------------------------------------------------------------------------

DDIM_COLUMNS = ("timestep", "sigma", "sqrt_beta_t", "sqrt_alpha_t", "sqrt_alpha_prev", "direction")


def _ddim_rows(sched, steps: int) -> list[list[torch.Tensor]]:
    rows = []
    eta = 0.0
    for timestep in sched.timesteps:
        prev_timestep = timestep - sched.config.num_train_timesteps // sched.num_inference_steps
        alpha_prod_t = sched.alphas_cumprod[timestep]
        alpha_prod_t_prev = sched.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else sched.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        std_dev_t = eta * sched._get_variance(timestep, prev_timestep) ** (0.5)
        rows.append([timestep.float(), torch.tensor(0.0), beta_prod_t ** (0.5), alpha_prod_t ** (0.5),
                     alpha_prod_t_prev ** (0.5), (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)])
    return rows


def ddim_step(latents: torch.Tensor, eps: torch.Tensor, row: torch.Tensor, noise: torch.Tensor | None = None,
              history: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM, eta 0, no clipping (epsilon prediction): x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t);
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps. In the latents' dtype, as diffusers computes it."""
    pred_original = (latents - row[2] * eps) / row[3]
    direction = row[5] * eps
    return row[4] * pred_original + direction


# -- DPM-Solver++ (2M) --------------------------------------------------------------------------------------------

DPM_COLUMNS = ("timestep", "sigma", "sigma_t", "alpha_t", "a", "b", "c", "inv_r0", "second_order")


def _dpm_rows(sched, steps: int) -> list[list[torch.Tensor]]:
    def lam(sigma):
        alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sigma)
        return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)

    rows = []
    for i in range(steps):
        alpha_s, sigma_s = sched._sigma_to_alpha_sigma_t(sched.sigmas[i])  # convert_model_output
        alpha_t, sigma_t, lambda_t = lam(sched.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = lam(sched.sigmas[i])
        h = lambda_t - lambda_s0
        a = sigma_t / sigma_s0
        b = alpha_t * (torch.exp(-h) - 1.0)
        # diffusers: first order on the first step and on the last (final_sigmas_type "zero"), second order between
        second = 0 < i < steps - 1
        if second:
            _, _, lambda_s1 = lam(sched.sigmas[i - 1])
            r0 = (lambda_s0 - lambda_s1) / h
            c, inv_r0 = 0.5 * (alpha_t * (torch.exp(-h) - 1.0)), 1.0 / r0
        else:
            c, inv_r0 = torch.tensor(0.0), torch.tensor(0.0)
        rows.append([sched.timesteps[i].float(), torch.tensor(0.0), sigma_s, alpha_s, a, b, c, inv_r0,
                     torch.tensor(float(second))])
    return rows


def dpm_step(latents: torch.Tensor, eps: torch.Tensor, row: torch.Tensor, noise: torch.Tensor | None,
             history: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++ 2M (midpoint): history[0] = the previous step's x0 prediction (m1), replaced by this step's."""
    x0 = (latents - row[2] * eps) / row[3]  # convert_model_output, in the latents' dtype
    sample = latents.to(torch.float32)
    first = row[4] * sample - row[5] * x0
    d1 = row[7] * (x0 - history[0])
    second = row[4] * sample - row[5] * x0 - row[6] * d1
    history[0].copy_(x0)
    return torch.where(row[8] > 0, second, first).to(eps.dtype)


# -- UniPC (bh2, order 2, predicting x0) ------------------------------------------------------------------------

UNIPC_COLUMNS = ("timestep", "sigma", "sigma_t", "alpha_t",
                 "corrector", "c_a", "c_b", "c_ab", "c_rk", "c_rho0", "c_rho1", "c_second_order",
                 "p_a", "p_b", "p_ab", "p_rk", "p_second_order")
M0, M1, LAST = range(3)  # history slots: x0 of the previous step, of the one before, the sample it started from


def _unipc_coefficients(sched, step_index: int, s0_index: int, order: int, corrector: bool):
    """multistep_uni_p_bh_update / multistep_uni_c_bh_update's constants (bh2, predict_x0), as diffusers computes
    them: x_t = a * x - b * m0 - ab * (...), D1 = (m_i - m0) / rk, and the corrector's rhos."""
    t_index = step_index + 1 if not corrector else step_index
    alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sched.sigmas[t_index])
    alpha_s0, sigma_s0 = sched._sigma_to_alpha_sigma_t(sched.sigmas[s0_index])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    rks = []
    for i in range(1, order):
        si = step_index - (i + 1) if corrector else step_index - i
        alpha_si, sigma_si = sched._sigma_to_alpha_sigma_t(sched.sigmas[si])
        lambda_si = torch.log(alpha_si) - torch.log(sigma_si)
        rks.append((lambda_si - lambda_s0) / h)
    rk = rks[0] if rks else torch.tensor(1.0)
    rks.append(torch.ones(()))
    rks = torch.stack(rks)
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    b_h = torch.expm1(hh)
    r, b = [], []
    for i in range(1, order + 1):
        r.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    rhos = (torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(torch.stack(r), torch.stack(b))) \
        if corrector else torch.zeros(2)
    rho0, rho1 = (torch.tensor(0.0), rhos[-1]) if order == 1 else (rhos[0], rhos[-1])
    return sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h, rk, rho0, rho1


def _unipc_rows(sched, steps: int) -> list[list[torch.Tensor]]:
    rows, orders = [], []
    for i in range(steps):
        alpha_s, sigma_s = sched._sigma_to_alpha_sigma_t(sched.sigmas[i])  # convert_model_output
        order = min(min(sched.config.solver_order, steps - i), min(i, sched.config.solver_order) + 1)
        orders.append(order)
        if i > 0:  # the corrector refines this step's sample with the previous step's order
            c_a, c_b, c_ab, c_rk, c_rho0, c_rho1 = _unipc_coefficients(sched, i, i - 1, orders[i - 1], True)
            second = torch.tensor(float(orders[i - 1] == 2))
            corrector = [torch.tensor(1.0), c_a, c_b, c_ab, c_rk, c_rho0, c_rho1, second]
        else:
            corrector = [torch.tensor(0.0)] + [torch.tensor(v) for v in (1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)]
        p_a, p_b, p_ab, p_rk, _, _ = _unipc_coefficients(sched, i, i, order, False)
        rows.append([sched.timesteps[i].float(), torch.tensor(0.0), sigma_s, alpha_s, *corrector, p_a, p_b, p_ab, p_rk,
                     torch.tensor(float(order == 2))])
    return rows


def unipc_step(latents: torch.Tensor, eps: torch.Tensor, row: torch.Tensor, noise: torch.Tensor | None,
               history: torch.Tensor) -> torch.Tensor:
    """UniPC (bh2, order 2): the corrector (UniC) refines this step's sample with its new x0 prediction, then the
    predictor (UniP) steps. history = [m0, m1, last sample] (slots M0, M1, LAST), updated in place."""
    x0 = (latents - row[2] * eps) / row[3]  # convert_model_output, in the latents' dtype
    m0, m1, last = history[M0], history[M1], history[LAST]
    # UniC: x = last sample, m0 = previous x0, m1 = the one before, model_t = x0
    c_rhos = torch.stack([row[9], row[10]]).to(latents.dtype)
    x_t_ = row[5] * last - row[6] * m0
    c_res = torch.einsum("k,bkc...->bc...", c_rhos[:-1], torch.stack([(m1 - m0) / row[8]], dim=1))
    d1_t = x0 - m0
    c_second = x_t_ - row[7] * (c_res + c_rhos[-1] * d1_t)
    c_first = x_t_ - row[7] * (0 + c_rhos[-1] * d1_t)
    corrected = torch.where(row[11] > 0, c_second, c_first).to(last.dtype)
    sample = torch.where(row[4] > 0, corrected, latents)
    m1.copy_(m0)
    m0.copy_(x0)
    last.copy_(sample)
    # UniP: x = sample, m0 = this x0, m1 = the previous one
    p_rhos = torch.ones(1, dtype=sample.dtype, device=sample.device) * 0.5
    x_t_ = row[12] * sample - row[13] * m0
    p_res = torch.einsum("k,bkc...->bc...", p_rhos, torch.stack([(m1 - m0) / row[15]], dim=1))
    second = x_t_ - row[14] * p_res
    return torch.where(row[16] > 0, second, x_t_).to(sample.dtype)


# -- the table of samplers: the one place for their names, configs and bounds ---------------------------------------

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("euler-ancestral", EulerAncestralDiscreteScheduler, {}, EA_COLUMNS, _ancestral_rows, ancestral_step,
            noise=True),
    Sampler("euler", EulerDiscreteScheduler, {}, ("timestep", "sigma", "dt"), _euler_rows, euler_step),
    # InstructPix2Pix's (SD-1.5's) scheduler files set these two: clipping x0 to [-1, 1] is for pixel-space models
    Sampler("ddim", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}, DDIM_COLUMNS, _ddim_rows,
            ddim_step, max_steps=MAX_STEPS - 1),  # "leading" + steps_offset 1: 1000 steps would read timestep 1000
    Sampler("dpm-solver++", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2},
            DPM_COLUMNS, _dpm_rows, dpm_step, max_steps=MAX_STEPS - 1, history=1),
    Sampler("unipc", UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2"}, UNIPC_COLUMNS, _unipc_rows,
            unipc_step, max_steps=MAX_STEPS - 1, history=3),
)}
DEFAULT_SAMPLER = "euler-ancestral"  # InstructPix2Pix's and the official SmartEdit script's


def get_sampler(name: object) -> Sampler:
    """The sampler named `name` (InputError naming it and the choices otherwise)."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def sampler_from_record(record: object, where: str) -> Sampler:
    """The sampler a model folder or manifest recorded ({"name", "class", "config"}): its name must be known and its
    config the one this sampler runs (a config changed by hand would silently run another schedule otherwise)."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: the sampler record must be a JSON object, got {type(record).__name__}")
    sampler = get_sampler(record.get("name"))
    config = record.get("config", sampler.config)
    if not isinstance(config, dict):
        raise InputError(f"{where}: the sampler's config must be a JSON object")
    runs = sampler.diffusers_scheduler().config  # what it runs with
    defaults = sampler.scheduler().config  # what diffusers reads for a key the record leaves out
    for key in sorted(set(config) | set(runs)):
        if key.startswith("_"):  # diffusers' own bookkeeping (_class_name, _diffusers_version)
            continue
        said = config.get(key, defaults.get(key))
        if said != runs.get(key):
            raise InputError(f"{where}: sampler {sampler.name!r} runs with {key} = {runs.get(key)!r}, the "
                             f"record says {said!r}; this toolchain runs only the listed config")
    return sampler


def _json_finite(value: object) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))


def check_steps(steps: object, sampler: str = DEFAULT_SAMPLER) -> int:
    """A number of denoising steps for `sampler`: an integer in 1..its max_steps (InputError naming it otherwise)."""
    return get_sampler(sampler).check_steps(steps)


def initial_latents(generator: Generators, shape: tuple[int, ...], plan: Plan,
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
    """The Euler samplers' scale_model_input: x / sqrt(sigma^2 + 1), sigma a 0-dim fp32 tensor (it does not
    promote). The other samplers do not scale: their rows hold sigma 0, and x / 1 is x, bit for bit."""
    return latents / ((sigma**2 + 1) ** 0.5)
