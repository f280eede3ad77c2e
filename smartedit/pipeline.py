"""SmartEditPipeline: image + instruction -> edited image, in eager PyTorch. The reference every export must match.

Order of work (official test/DS_SmartEdit_test.py and InstructPix2PixSD_SM.py):
    CLIP(224) -> mm_projector -> LLaMA -> 32 <img_i> states -> QFormer -> BIM -> (prompt_embeds, bim_residual)
    VAE encode (latent mode) -> 100 x UNet on the 3-way CFG batch [cond; null+img; null+zero-img], EulerAncestral
    eps = u + g_t (t - i) + g_i (i - u)  ->  VAE decode
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from diffusers import EulerAncestralDiscreteScheduler
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from . import checkpoint as ckpt
from .bim import BIM
from .config import SCHEDULER_CONFIG, SmartEditConfig
from .mllm import IMG_MODES, SmartEditLLM, pad_prompts, pick_template, tokenize_prompt
from .qformer import QFormer
from .tokenizer import add_smartedit_tokens, build_offline_tokenizer
from .unet import SmartEditUNet
from .vae import VAE, postprocess, preprocess_vae
from .vision import VisionTower, preprocess_clip

log = logging.getLogger(__name__)


@dataclass
class Stages:
    """The six networks, one per file; attribute names = checkpoint file names."""

    vision: VisionTower
    llm: SmartEditLLM
    qformer: QFormer
    bim: BIM
    unet: SmartEditUNet
    vae: VAE

    def items(self) -> Iterator[tuple[str, nn.Module]]:
        for name in ckpt.STAGE_FILES:
            yield name, getattr(self, name)


@contextlib.contextmanager
def _construction(device: torch.device | str, dtype: torch.dtype, init: bool):
    """Build modules directly on `device` in `dtype`; with init=False skip weight init (weights are loaded next)."""
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), (contextlib.nullcontext() if init else no_init_weights()):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_stages(cfg: SmartEditConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 init: bool = True, only: Iterable[str] | None = None, seed: int | None = None) -> Stages:
    """Build the six stages; those not in `only` (if given) go on the meta device: shapes, no memory, not runnable
    (e.g. exporting the 7b UNet on a 24 GB machine without materialising the 7b LLM). With `seed`, each stage's
    random init is seeded on its own, so a stage's weights do not depend on which other stages were built."""
    wanted = set(ckpt.STAGE_FILES if only is None else only)
    unknown = wanted - set(ckpt.STAGE_FILES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(ckpt.STAGE_FILES)}")
    builders = {
        "vision": lambda: VisionTower(cfg.vision, cfg.llm),
        "llm": lambda: SmartEditLLM(cfg.llm),
        "qformer": lambda: QFormer(cfg.qformer, encoder_hidden_size=cfg.llm.hidden_size),
        "bim": lambda: BIM(cfg.bim, text_dim=cfg.qformer.hidden_size, residual_channels=cfg.unet_residual_channels),
        "unet": lambda: SmartEditUNet(cfg.unet),
        "vae": lambda: VAE(cfg.vae),
    }
    modules = {}
    for i, name in enumerate(ckpt.STAGE_FILES):
        where, do_init = (device, init) if name in wanted else ("meta", False)
        if seed is not None:
            torch.manual_seed(seed * 100 + i)
        with _construction(where, dtype, do_init):
            modules[name] = builders[name]()
        modules[name].eval().requires_grad_(False)
    return Stages(**modules)


def _as_image(x: Image.Image | str | Path) -> Image.Image:
    if isinstance(x, Image.Image):
        return x
    path = Path(x)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return img


class SmartEditPipeline:
    def __init__(self, config: SmartEditConfig, tokenizer: PreTrainedTokenizerBase, stages: Stages,
                 null_text_embeds: torch.Tensor, random_weights: bool = False, backend=None):
        if tuple(null_text_embeds.shape) != (1, config.qformer.num_queries, config.qformer.hidden_size):
            raise ValueError(f"null_text_embeds must be [1, {config.qformer.num_queries}, "
                             f"{config.qformer.hidden_size}], got {tuple(null_text_embeds.shape)}")
        self.config = config
        self.tokenizer = add_smartedit_tokens(tokenizer)
        self.stages = stages
        self.null_text_embeds = null_text_embeds  # [1, 77, D]: CLIP text embedding of ""
        self.random_weights = random_weights
        self._backend = backend  # smartedit.engines StageBackend; None = eager PyTorch on `stages`

    @property
    def backend(self):
        """The runtime that runs the five graphs (smartedit.engines); eager PyTorch unless one was set."""
        if self._backend is None:
            from smartedit.engines.eager import EagerBackend

            self._backend = EagerBackend(self)
        return self._backend

    @backend.setter
    def backend(self, value) -> None:
        self._backend = value

    # -- construction -------------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, only: Iterable[str] | None = None) -> "SmartEditPipeline":
        """Random weights with the preset's shapes (for tests and latency work: speed does not depend on values).

        `only` limits which stages get real (random) weights; the others stay on the meta device. The values of a
        stage do not depend on `only`: every stage draws from its own seeded generator state.
        """
        cfg = SmartEditConfig.from_name(name)
        log.warning("SmartEdit %s with RANDOM weights (seed %d): outputs are noise, shapes and costs are real", name, seed)
        stages = build_stages(cfg, device, dtype, init=True, only=only, seed=seed)
        # peft initialises lora_B to zero (a no-op adapter); a trained release's is not, so give it values too
        if not stages.llm.lm_head.weight.is_meta:
            torch.manual_seed(seed * 100 + 99)
            for pname, p in stages.llm.named_parameters():
                if "lora_B" in pname:
                    nn.init.normal_(p, std=0.02)
        g = torch.Generator().manual_seed(seed)
        null = torch.randn(1, cfg.qformer.num_queries, cfg.qformer.hidden_size, generator=g).to(device, dtype)
        return cls(cfg, build_offline_tokenizer(), stages, null, random_weights=True)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, only: Iterable[str] | None = None
                        ) -> "SmartEditPipeline":
        """Load a converted folder; `only` loads just those stages (the others stay on the meta device)."""
        model_dir = Path(model_dir)
        cfg, meta = ckpt.read_config(model_dir)
        wanted = list(ckpt.STAGE_FILES if only is None else only)
        missing = ckpt.iter_missing([model_dir / f"{n}.safetensors" for n in wanted]
                                    + [model_dir / ckpt.NULL_TEXT_FILE])
        if missing:
            raise ckpt.CheckpointError(f"{model_dir} is incomplete, missing: {', '.join(str(p) for p in missing)}")
        stages = build_stages(cfg, device, dtype, init=False, only=wanted)  # uninitialised, on the target device
        for name, module in stages.items():
            if name in wanted:
                ckpt.load_stage(module, model_dir / f"{name}.safetensors")
        null = ckpt.load_torch_file(model_dir / ckpt.NULL_TEXT_FILE)["null_text_embeds"].to(device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        return cls(cfg, tokenizer, stages, null, random_weights=bool(meta.get("random_weights", False)))

    def save_pretrained(self, model_dir: str | Path, overwrite: bool = False, source: dict | None = None) -> Path:
        def write(tmp: Path) -> None:
            ckpt.write_config(tmp / "config.json", self.config, self.random_weights, source or {})
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            for name, module in self.stages.items():
                ckpt.save_stage(module, tmp / f"{name}.safetensors")
            ckpt.save_stage({"null_text_embeds": self.null_text_embeds.cpu()}, tmp / ckpt.NULL_TEXT_FILE)

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

    # -- stages -------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_condition(self, images: Sequence[Image.Image], instructions: Sequence[str],
                         img_token_mode: str = "forced", template: int | str = 0, temperature: float = 0.0,
                         seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompt_embeds [B, 77, D], bim_residual [B, C0, 16, 16]."""
        if img_token_mode not in IMG_MODES:
            raise ValueError(f"img_token_mode must be one of {IMG_MODES}, got {img_token_mode!r}")
        pixels = preprocess_clip(list(images), self.config.vision.image_size).to(self.device, self.dtype)
        rng = random.Random(seed)
        forced = img_token_mode == "forced"
        prompts = [tokenize_prompt(self.tokenizer, text, pick_template(template, rng), forced=forced)
                   for text in instructions]
        if forced:
            if self.tokenizer.pad_token_id != 0:
                raise ValueError(f"the llava graph pads with id 0 (<unk>); this tokenizer pads with "
                                 f"{self.tokenizer.pad_token_id}")
            prefix, suffix, _ = pad_prompts(prompts, 0, self.config.vision.num_patches)
            out = self.backend.run("llava", {"pixel_values": pixels, "prefix_ids": prefix.to(self.device),
                                             "suffix_ids": suffix.to(self.device)})
            img_hidden, clip_feats = out["img_hidden"], out["clip_feats"]
        else:
            if self.backend.name != "eager":
                raise ValueError(f"generate mode decodes token by token in eager PyTorch; backend "
                                 f"{self.backend.name!r} runs the exported forced-mode graph only")
            s = self.stages
            clip_feats, image_embeds = s.vision(pixels)  # [B, 256, Dv], [B, 256, H]
            gen = torch.Generator().manual_seed(seed if seed is not None else 0)
            img_hidden = torch.cat([
                s.llm.generate_img_states(torch.tensor([p.prefix], device=self.device), image_embeds[i:i + 1],
                                          torch.tensor([p.suffix], device=self.device), temperature=temperature,
                                          generator=gen, eos_token_id=self.tokenizer.eos_token_id)[0]
                for i, p in enumerate(prompts)
            ])
        out = self.backend.run("qformer_bim", {"img_hidden": img_hidden, "clip_feats": clip_feats})
        return out["prompt_embeds"].to(self.dtype), out["bim_residual"].to(self.dtype)

    def runtime_inputs(self, images: Sequence[Image.Image], instructions: Sequence[str], resolution: int = 256,
                       template: int | str = 0, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors the C++ runtime's `Editor` takes (runtime/include/smartedit/editor.h), on the CPU:
        pixel_values [B,3,224,224], prefix_ids [B,Lp] / suffix_ids [B,Ls] int64 (forced mode, padded with 0),
        image [B,3,R,R] in [-1, 1], null_text_embeds [1,77,D]. The same preprocessing as an edit through __call__."""
        rng = random.Random(seed)
        prompts = [tokenize_prompt(self.tokenizer, text, pick_template(template, rng), forced=True)
                   for text in instructions]
        prefix, suffix, _ = pad_prompts(prompts, 0, self.config.vision.num_patches)
        out = {"pixel_values": preprocess_clip(list(images), self.config.vision.image_size).to(self.dtype),
               "prefix_ids": prefix, "suffix_ids": suffix,
               "image": preprocess_vae(list(images), resolution).to(self.dtype),
               "null_text_embeds": self.null_text_embeds.cpu()}
        return {k: v.contiguous() for k, v in out.items()}  # safetensors stores contiguous tensors only

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
        """-> image latents [B, 4, R/8, R/8]."""
        x = preprocess_vae(list(images), resolution).to(self.device, self.dtype)
        return self.backend.run("vae_encoder", {"image": x})["latents"].to(self.dtype)

    @torch.inference_mode()
    def denoise(self, prompt_embeds: torch.Tensor, bim_residual: torch.Tensor, image_latents: torch.Tensor,
                steps: int = 100, guidance_scale: float = 7.5, image_guidance_scale: float = 1.5,
                generator: torch.Generator | None = None, progress: bool = False,
                latents: torch.Tensor | None = None) -> torch.Tensor:
        """EulerAncestral over the 3-way CFG batch -> latents [B, 4, h, w] (scaled, ready for decode)."""
        scheduler = EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps, device=self.device)
        if latents is None:
            noise = torch.randn(image_latents.shape, generator=generator, dtype=torch.float32)  # CPU generator
            latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
        loop = getattr(self.backend, "denoise_loop", None)
        if loop is not None:  # a backend that runs the whole loop itself (engines/cudagraph.py), same seed, same math
            return loop(latents, image_latents, prompt_embeds, self.null_text_embeds, bim_residual, steps,
                        guidance_scale, image_guidance_scale, generator)
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoise", disable=not progress)):
            sigma = scheduler.sigmas[i].to(self.device)
            # the 3-way CFG batch [cond; null+img; null+zero-img] and the combine: engines.base.guided_eps
            eps = self.backend.guided_eps(latents, image_latents, t, sigma, prompt_embeds, self.null_text_embeds,
                                          bim_residual, guidance_scale, image_guidance_scale).to(self.dtype)
            scheduler.is_scale_input_called = True  # guided_eps applied scale_model_input's x / sqrt(sigma^2 + 1)
            latents = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.backend.run("vae_decoder", {"latents": latents})["image"]  # [B, 3, H, W]

    # -- the edit -----------------------------------------------------------------------------------------------------

    def __call__(self, image, instruction: str | Sequence[str] | None = None, steps: int = 100,
                 guidance_scale: float = 7.5, image_guidance_scale: float = 1.5, resolution: int = 256,
                 seed: int | None = None, img_token_mode: str = "forced", template: int | str = 0,
                 temperature: float = 0.0, progress: bool = False, timings: dict[str, float] | None = None):
        """One edit -> PIL image; lists of images and instructions (or a list of (image, instruction) pairs) -> a
        list of PIL images, run as one batch. seed=None draws a seed (the official script draws one per image).

        `timings`, if given, receives the wall time in ms of each stage (device-synchronised): condition (vision +
        LLM + QFormer + BIM), vae_encode, denoise (all steps), vae_decode, total.
        """
        single = not isinstance(image, (list, tuple))
        if instruction is None:
            if single or not all(isinstance(p, tuple) and len(p) == 2 for p in image):
                raise ValueError("pass an instruction, or a list of (image, instruction) pairs")
            image, instruction = [p[0] for p in image], [p[1] for p in image]
            single = False
        images = [image] if single else list(image)
        instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        if len(images) != len(instructions) or not images:
            raise ValueError(f"got {len(images)} images and {len(instructions)} instructions; need the same, >= 1")
        if resolution % 8 or resolution < 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        pil = [_as_image(x) for x in images]
        if seed is None:
            seed = random.randrange(2**31)
        generator = torch.Generator().manual_seed(seed)
        clock = _StageClock(self.device, timings)
        with clock("condition"):
            prompt_embeds, bim_residual = self.encode_condition(pil, instructions, img_token_mode, template,
                                                                temperature, seed)
        with clock("vae_encode"):
            image_latents = self.encode_image(pil, resolution)
        with clock("denoise"):
            latents = self.denoise(prompt_embeds, bim_residual, image_latents, steps, guidance_scale,
                                   image_guidance_scale, generator, progress)
        with clock("vae_decode"):
            decoded = self.decode(latents)
        out = postprocess(decoded)
        clock.finish()
        return out[0] if single else out


class _StageClock:
    """Wall time per stage in ms, synchronising the device before each reading (CUDA work is asynchronous)."""

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
