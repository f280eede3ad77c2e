"""`qformer_bim` graph: QFormer + BIM.

    img_hidden [B,32,H], clip_feats [B,256,Dv] -> prompt_embeds [B,77,D], bim_residual [B,C0,16,16]
"""

from __future__ import annotations

import torch
from torch import nn

from smartedit.bim import BIM
from smartedit.config import NUM_IMG_TOKENS, SmartEditConfig
from smartedit.qformer import QFormer

from .spec import GraphSpec, ProfileOptions, TensorSpec


class QFormerBIMGraph(nn.Module):
    def __init__(self, qformer: QFormer, bim: BIM):
        super().__init__()
        self.qformer, self.bim = qformer, bim

    def forward(self, img_hidden: torch.Tensor, clip_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bim(self.qformer(img_hidden), clip_feats)


def spec(cfg: SmartEditConfig, opts: ProfileOptions) -> GraphSpec:
    grid = cfg.vision.grid_size
    return GraphSpec(
        name="qformer_bim",
        inputs=(
            TensorSpec("img_hidden", "float", ("B", NUM_IMG_TOKENS, cfg.llm.hidden_size)),
            TensorSpec("clip_feats", "float", ("B", cfg.vision.num_patches, cfg.vision.hidden_size)),
        ),
        outputs=(
            TensorSpec("prompt_embeds", "float", ("B", cfg.qformer.num_queries, cfg.qformer.hidden_size)),
            TensorSpec("bim_residual", "float", ("B", cfg.unet_residual_channels, grid, grid)),
        ),
        dims={"B": opts.batch()},
    )


def build(stages) -> nn.Module:
    return QFormerBIMGraph(stages.qformer, stages.bim)
