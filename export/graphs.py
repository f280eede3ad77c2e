"""The five graphs of the export contract (DESIGN §4): name -> (spec builder, wrapper builder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from smartedit.config import SmartEditConfig

from . import llava, qformer_bim, unet, vae
from .spec import GraphSpec, ProfileOptions

GRAPH_NAMES = ("llava", "qformer_bim", "unet", "vae_encoder", "vae_decoder")


@dataclass(frozen=True)
class Graph:
    spec: GraphSpec
    build: Callable[[object], nn.Module]  # pipeline -> export wrapper over its real modules


def graphs(cfg: SmartEditConfig, opts: ProfileOptions, fold_cfg: bool = False) -> dict[str, Graph]:
    return {
        "llava": Graph(llava.spec(cfg, opts), lambda p: llava.build(p.stages)),
        "qformer_bim": Graph(qformer_bim.spec(cfg, opts), lambda p: qformer_bim.build(p.stages)),
        "unet": Graph(unet.spec(cfg, opts, fold_cfg),
                      lambda p: unet.build(p.stages, p.null_text_embeds, fold_cfg=fold_cfg)),
        "vae_encoder": Graph(vae.encoder_spec(cfg, opts), lambda p: vae.build_encoder(p.stages)),
        "vae_decoder": Graph(vae.decoder_spec(cfg, opts), lambda p: vae.build_decoder(p.stages)),
    }


def parse_graph_names(text: str | None) -> list[str]:
    """"unet,vae_decoder" -> ["unet", "vae_decoder"]; None/"all" -> all five, in dataflow order."""
    if text in (None, "", "all"):
        return list(GRAPH_NAMES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in GRAPH_NAMES]
    if unknown:
        raise ValueError(f"unknown graph name(s) {unknown}; choose from {list(GRAPH_NAMES)}")
    return [n for n in GRAPH_NAMES if n in names]
