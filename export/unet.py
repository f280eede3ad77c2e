"""`unet` graph: one denoising step.

Plain (the contract of DESIGN §4): the 3-way CFG batch in, eps out; the caller scales, combines and steps.
    sample [3B,8,h,w], timestep [1] fp32, prompt_embeds [3B,77,D], bim_residual [B,C0,16,16] -> eps [3B,4,h,w]

Folded (`fold_cfg=True`): the scheduler's input scaling x / sqrt(sigma^2 + 1), the CFG batch (with the null-text
embedding as a constant) and the combine  u + g_t (t - i) + g_i (i - u)  inside the graph.
    latents [B,4,h,w], image_latents [B,4,h,w], timestep [1], sigma [1], prompt_embeds [B,77,D],
    bim_residual [B,C0,16,16], guidance [2] (text, image) fp32 -> eps [B,4,h,w]

h and w are latent sizes, multiples of 8 (resolution multiples of 64): SD's UNet downsamples 3 times.
"""

from __future__ import annotations

import torch
from torch import nn

from smartedit.config import SmartEditConfig
from smartedit.unet import SmartEditUNet

from .spec import GraphSpec, ProfileOptions, TensorSpec


class UNetGraph(nn.Module):
    def __init__(self, unet: SmartEditUNet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, prompt_embeds, bim_residual):
        return self.unet(sample, timestep, prompt_embeds, bim_residual)


class UNetCFGGraph(nn.Module):
    def __init__(self, unet: SmartEditUNet, null_text_embeds: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("null_text_embeds", null_text_embeds.detach().clone())  # [1, 77, D]

    def forward(self, latents, image_latents, timestep, sigma, prompt_embeds, bim_residual, guidance):
        b = latents.shape[0]
        x = latents / torch.sqrt(sigma.float() ** 2 + 1).to(latents.dtype)  # EulerAncestral scale_model_input
        null = self.null_text_embeds.to(prompt_embeds.dtype).expand(b, -1, -1)
        sample = torch.cat([torch.cat([x, x, x]),
                            torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])], dim=1)
        eps = self.unet(sample, timestep, torch.cat([prompt_embeds, null, null]), bim_residual)  # [3B, 4, h, w]
        eps = eps.float()  # fp32 combine: g_t * (t - i) amplifies fp16 rounding
        # slices, not chunk(3): chunk's guard ((4B - 1) // B == 3) is beyond torch.export's solver and pins B
        e_text, e_image, e_uncond = eps[:b], eps[b:2 * b], eps[2 * b:]
        g_text, g_image = guidance[0], guidance[1]
        out = e_uncond + g_text * (e_text - e_image) + g_image * (e_image - e_uncond)
        return out.to(latents.dtype)


def spec(cfg: SmartEditConfig, opts: ProfileOptions, fold_cfg: bool = False) -> GraphSpec:
    c, q, lat = cfg.unet, cfg.qformer, ("8*h8", "8*w8")
    grid = cfg.vision.grid_size
    residual = TensorSpec("bim_residual", "float", ("B", cfg.unet_residual_channels, grid, grid))
    dims = {"B": opts.batch(), "h8": opts.latent8(), "w8": opts.latent8()}
    if not fold_cfg:
        return GraphSpec(
            name="unet",
            inputs=(TensorSpec("sample", "float", ("3*B", c.in_channels) + lat),
                    TensorSpec("timestep", "float32", (1,), values="timestep"),
                    TensorSpec("prompt_embeds", "float", ("3*B", q.num_queries, q.hidden_size)),
                    residual),
            outputs=(TensorSpec("eps", "float", ("3*B", c.out_channels) + lat),),
            dims=dims,
        )
    latent_ch = c.in_channels // 2
    return GraphSpec(
        name="unet",
        inputs=(TensorSpec("latents", "float", ("B", latent_ch) + lat),
                TensorSpec("image_latents", "float", ("B", latent_ch) + lat),
                TensorSpec("timestep", "float32", (1,), values="timestep"),
                TensorSpec("sigma", "float32", (1,), values="sigma"),
                TensorSpec("prompt_embeds", "float", ("B", q.num_queries, q.hidden_size)),
                residual,
                TensorSpec("guidance", "float32", (2,), values="guidance")),
        outputs=(TensorSpec("eps", "float", ("B", c.out_channels) + lat),),
        dims=dims,
    )


def build(stages, null_text_embeds: torch.Tensor | None = None, fold_cfg: bool = False) -> nn.Module:
    if fold_cfg:
        if null_text_embeds is None:
            raise ValueError("fold_cfg needs the null-text embedding")
        return UNetCFGGraph(stages.unet, null_text_embeds)
    return UNetGraph(stages.unet)
