"""The graph contract: the five graphs an edit is made of, as data, as modules, and as the protocol runners implement.

Between the model below (smartedit/model.py: one method per graph) and everything that exports or runs graphs above
(smartedit.export, smartedit.engines, smartedit.pipeline), this package holds:
- the specs (spec.py; one file per graph: names, dtypes, shapes, dynamic ranges, profiles),
- `Graph`: a spec and the Stages method it is; `GraphModule`: that method over the stages it reads, as the
  nn.Module torch.export and torch.onnx take (never a copy of the model's logic),
- `GraphRunner` / `LoopRunner`: the protocol every runner implements, and `EagerRunner`, the model itself run as
  the contract (the reference every export is checked against),
- the manifest schema of exported artifacts (manifest.py) and the parity check against PyTorch (parity.py).

Adding a graph: its method in smartedit/model.py, its spec file here, its line in `GRAPHS`. Code outside the
pipeline (which calls each graph by name where it uses it) finds a graph by its role (`graph_with_role`): the
denoiser, DeepCache's whole and shallow steps.

The five graphs of an edit are GRAPH_NAMES; the DeepCache pair (unet_deep, unet_shallow: smartedit/deepcache.py) is
built only when asked for, at the skip branch the graph table is made with (`cache_branch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from smartedit.config import SmartEditConfig
from smartedit.deepcache import DEFAULT_CACHE_BRANCH
from smartedit.errors import InputError
from smartedit.model import Stages
from smartedit.scheduler import Plan

from . import llava, qformer_bim, unet, vae
from .spec import GraphSpec, ProfileOptions



@dataclass(frozen=True)
class GraphFacts:
    """What is known of a graph before any config: everything other code would otherwise look up by its name."""

    # (config, profile, fold_cfg, DeepCache branch) -> its spec
    spec: Callable[[SmartEditConfig, ProfileOptions, bool, int], GraphSpec]
    method: Callable[[bool], str]  # fold_cfg -> the Stages method (smartedit/model.py) it is
    stages: tuple[str, ...]  # the stages whose weights it reads
    label: str  # what the benchmarks call its time (and its FLOPs)
    per_step: bool = False  # called once per denoising step: the graph a runner captures as a CUDA graph
    deepcache: bool = False  # a DeepCache graph: built when asked for; its method takes the branch
    role: str = ""  # what code outside the pipeline finds it by (ROLES); "": only the pipeline calls it
    step_label: str = ""  # what the benchmarks call its median time per call, where not `label` (the denoiser's step)


# roles (GraphFacts.role), one graph each
DENOISER = "denoiser"  # the UNet step of the plain loop: --fold-cfg folds it, --precision int8/fp8 quantizes it, the
#                        CUDA-graph runner captures it, the benchmarks report its time per step
DEEPCACHE_WHOLE = "deepcache_whole"  # DeepCache's whole-UNet step: eps and the feature it caches
DEEPCACHE_SHALLOW = "deepcache_shallow"  # DeepCache's shallow step on the cached feature
ROLES = (DENOISER, DEEPCACHE_WHOLE, DEEPCACHE_SHALLOW)


# the graphs in dataflow order; adding one: its method in smartedit/model.py, its spec file here, its line here
GRAPHS: dict[str, GraphFacts] = {
    "llava": GraphFacts(lambda c, o, f, k: llava.spec(c, o), lambda f: llava.METHOD, llava.STAGES, "vision+llm"),
    "qformer_bim": GraphFacts(lambda c, o, f, k: qformer_bim.spec(c, o), lambda f: qformer_bim.METHOD,
                              qformer_bim.STAGES, "qformer_bim"),
    "unet": GraphFacts(lambda c, o, f, k: unet.spec(c, o, f), unet.method, unet.STAGES, "unet", per_step=True,
                       role=DENOISER, step_label="unet_step"),
    "vae_encoder": GraphFacts(lambda c, o, f, k: vae.encoder_spec(c, o), lambda f: vae.ENCODE, vae.STAGES,
                              "vae_encode"),
    "vae_decoder": GraphFacts(lambda c, o, f, k: vae.decoder_spec(c, o), lambda f: vae.DECODE, vae.STAGES,
                              "vae_decode"),
    "unet_deep": GraphFacts(lambda c, o, f, k: unet.deep_spec(c, o, k), lambda f: unet.DEEP, unet.STAGES,
                            "unet_deep", per_step=True, deepcache=True, role=DEEPCACHE_WHOLE),
    "unet_shallow": GraphFacts(lambda c, o, f, k: unet.shallow_spec(c, o, k), lambda f: unet.SHALLOW, unet.STAGES,
                               "unet_shallow", per_step=True, deepcache=True, role=DEEPCACHE_SHALLOW),
}
GRAPH_NAMES = tuple(n for n, f in GRAPHS.items() if not f.deepcache)  # the graphs of an edit
DEEPCACHE_GRAPHS = tuple(n for n, f in GRAPHS.items() if f.deepcache)


def graph_with_role(role: str) -> str:
    """The name of the graph that plays `role` (ROLES): e.g. DENOISER -> "unet"."""
    names = [n for n, f in GRAPHS.items() if f.role == role]
    if len(names) != 1:
        raise InputError(f"graph role {role!r} is played by {names or 'no graph'}; the roles are {list(ROLES)}")
    return names[0]


# the roles are table facts: every role played by exactly one graph, checked at import
for _role in ROLES:
    graph_with_role(_role)
del _role


@dataclass(frozen=True)
class Graph:
    spec: GraphSpec
    method: str  # the Stages method (smartedit/model.py) this graph is
    stages: tuple[str, ...]  # the stages whose weights it reads
    label: str = ""  # what the benchmarks call its time (GraphFacts.label)
    per_step: bool = False  # GraphFacts.per_step
    cache_branch: int | None = None  # a DeepCache graph: the skip branch its method is called with

    @property
    def constants(self) -> dict[str, int]:
        """Keyword arguments of its method fixed when the graph is built."""
        return {} if self.cache_branch is None else {"branch": self.cache_branch}

    @property
    def takes_null_text(self) -> bool:  # the folded unet: the null-text embedding is a constant of the graph
        return self.method == "guided_eps"

    def module(self, stages: Stages, null_text_embeds: torch.Tensor | None = None) -> "GraphModule":
        return GraphModule(self, stages, null_text_embeds)


def graph_table(cfg: SmartEditConfig, opts: ProfileOptions | None = None, fold_cfg: bool = False,
                cache_branch: int | None = None) -> dict[str, Graph]:
    """Every graph at this profile; the DeepCache pair at `cache_branch` (None: the default branch)."""
    opts = opts or ProfileOptions()
    k = DEFAULT_CACHE_BRANCH if cache_branch is None else check_cache_branch(cfg, cache_branch)
    return {n: Graph(f.spec(cfg, opts, fold_cfg, k), f.method(fold_cfg), f.stages, f.label, f.per_step,
                     k if f.deepcache else None)
            for n, f in GRAPHS.items()}


def check_cache_branch(cfg: SmartEditConfig, branch: int) -> int:
    """The DeepCache branch, or InputError naming it and the range this model's UNet has."""
    top = cfg.unet.layers_per_block
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= top:
        raise InputError(f"DeepCache branch must be an integer in [0, {top}] (the layers of this UNet's first down "
                         f"block), got {branch!r}")
    return branch


def parse_graph_names(text: str | list[str] | None) -> list[str]:
    """"unet,vae_decoder" -> ["unet", "vae_decoder"]; None/"all" -> the five of an edit, in dataflow order (the
    DeepCache graphs only when named)."""
    if text in (None, "", "all"):
        return list(GRAPH_NAMES)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in GRAPHS]
    if unknown:
        raise InputError(f"unknown graph name(s) {unknown}; choose from {list(GRAPHS)}")
    return [n for n in GRAPHS if n in names]


class GraphModule(nn.Module):
    """One graph as an nn.Module: the Stages method, over only the stages it reads (so a graph never holds, or
    exports, another stage's weights)."""

    def __init__(self, graph: Graph, stages: Stages, null_text_embeds: torch.Tensor | None = None):
        super().__init__()
        self.stages, self.method, self.constants = stages.subset(graph.stages), graph.method, graph.constants
        if graph.takes_null_text and null_text_embeds is None:
            raise InputError(f"the {graph.spec.name} graph ({graph.method}) needs the null-text embedding")
        null = null_text_embeds.detach().clone() if graph.takes_null_text else None
        self.register_buffer("null_text_embeds", null)  # [1, 77, D]: a constant of the folded unet graph

    def forward(self, *args: torch.Tensor):
        extra = () if self.null_text_embeds is None else (self.null_text_embeds,)
        return getattr(self.stages, self.method)(*args, *extra, **self.constants)


@runtime_checkable
class GraphRunner(Protocol):
    """What a runner is: it runs the graphs of the contract by name (each backend hands one back).
    run(graph, {input name: tensor}) -> {output name: tensor}, names and shapes as in the specs; inputs may come in
    any float dtype and device (the runner casts to its own precision), outputs come back on the inputs' device."""

    name: str
    fold_cfg: bool  # True when its `unet` is the folded graph (latents + sigma + guidance in, guided eps out)
    specs: dict[str, GraphSpec]  # the graphs whose shapes an exported profile bounds; empty: any shape runs
    cache_branch: int | None  # the skip branch of its DeepCache graphs (unet_deep, unet_shallow); None: it has none

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class LoopRunner(GraphRunner, Protocol):
    """A runner that runs the whole denoising loop itself (engines/cudagraph.py), from what the pipeline prepared:
    the starting latents, the sampler's plan (its schedule table), every step's ancestral noise for an ancestral
    sampler (smartedit/scheduler.py), the CFG batch's branches of each step (smartedit/guidance.py) and DeepCache's
    whole steps (smartedit/deepcache.py)."""

    def denoise_loop(self, latents: torch.Tensor, image_latents: torch.Tensor, prompt_embeds: torch.Tensor,
                     null_text_embeds: torch.Tensor, bim_residual: torch.Tensor, plan: Plan,
                     noise: torch.Tensor | None, guidance: torch.Tensor,
                     branches: tuple[int, ...] | None = None, whole: tuple[bool, ...] | None = None
                     ) -> torch.Tensor:
        """guidance [B, 2] fp32: each sample's (text, image) scales; branches: 3, 2 or 1 per step; whole: per step,
        whether DeepCache runs the whole UNet (True) or the shallow path (None: no DeepCache, the unet graph)."""


class EagerRunner:
    """The contract run on the model itself, the reference: each graph is its Stages method, called as it is.
    Float inputs are cast to the dtype of the stage that reads them (a pipeline may keep stages at mixed precision)."""

    name = "eager"
    fold_cfg = False

    def __init__(self, stages: Stages, config: SmartEditConfig, cache_branch: int | None = None):
        self.specs: dict[str, GraphSpec] = {}  # the model runs any shape
        self.stages, self.config = stages, config
        self._graphs = graph_table(config, cache_branch=cache_branch)
        self.cache_branch = self._graphs[DEEPCACHE_GRAPHS[0]].cache_branch

    def for_branch(self, branch: int) -> "EagerRunner":
        """The same model, its DeepCache graphs at another skip branch."""
        if branch == self.cache_branch:
            return self
        other = EagerRunner(self.stages, self.config, branch)
        other.name = self.name
        return other

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self._graphs[graph]
        dtype = next(getattr(self.stages, g.stages[0]).parameters()).dtype
        args = [inputs[t.name].to(dtype) if t.dtype == "float" else inputs[t.name] for t in g.spec.inputs]
        with torch.inference_mode():
            out = getattr(self.stages, g.method)(*args, **g.constants)
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(g.spec.outputs, out)}
