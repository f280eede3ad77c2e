"""The model: the six networks together, and the five computations an edit is made of.

Each computation is one method here. The eager pipeline runs these methods as they are; the export wraps the same
methods, unchanged, as the graphs of the export contract (smartedit.graphs), so what is exported is what the
reference computes:

    llava(pixel_values, prefix_ids, suffix_ids)         -> img_hidden [B,32,H], clip_feats [B,256,Dv]
    qformer_bim(img_hidden, clip_feats)                 -> prompt_embeds [B,77,D], bim_residual [B,C0,16,16]
    unet_eps(sample, timestep, prompt_embeds, residual) -> eps [nB,4,h,w]           (one CFG batch of n branches)
    unet_deep(..., branch) -> eps, cached_feature;  unet_shallow(..., cached_feature, branch) -> eps   (DeepCache)
    guided_eps(latents, image_latents, timestep, sigma,
               prompt_embeds, bim_residual, guidance,
               null_text_embeds, branches=3)            -> guided eps [B,4,h,w]   (scaling, CFG batch and combine)
    vae_encode(image) / vae_decode(latents)

and the classifier-free guidance of InstructPix2Pix, written once: the 3-way batch [cond; null+img; null+zero-img]
(`cfg_batch`) and the combine eps = u + g_t (t - i) + g_i (i - u) in fp32 (`cfg_combine`: g_t * (t - i) amplifies
fp16 rounding; every Python backend uses this one, and the --fold-cfg unet graph holds it, so the C++ runtime runs it
there; on the plain graph the C++ loop writes the same combine again, runtime/src/denoiser.cpp); and the cheaper
batches of a guidance schedule (smartedit/guidance.py): 2 branches [cond; null+img] with eps = i + g_t (t - i),
1 branch [cond] with eps = t.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .bim import BIM
from .config import SmartEditConfig, derived_seed
from .errors import InputError
from .mllm import PAD_ID, SmartEditLLM
from .qformer import QFormer
from .scheduler import scale_model_input
from .unet import SmartEditUNet
from .vae import VAE
from .vision import VisionTower

STAGE_NAMES = ("vision", "llm", "qformer", "bim", "unet", "vae")  # also the checkpoint's file names


def cfg_batch(x: torch.Tensor, image_latents: torch.Tensor, prompt_embeds: torch.Tensor,
              null_text_embeds: torch.Tensor, branches: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """x, image_latents [B,4,h,w], prompt_embeds [B,77,D], null [1,77,D] -> sample [nB,8,h,w], prompts [nB,77,D]:
    the first n of the branches [cond; null text + image; null text + zero image], batch-major."""
    b = x.shape[0]
    if branches == 1:
        return torch.cat([x, image_latents], dim=1), prompt_embeds
    null = null_text_embeds.to(prompt_embeds.dtype).expand(b, -1, -1)
    if branches == 2:
        return torch.cat([torch.cat([x, x]), torch.cat([image_latents, image_latents])], dim=1), \
            torch.cat([prompt_embeds, null])
    sample = torch.cat([torch.cat([x, x, x]),
                        torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])], dim=1)
    return sample, torch.cat([prompt_embeds, null, null])


def cfg_combine(eps: torch.Tensor, guidance_scale, image_guidance_scale, branches: int = 3) -> torch.Tensor:
    """eps [nB,4,h,w] of n branches -> the guided eps [B,4,h,w] in fp32: 3 branches u + g_t (t - i) + g_i (i - u);
    2 branches (text-only) i + g_t (t - i); 1 branch t. Slices, not chunk(3): chunk's guard ((4B - 1) // B == 3)
    is beyond torch.export's solver and pins B."""
    b = eps.shape[0] // branches
    e = eps.float()
    if branches == 1:
        return e
    if branches == 2:
        e_text, e_image = e[:b], e[b:]
        return e_image + guidance_scale * (e_text - e_image)
    e_text, e_image, e_uncond = e[:b], e[b:2 * b], e[2 * b:]
    return e_uncond + guidance_scale * (e_text - e_image) + image_guidance_scale * (e_image - e_uncond)


class Stages(nn.Module):
    """The six networks, one per file; attribute names = checkpoint file names. A stage may be None (a graph's
    module holds only the stages it uses) or on the meta device (built for its shapes, not loaded)."""

    def __init__(self, vision: VisionTower | None = None, llm: SmartEditLLM | None = None,
                 qformer: QFormer | None = None, bim: BIM | None = None, unet: SmartEditUNet | None = None,
                 vae: VAE | None = None):
        super().__init__()
        self.vision, self.llm, self.qformer, self.bim, self.unet, self.vae = vision, llm, qformer, bim, unet, vae

    def items(self) -> Iterator[tuple[str, nn.Module]]:
        for name in STAGE_NAMES:
            if getattr(self, name) is not None:
                yield name, getattr(self, name)

    def subset(self, names: Iterable[str]) -> "Stages":
        """The same modules (not copies), only those named."""
        return Stages(**{n: getattr(self, n) for n in names})

    # -- the five computations (the graphs of smartedit.graphs) ------------------------------------------------------

    def llava(self, pixel_values: torch.Tensor, prefix_ids: torch.Tensor, suffix_ids: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP + mm_projector + one LLaMA prefill over prompt and canonical answer (forced mode).
        prefix_ids / suffix_ids are left-padded with PAD_ID (0, <unk>, which the LLaMA tokenizer never emits: it
        falls back to bytes), so the attention mask is derived here and a padded row computes what it would alone."""
        clip_feats, image_embeds = self.vision(pixel_values)  # [B, 256, Dv], [B, 256, H]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        mask = torch.cat([(prefix_ids != PAD_ID).long(), image_mask, (suffix_ids != PAD_ID).long()], dim=1)
        return self.llm.forced_img_states(prefix_ids, image_embeds, suffix_ids, mask), clip_feats

    def qformer_bim(self, img_hidden: torch.Tensor, clip_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bim(self.qformer(img_hidden), clip_feats)

    def unet_eps(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                 bim_residual: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, prompt_embeds, bim_residual)

    def unet_deep(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                  bim_residual: torch.Tensor, branch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """unet_eps, and the feature DeepCache keeps at skip branch `branch` ([nB,C,h,w], smartedit/unet.py)."""
        return self.unet.deep(sample, timestep, prompt_embeds, bim_residual, branch)

    def unet_shallow(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                     bim_residual: torch.Tensor, cached_feature: torch.Tensor, branch: int) -> torch.Tensor:
        """eps [nB,4,h,w] from the UNet's shallow path at `branch` and a feature unet_deep returned."""
        return self.unet.shallow(sample, timestep, prompt_embeds, bim_residual, cached_feature, branch)

    def guided_eps(self, latents: torch.Tensor, image_latents: torch.Tensor, timestep: torch.Tensor,
                   sigma: torch.Tensor, prompt_embeds: torch.Tensor, bim_residual: torch.Tensor,
                   guidance: torch.Tensor, null_text_embeds: torch.Tensor, branches: int = 3,
                   unet: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """One guided step from unscaled latents: scale_model_input, the CFG batch of `branches` branches (3: the
        official one), the UNet, the fp32 combine. timestep [1], sigma [1] fp32; guidance (text, image) scales,
        fp32: [2] for the batch, or [B, 2] per sample. `unet` (sample, timestep, prompts, bim_residual) -> eps stands
        in for unet_eps (a DeepCache path)."""
        x = scale_model_input(latents, sigma.float().reshape(()))
        sample, prompts = cfg_batch(x, image_latents, prompt_embeds, null_text_embeds, branches)
        eps = (unet or self.unet_eps)(sample, timestep, prompts, bim_residual)
        g = guidance.float().reshape(-1, 2, 1, 1, 1)  # [1 or B, 2, 1, 1, 1]: broadcast over [B, 4, h, w]
        return cfg_combine(eps, g[:, 0], g[:, 1], branches).to(latents.dtype)

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


@contextlib.contextmanager
def _construction(device: torch.device | str, dtype: torch.dtype, init: bool):
    """Build modules directly on `device` in `dtype`; with init=False skip weight init (weights are loaded next)."""
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), (contextlib.nullcontext() if init else no_init_weights()):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_stages(cfg: SmartEditConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 init: bool = True, only: Iterable[str] | None = None, seed: int | None = None) -> Stages:
    """Build the six stages; those not in `only` (if given) go on the meta device: shapes, no memory, not runnable
    (e.g. exporting the 7b UNet on a 24 GB machine without materialising the 7b LLM). With `seed`, each stage's
    random init is seeded on its own, so a stage's weights do not depend on which other stages were built."""
    wanted = set(STAGE_NAMES if only is None else only)
    unknown = wanted - set(STAGE_NAMES)
    if unknown:
        raise InputError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGE_NAMES)}")
    builders = {
        "vision": lambda: VisionTower(cfg.vision, cfg.llm),
        "llm": lambda: SmartEditLLM(cfg.llm),
        "qformer": lambda: QFormer(cfg.qformer, encoder_hidden_size=cfg.llm.hidden_size),
        "bim": lambda: BIM(cfg.bim, text_dim=cfg.qformer.hidden_size, residual_channels=cfg.unet_residual_channels),
        "unet": lambda: SmartEditUNet(cfg.unet),
        "vae": lambda: VAE(cfg.vae),
    }
    modules = {}
    for i, name in enumerate(STAGE_NAMES):
        where, do_init = (device, init) if name in wanted else ("meta", False)
        if seed is not None:
            torch.manual_seed(derived_seed(seed, i))
        with _construction(where, dtype, do_init):
            modules[name] = builders[name]()
        modules[name].eval().requires_grad_(False)
    return Stages(**modules)

