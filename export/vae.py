"""`vae_encoder` and `vae_decoder` graphs.

    vae_encoder: image [B,3,8h,8w] in [-1, 1] -> latents [B,4,h,w]   (latent mode, unscaled: the IP2P convention)
    vae_decoder: latents [B,4,h,w] -> image [B,3,8h,8w]               (includes the 1/0.18215 scaling)
"""

from __future__ import annotations

import torch
from torch import nn

from smartedit.config import SmartEditConfig
from smartedit.vae import VAE

from .spec import GraphSpec, ProfileOptions, TensorSpec


class VaeEncoderGraph(nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


def encoder_spec(cfg: SmartEditConfig, opts: ProfileOptions) -> GraphSpec:
    f, c = cfg.vae.downsample_factor, cfg.vae.latent_channels
    return GraphSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", "float", ("B", 3, f"{f}*h", f"{f}*w"), values="image"),),
        outputs=(TensorSpec("latents", "float", ("B", c, "h", "w")),),
        dims={"B": opts.batch(), "h": opts.latent(), "w": opts.latent()},
    )


def decoder_spec(cfg: SmartEditConfig, opts: ProfileOptions) -> GraphSpec:
    f, c = cfg.vae.downsample_factor, cfg.vae.latent_channels
    return GraphSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latents", "float", ("B", c, "h", "w")),),
        outputs=(TensorSpec("image", "float", ("B", 3, f"{f}*h", f"{f}*w")),),
        dims={"B": opts.batch(), "h": opts.latent(), "w": opts.latent()},
    )


def build_encoder(stages) -> nn.Module:
    return VaeEncoderGraph(stages.vae)


def build_decoder(stages) -> nn.Module:
    return VaeDecoderGraph(stages.vae)
