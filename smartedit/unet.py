"""UNet stage: the SD-1.5 UNet (diffusers UNet2DConditionModel) with InstructPix2Pix's 8 input channels, plus the BIM
image residual added to `conv_in`'s output.

Official: model/unet_2d_condition_ZeroConv.py:907-909 (`sample = self.conv_in(sample); sample = sample + residual`),
a fork of diffusers' forward whose only change is that add. Here diffusers' forward stays untouched: a forward hook on
`conv_in` adds the residual. Checkpoint keys are diffusers' (the release's `unet.` prefix stripped).

The BIM residual arrives at 16x16 ([B, 320, 16, 16]); it is resized to the latent size here, where h and w are known,
and shared by the three classifier-free-guidance branches (the official script repeats it 3 times).
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

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, prompt_embeds: torch.Tensor,
                bim_residual: torch.Tensor) -> torch.Tensor:
        n_branches = sample.shape[0] // bim_residual.shape[0]  # not divmod: it rejects symbolic (exported) sizes
        if sample.shape[0] != n_branches * bim_residual.shape[0]:
            raise InputError(f"sample batch {sample.shape[0]} is not a multiple of bim_residual batch "
                             f"{bim_residual.shape[0]}")
        residual = resize_residual(bim_residual, tuple(sample.shape[-2:])).to(sample.dtype)
        self._residual = residual.repeat(n_branches, 1, 1, 1)  # [nB, 320, h, w], branch-major like `sample`
        try:
            return self.unet(sample, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        finally:
            self._residual = None
