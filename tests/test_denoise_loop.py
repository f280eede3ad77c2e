"""The samplers (smartedit/scheduler.py), the pipeline's loop and the CUDA-graph loop (engines/cudagraph.py) against
the reference: diffusers' own scheduler classes driving InstructPix2Pix's guided loop, for the same seed.

On the CPU the loop program runs uncaptured (capture="none"): the schedule tables, the up-front ancestral noise, a
multistep solver's history buffers, the static buffers and the step indexed by a device counter are all checked
there, with every sampler and with a guidance schedule of mixed branch counts. The CUDA tests check that capturing
(a whole-loop graph, per-step graphs) changes nothing, and that fp16 on the GPU matches eager fp16.
"""

import numpy as np
import pytest
import torch
from conftest import assert_close
from diffusers import EulerAncestralDiscreteScheduler

from smartedit.config import SCHEDULER_CONFIG
from smartedit.engines.cudagraph import CudaGraphRunner
from smartedit.errors import InputError
from smartedit.pipeline import SmartEditPipeline
from smartedit.guidance import GuidanceSchedule
from smartedit.scheduler import SAMPLERS, ancestral_step, draw_ancestral_noise, get_sampler


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("steps", [1, 7, 100])
def test_ancestral_step_equals_diffusers(dtype, steps):
    """Feed both the same eps sequence; the latents must be bit-identical at every step (same ops, same dtypes)."""
    shape = (2, 4, 8, 8)
    sched = EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    plan = get_sampler("euler-ancestral").plan(steps, "cpu")
    assert plan.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma))
    assert torch.equal(plan.table[:, 0], sched.timesteps.float()) and torch.equal(plan.table[:, 1], sched.sigmas[:-1])
    noise = draw_ancestral_noise(torch.Generator().manual_seed(3), steps, shape, dtype)
    g_ref = torch.Generator().manual_seed(3)
    eps_rng = torch.Generator().manual_seed(11)
    ref = ours = (torch.randn(shape, generator=eps_rng) * plan.init_noise_sigma).to(dtype)
    for i, t in enumerate(sched.timesteps):
        eps = torch.randn(shape, generator=eps_rng).to(dtype)
        sched.is_scale_input_called = True
        ref = sched.step(eps, t, ref, generator=g_ref, return_dict=False)[0]
        ours = ancestral_step(ours, eps, plan.table[i], noise[i])
        assert ours.dtype == ref.dtype == dtype
        assert torch.equal(ours, ref), f"step {i}: max diff {(ours.float() - ref.float()).abs().max():.3e}"


def test_ancestral_noise_is_drawn_where_the_generator_lives_and_returned_on_the_device():
    """diffusers draws a CPU generator's noise on the CPU (the same numbers on any device) and moves it; a generator on
    a GPU draws there (it cannot draw on the CPU: torch.randn raises). Only the CPU case can run here."""
    shape = (1, 4, 2, 2)
    on_cpu = draw_ancestral_noise(torch.Generator().manual_seed(3), 4, shape, torch.float16)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(on_cpu, torch.stack([torch.randn(shape, generator=g, dtype=torch.float16) for _ in range(4)]))
    moved = draw_ancestral_noise(torch.Generator().manual_seed(3), 4, shape, torch.float16, device="meta")
    assert moved.device.type == "meta" and moved.shape == (4, *shape) and moved.dtype == torch.float16
    assert draw_ancestral_noise(None, 2, shape, torch.float32, device="meta").device.type == "meta"


def test_plan_rejects_zero_steps():
    with pytest.raises(InputError, match="steps must be an integer from 1 to 1000, got 0"):
        get_sampler("euler-ancestral").plan(0, "cpu")


def _denoise_inputs(pipe, b=2, h=8):
    g = torch.Generator().manual_seed(5)
    q, c0 = pipe.config.qformer, pipe.config.unet_residual_channels
    grid = pipe.config.vision.grid_size
    rand = lambda *s: torch.randn(*s, generator=g).to(pipe.device, pipe.dtype)  # noqa: E731
    return dict(prompt_embeds=rand(b, q.num_queries, q.hidden_size), bim_residual=rand(b, c0, grid, grid),
                image_latents=rand(b, 4, h, h))


def _diffusers_loop(pipe, x, steps, seed, g_text=7.5, g_image=1.5, sampler="euler-ancestral"):
    """InstructPix2Pix's guided loop written with diffusers' scheduler as its pipeline does (scale_model_input,
    step with the seed's generator for an ancestral one), around the model's UNet: an independent reference for
    the sampler."""
    sched = get_sampler(sampler).diffusers_scheduler()
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    img, prompt, res = x["image_latents"], x["prompt_embeds"], x["bim_residual"]
    null = pipe.null_text_embeds.expand(img.shape[0], -1, -1)
    latents = torch.randn(img.shape, generator=gen, dtype=torch.float32).to(pipe.dtype) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(latents, t)
            sample = torch.cat([torch.cat([x_in] * 3), torch.cat([img, img, torch.zeros_like(img)])], dim=1)
            e_text, e_image, e_uncond = pipe.stages.unet(sample, t, torch.cat([prompt, null, null]), res).chunk(3)
            eps = e_uncond + g_text * (e_text - e_image) + g_image * (e_image - e_uncond)
            kw = {"generator": gen} if sampler == "euler-ancestral" else {}
            latents = sched.step(eps, t, latents, return_dict=False, **kw)[0]
    return latents


@pytest.mark.parametrize("steps", [1, 4])
def test_pipeline_loop_equals_diffusers_loop(tiny_pipe, steps):
    x = _denoise_inputs(tiny_pipe)
    ours = tiny_pipe.denoise(**x, steps=steps, generator=torch.Generator().manual_seed(9))
    ref = _diffusers_loop(tiny_pipe, x, steps, 9)
    assert torch.equal(ours, ref), f"max diff {(ours - ref).abs().max():.3e}"


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "euler-ancestral"])
def test_pipeline_loop_equals_diffusers_loop_with_every_sampler(tiny_pipe, sampler):
    """The whole guided loop (the model's UNet, the 3-way batch, the fp32 combine) with each sampler, bit for bit
    against the same loop around diffusers' own class: 5 steps reach every multistep order (first, second, last)."""
    x = _denoise_inputs(tiny_pipe)
    ours = tiny_pipe.denoise(**x, steps=5, generator=torch.Generator().manual_seed(9), sampler=sampler)
    ref = _diffusers_loop(tiny_pipe, x, 5, 9, sampler=sampler)
    assert torch.equal(ours, ref), f"{sampler}: max diff {(ours - ref).abs().max():.3e}"


@pytest.mark.parametrize("steps", [1, 4])
def test_uncaptured_loop_equals_the_pipeline_loop_cpu(tiny_pipe, steps):
    """capture="none" runs the exact program a graph would hold; on the CPU it must equal the pipeline's loop."""
    x = _denoise_inputs(tiny_pipe)
    ref = tiny_pipe.denoise(**x, steps=steps, generator=torch.Generator().manual_seed(9))
    fast = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                             random_weights=True)
    fast.runner = CudaGraphRunner(fast.stages, fast.config, capture="none")
    got = fast.denoise(**x, steps=steps, generator=torch.Generator().manual_seed(9))
    assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{steps} steps")
    # a second edit with another seed and other guidance reuses the buffers: no state may leak from the first
    again = fast.denoise(**x, steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(10))
    ref2 = tiny_pipe.denoise(**x, steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(10))
    assert_close(again, ref2, atol=1e-5, rtol=1e-5, msg="second seed and guidance")
    assert not torch.allclose(again, got)
    # what a benchmark row records of it, and the release between resolutions
    shape = list(x["image_latents"].shape)
    assert fast.runner.record == {"capture_asked": "none",
                                   "capture_used": {f"latents {shape}, {steps} steps": "none"}}
    fast.runner.release()
    assert not fast.runner._loops and not fast.runner._captured


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_uncaptured_loop_equals_the_pipeline_loop_with_every_sampler_and_a_guidance_schedule_cpu(tiny_pipe, sampler):
    """The program a graph would hold, for each sampler (its table, noise or history buffers) and with steps of 3, 2
    and 1 branches: equal to the pipeline's loop; a second edit reuses the buffers (history zeroed, no leak)."""
    x = _denoise_inputs(tiny_pipe)
    schedule = GuidanceSchedule(interval=(0.0, 0.7), text_only=(0.3, 0.7))
    assert schedule.branches(6) == (3, 3, 2, 2, 1, 1)
    kw = dict(steps=6, sampler=sampler, guidance_schedule=schedule)
    ref = tiny_pipe.denoise(**x, generator=torch.Generator().manual_seed(9), **kw)
    fast = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                             random_weights=True)
    fast.runner = CudaGraphRunner(fast.stages, fast.config, capture="none")
    for _ in range(2):
        got = fast.denoise(**x, generator=torch.Generator().manual_seed(9), **kw)
        assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=sampler)
    shape = list(x["image_latents"].shape)
    label = f"latents {shape}, 6 steps" + ("" if sampler == "euler-ancestral" else f", {sampler}")
    label += ", 12 UNet branches"
    assert fast.runner.record["capture_used"] == {label: "none"}


def test_whole_edit_through_the_loop_backend_cpu(tiny_pipe, test_image):
    fast = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                             random_weights=True)
    fast.runner = CudaGraphRunner(fast.stages, fast.config, capture="none")
    a = np.asarray(tiny_pipe(test_image, "make it blue", steps=3, seed=1, resolution=64), dtype=np.int16)
    b = np.asarray(fast(test_image, "make it blue", steps=3, seed=1, resolution=64), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_backend_argument_checks(tiny_pipe):
    with pytest.raises(ValueError, match="capture must be one of .* got 'all'"):
        CudaGraphRunner(tiny_pipe.stages, tiny_pipe.config, capture="all")
    with pytest.raises(RuntimeError, match="needs the model on a CUDA device; it is on cpu"):
        CudaGraphRunner(tiny_pipe.stages, tiny_pipe.config, capture="loop")
    fast = CudaGraphRunner(tiny_pipe.stages, tiny_pipe.config, capture="none")
    x = _denoise_inputs(tiny_pipe)
    plan = get_sampler("euler-ancestral").plan(2)
    with pytest.raises(ValueError, match="batch/shape mismatch"):
        fast.denoise_loop(torch.zeros(1, 4, 8, 8), x["image_latents"], x["prompt_embeds"], tiny_pipe.null_text_embeds,
                          x["bim_residual"], plan, torch.zeros(2, 1, 4, 8, 8), torch.tensor([[7.5, 1.5]]))
    with pytest.raises(ValueError, match="noise None"):  # an ancestral sampler without its noise
        fast.denoise_loop(torch.zeros(2, 4, 8, 8), x["image_latents"], x["prompt_embeds"], tiny_pipe.null_text_embeds,
                          x["bim_residual"], plan, None, torch.tensor([[7.5, 1.5]] * 2))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("capture", ["loop", "step"])
@pytest.mark.parametrize("sampler,schedule", [("euler-ancestral", None),
                                              ("dpm-solver++", GuidanceSchedule((0.0, 0.6), (0.3, 0.6)))])
def test_captured_loop_equals_uncaptured_cuda(capture, sampler, schedule):
    """Replaying the graph runs the same kernels on the same buffers as running the program: equal up to kernel
    choices (cuBLAS/cuDNN heuristics are the same in and out of capture, so in practice bit-identical)."""
    pipe = SmartEditPipeline.from_preset("tiny", seed=0, device="cuda", dtype=torch.float16)
    x = _denoise_inputs(pipe)
    plain = SmartEditPipeline(pipe.config, pipe.tokenizer, pipe.stages, pipe.null_text_embeds, random_weights=True)
    plain.runner = CudaGraphRunner(plain.stages, plain.config, capture="none")
    pipe.runner = CudaGraphRunner(pipe.stages, pipe.config, capture=capture)
    kw = dict(steps=6, sampler=sampler, guidance_schedule=schedule)
    ref = plain.denoise(**x, generator=torch.Generator().manual_seed(9), **kw)
    for seed in (9, 9, 4):  # capture on the first call, replay on the next ones (and with another seed)
        got = pipe.denoise(**x, generator=torch.Generator().manual_seed(seed), **kw)
        if seed == 9:
            assert_close(got, ref, atol=1e-3, rtol=1e-3, msg=f"capture={capture} vs the same program uncaptured")
    assert not torch.equal(got, ref)
    assert list(pipe.runner.record["capture_used"].values()) == [capture]  # no fallback at the tiny shapes
    eager = SmartEditPipeline(pipe.config, pipe.tokenizer, pipe.stages, pipe.null_text_embeds, random_weights=True)
    want = eager.denoise(**x, generator=torch.Generator().manual_seed(4), **kw)
    assert_close(got, want, atol=2e-2, rtol=2e-2, msg=f"capture={capture} vs eager fp16")
