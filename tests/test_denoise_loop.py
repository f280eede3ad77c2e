"""The device-side denoising loop (engines/euler_ancestral.py, engines/cudagraph.py) against the reference:
diffusers' EulerAncestralDiscreteScheduler and the pipeline's eager loop, for the same seed.

On the CPU the loop program runs uncaptured (capture="none"): the schedule table, the up-front ancestral noise, the
static buffers and the step indexed by a device counter are all checked there. The CUDA tests check that capturing
(a whole-loop graph, a per-step graph) changes nothing, and that fp16 on the GPU matches eager fp16.
"""

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from smartedit.config import SCHEDULER_CONFIG
from smartedit.engines.cudagraph import CudaGraphBackend
from smartedit.engines.euler_ancestral import AncestralPlan, ancestral_step, draw_ancestral_noise
from smartedit.pipeline import SmartEditPipeline

from conftest import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("steps", [1, 7, 100])
def test_ancestral_step_equals_diffusers(dtype, steps):
    """Feed both the same eps sequence; the latents must be bit-identical at every step (same ops, same dtypes)."""
    shape = (2, 4, 8, 8)
    sched = EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    plan = AncestralPlan.build(steps, "cpu")
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
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        AncestralPlan.build(0, "cpu")


def _denoise_inputs(pipe, b=2, h=8):
    g = torch.Generator().manual_seed(5)
    q, c0 = pipe.config.qformer, pipe.config.unet_residual_channels
    grid = pipe.config.vision.grid_size
    rand = lambda *s: torch.randn(*s, generator=g).to(pipe.device, pipe.dtype)  # noqa: E731
    return dict(prompt_embeds=rand(b, q.num_queries, q.hidden_size), bim_residual=rand(b, c0, grid, grid),
                image_latents=rand(b, 4, h, h))


@pytest.mark.parametrize("steps", [1, 4])
def test_uncaptured_loop_equals_eager_loop_cpu(tiny_pipe, steps):
    """capture="none" runs the exact program a graph would hold; on the CPU it must equal the diffusers loop."""
    x = _denoise_inputs(tiny_pipe)
    ref = tiny_pipe.denoise(**x, steps=steps, generator=torch.Generator().manual_seed(9))
    fast = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                             random_weights=True)
    fast.backend = CudaGraphBackend(fast, capture="none")
    got = fast.denoise(**x, steps=steps, generator=torch.Generator().manual_seed(9))
    assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{steps} steps")
    # a second edit with another seed reuses the buffers: no state may leak from the first
    again = fast.denoise(**x, steps=steps, generator=torch.Generator().manual_seed(10))
    ref2 = tiny_pipe.denoise(**x, steps=steps, generator=torch.Generator().manual_seed(10))
    assert_close(again, ref2, atol=1e-5, rtol=1e-5, msg="second seed")
    assert not torch.allclose(again, got)


def test_whole_edit_through_the_loop_backend_cpu(tiny_pipe, test_image):
    fast = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                             random_weights=True)
    fast.backend = CudaGraphBackend(fast, capture="none")
    a = np.asarray(tiny_pipe(test_image, "make it blue", steps=3, seed=1, resolution=64), dtype=np.int16)
    b = np.asarray(fast(test_image, "make it blue", steps=3, seed=1, resolution=64), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_backend_argument_checks(tiny_pipe):
    with pytest.raises(ValueError, match="capture must be one of .* got 'all'"):
        CudaGraphBackend(tiny_pipe, capture="all")
    with pytest.raises(RuntimeError, match="needs the pipeline on a CUDA device; it is on cpu"):
        CudaGraphBackend(tiny_pipe, capture="loop")
    fast = CudaGraphBackend(tiny_pipe, capture="none")
    x = _denoise_inputs(tiny_pipe)
    with pytest.raises(ValueError, match="batch/shape mismatch"):
        fast.denoise_loop(torch.zeros(1, 4, 8, 8), x["image_latents"], x["prompt_embeds"], tiny_pipe.null_text_embeds,
                          x["bim_residual"], 2, 7.5, 1.5, None)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("capture", ["loop", "step"])
def test_captured_loop_equals_uncaptured_cuda(capture):
    """Replaying the graph runs the same kernels on the same buffers as running the program: equal up to kernel
    choices (cuBLAS/cuDNN heuristics are the same in and out of capture, so in practice bit-identical)."""
    pipe = SmartEditPipeline.from_preset("tiny", seed=0, device="cuda", dtype=torch.float16)
    x = _denoise_inputs(pipe)
    plain = SmartEditPipeline(pipe.config, pipe.tokenizer, pipe.stages, pipe.null_text_embeds, random_weights=True)
    plain.backend = CudaGraphBackend(plain, capture="none")
    pipe.backend = CudaGraphBackend(pipe, capture=capture)
    ref = plain.denoise(**x, steps=6, generator=torch.Generator().manual_seed(9))
    for seed in (9, 9, 4):  # capture on the first call, replay on the next ones (and with another seed)
        got = pipe.denoise(**x, steps=6, generator=torch.Generator().manual_seed(seed))
        if seed == 9:
            assert_close(got, ref, atol=1e-3, rtol=1e-3, msg=f"capture={capture} vs the same program uncaptured")
    assert not torch.equal(got, ref)
    eager = SmartEditPipeline(pipe.config, pipe.tokenizer, pipe.stages, pipe.null_text_embeds, random_weights=True)
    want = eager.denoise(**x, steps=6, generator=torch.Generator().manual_seed(4))
    assert_close(got, want, atol=2e-2, rtol=2e-2, msg=f"capture={capture} vs eager fp16")
