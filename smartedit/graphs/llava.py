"""`llava` graph: CLIP tower + mm_projector + LLaMA prefill over the forced suffix -> the 32 <img_i> states.

    pixel_values [B,3,224,224], prefix_ids [B,Lp], suffix_ids [B,Ls] (ends with <img_0>..<img_31>, left-padded with 0)
    -> img_hidden [B,32,H], clip_feats [B,256,Dv]

The computation is Stages.llava (smartedit/model.py): the attention mask is derived from the padding inside it, so
the graph has no mask input.
"""

from __future__ import annotations

from smartedit.config import NUM_IMG_TOKENS, SmartEditConfig

from .spec import DimRange, GraphSpec, ProfileOptions, TensorSpec

METHOD, STAGES = "llava", ("vision", "llm")


def spec(cfg: SmartEditConfig, opts: ProfileOptions) -> GraphSpec:
    v, h = cfg.vision, cfg.llm.hidden_size
    return GraphSpec(
        name="llava",
        inputs=(
            TensorSpec("pixel_values", "float", ("B", 3, v.image_size, v.image_size)),
            TensorSpec("prefix_ids", "int64", ("B", "Lp"), values="token_ids"),
            TensorSpec("suffix_ids", "int64", ("B", "Ls"), values="img_suffix_ids"),
        ),
        outputs=(
            TensorSpec("img_hidden", "float", ("B", NUM_IMG_TOKENS, h)),
            TensorSpec("clip_feats", "float", ("B", v.num_patches, v.hidden_size)),
        ),
        dims={"B": opts.batch(),
              "Lp": DimRange(opts.min_prefix, opts.opt_prefix, opts.max_prefix),
              "Ls": DimRange(opts.min_suffix, opts.opt_suffix, opts.max_suffix)},
    )
