"""`llava` graph: CLIP tower + mm_projector + LLaMA prefill over the forced suffix -> the 32 <img_i> states.

    pixel_values [B,3,224,224], prefix_ids [B,Lp], suffix_ids [B,Ls] (ends with <img_0>..<img_31>)
    -> img_hidden [B,32,H], clip_feats [B,256,Dv]

Padding is id 0 (<unk>, the official pad token), which the LLaMA sentencepiece tokenizer never emits (it falls back
to bytes), so the attention mask is derived inside the graph: no mask input, and a batch of prompts of different
lengths (left-padded by smartedit.mllm.pad_prompts) computes what each prompt computes alone.
"""

from __future__ import annotations

import torch
from torch import nn

from smartedit.config import NUM_IMG_TOKENS, SmartEditConfig
from smartedit.mllm import SmartEditLLM
from smartedit.vision import VisionTower

from .spec import DimRange, GraphSpec, ProfileOptions, TensorSpec

PAD_ID = 0


class LlavaGraph(nn.Module):
    """Export-only wrapper over the real vision tower and LLM (no export branches inside the model)."""

    def __init__(self, vision: VisionTower, llm: SmartEditLLM):
        super().__init__()
        self.vision, self.llm = vision, llm

    def forward(self, pixel_values: torch.Tensor, prefix_ids: torch.Tensor, suffix_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        clip_feats, image_embeds = self.vision(pixel_values)  # [B, 256, Dv], [B, 256, H]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        mask = torch.cat([(prefix_ids != PAD_ID).long(), image_mask, (suffix_ids != PAD_ID).long()], dim=1)
        hidden = self.llm(self.llm.embed(prefix_ids, image_embeds, suffix_ids), mask)  # [B, L, H]
        return hidden[:, -NUM_IMG_TOKENS:], clip_feats


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


def build(stages) -> nn.Module:
    return LlavaGraph(stages.vision, stages.llm)
