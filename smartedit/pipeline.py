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
from typing import Iterator, Sequence

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
                 init: bool = True) -> Stages:
    with _construction(device, dtype, init):
        stages = Stages(
            vision=VisionTower(cfg.vision, cfg.llm),
            llm=SmartEditLLM(cfg.llm),
            qformer=QFormer(cfg.qformer, encoder_hidden_size=cfg.llm.hidden_size),
            bim=BIM(cfg.bim, text_dim=cfg.qformer.hidden_size, residual_channels=cfg.unet_residual_channels),
            unet=SmartEditUNet(cfg.unet),
            vae=VAE(cfg.vae),
        )
    for _, m in stages.items():
        m.eval().requires_grad_(False)
    return stages


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
                 null_text_embeds: torch.Tensor, random_weights: bool = False):
        if tuple(null_text_embeds.shape) != (1, config.qformer.num_queries, config.qformer.hidden_size):
            raise ValueError(f"null_text_embeds must be [1, {config.qformer.num_queries}, "
                             f"{config.qformer.hidden_size}], got {tuple(null_text_embeds.shape)}")
        self.config = config
        self.tokenizer = add_smartedit_tokens(tokenizer)
        self.stages = stages
        self.null_text_embeds = null_text_embeds  # [1, 77, D]: CLIP text embedding of ""
        self.random_weights = random_weights

    # -- construction -------------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "SmartEditPipeline":
        """Random weights with the preset's shapes (for tests and latency work: speed does not depend on values)."""
        cfg = SmartEditConfig.from_name(name)
        log.warning("SmartEdit %s with RANDOM weights (seed %d): outputs are noise, shapes and costs are real", name, seed)
        torch.manual_seed(seed)
        stages = build_stages(cfg, device, dtype, init=True)
        g = torch.Generator().manual_seed(seed)
        null = torch.randn(1, cfg.qformer.num_queries, cfg.qformer.hidden_size, generator=g).to(device, dtype)
        return cls(cfg, build_offline_tokenizer(), stages, null, random_weights=True)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "SmartEditPipeline":
        model_dir = Path(model_dir)
        cfg, meta = ckpt.read_config(model_dir)
        missing = ckpt.iter_missing([model_dir / f"{n}.safetensors" for n in ckpt.STAGE_FILES]
                                    + [model_dir / ckpt.NULL_TEXT_FILE])
        if missing:
            raise ckpt.CheckpointError(f"{model_dir} is incomplete, missing: {', '.join(str(p) for p in missing)}")
        stages = build_stages(cfg, device, dtype, init=False)  # uninitialised, on the target device
        for name, module in stages.items():
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
        s = self.stages
        pixels = preprocess_clip(list(images), self.config.vision.image_size).to(self.device, self.dtype)
        clip_feats, image_embeds = s.vision(pixels)  # [B, 256, Dv], [B, 256, H]
        rng = random.Random(seed)
        forced = img_token_mode == "forced"
        prompts = [tokenize_prompt(self.tokenizer, text, pick_template(template, rng), forced=forced)
                   for text in instructions]
        if forced:
            prefix, suffix, mask = pad_prompts(prompts, self.tokenizer.pad_token_id, image_embeds.shape[1])
            img_hidden = s.llm.forced_img_states(prefix.to(self.device), image_embeds, suffix.to(self.device),
                                                 mask.to(self.device))
        else:
            gen = torch.Generator().manual_seed(seed if seed is not None else 0)
            img_hidden = torch.cat([
                s.llm.generate_img_states(torch.tensor([p.prefix], device=self.device), image_embeds[i:i + 1],
                                          torch.tensor([p.suffix], device=self.device), temperature=temperature,
                                          generator=gen, eos_token_id=self.tokenizer.eos_token_id)[0]
                for i, p in enumerate(prompts)
            ])
        q = s.qformer(img_hidden)  # [B, 77, D]
        return s.bim(q, clip_feats)

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
        """-> image latents [B, 4, R/8, R/8]."""
        x = preprocess_vae(list(images), resolution).to(self.device, self.dtype)
        return self.stages.vae.encode(x)

    @torch.inference_mode()
    def denoise(self, prompt_embeds: torch.Tensor, bim_residual: torch.Tensor, image_latents: torch.Tensor,
                steps: int = 100, guidance_scale: float = 7.5, image_guidance_scale: float = 1.5,
                generator: torch.Generator | None = None, progress: bool = False,
                latents: torch.Tensor | None = None) -> torch.Tensor:
        """EulerAncestral over the 3-way CFG batch -> latents [B, 4, h, w] (scaled, ready for decode)."""
        scheduler = EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps, device=self.device)
        b = image_latents.shape[0]
        if latents is None:
            noise = torch.randn(image_latents.shape, generator=generator, dtype=torch.float32)  # CPU generator
            latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
        null = self.null_text_embeds.expand(b, -1, -1)
        prompt3 = torch.cat([prompt_embeds, null, null])  # [3B, 77, D]
        image3 = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])  # [3B, 4, h, w]
        for t in tqdm(scheduler.timesteps, desc="denoise", disable=not progress):
            x = scheduler.scale_model_input(torch.cat([latents] * 3), t)
            eps = self.stages.unet(torch.cat([x, image3], dim=1), t, prompt3, bim_residual)  # [3B, 4, h, w]
            e_text, e_image, e_uncond = eps.chunk(3)
            eps = e_uncond + guidance_scale * (e_text - e_image) + image_guidance_scale * (e_image - e_uncond)
            latents = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.stages.vae.decode(latents)  # [B, 3, H, W]

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
