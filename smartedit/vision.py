"""Vision stage: CLIP ViT-L/14 at 224 px (LLaVA-1.1's tower), penultimate layer, CLS dropped; and `mm_projector`.

Official: llava/model/multimodal_encoder/clip_encoder.py (hidden_states[-2][:, 1:]) and DS_SmartEdit_model.py
(`mm_projector = nn.Linear(1024, H)`). The raw CLIP features feed the BIM; the projected ones go into the LLM.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import LLMConfig, VisionConfig

# OpenAI CLIP normalisation (CLIPImageProcessor of openai/clip-vit-large-patch14)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB by its meaning, not its raw values: upright as its EXIF orientation says (a phone's
    JPEG is stored sideways; every stage sees it upright, as the official VAE input does); PIL's convert("RGB") clips
    a 16-bit greyscale PNG (mode I;16 / I, 0..65535) to white, here it is scaled by 255/65535 first. Alpha is
    dropped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":  # float greyscale: PIL's own convention is 0..255
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def preprocess_clip(images: list[Image.Image], size: int = 224) -> torch.Tensor:
    """PIL images -> pixel_values [B, 3, size, size], fp32.

    Official test script: bicubic resize to 224x224, then CLIPImageProcessor (shortest side 224 + centre crop 224,
    both no-ops on a 224x224 image, then /255 and CLIP mean/std).
    """
    arrays = []
    for img in images:
        img = to_rgb(img).resize((size, size), resample=Image.Resampling.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, H, W]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class VisionTower(nn.Module):
    """pixel_values [B, 3, 224, 224] -> (clip_feats [B, 256, Dv], image_embeds [B, 256, H])."""

    def __init__(self, cfg: VisionConfig, llm: LLMConfig):
        super().__init__()
        self.cfg = cfg
        clip_cfg = CLIPVisionConfig(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_act="quick_gelu",  # OpenAI CLIP
            layer_norm_eps=cfg.layer_norm_eps,
        )
        self.clip = CLIPVisionModel(clip_cfg)
        # Only the layers up to the selected one are ever used (hidden_states[-2] = after layer num_layers - 1):
        # drop the rest so nothing computes them. CLIP's last_hidden_state carries no post-LayerNorm, so the
        # truncated tower's last_hidden_state is exactly LLaVA's hidden_states[select_layer].
        encoder = getattr(self.clip, "vision_model", self.clip).encoder  # transformers 5 flattened `vision_model`
        encoder.layers = encoder.layers[: cfg.num_layers_used]
        self.mm_projector = nn.Linear(cfg.hidden_size, llm.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.clip(pixel_values=pixel_values).last_hidden_state  # [B, 1 + 256, Dv]
        clip_feats = feats[:, 1:]  # drop CLS: [B, 256, Dv]
        return clip_feats, self.mm_projector(clip_feats)  # [B, 256, Dv], [B, 256, H]
