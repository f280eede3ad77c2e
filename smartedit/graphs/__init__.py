"""The graph contract: the five graphs an edit is made of, as data, as modules, and as the protocol runners implement.

Between the model below (smartedit/model.py: one method per graph) and everything that exports or runs graphs above
(smartedit.export, smartedit.engines, smartedit.pipeline), this package holds:
- the specs (spec.py; one file per graph: names, dtypes, shapes, dynamic ranges, profiles),
- `Graph`: a spec and the Stages method it is; `GraphModule`: that method over the stages it reads, as the
  nn.Module torch.export and torch.onnx take (never a copy of the model's logic),
- `GraphRunner` / `LoopRunner`: the protocol every runner implements, and `EagerRunner`, the model itself run as
  the contract (the reference every export is checked against),
- the manifest schema of exported artifacts (manifest.py) and the parity check against PyTorch (parity.py).

Adding a graph: its method in smartedit/model.py, its spec file here, its line in `GRAPHS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from smartedit.config import SmartEditConfig
from smartedit.errors import InputError
from smartedit.model import Stages
from smartedit.scheduler import Plan

from . import llava, qformer_bim, unet, vae
from .spec import GraphSpec, ProfileOptions



@dataclass(frozen=True)
class GraphFacts:
    """What is known of a graph before any config: everything other code would otherwise look up by its name."""

    spec: Callable[[SmartEditConfig, ProfileOptions, bool], GraphSpec]  # (config, profile, fold_cfg) -> its spec
    method: Callable[[bool], str]  # fold_cfg -> the Stages method (smartedit/model.py) it is
    stages: tuple[str, ...]  # the stages whose weights it reads
    label: str  # what the benchmarks call its time
    per_step: bool = False  # called once per denoising step: the graph a runner captures as a CUDA graph


# the graphs in dataflow order; adding one: its method in smartedit/model.py, its spec file here, its line here
GRAPHS: dict[str, GraphFacts] = {
    "llava": GraphFacts(lambda c, o, f: llava.spec(c, o), lambda f: llava.METHOD, llava.STAGES, "vision+llm"),
    "qformer_bim": GraphFacts(lambda c, o, f: qformer_bim.spec(c, o), lambda f: qformer_bim.METHOD,
                              qformer_bim.STAGES, "qformer_bim"),
    "unet": GraphFacts(unet.spec, unet.method, unet.STAGES, "unet", per_step=True),
    "vae_encoder": GraphFacts(lambda c, o, f: vae.encoder_spec(c, o), lambda f: vae.ENCODE, vae.STAGES,
                              "vae_encode"),
    "vae_decoder": GraphFacts(lambda c, o, f: vae.decoder_spec(c, o), lambda f: vae.DECODE, vae.STAGES,
                              "vae_decode"),
}
GRAPH_NAMES = tuple(GRAPHS)


@dataclass(frozen=True)
class Graph:
    spec: GraphSpec
    method: str  # the Stages method (smartedit/model.py) this graph is
    stages: tuple[str, ...]  # the stages whose weights it reads
    label: str = ""  # what the benchmarks call its time (GraphFacts.label)
    per_step: bool = False  # GraphFacts.per_step

    @property
    def takes_null_text(self) -> bool:  # the folded unet: the null-text embedding is a constant of the graph
        return self.method == "guided_eps"

    def module(self, stages: Stages, null_text_embeds: torch.Tensor | None = None) -> "GraphModule":
        return GraphModule(self, stages, null_text_embeds)


def graph_table(cfg: SmartEditConfig, opts: ProfileOptions | None = None, fold_cfg: bool = False
                ) -> dict[str, Graph]:
    opts = opts or ProfileOptions()
    return {n: Graph(f.spec(cfg, opts, fold_cfg), f.method(fold_cfg), f.stages, f.label, f.per_step)
            for n, f in GRAPHS.items()}


def parse_graph_names(text: str | list[str] | None) -> list[str]:
    """"unet,vae_decoder" -> ["unet", "vae_decoder"]; None/"all" -> all five, in dataflow order."""
    if text in (None, "", "all"):
        return list(GRAPH_NAMES)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in GRAPH_NAMES]
    if unknown:
        raise InputError(f"unknown graph name(s) {unknown}; choose from {list(GRAPH_NAMES)}")
    return [n for n in GRAPH_NAMES if n in names]


class GraphModule(nn.Module):
    """One graph as an nn.Module: the Stages method, over only the stages it reads (so a graph never holds, or
    exports, another stage's weights)."""

    def __init__(self, graph: Graph, stages: Stages, null_text_embeds: torch.Tensor | None = None):
        super().__init__()
        self.stages, self.method = stages.subset(graph.stages), graph.method
        if graph.takes_null_text and null_text_embeds is None:
            raise InputError(f"the {graph.spec.name} graph ({graph.method}) needs the null-text embedding")
        null = null_text_embeds.detach().clone() if graph.takes_null_text else None
        self.register_buffer("null_text_embeds", null)  # [1, 77, D]: a constant of the folded unet graph

    def forward(self, *args: torch.Tensor):
        extra = () if self.null_text_embeds is None else (self.null_text_embeds,)
        return getattr(self.stages, self.method)(*args, *extra)


@runtime_checkable
class GraphRunner(Protocol):
    """What a runner is: it runs the graphs of the contract by name (each backend hands one back).
    run(graph, {input name: tensor}) -> {output name: tensor}, names and shapes as in the specs; inputs may come in
    any float dtype and device (the runner casts to its own precision), outputs come back on the inputs' device."""

    name: str
    fold_cfg: bool  # True when its `unet` is the folded graph (latents + sigma + guidance in, guided eps out)
    specs: dict[str, GraphSpec]  # the graphs whose shapes an exported profile bounds; empty: any shape runs

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class LoopRunner(GraphRunner, Protocol):
    """A runner that runs the whole denoising loop itself (engines/cudagraph.py), from what the pipeline prepared:
    the starting latents, the sampler's plan (its schedule table), every step's ancestral noise for an ancestral
    sampler (smartedit/scheduler.py) and the CFG batch's branches of each step (smartedit/guidance.py)."""

    def denoise_loop(self, latents: torch.Tensor, image_latents: torch.Tensor, prompt_embeds: torch.Tensor,
                     null_text_embeds: torch.Tensor, bim_residual: torch.Tensor, plan: Plan,
                     noise: torch.Tensor | None, guidance: torch.Tensor,
                     branches: tuple[int, ...] | None = None) -> torch.Tensor:
        """guidance [B, 2] fp32: each sample's (text, image) scales; branches: 3, 2 or 1 per step."""


class EagerRunner:
    """The contract run on the model itself, the reference: each graph is its Stages method, called as it is.
    Float inputs are cast to the dtype of the stage that reads them (a pipeline may keep stages at mixed precision)."""

    name = "eager"
    fold_cfg = False

    def __init__(self, stages: Stages, config: SmartEditConfig):
        self.specs: dict[str, GraphSpec] = {}  # the model runs any shape
        self.stages = stages
        self._graphs = graph_table(config)

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self._graphs[graph]
        dtype = next(getattr(self.stages, g.stages[0]).parameters()).dtype
        args = [inputs[t.name].to(dtype) if t.dtype == "float" else inputs[t.name] for t in g.spec.inputs]
        with torch.inference_mode():
            out = getattr(self.stages, g.method)(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(g.spec.outputs, out)}
