"""SmartEditPipeline: image + instruction -> edited image, its graphs run by any runner of the graph contract.

Order of work (official test/DS_SmartEdit_test.py and InstructPix2PixSD_SM.py):
    CLIP(224) -> mm_projector -> LLaMA -> 32 <img_i> states -> QFormer -> BIM       graphs llava, qformer_bim
    VAE encode (latent mode)                                                        graph vae_encoder
    100 x (UNet on the 3-way CFG batch [cond; null+img; null+zero-img], eps = u + g_t (t - i) + g_i (i - u),
           EulerAncestral)                                                          graph unet (+ smartedit.scheduler)
    VAE decode                                                                      graph vae_decoder

Those are the defaults, and the official model. Three components may change what the loop costs, per pipeline or per
edit: the sampler (`pipe.sampler`, or `sampler=` per edit: smartedit.scheduler.SAMPLERS; saved with the model
folder), the guidance schedule (`guidance_schedule=`: smartedit.guidance.GuidanceSchedule, the steps that run the
3-way batch, a 2-way text-only one or the conditional branch alone) and DeepCache (`deepcache=`:
smartedit.deepcache.DeepCache, the steps that run the UNet's shallow path on a cached deep feature).

The graphs run on `pipe.runner`, a GraphRunner (smartedit.graphs): by default the model itself (EagerRunner, the
reference); each backend of smartedit.engines.registry hands back another (CUDA graphs, ONNX Runtime, TensorRT,
AOTInductor), and `on_backend` puts it in a pipeline. The pipeline owns everything between the graphs:
tokenisation, image pre/post-processing, the sampler and the guidance.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from . import checkpoint as ckpt
from . import weights
from .deepcache import DeepCache
from .config import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_RESOLUTION,
    DEFAULT_STEPS,
    SmartEditConfig,
    check_guidance,
    check_resolution,
    precision_of,
)
from .engines import registry
from .errors import Cancelled, InputError, RunError
from .files import open_image
from .graphs import DEEPCACHE_GRAPHS, EagerRunner, GraphRunner, LoopRunner
from .graphs.spec import parse_dim
from .guidance import DEFAULT_GUIDANCE, GuidanceSchedule
from .mllm import IMG_MODES, NUM_IMG_TOKENS, PAD_ID, PromptIds, pad_prompts, pick_template, tokenize_prompt
from .model import Stages, cfg_batch, cfg_combine
from .scheduler import (
    DEFAULT_SAMPLER,
    SIGMA,
    Generators,
    Plan,
    T,
    draw_ancestral_noise,
    get_sampler,
    initial_latents,
    scale_model_input,
)
from .tokenizer import add_smartedit_tokens
from .vae import postprocess, preprocess_vae
from .vision import preprocess_clip
from .weights import ModelSource, Weights

log = logging.getLogger(__name__)
Guidance = Union[float, Sequence[float]]  # one value for the batch, or one per sample
PLAN_CACHE = 16  # prepared schedules a pipeline keeps, (sampler, steps, device) each


def _as_image(x: Image.Image | str | Path) -> Image.Image:
    return x if isinstance(x, Image.Image) else open_image(x, "input image")


class SmartEditPipeline:
    def __init__(self, config: SmartEditConfig, tokenizer: PreTrainedTokenizerBase, stages: Stages,
                 null_text_embeds: torch.Tensor, random_weights: bool = False, runner: GraphRunner | None = None,
                 img_token_mode: str = "forced", sampler: str = DEFAULT_SAMPLER):
        if tuple(null_text_embeds.shape) != (1, config.qformer.num_queries, config.qformer.hidden_size):
            raise InputError(f"null_text_embeds must be [1, {config.qformer.num_queries}, "
                             f"{config.qformer.hidden_size}], got {tuple(null_text_embeds.shape)}")
        self.config = config
        self.tokenizer = add_smartedit_tokens(tokenizer)
        self.stages = stages
        self.null_text_embeds = null_text_embeds  # [1, 77, D]: CLIP text embedding of ""
        self.random_weights = random_weights
        self.runner: GraphRunner = runner or EagerRunner(stages, config)
        self.img_token_mode = img_token_mode  # the default of encode_condition / __call__ (`official`: "stepwise")
        self.sampler = get_sampler(sampler).name  # the default of denoise / __call__; save_pretrained records it
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()  # plan(): the last PLAN_CACHE prepared schedules

    # -- construction -------------------------------------------------------------------------------------------------

    @classmethod
    def from_weights(cls, w: Weights, runner: GraphRunner | None = None, img_token_mode: str = "forced"
                     ) -> "SmartEditPipeline":
        """The edit over loaded weights, its graphs run by `runner` (None: the model itself, EagerRunner)."""
        return cls(w.config, w.tokenizer, w.stages, w.null_text_embeds, w.random_weights, runner, img_token_mode,
                   w.sampler)

    @classmethod
    def on_backend(cls, name: str, source: ModelSource, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, artifacts: str | Path | None = None) -> "SmartEditPipeline":
        """The edit on backend `name` (smartedit.engines.registry): it loads what it needs of `source` and hands
        back its runner. Refuses at once, naming the reason, what cannot run here."""
        loaded = registry.load(name, source, device, dtype, artifacts)
        return cls.from_weights(loaded.weights, loaded.runner, registry.get(name).img_token_mode)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, only: Iterable[str] | None = None) -> "SmartEditPipeline":
        """Random weights with the preset's shapes, run eagerly (smartedit.weights.from_preset)."""
        return cls.from_weights(weights.from_preset(name, seed, device, dtype, only))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, only: Iterable[str] | None = None
                        ) -> "SmartEditPipeline":
        """A converted folder, run eagerly (smartedit.weights.from_pretrained)."""
        return cls.from_weights(weights.from_pretrained(model_dir, device, dtype, only))

    def save_pretrained(self, model_dir: str | Path, overwrite: bool = False, source: dict | None = None) -> Path:
        def write(tmp: Path) -> None:
            ckpt.write_config(tmp / "config.json", self.config, self.random_weights, source or {})
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            for name, module in self.stages.items():
                ckpt.save_stage(module, tmp / f"{name}.safetensors")
            ckpt.save_stage({"null_text_embeds": self.null_text_embeds.cpu()}, tmp / ckpt.NULL_TEXT_FILE)
            ckpt.write_sampler(tmp, get_sampler(self.sampler))

        return ckpt.write_folder_atomically(Path(model_dir), write, overwrite=overwrite)

    @property
    def device(self) -> torch.device:
        return self.null_text_embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.null_text_embeds.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SmartEditPipeline":
        for _, m in self.stages.items():
            m.to(device=device, dtype=dtype)
        self.null_text_embeds = self.null_text_embeds.to(device=device, dtype=dtype)
        return self

    # -- phases -------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_condition(self, images: Sequence[Image.Image], instructions: Sequence[str],
                         img_token_mode: str | None = None, template: int | str = 0, temperature: float = 0.0,
                         seed: int | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompt_embeds [B, 77, D], bim_residual [B, C0, 16, 16]. `seed` (one, or one per sample) draws the
        template when template="random"."""
        mode = img_token_mode or self.img_token_mode
        if mode not in IMG_MODES:
            raise InputError(f"img_token_mode must be one of {IMG_MODES}, got {mode!r}")
        pixels = preprocess_clip(list(images), self.config.vision.image_size).to(self.device)
        if isinstance(seed, (list, tuple)):
            templates = [pick_template(template, random.Random(s)) for s in seed]
            seed = seed[0]
        else:
            rng = random.Random(seed)
            templates = [pick_template(template, rng) for _ in instructions]
        if mode == "forced":
            if self.tokenizer.pad_token_id != PAD_ID:
                raise InputError(f"the llava graph pads with id {PAD_ID} (<unk>); this tokenizer pads with "
                                 f"{self.tokenizer.pad_token_id}")
            prompts = [self._tokenize(text, t) for text, t in zip(instructions, templates)]
            prefix, suffix, _ = pad_prompts(prompts, PAD_ID, self.config.vision.num_patches)
            out = self.runner.run("llava", {"pixel_values": pixels, "prefix_ids": prefix.to(self.device),
                                             "suffix_ids": suffix.to(self.device)})
            img_hidden, clip_feats = out["img_hidden"], out["clip_feats"]
        else:
            img_hidden, clip_feats = self._decode_img_states(pixels, instructions, templates, mode, temperature, seed)
        out = self.runner.run("qformer_bim", {"img_hidden": img_hidden, "clip_feats": clip_feats})
        return out["prompt_embeds"].to(self.dtype), out["bim_residual"].to(self.dtype)

    def _tokenize(self, instruction: str, template: int, forced: bool = True) -> PromptIds:
        """The prompt's ids around the image, refused when prompt + image + answer exceed the LLM's positions."""
        p = tokenize_prompt(self.tokenizer, instruction, template, forced=forced)
        n = len(p.prefix) + self.config.vision.num_patches + len(p.suffix) + (0 if forced else NUM_IMG_TOKENS + 8)
        if n > self.config.llm.max_position_embeddings:
            raise InputError(f"instruction too long: the prompt would be {n} tokens (with the image's "
                             f"{self.config.vision.num_patches}), over the LLM's {self.config.llm.max_position_embeddings}")
        return p

    def _decode_img_states(self, pixels, instructions, templates, mode, temperature, seed):
        """generate / stepwise: token by token with a KV cache, one sample at a time, in eager PyTorch."""
        s = self.stages
        if s.llm is None or s.vision is None or s.llm.lm_head.weight.is_meta or s.vision.mm_projector.weight.is_meta:
            raise InputError(f"img_token_mode {mode!r} decodes token by token in eager PyTorch, and this pipeline has "
                             f"no LLM weights loaded (runner {self.runner.name!r} runs the exported forced-mode "
                             "graph)")
        clip_feats, image_embeds = s.vision(pixels.to(next(s.vision.parameters()).dtype))  # [B, 256, Dv], [B, 256, H]
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        states = []
        for i, (text, t) in enumerate(zip(instructions, templates)):
            prompt = self._tokenize(text, t, forced=False)
            answer = None
            if mode == "stepwise":  # the canonical answer, fed token by token (the official loop's cost)
                answer = tokenize_prompt(self.tokenizer, text, t, forced=True).suffix[len(prompt.suffix):]
            ids = lambda x: torch.tensor([x], device=self.device)  # noqa: E731
            states.append(s.llm.generate_img_states(ids(prompt.prefix), image_embeds[i:i + 1], ids(prompt.suffix),
                                                    temperature=temperature, generator=gen,
                                                    eos_token_id=self.tokenizer.eos_token_id, answer_ids=answer)[0])
        return torch.cat(states), clip_feats

    def runtime_inputs(self, images: Sequence[Image.Image], instructions: Sequence[str], resolution: int = DEFAULT_RESOLUTION,
                       template: int | str = 0, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors the C++ runtime's `Editor` takes (runtime/include/smartedit/editor.h), on the CPU:
        pixel_values [B,3,224,224], prefix_ids [B,Lp] / suffix_ids [B,Ls] int64 (forced mode, padded with 0),
        image [B,3,R,R] in [-1, 1], null_text_embeds [1,77,D]. The same preprocessing as an edit through __call__."""
        check_resolution(resolution)
        rng = random.Random(seed)
        prompts = [self._tokenize(text, pick_template(template, rng)) for text in instructions]
        prefix, suffix, _ = pad_prompts(prompts, PAD_ID, self.config.vision.num_patches)
        out = {"pixel_values": preprocess_clip(list(images), self.config.vision.image_size).to(self.dtype),
               "prefix_ids": prefix, "suffix_ids": suffix,
               "image": preprocess_vae(list(images), resolution).to(self.dtype),
               "null_text_embeds": self.null_text_embeds.cpu()}
        return {k: v.contiguous() for k, v in out.items()}  # safetensors stores contiguous tensors only

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
        """-> image latents [B, 4, R/8, R/8]."""
        x = preprocess_vae(list(images), resolution).to(self.device)
        return self.runner.run("vae_encoder", {"image": x})["latents"].to(self.dtype)

    def guided_eps(self, latents: torch.Tensor, image_latents: torch.Tensor, row: torch.Tensor,
                   prompt_embeds: torch.Tensor, bim_residual: torch.Tensor, guidance_scale: Guidance,
                   image_guidance_scale: Guidance, branches: int = 3) -> torch.Tensor:
        """One guided step: latents [B,4,h,w] (unscaled), row = the schedule's row -> eps [B,4,h,w] in the
        pipeline's dtype. The CFG batch of `branches` branches (smartedit.guidance) and the fp32 combine are
        smartedit.model's, here or inside a folded graph. Guidance scales are one value for the batch or one per
        sample.

        An exported unet graph takes the 3-way batch only (its spec's sample is [3B, ...]): a step of fewer branches
        runs the 3-way batch there and combines the branches it needs (the same eps; no evaluation saved). The
        folded graph gets the scales that reduce its combine to the step's: (g_t, 1) for 2 branches, (1, 1) for 1."""
        t, sigma = row[T].reshape(1), row[SIGMA]
        g_text, g_image = _per_sample(guidance_scale, latents), _per_sample(image_guidance_scale, latents)
        if self.runner.fold_cfg:
            if not (isinstance(g_text, float) and isinstance(g_image, float)):
                raise InputError("the --fold-cfg unet graph takes one pair of guidance scales per batch; give "
                                 "every sample the same, or run them apart")
            g = {3: (g_text, g_image), 2: (g_text, 1.0), 1: (1.0, 1.0)}[branches]
            return self.runner.run("unet", {
                "latents": latents, "image_latents": image_latents, "timestep": t, "sigma": sigma.reshape(1),
                "prompt_embeds": prompt_embeds, "bim_residual": bim_residual,
                "guidance": torch.tensor(g, device=latents.device)})["eps"].to(self.dtype)
        return self._cfg_step(self.runner, "unet", latents, image_latents, row, prompt_embeds, bim_residual,
                              g_text, g_image, branches)[0]

    def _cfg_step(self, runner: GraphRunner, graph: str, latents: torch.Tensor, image_latents: torch.Tensor,
                  row: torch.Tensor, prompt_embeds: torch.Tensor, bim_residual: torch.Tensor, g_text, g_image,
                  branches: int, **more: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A step of a graph that takes the CFG batch (unet, unet_deep, unet_shallow; `more`: its other inputs, each
        cut to the batch's rows) -> (the guided eps in the pipeline's dtype, the graph's outputs)."""
        run = branches if unet_takes_any_branches(runner, graph) else 3
        sample, prompts = cfg_batch(scale_model_input(latents, row[SIGMA]), image_latents, prompt_embeds,
                                    self.null_text_embeds, run)
        out = runner.run(graph, {"sample": sample, "timestep": row[T].reshape(1), "prompt_embeds": prompts,
                                 "bim_residual": bim_residual, **{k: v[:sample.shape[0]] for k, v in more.items()}})
        eps = cfg_combine(out["eps"][:branches * latents.shape[0]], g_text, g_image, branches).to(self.dtype)
        return eps, out

    def cache_runner(self, deepcache: DeepCache | None) -> GraphRunner | None:
        """The runner of `deepcache`'s graphs (None: the plain loop, no DeepCache or interval 1); InputError when
        this pipeline's runner has no DeepCache graphs, or has them at another skip branch."""
        if deepcache is None or deepcache.is_plain:
            return None
        if not isinstance(deepcache, DeepCache):
            raise InputError(f"deepcache must be a smartedit.deepcache.DeepCache, got {type(deepcache).__name__}")
        runner, branch = self.runner, deepcache.branch
        have = getattr(runner, "cache_branch", None)
        if have is None:
            raise InputError(f"backend {runner.name!r} has no DeepCache graphs: export them with smartedit-export "
                             f"--deepcache [BRANCH] (graphs {', '.join(DEEPCACHE_GRAPHS)})")
        if branch is None or branch == have:
            return runner
        if hasattr(runner, "for_branch"):  # the model itself builds any branch
            return runner.for_branch(branch)
        raise InputError(f"DeepCache branch {branch}: backend {runner.name!r} runs graphs exported at branch {have} "
                         f"(re-export with smartedit-export --deepcache {branch}, or ask for branch {have})")

    def cached_eps(self, runner: GraphRunner, latents: torch.Tensor, image_latents: torch.Tensor, row: torch.Tensor,
                   prompt_embeds: torch.Tensor, bim_residual: torch.Tensor, guidance_scale: Guidance,
                   image_guidance_scale: Guidance, branches: int, feature: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DeepCache step: feature None runs the whole UNet (unet_deep) and returns its feature; a feature runs
        the shallow path (unet_shallow) on its first rows and returns it unchanged. -> (guided eps [B,4,h,w],
        feature [nB,C,h,w]). The CFG batch and combine as in guided_eps (an exported graph takes the 3-way batch)."""
        g_text, g_image = _per_sample(guidance_scale, latents), _per_sample(image_guidance_scale, latents)
        args = (latents, image_latents, row, prompt_embeds, bim_residual, g_text, g_image, branches)
        if feature is None:
            eps, out = self._cfg_step(runner, "unet_deep", *args)
            return eps, out["cached_feature"]
        return self._cfg_step(runner, "unet_shallow", *args, cached_feature=feature)[0], feature

    def plan(self, steps: int = DEFAULT_STEPS, sampler: str | None = None) -> Plan:
        """The prepared schedule of `sampler` (default: this pipeline's) for `steps` steps, on this device. The
        last PLAN_CACHE plans are kept: building one costs 5-180 ms on a CPU (a multistep solver's constants are
        computed step by step, as diffusers computes them), every edit of a server would pay it again."""
        key = (get_sampler(sampler or self.sampler).name, steps, self.device)
        plans = self._plans
        if key in plans:
            plans.move_to_end(key)
            return plans[key]
        plan = plans[key] = get_sampler(key[0]).plan(steps, self.device)
        while len(plans) > PLAN_CACHE:
            plans.popitem(last=False)
        return plan

    @torch.inference_mode()
    def denoise(self, prompt_embeds: torch.Tensor, bim_residual: torch.Tensor, image_latents: torch.Tensor,
                steps: int = DEFAULT_STEPS, guidance_scale: Guidance = DEFAULT_GUIDANCE_SCALE,
                image_guidance_scale: Guidance = DEFAULT_IMAGE_GUIDANCE_SCALE, generator: Generators = None, progress: bool = False,
                latents: torch.Tensor | None = None, stop: Callable[[], bool] | None = None,
                sampler: str | None = None, guidance_schedule: GuidanceSchedule | None = None,
                deepcache: DeepCache | None = None) -> torch.Tensor:
        """The sampler (default: this pipeline's, EulerAncestral unless changed) over the CFG batches of the
        guidance schedule (default: 3-way on every step) -> latents [B, 4, h, w] (scaled, ready for decode). The
        seed's noise is drawn as diffusers draws it: the starting latents, then (an ancestral sampler) one tensor
        per step (one generator for the batch, or one per sample). `stop`, asked before each step, ends the loop
        with Cancelled when it answers True (a server whose clients went away); a runner that replays the whole
        loop as one program is not asked. `deepcache`: the steps between whole UNet runs take the shallow path."""
        plan = self.plan(steps, sampler)
        branches = (guidance_schedule or DEFAULT_GUIDANCE).branches(steps)
        cache = self.cache_runner(deepcache)
        whole = None if cache is None else deepcache.whole_steps(branches)
        if latents is None:
            latents = initial_latents(generator, tuple(image_latents.shape), plan, self.device, self.dtype)
        noise = (draw_ancestral_noise(generator, steps, tuple(latents.shape), latents.dtype, self.device)
                 if plan.sampler.noise else None)
        if isinstance(self.runner, LoopRunner):  # the whole loop in one program (engines/cudagraph.py)
            guidance = torch.stack([torch.as_tensor(_per_sample(g, latents), dtype=torch.float32, device=self.device)
                                    .reshape(-1).expand(latents.shape[0]) for g in (guidance_scale,
                                                                                    image_guidance_scale)], 1)
            loop = cache or self.runner  # guidance [B, 2]; whole: DeepCache's whole steps, or None
            return loop.denoise_loop(latents, image_latents, prompt_embeds, self.null_text_embeds, bim_residual,
                                     plan, noise, guidance, branches, whole)
        history = plan.history(tuple(latents.shape), latents.dtype, self.device)
        feature = None  # [nB, C, h, w]: the deep feature of the last whole step (DeepCache)
        for i in tqdm(range(steps), desc="denoise", disable=not progress):
            if stop is not None and stop():
                raise Cancelled(f"stopped before step {i + 1} of {steps}: the caller stopped waiting (cancelled, or "
                                "its timeout passed)")
            row = plan.table[i]
            if cache is None:
                eps = self.guided_eps(latents, image_latents, row, prompt_embeds, bim_residual, guidance_scale,
                                      image_guidance_scale, branches[i])
            else:
                eps, feature = self.cached_eps(cache, latents, image_latents, row, prompt_embeds, bim_residual,
                                               guidance_scale, image_guidance_scale, branches[i],
                                               None if whole[i] else feature)
            latents = plan.sampler.step(latents, eps, row, None if noise is None else noise[i], history)
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.runner.run("vae_decoder", {"latents": latents})["image"]  # [B, 3, H, W]

    # -- the edit -----------------------------------------------------------------------------------------------------

    def __call__(self, image, instruction: str | Sequence[str] | None = None, steps: int = DEFAULT_STEPS,
                 guidance_scale: Guidance = DEFAULT_GUIDANCE_SCALE,
                 image_guidance_scale: Guidance = DEFAULT_IMAGE_GUIDANCE_SCALE, resolution: int = DEFAULT_RESOLUTION,
                 seed: int | Sequence[int] | None = None, img_token_mode: str | None = None,
                 template: int | str = 0, temperature: float = 0.0, progress: bool = False,
                 timings: dict[str, float] | None = None, stop: Callable[[], bool] | None = None,
                 sampler: str | None = None, guidance_schedule: GuidanceSchedule | None = None,
                 deepcache: DeepCache | None = None):
        """One edit -> PIL image; lists of images and instructions (or a list of (image, instruction) pairs) -> a
        list of PIL images, run as one batch. seed=None draws a seed (the official script draws one per image).
        `seed` and the guidance scales may be one per sample: then each sample draws its own noise from its own
        seed and gets the image it would get alone (up to the batched kernels' rounding).

        `sampler` (a name of smartedit.scheduler.SAMPLERS; default `pipe.sampler`) and `guidance_schedule`
        (smartedit.guidance.GuidanceSchedule; default 3-way guidance on every step) change what the denoising loop
        costs: both default to the official loop. `steps` is bounded by the sampler (1..1000, 1..999 for some).
        `deepcache` (smartedit.deepcache.DeepCache; default none) runs the UNet's shallow path on the steps between
        whole runs: the runner must hold the DeepCache graphs (the model itself does).

        `timings`, if given, receives the wall time in ms of each phase (device-synchronised): condition (vision +
        LLM + QFormer + BIM), vae_encode, denoise (all steps), vae_decode, total. `stop`: see denoise.

        Non-finite latents or a non-finite decoded image (a huge guidance can keep the latents finite and still
        overflow the decoder) are a RunError: NaN would otherwise be written as a black image.
        """
        single = not isinstance(image, (list, tuple))
        if instruction is None:
            if single or not all(isinstance(p, tuple) and len(p) == 2 for p in image):
                raise InputError("pass an instruction, or a list of (image, instruction) pairs")
            image, instruction = [p[0] for p in image], [p[1] for p in image]
            single = False
        images = [image] if single else list(image)
        instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        if len(images) != len(instructions) or not images:
            raise InputError(f"got {len(images)} images and {len(instructions)} instructions; need the same, >= 1")
        check_resolution(resolution)
        get_sampler(sampler or self.sampler).check_steps(steps)  # before any work
        if guidance_schedule is not None and not isinstance(guidance_schedule, GuidanceSchedule):
            raise InputError(f"guidance_schedule must be a smartedit.guidance.GuidanceSchedule, got "
                             f"{type(guidance_schedule).__name__}")
        self.cache_runner(deepcache)  # before any work: a runner without the graphs, or at another branch
        for name, g in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
            _check_guidance(name, g, len(images))
        pil = [_as_image(x) for x in images]
        if seed is None:
            seed = random.randrange(2**31)
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(images):
                raise InputError(f"got {len(seed)} seeds for {len(images)} images; give one, or one per image")
            generator = [torch.Generator().manual_seed(int(s)) for s in seed]
        else:
            generator = torch.Generator().manual_seed(seed)
        clock = PhaseClock(self.device, timings)
        with clock("condition"):
            prompt_embeds, bim_residual = self.encode_condition(pil, instructions, img_token_mode, template,
                                                                temperature, seed)
        with clock("vae_encode"):
            image_latents = self.encode_image(pil, resolution)
        with clock("denoise"):
            latents = self.denoise(prompt_embeds, bim_residual, image_latents, steps, guidance_scale,
                                   image_guidance_scale, generator, progress, stop=stop, sampler=sampler,
                                   guidance_schedule=guidance_schedule, deepcache=deepcache)
        self._check_finite(latents, f"the latents are not finite after {steps} steps")
        with clock("vae_decode"):
            decoded = self.decode(latents)
        self._check_finite(decoded, "the decoded image is not finite")
        out = postprocess(decoded)
        clock.finish()
        return out[0] if single else out


    def _check_finite(self, x: torch.Tensor, what: str) -> None:
        """RunError naming the samples of x [B, ...] that hold NaN/inf (one sync): they would be written as black or
        white images that look like answers."""
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            raise RunError(f"sample(s) {bad}: {what} on backend {self.runner.name!r} in "
                           f"{precision_of(self.dtype)}: no image written")


def _check_guidance(name: str, g: Guidance, n: int) -> None:
    values = list(g) if isinstance(g, (list, tuple)) else [g]
    if isinstance(g, (list, tuple)) and len(values) != n:
        raise InputError(f"got {len(values)} values of {name} for {n} images; give one, or one per image")
    for v in values:
        check_guidance(name, v)


def unet_takes_any_branches(runner: GraphRunner, graph: str = "unet") -> bool:
    """Whether `runner`'s `graph` (unet, unet_deep, unet_shallow) takes a CFG batch of any number of branches (the
    model itself), or only the 3-way batch its exported spec fixes (sample [3B, ...])."""
    spec = getattr(runner, "specs", {}).get(graph)
    return spec is None or parse_dim(spec.inputs[0].shape[0])[0] == 1


def _per_sample(g: Guidance, latents: torch.Tensor):
    """One value for the batch -> a float; one per sample -> [B,1,1,1] fp32 (one value repeated -> a float)."""
    if not isinstance(g, (list, tuple)):
        return float(g)
    if len(set(g)) == 1:
        return float(g[0])
    return torch.tensor(g, dtype=torch.float32, device=latents.device).view(-1, 1, 1, 1)


class PhaseClock:
    """Wall time per phase in ms into `sink` (the edit's phase names; None: nothing measured), synchronising the
    device before each reading (CUDA work is asynchronous); finish() adds "total" since construction."""

    def __init__(self, device: torch.device, sink: dict[str, float] | None):
        import time

        self._now, self.device, self.sink = time.perf_counter, device, sink
        self._start = self._read() if sink is not None else 0.0

    def _read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._now()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sink is None:
            yield
            return
        t0 = self._read()
        yield
        self.sink[name] = (self._read() - t0) * 1e3

    def finish(self) -> None:
        if self.sink is not None:
            self.sink["total"] = (self._read() - self._start) * 1e3
