"""`qformer_bim` graph: QFormer + BIM (Stages.qformer_bim).

    img_hidden [B,32,H], clip_feats [B,256,Dv] -> prompt_embeds [B,77,D], bim_residual [B,C0,16,16]
"""

from __future__ import annotations

from smartedit.config import NUM_IMG_TOKENS, SmartEditConfig

from .spec import GraphSpec, ProfileOptions, TensorSpec

METHOD, STAGES = "qformer_bim", ("qformer", "bim")


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
