"""CUDA-graph backends: the whole denoising loop replayed from CUDA graphs, on the PyTorch model (`cudagraph`), or on
its torch.compile'd UNet (`compile`).

At 256x256 the eager UNet step is launch-bound (~39 ms of launches for < 1 ms of work per step on an H100), and the
eager loop adds the CFG combine, the sampler's Python and a host-to-device noise copy every step. Here one denoising
step is a fixed program on static device buffers, the model's own guided step and the sampler's own update:

    row = table[idx]; eps = Stages.guided_eps(latents, image_latents, row, prompt_embeds, bim_residual, guidance,
    null_text_embeds, branches); latents = sampler.step(latents, eps, row, noise[idx], history); idx += 1

with the schedule table, the seed's ancestral noise for every step (an ancestral sampler) and a multistep solver's
history buffers prepared by the pipeline (smartedit/scheduler.py). Because the step index and the guidance scales
live on the device, the same program serves every step and every guidance scale; the CFG batch's branches per step
(smartedit/guidance.py) are shapes, so they are part of what is captured:

    capture="loop"  one graph holds all `steps` steps; an edit's denoising is one graph launch (the default)
    capture="step"  one graph per branch count holds one step; the loop is `steps` replays with no host work between
    capture="none"  the same program run eagerly: no CUDA needed (the CPU tests check it against the pipeline's loop)

With DeepCache (smartedit/deepcache.py) a step is also whole (unet_deep: eps and the cached feature, written into a
static feature buffer) or shallow (unet_shallow on that buffer): "loop" captures the mixed steps in one graph, "step"
one graph per (branches, whole or shallow). Under `compile` only the plain UNet call is compiled; the DeepCache
paths run the model's modules as they are.

Graphs are captured once per (shapes, dtype, sampler, steps, branches per step) and reused; each edit copies its
inputs into the static buffers, zeroes the history, replays and returns a copy of the latents. For the same seed
the result equals the eager loop's within fp16 noise (same ops in the same dtypes; only kernel selection may
differ). The other graphs run eagerly (once per edit); `run()` of the denoiser graph (unet) replays a captured
single UNet call (what smartedit-bench's per-stage breakdown times).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from smartedit.errors import InputError, UnavailableError
from smartedit.graphs import DENOISER, EagerRunner, graph_with_role
from smartedit.model import Stages
from smartedit.unet import cache_feature_channels
from smartedit.scheduler import DEFAULT_SAMPLER, SIGMA, Plan, Sampler, T

from .backend import Backend, Loaded, cuda_unavailable

log = logging.getLogger(__name__)
CAPTURE_MODES = ("loop", "step", "none")


@dataclass
class _Loop:
    """Static buffers of one denoising program, and its graph once captured."""

    latents: torch.Tensor  # [B,4,h,w]: read and updated in place by every step
    image_latents: torch.Tensor  # [B,4,h,w]
    prompt_embeds: torch.Tensor  # [B,77,D]
    null_text_embeds: torch.Tensor  # [1,77,D]
    bim_residual: torch.Tensor  # [B,C0,16,16]
    table: torch.Tensor  # [steps,K] fp32: the sampler's schedule
    noise: torch.Tensor | None  # [steps,B,4,h,w]: ancestral noise of the edit's seed (an ancestral sampler)
    history: torch.Tensor | None  # [slots,B,4,h,w]: a multistep solver's history, zeroed per edit
    guidance: torch.Tensor  # [B, 2] fp32: each sample's (text, image) scales
    idx: torch.Tensor  # [1] int64: the step the next replay runs
    sampler: Sampler
    branches: tuple[int, ...]  # the CFG batch's branches of each step
    whole: tuple[bool, ...] | None  # DeepCache: per step, the whole UNet (True) or the shallow path; None: plain
    feature: torch.Tensor | None  # DeepCache: [3B,C,h,w], the feature of the last whole step
    graphs: dict[tuple, torch.cuda.CUDAGraph] | None = None  # loop: {(): the whole loop}; step: {kind: one step}

    def kinds(self) -> list[tuple[int, bool | None]]:
        """Each step's (branches, whole): None without DeepCache."""
        return list(zip(self.branches, self.whole or (None,) * len(self.branches)))


class CudaGraphRunner(EagerRunner):
    def __init__(self, stages: Stages, config, torch_compile: bool = False, capture: str = "loop", warmup: int = 2,
                 cache_branch: int | None = None):
        if capture not in CAPTURE_MODES:
            raise InputError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        device = next(stages.unet.parameters()).device
        if capture != "none" and (not torch.cuda.is_available() or device.type != "cuda"):
            raise UnavailableError(f"the CUDA-graph backend (capture={capture!r}) needs the model on a CUDA device; "
                               f"it is on {device}")
        super().__init__(stages, config, cache_branch)
        self.name = "compile" if torch_compile else "cudagraph"
        self.torch_compile, self.capture, self.warmup = torch_compile, capture, warmup
        self._denoiser = graph_with_role(DENOISER)  # the graph run() captures
        self._unet_stages = stages.subset(self._graphs[self._denoiser].stages)
        if torch_compile:
            self._unet_stages.unet = torch.compile(stages.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
        self._captured: dict[tuple, tuple] = {}  # run(denoiser) single-call graphs
        self._loops: dict[tuple, _Loop] = {}
        self.capture_used: dict[str, str] = {}  # "shape key" -> the capture it got ("step: the loop's failed: ...")

    def for_branch(self, branch: int) -> "CudaGraphRunner":
        """This runner with its DeepCache paths at another skip branch (its own captured programs)."""
        if branch == self.cache_branch:
            return self
        return CudaGraphRunner(self.stages, self.config, self.torch_compile, self.capture, self.warmup, branch)

    @property
    def record(self) -> dict[str, object]:
        """What a benchmark row records of this runner: how each denoising program was captured."""
        return {"capture_asked": self.capture, "capture_used": dict(self.capture_used)}

    def release(self) -> None:
        """Drop every captured program and its buffers (their memory pools go with them on empty_cache): a
        benchmark's next resolution then measures its own peak, not this one's graphs too."""
        self._captured.clear()
        self._loops.clear()

    # -- the denoising loop (SmartEditPipeline.denoise hands it over whole) ---------------------------------------

    @torch.inference_mode()
    def denoise_loop(self, latents: torch.Tensor, image_latents: torch.Tensor, prompt_embeds: torch.Tensor,
                     null_text_embeds: torch.Tensor, bim_residual: torch.Tensor, plan: Plan,
                     noise: torch.Tensor | None, guidance: torch.Tensor,
                     branches: tuple[int, ...] | None = None, whole: tuple[bool, ...] | None = None
                     ) -> torch.Tensor:
        """latents [B,4,h,w] (initial noise, already times init_noise_sigma) -> denoised latents [B,4,h,w].
        plan: the sampler's prepared schedule; noise [steps,B,4,h,w] for an ancestral sampler, else None;
        guidance [B, 2]: each sample's (text, image) scales (device data: one captured graph serves any);
        branches: the CFG batch's branches of each step (default 3 on every step); whole: DeepCache's whole steps
        (smartedit.deepcache.DeepCache.whole_steps; None: the plain loop)."""
        b, steps, table = latents.shape[0], plan.steps, plan.table
        branches = tuple(branches) if branches is not None else (3,) * steps
        noise_shape = None if noise is None else tuple(noise.shape)
        if image_latents.shape != latents.shape or prompt_embeds.shape[0] != b or bim_residual.shape[0] != b \
                or (noise_shape != (steps, *latents.shape) if plan.sampler.noise else noise is not None) \
                or tuple(guidance.shape) != (b, 2) or len(branches) != steps \
                or (whole is not None and (len(whole) != steps or not whole[0])):
            raise InputError(f"batch/shape mismatch: latents {tuple(latents.shape)}, image_latents "
                             f"{tuple(image_latents.shape)}, prompt_embeds {tuple(prompt_embeds.shape)}, "
                             f"bim_residual {tuple(bim_residual.shape)}, noise {noise_shape}, guidance "
                             f"{tuple(guidance.shape)}, branches for {len(branches)} of {steps} steps, whole steps "
                             f"{None if whole is None else len(whole)} (the first must be whole)")
        whole = None if whole is None else tuple(whole)
        key = (tuple(latents.shape), tuple(prompt_embeds.shape), tuple(bim_residual.shape), latents.dtype,
               plan.sampler.name, steps, branches, whole)
        loop = self._loops.get(key)
        if loop is None:
            loop = self._loops[key] = _Loop(
                latents=torch.empty_like(latents), image_latents=torch.empty_like(image_latents),
                prompt_embeds=torch.empty_like(prompt_embeds), null_text_embeds=torch.empty_like(null_text_embeds),
                bim_residual=torch.empty_like(bim_residual), table=torch.empty_like(table),
                noise=None if noise is None else torch.empty_like(noise),
                history=plan.history(tuple(latents.shape), latents.dtype, latents.device),
                guidance=torch.empty(b, 2, device=latents.device),
                idx=torch.zeros(1, device=latents.device, dtype=torch.long), sampler=plan.sampler, branches=branches,
                whole=whole, feature=None if whole is None else latents.new_empty(
                    (max(branches) * b, cache_feature_channels(self.config.unet, self.cache_branch),
                     *latents.shape[2:])))
        inputs = (latents, image_latents, prompt_embeds, null_text_embeds, bim_residual, table, noise, guidance)
        self._load(loop, *inputs)
        if self.capture != "none" and loop.graphs is None:
            self._capture(loop)  # warm-up steps on a side stream change the buffers: load them again
            self._load(loop, *inputs)
        if loop.graphs is None:
            self.capture_used[self._describe(loop)] = "none"
            for kind in loop.kinds():
                self._step(loop, *kind)
        elif () in loop.graphs:
            loop.graphs[()].replay()
        else:
            for kind in loop.kinds():
                loop.graphs[kind].replay()
        return loop.latents.clone()

    @staticmethod
    def _describe(loop: _Loop) -> str:
        """The key of capture_used: the latents and steps, and the sampler and branches when not the defaults."""
        steps = len(loop.branches)
        out = f"latents {list(loop.latents.shape)}, {steps} steps"
        if loop.sampler.name != DEFAULT_SAMPLER:
            out += f", {loop.sampler.name}"
        if set(loop.branches) != {3}:
            out += f", {sum(loop.branches)} UNet branches"
        if loop.whole is not None:
            out += f", DeepCache {sum(loop.whole)} whole of {steps}"
        return out

    @staticmethod
    def _load(loop: _Loop, latents, image_latents, prompt_embeds, null_text_embeds, bim_residual, table, noise,
              guidance) -> None:
        for buf, x in ((loop.latents, latents), (loop.image_latents, image_latents),
                       (loop.prompt_embeds, prompt_embeds), (loop.null_text_embeds, null_text_embeds),
                       (loop.bim_residual, bim_residual), (loop.table, table), (loop.guidance, guidance),
                       (loop.noise, noise)):  # noise [steps,B,4,h,w]: 0.8 MB at 256x256, 100 steps, fp16
            if buf is not None:
                buf.copy_(x)
        if loop.history is not None:
            loop.history.zero_()
        loop.idx.zero_()

    def _step(self, loop: _Loop, branches: int, whole: bool | None = None) -> None:
        """One denoising step on the static buffers; everything it reads per step is indexed by loop.idx. whole:
        None the plain guided step; True / False DeepCache's whole UNet / shallow path (the CFG batch and combine
        of Stages.guided_eps around unet_deep / unet_shallow)."""
        row = loop.table.index_select(0, loop.idx)[0]  # [K] fp32
        s, k = self._unet_stages, self.cache_branch

        def deep(sample, t, prompts, residual):  # the whole UNet; its feature into the static buffer
            eps, cached = s.unet_deep(sample, t, prompts, residual, k)
            loop.feature[:sample.shape[0]].copy_(cached)
            return eps

        def shallow(sample, t, prompts, residual):
            return s.unet_shallow(sample, t, prompts, residual, loop.feature[:sample.shape[0]], k)

        eps = s.guided_eps(loop.latents, loop.image_latents, row[T].reshape(1), row[SIGMA].reshape(1),
                           loop.prompt_embeds, loop.bim_residual, loop.guidance, loop.null_text_embeds, branches,
                           {None: None, True: deep, False: shallow}[whole])
        noise = None if loop.noise is None else loop.noise.index_select(0, loop.idx)[0]
        loop.latents.copy_(loop.sampler.step(loop.latents, eps, row, noise, loop.history))
        loop.idx.add_(1)

    def _capture(self, loop: _Loop) -> None:
        steps, kinds = len(loop.branches), sorted(set(loop.kinds()), key=lambda k: (k[0], k[1] is False))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # cuBLAS/cuDNN handles, autotuning and torch.compile outside the capture
            for _ in range(max(1, self.warmup)):
                for kind in kinds:  # every batch size and path the loop runs (whole before shallow)
                    loop.idx.zero_()
                    self._step(loop, *kind)
        torch.cuda.current_stream().wait_stream(side)
        loop.idx.zero_()
        used = self.capture
        graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        if self.capture == "loop":
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    for kind in loop.kinds():
                        self._step(loop, *kind)
                graphs[()] = graph
            except RuntimeError as e:
                # e.g. out of memory instantiating steps x UNet kernels: one step per replay does the same work
                log.warning("capturing the %d-step loop failed (%s); capturing one step and replaying it", steps, e)
                used = f"step (the {steps}-step loop's capture failed: {str(e).splitlines()[0][:200]})"
        if not graphs:
            for kind in kinds:
                graphs[kind] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[kind]):
                    self._step(loop, *kind)
        loop.graphs = graphs
        self.capture_used[self._describe(loop)] = used

    # -- the per-graph interface ------------------------------------------------------------------------------------

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if graph != self._denoiser:
            return super().run(graph, inputs)
        g = self._graphs[graph]
        names = [t.name for t in g.spec.inputs]
        unet = getattr(self._unet_stages, g.method)
        if self.capture == "none":
            with torch.inference_mode():
                return {"eps": unet(*(inputs[n] for n in names))}
        key = tuple((n, tuple(inputs[n].shape), inputs[n].dtype) for n in names)
        if key not in self._captured:
            static = [inputs[n].clone() for n in names]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(self.warmup):  # allocator and cuBLAS/cuDNN warm-up outside the capture
                    unet(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph_ = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph_), torch.inference_mode():
                out = unet(*static)
            self._captured[key] = (graph_, static, out)
        graph_, static, out = self._captured[key]
        for buf, n in zip(static, names):
            buf.copy_(inputs[n])
        graph_.replay()
        return {"eps": out.clone()}


def _loader(torch_compile: bool):
    def load(source, device, dtype, artifacts):
        w = source.load(device, dtype)
        return Loaded(w, CudaGraphRunner(w.stages, w.config, torch_compile=torch_compile))

    return load


CUDAGRAPH = Backend("cudagraph", "the whole denoising loop replayed from one CUDA graph (eager PyTorch modules)",
                    ("cuda",), None, cuda_unavailable, _loader(False))
COMPILE = Backend("compile", "cudagraph with the UNet torch.compile'd (max-autotune; compiles for minutes)",
                  ("cuda",), None, cuda_unavailable, _loader(True))
