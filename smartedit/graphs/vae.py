"""`vae_encoder` and `vae_decoder` graphs (Stages.vae_encode / vae_decode).

    vae_encoder: image [B,3,8h,8w] in [-1, 1] -> latents [B,4,h,w]   (latent mode, unscaled: the IP2P convention)
    vae_decoder: latents [B,4,h,w] -> image [B,3,8h,8w]               (includes the 1/0.18215 scaling)
"""

from __future__ import annotations

from smartedit.config import SmartEditConfig

from .spec import GraphSpec, ProfileOptions, TensorSpec

STAGES = ("vae",)
ENCODE, DECODE = "vae_encode", "vae_decode"


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
