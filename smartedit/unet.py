"""UNet stage: the SD-1.5 UNet (diffusers UNet2DConditionModel) with InstructPix2Pix's 8 input channels, plus the BIM
image residual added to `conv_in`'s output.

Official: model/unet_2d_condition_ZeroConv.py:907-909 (`sample = self.conv_in(sample); sample = sample + residual`),
a fork of diffusers' forward whose only change is that add. Here diffusers' forward stays untouched: a forward hook on
`conv_in` adds the residual. Checkpoint keys are diffusers' (the release's `unet.` prefix stripped).

The BIM residual arrives at 16x16 ([B, 320, 16, 16]); it is resized to the latent size here, where h and w are known,
and shared by the three classifier-free-guidance branches (the official script repeats it 3 times).

DeepCache (Ma et al., 2024) splits the same forward at a skip branch of the outermost resolution. Branch k (0 <= k <=
layers_per_block) pairs the first k layers of the first down block with the last L + 1 - k layers of the last up
block (L = layers_per_block); `deep` runs the whole UNet and also returns the feature entering up layer L - k (the
"cached feature": [nB, C, h, w], C = block_out_channels[0], or block_out_channels[1] for k = L); `shallow` runs only
conv_in, those k down layers and those up layers, taking the cached feature in place of everything deeper. Given the
feature `deep` returned for the same inputs, `shallow` computes the same eps with the same operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from .config import UNetConfig
from .errors import InputError


def resize_residual(bim_residual: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C0, 16, 16] -> [B, C0, h, w], bilinear (align_corners=False) as the official F.interpolate."""
    return F.interpolate(bim_residual, size=size, mode="bilinear", align_corners=False)


class SmartEditUNet(nn.Module):
    """(sample [nB,8,h,w], timestep, prompt_embeds [nB,77,768], bim_residual [B,320,16,16]) -> eps [nB,4,h,w].

    nB is a multiple of B: the CFG branches are stacked batch-major ([cond; null+img; null+no-img] for n = 3) and
    every branch gets the same residual.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet2DConditionModel(**cfg.diffusers_kwargs())
        self._residual: torch.Tensor | None = None  # set only for the duration of one forward
        self.unet.conv_in.register_forward_hook(self._add_residual)

    def _add_residual(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._residual is None:
            return output
        return output + self._residual  # [nB, 320, h, w]

    def _repeated_residual(self, sample: torch.Tensor, bim_residual: torch.Tensor) -> torch.Tensor:
        """[B, C0, 16, 16] -> [nB, C0, h, w], branch-major like `sample`."""
        n_branches = sample.shape[0] // bim_residual.shape[0]  # not divmod: it rejects symbolic (exported) sizes
        if sample.shape[0] != n_branches * bim_residual.shape[0]:
            raise InputError(f"sample batch {sample.shape[0]} is not a multiple of bim_residual batch "
                             f"{bim_residual.shape[0]}")
        residual = resize_residual(bim_residual, tuple(sample.shape[-2:])).to(sample.dtype)
        return residual.repeat(n_branches, 1, 1, 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, prompt_embeds: torch.Tensor,
                bim_residual: torch.Tensor) -> torch.Tensor:
        self._residual = self._repeated_residual(sample, bim_residual)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        finally:
            self._residual = None

    # -- DeepCache: the same forward, split at skip branch k (module docstring) ---------------------------------------

    def _embed(self, sample: torch.Tensor, timestep: torch.Tensor | float, bim_residual: torch.Tensor):
        """-> (time embedding [nB, 4*C0], conv_in output plus the residual [nB, C0, h, w]): diffusers' steps 1-2."""
        emb = self.unet.time_embedding(self.unet.get_time_embed(sample=sample, timestep=timestep))
        self._residual = self._repeated_residual(sample, bim_residual)
        try:
            return emb, self.unet.conv_in(sample)  # the hook adds the residual, as in forward
        finally:
            self._residual = None

    def _last_up_layer(self, j: int, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor,
                       context: torch.Tensor) -> torch.Tensor:
        """Layer j of the last up block (diffusers' CrossAttnUpBlock2D.forward, one iteration)."""
        block = self.unet.up_blocks[-1]
        x = block.resnets[j](torch.cat([x, skip], dim=1), emb)
        if getattr(block, "attentions", None) is not None:
            x = block.attentions[j](x, encoder_hidden_states=context, return_dict=False)[0]
        return x

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        u = self.unet
        if u.conv_norm_out is not None:
            x = u.conv_act(u.conv_norm_out(x))
        return u.conv_out(x)

    def deep(self, sample: torch.Tensor, timestep: torch.Tensor | float, prompt_embeds: torch.Tensor,
             bim_residual: torch.Tensor, branch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole UNet (diffusers' forward, step by step) -> (eps [nB,4,h,w], cached feature [nB,C,h,w])."""
        u, top = self.unet, self.cfg.layers_per_block
        emb, x = self._embed(sample, timestep, bim_residual)
        skips = (x,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=prompt_embeds)
            else:
                x, res = block(hidden_states=x, temb=emb)
            skips += res
        x = u.mid_block(x, emb, encoder_hidden_states=prompt_embeds)
        for block in u.up_blocks[:-1]:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            if getattr(block, "has_cross_attention", False):
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=prompt_embeds)
            else:
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res)
        feature = x
        for j in range(top + 1):  # skips = (conv_in output, the first down block's layer outputs): top + 1 of them
            if j == top - branch:
                feature = x
            x = self._last_up_layer(j, x, skips[top - j], emb, prompt_embeds)
        return self._out(x), feature

    def shallow(self, sample: torch.Tensor, timestep: torch.Tensor | float, prompt_embeds: torch.Tensor,
                bim_residual: torch.Tensor, feature: torch.Tensor, branch: int) -> torch.Tensor:
        """conv_in, the first `branch` layers of the first down block, the cached feature, the last up layers ->
        eps [nB,4,h,w]."""
        top = self.cfg.layers_per_block
        emb, x = self._embed(sample, timestep, bim_residual)
        skips = (x,)
        first = self.unet.down_blocks[0]
        for layer in range(branch):
            x = first.resnets[layer](x, emb)
            if getattr(first, "attentions", None) is not None:
                x = first.attentions[layer](x, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            skips += (x,)
        x = feature.to(sample.dtype)
        for j in range(top - branch, top + 1):
            x = self._last_up_layer(j, x, skips[top - j], emb, prompt_embeds)
        return self._out(x)


def cache_feature_channels(cfg: UNetConfig, branch: int) -> int:
    """Channels of the feature cached at DeepCache branch `branch` (module docstring)."""
    return cfg.block_out_channels[0] if branch < cfg.layers_per_block else cfg.block_out_channels[1]
