"""VAE stage: InstructPix2Pix's AutoencoderKL (diffusers). Encode takes the latent mode, unscaled, as the IP2P pipeline;
decode divides by the scaling factor 0.18215 first (test/InstructPix2PixSD_SM.py:258-306)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from .config import VAEConfig
from .vision import to_rgb


def preprocess_vae(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> [B, 3, R, R] in [-1, 1]. Official: exif transpose (in to_rgb), RGB, bicubic resize to a square
    (is_resize)."""
    arrays = []
    for img in images:
        img = to_rgb(img).resize((resolution, resolution), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def postprocess(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images (as diffusers' VaeImageProcessor: clamp, x255, round)."""
    x = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = AutoencoderKL(**cfg.diffusers_kwargs())

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/8, W/8] (the mode, not sampled, not scaled)."""
        return self.vae.encode(image).latent_dist.mode()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] (scaled, as the sampler produces them) -> image [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.vae.decode(latents / self.cfg.scaling_factor).sample
