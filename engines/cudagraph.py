"""CUDA-graph backend: the whole denoising loop replayed from CUDA graphs, on the eager PyTorch modules.

At 256x256 the eager UNet step is launch-bound (DESIGN §7: ~39 ms of launches for < 1 ms of work per step), and the
eager loop adds the CFG combine, the scheduler's Python and a host-to-device noise copy every step. Here one
denoising step is a fixed program on static device buffers:

    row = table[idx]; x = latents / sqrt(sigma^2 + 1); sample[:, :4] = [x; x; x]         (image channels set once)
    eps = unet(sample [3B,8,h,w], t, [prompt; null; null], bim_residual)                   3-way CFG batch
    eps = u + g_t (t - i) + g_i (i - u);  latents = EulerAncestral(latents, eps, row, noise[idx]);  idx += 1

with the schedule table and the seed's ancestral noise for every step prepared on the device before the loop
(engines/euler_ancestral.py). Because the step index lives on the device, the same program serves every step:

    capture="loop"  one graph holds all `steps` steps; an edit's denoising is one graph launch (the default)
    capture="step"  one graph holds one step; the loop is `steps` replays with no host work in between
    capture="none"  the same program run eagerly: no CUDA needed (the CPU tests check it against the reference loop)

Graphs are captured once per (shapes, dtype, steps, guidance scales) and reused; each edit copies its inputs into the
static buffers, replays and returns a copy of the latents. For the same seed the result equals the eager loop's within
fp16 noise (same ops in the same dtypes; only kernel selection may differ). `torch_compile=True` compiles the UNet
(mode "max-autotune-no-cudagraphs") and captures the compiled code the same way.
The per-graph `run()` interface stays: `run("unet")` replays a captured single UNet call (what smartedit-bench's
per-stage breakdown times); the other graphs run eagerly (once per edit, not launch-bound the same way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .eager import EagerBackend
from .euler_ancestral import SIGMA, T, AncestralPlan, ancestral_step, draw_ancestral_noise

log = logging.getLogger(__name__)
CAPTURE_MODES = ("loop", "step", "none")


@dataclass
class _Loop:
    """Static buffers of one denoising program, and its graph once captured."""

    plan: AncestralPlan
    latents: torch.Tensor  # [B,4,h,w] dtype: read and updated in place by every step
    sample: torch.Tensor  # [3B,8,h,w]: channels 0:4 written each step, 4:8 = [img; img; 0] written per edit
    prompt_embeds: torch.Tensor  # [3B,77,D] = [prompt; null; null]
    bim_residual: torch.Tensor  # [B,C0,16,16]
    noise: torch.Tensor  # [steps,B,4,h,w] dtype: ancestral noise of the edit's seed
    idx: torch.Tensor  # [1] int64: the step the next replay runs
    guidance: tuple[float, float]
    graph: torch.cuda.CUDAGraph | None = None
    graph_steps: int = 0  # steps one replay runs: `steps` (loop) or 1 (step)


class CudaGraphBackend(EagerBackend):
    def __init__(self, pipe, torch_compile: bool = False, capture: str = "loop", warmup: int = 2):
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        if capture != "none" and (not torch.cuda.is_available() or pipe.device.type != "cuda"):
            raise RuntimeError(f"the CUDA-graph backend (capture={capture!r}) needs the pipeline on a CUDA device; "
                               f"it is on {pipe.device}")
        super().__init__(pipe)
        self.name = "compile" if torch_compile else "cudagraph"
        self.torch_compile, self.capture, self.warmup = torch_compile, capture, warmup
        self._captured: dict[tuple, tuple] = {}  # run("unet") single-call graphs
        self._loops: dict[tuple, _Loop] = {}

    def _unet(self):
        if "unet" not in self._modules:
            module = self._graphs["unet"].build(self._pipe).eval()
            if self.torch_compile:
                module = torch.compile(module, mode="max-autotune-no-cudagraphs", fullgraph=False)
            self._modules["unet"] = module
        return self._modules["unet"]

    # -- the denoising loop (SmartEditPipeline.denoise hands it over whole) ---------------------------------------

    @torch.inference_mode()
    def denoise_loop(self, latents: torch.Tensor, image_latents: torch.Tensor, prompt_embeds: torch.Tensor,
                     null_text_embeds: torch.Tensor, bim_residual: torch.Tensor, steps: int, guidance_scale: float,
                     image_guidance_scale: float, generator: torch.Generator | None) -> torch.Tensor:
        """latents [B,4,h,w] (initial noise, already times init_noise_sigma) -> denoised latents [B,4,h,w]."""
        b = latents.shape[0]
        if image_latents.shape != latents.shape or prompt_embeds.shape[0] != b or bim_residual.shape[0] != b:
            raise ValueError(f"batch/shape mismatch: latents {tuple(latents.shape)}, image_latents "
                             f"{tuple(image_latents.shape)}, prompt_embeds {tuple(prompt_embeds.shape)}, "
                             f"bim_residual {tuple(bim_residual.shape)}")
        key = (tuple(latents.shape), tuple(prompt_embeds.shape), tuple(bim_residual.shape), latents.dtype, steps,
               float(guidance_scale), float(image_guidance_scale))
        loop = self._loops.get(key)
        if loop is None:
            loop = self._loops[key] = self._new_loop(latents, prompt_embeds, bim_residual, steps,
                                                     (float(guidance_scale), float(image_guidance_scale)))
        # this edit's inputs into the static buffers; the noise is drawn in diffusers' order from the seed's generator
        noise = draw_ancestral_noise(generator, steps, tuple(latents.shape), latents.dtype, latents.device)
        self._load(loop, latents, image_latents, prompt_embeds, null_text_embeds, bim_residual, noise)
        if self.capture != "none" and loop.graph is None:
            self._capture(loop)  # warm-up steps on a side stream change the buffers: load them again
            self._load(loop, latents, image_latents, prompt_embeds, null_text_embeds, bim_residual, noise)
        if loop.graph is None:
            for _ in range(steps):
                self._step(loop)
        else:
            for _ in range(steps // loop.graph_steps):
                loop.graph.replay()
        return loop.latents.clone()

    def _new_loop(self, latents, prompt_embeds, bim_residual, steps, guidance) -> _Loop:
        b, c, h, w = latents.shape
        dev, dt = latents.device, latents.dtype
        return _Loop(plan=AncestralPlan.build(steps, dev), latents=torch.empty_like(latents),
                     sample=torch.empty(3 * b, 2 * c, h, w, device=dev, dtype=dt),
                     prompt_embeds=torch.empty((3 * b,) + tuple(prompt_embeds.shape[1:]), device=dev,
                                               dtype=prompt_embeds.dtype),
                     bim_residual=torch.empty_like(bim_residual),
                     noise=torch.empty((steps,) + tuple(latents.shape), device=dev, dtype=dt),
                     idx=torch.zeros(1, device=dev, dtype=torch.long), guidance=guidance)

    @staticmethod
    def _load(loop: _Loop, latents, image_latents, prompt_embeds, null_text_embeds, bim_residual, noise) -> None:
        b, c = latents.shape[:2]
        loop.latents.copy_(latents)
        loop.sample[:, c:].copy_(torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)]))
        null = null_text_embeds.expand(b, -1, -1)
        loop.prompt_embeds.copy_(torch.cat([prompt_embeds, null, null]))
        loop.bim_residual.copy_(bim_residual)
        loop.noise.copy_(noise)  # [steps,B,4,h,w]: 0.8 MB at 256x256, 100 steps, fp16; one copy per edit
        loop.idx.zero_()

    def _step(self, loop: _Loop) -> None:
        """One denoising step on the static buffers; everything it reads per step is indexed by loop.idx."""
        c = loop.latents.shape[1]
        row = loop.plan.table.index_select(0, loop.idx)[0]  # [4] fp32
        x = loop.latents / ((row[SIGMA] ** 2 + 1) ** 0.5)  # EulerAncestral scale_model_input
        loop.sample[:, :c].copy_(torch.cat([x, x, x]))
        eps = self._unet()(loop.sample, row[T].reshape(1), loop.prompt_embeds, loop.bim_residual)  # [3B,4,h,w]
        e_text, e_image, e_uncond = eps.chunk(3)
        g_text, g_image = loop.guidance
        eps = (e_uncond + g_text * (e_text - e_image) + g_image * (e_image - e_uncond)).to(loop.latents.dtype)
        noise = loop.noise.index_select(0, loop.idx)[0]
        loop.latents.copy_(ancestral_step(loop.latents, eps, row, noise))
        loop.idx.add_(1)

    def _capture(self, loop: _Loop) -> None:
        steps = loop.plan.steps
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # cuBLAS/cuDNN handles, autotuning and torch.compile outside the capture
            for _ in range(max(1, self.warmup)):
                loop.idx.zero_()
                self._step(loop)
        torch.cuda.current_stream().wait_stream(side)
        loop.idx.zero_()
        per_replay = steps if self.capture == "loop" else 1
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(per_replay):
                    self._step(loop)
        except RuntimeError as e:
            if per_replay == 1:
                raise
            # e.g. out of memory instantiating steps x UNet kernels: one step per replay does the same work
            log.warning("capturing the %d-step loop failed (%s); capturing one step and replaying it", steps, e)
            graph, per_replay = torch.cuda.CUDAGraph(), 1
            with torch.cuda.graph(graph):
                self._step(loop)
        loop.graph, loop.graph_steps = graph, per_replay

    # -- the per-graph interface ------------------------------------------------------------------------------------

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if graph != "unet":
            return super().run(graph, inputs)
        names = [t.name for t in self._graphs["unet"].spec.inputs]
        if self.capture == "none":
            with torch.inference_mode():
                return {"eps": self._unet()(*(inputs[n] for n in names))}
        key = tuple((n, tuple(inputs[n].shape), inputs[n].dtype) for n in names)
        if key not in self._captured:
            module = self._unet()
            static = [inputs[n].clone() for n in names]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(self.warmup):  # allocator and cuBLAS/cuDNN warm-up outside the capture
                    module(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph_ = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph_), torch.inference_mode():
                out = module(*static)
            self._captured[key] = (graph_, static, out)
        graph_, static, out = self._captured[key]
        for buf, n in zip(static, names):
            buf.copy_(inputs[n])
        graph_.replay()
        return {"eps": out.clone()}
