"""`unet` graph: one denoising step.

Plain (Stages.unet_eps): the 3-way CFG batch in, eps out; the caller scales, combines and steps.
    sample [3B,8,h,w], timestep [1] fp32, prompt_embeds [3B,77,D], bim_residual [B,C0,16,16] -> eps [3B,4,h,w]

Folded (`--fold-cfg`, Stages.guided_eps): the scheduler's input scaling, the CFG batch (with the null-text embedding
as a constant) and the fp32 combine inside the graph.
    latents [B,4,h,w], image_latents [B,4,h,w], timestep [1], sigma [1], prompt_embeds [B,77,D],
    bim_residual [B,C0,16,16], guidance [2] (text, image) fp32 -> eps [B,4,h,w]

DeepCache (`smartedit-export --deepcache`, smartedit/unet.py), at the skip branch k the export fixes:
    unet_deep    (Stages.unet_deep): the plain graph's inputs -> eps [3B,4,h,w], cached_feature [3B,C,h,w]
    unet_shallow (Stages.unet_shallow): the plain graph's inputs and cached_feature -> eps [3B,4,h,w]
Both take the 3-way CFG batch whatever --fold-cfg says: the pipeline builds the batch and combines around them.

h and w are latent sizes, multiples of 8 (resolution multiples of 64): SD's UNet downsamples 3 times.
"""

from __future__ import annotations

from smartedit.config import SmartEditConfig
from smartedit.unet import cache_feature_channels

from .spec import GraphSpec, ProfileOptions, TensorSpec

STAGES = ("unet",)
DEEP, SHALLOW = "unet_deep", "unet_shallow"  # the Stages methods of the DeepCache graphs


def method(fold_cfg: bool) -> str:
    return "guided_eps" if fold_cfg else "unet_eps"


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


def _plain_inputs(cfg: SmartEditConfig) -> tuple[TensorSpec, ...]:
    c, q, lat, grid = cfg.unet, cfg.qformer, ("8*h8", "8*w8"), cfg.vision.grid_size
    return (TensorSpec("sample", "float", ("3*B", c.in_channels) + lat),
            TensorSpec("timestep", "float32", (1,), values="timestep"),
            TensorSpec("prompt_embeds", "float", ("3*B", q.num_queries, q.hidden_size)),
            TensorSpec("bim_residual", "float", ("B", cfg.unet_residual_channels, grid, grid)))


def _feature(cfg: SmartEditConfig, branch: int) -> TensorSpec:
    return TensorSpec("cached_feature", "float", ("3*B", cache_feature_channels(cfg.unet, branch), "8*h8", "8*w8"))


def deep_spec(cfg: SmartEditConfig, opts: ProfileOptions, branch: int) -> GraphSpec:
    eps = TensorSpec("eps", "float", ("3*B", cfg.unet.out_channels, "8*h8", "8*w8"))
    return GraphSpec(name="unet_deep", inputs=_plain_inputs(cfg), outputs=(eps, _feature(cfg, branch)),
                     dims={"B": opts.batch(), "h8": opts.latent8(), "w8": opts.latent8()})


def shallow_spec(cfg: SmartEditConfig, opts: ProfileOptions, branch: int) -> GraphSpec:
    eps = TensorSpec("eps", "float", ("3*B", cfg.unet.out_channels, "8*h8", "8*w8"))
    return GraphSpec(name="unet_shallow", inputs=_plain_inputs(cfg) + (_feature(cfg, branch),), outputs=(eps,),
                     dims={"B": opts.batch(), "h8": opts.latent8(), "w8": opts.latent8()})
