"""What an export target is (its entry in targets.TARGETS), its options, and the job every target's producer works
from."""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from smartedit.config import PRECISIONS, Precision, SmartEditConfig
from smartedit.files import sha256_json, write_json
from smartedit.graphs import DENOISER, Graph, graph_with_role, parity
from smartedit.graphs.manifest import Entry, Manifest
from smartedit.graphs.spec import ProfileOptions
from smartedit.pipeline import SmartEditPipeline
from smartedit.weights import ModelSource


class TargetOptions:
    """The options of one target, as a frozen dataclass whose fields are its flags' values. `FLAGS`: each flag's
    argparse keywords (its `dest` is the field; a flag several targets take, --device, is added once with their help
    texts joined); `from_flags` builds the options from the parsed flags."""

    FLAGS: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_flags(cls, a: argparse.Namespace) -> "TargetOptions":
        return cls(**{kw["dest"]: getattr(a, kw["dest"]) for kw in cls.FLAGS.values()})


@dataclass(frozen=True)
class NoOptions(TargetOptions):
    pass


@dataclass(frozen=True)
class Target:
    name: str
    summary: str  # one line, for --help
    produce: Callable[["ExportJob"], None]  # writes and records the artifacts of job.names, skipping up-to-date ones
    options: type[TargetOptions] = NoOptions  # its options (job.target_options); their defaults when none are given
    # (target, options, quantize.QuantizeOptions or None) -> None: refuses at once, before any model is loaded, what
    # cannot be built here
    check: Callable[[str, Any, Any], None] = lambda target, options, quantize: None
    runtime: str | None = None  # where its artifacts run when no engines/ backend does (the Triton server)
    every_dim_dynamic: bool = False  # its artifacts keep every named dim dynamic: a one-value range is refused
    side_files: tuple[str, ...] = ()  # what it writes in OUT/<target>/ besides the <graph>.* files
    whole_folder: bool = False  # OUT/<target> is replaced whole and its files recorded in manifest.repositories
    quantized: bool = True  # it takes a quantized precision (its artifacts come from the quantized ONNX UNet)


@dataclass
class ExportJob:
    """One run of smartedit-export: where it writes, what from, which graphs, with which options."""

    target: str
    out: Path
    source: ModelSource
    cfg: SmartEditConfig
    graphs: dict[str, Graph]  # the graph table at this job's profile and fold_cfg
    names: list[str]  # the graphs asked for, in dataflow order
    manifest: Manifest
    report: dict[str, Any]
    precision: Precision  # --precision (a quantized one quantizes the unet; the other graphs are its unquantized)
    opset: int
    profile: ProfileOptions
    fold_cfg: bool
    verify: bool
    progress: Callable[[str], None]
    target_options: Any = None  # the target's TargetOptions (trt: BuildOptions, aoti: AotiOptions, ...)
    quantize: Any = None  # a quantized precision: quantize.QuantizeOptions of the per-step graph (the unet)
    _pipe: SmartEditPipeline | None = field(default=None, repr=False)
    _loaded: frozenset = frozenset()

    @property
    def options(self) -> dict[str, Any]:
        """The options every entry records and every key includes (a quantized graph's precision: entry_options)."""
        return {"precision": self.precision.unquantized.name, "opset": self.opset, "fold_cfg": self.fold_cfg,
                "profile": asdict(self.profile)}

    def entry_options(self, graph: str) -> dict[str, Any]:
        """The options an entry of `graph` records: `options`, a DeepCache graph's skip branch, and the precision of
        the graph this export quantizes."""
        k = self.graphs[graph].cache_branch
        opts = self.options if k is None else {**self.options, "cache_branch": k}
        return {**opts, "precision": self.precision.name} if self.quantizes(graph) else opts

    def quantizes(self, graph: str) -> bool:
        """Whether this export quantizes `graph` (a quantized precision quantizes the denoiser only)."""
        return self.precision.quantized and graph == graph_with_role(DENOISER)

    def key(self, graph: str, **extra) -> str:
        """The hash of everything that goes into an artifact: a rerun rebuilds exactly when it changed."""
        if self.quantizes(graph):
            extra = {**extra, "quantization": self.quantize.record}
        return sha256_json({"source": self.manifest.source["sha256"], "spec": self.graphs[graph].spec.to_dict(),
                            "options": self.entry_options(graph), "toolchain": self.manifest.toolchain, **extra})

    def up_to_date(self, target: str, graph: str, key: str) -> bool:
        e = self.manifest.entries(target).get(graph)
        return bool(e and e.key == key and e.verified is not False and not self.manifest.damaged(e))

    def todo(self, target: str, what: str = "", **extra) -> list[str]:
        """The graphs of `target` that need (re)building; the others are reported as skipped."""
        todo = []
        for n in self.names:
            if self.up_to_date(target, n, self.key(n, **extra)):
                self.progress(f"{n}: {what + ' ' if what else ''}up to date, skipped")
            else:
                todo.append(n)
        return todo

    def model(self, names: list[str]) -> SmartEditPipeline:
        """The source model with the stages `names` read (fp32 when verifying: the reference; the LoRA merged)."""
        from .lora import merge_lora

        needed = frozenset(s for n in names for s in self.graphs[n].stages)
        if self._pipe is None or not needed <= self._loaded:
            dtype = PRECISIONS["fp32"].dtype if self.verify else self.precision.dtype
            self._pipe = SmartEditPipeline.from_weights(self.source.load("cpu", dtype, only=sorted(needed)))
            self._loaded = needed
            if "llm" in needed:
                self.progress(f"merged the LoRA into {merge_lora(self._pipe.stages.llm)} LLaMA projections")
        return self._pipe

    def modules(self, name: str, device: str = "cpu") -> tuple[nn.Module, nn.Module]:
        """(the fp32 reference of graph `name`, the module to export: at the job's precision on `device`); the same
        module when nothing differs (fp32 on the CPU, or no check: the model was then loaded at the precision)."""
        pipe = self._pipe
        ref = self.graphs[name].module(pipe.stages, pipe.null_text_embeds).eval()
        if self.verify and (self.precision.name != "fp32" or torch.device(device).type != "cpu"):
            return ref, copy.deepcopy(ref).to(device=device, dtype=self.precision.dtype)
        return ref, ref.to(device=device)

    def check(self, entry: Entry, what: str, compare: Callable[..., list[parity.Comparison]], ref: nn.Module,
              at_precision: nn.Module, **report: Any) -> dict[str, Any] | None:
        """With verification on: the artifact against fp32 PyTorch at the spec's verification points (and PyTorch at
        the export precision, the bound's scale), by `compare(spec, ref, precision, model_at_precision, points) ->
        comparisons` (an ONNX file: onnx_parity.compare_onnx through Polygraphy; a runner Polygraphy has none for:
        functools.partial(parity.compare, run)), run by `what`; sets entry.verified and returns its report
        (`report`: more fields for it). None when verification is off."""
        if not self.verify:
            return None
        spec = self.graphs[entry.graph].spec
        points = parity.verification_points(spec)
        precision = entry.precision  # what the artifact is in (the unet before it is quantized: fp16)
        t0 = time.perf_counter()
        self.progress(f"    checking in {what} at {len(points)} shapes ...")
        comps = compare(spec, ref, precision, at_precision if precision != "fp32" else None, points)
        entry.verified = all(c.passed for c in comps)
        report = {"passed": entry.verified, "precision": precision, **report,
                  "comparisons": parity.as_dicts(comps)}
        if parity.max_point_note(spec):
            report["not_checked"] = [parity.max_point_note(spec)]
        self.progress(parity.summary(what, comps, time.perf_counter() - t0))
        return report

    def forget(self, target: str, graph: str) -> None:
        """Remove an entry from the manifest on disk before its file is replaced."""
        if graph in self.manifest.entries(target):
            self.manifest.drop(target, graph)
            self.manifest.write()

    def record(self, entry: Entry, report: dict | None = None) -> None:
        """Write the finished entry (and its parity report) to disk at once: an interrupted export keeps it."""
        self.manifest.put(entry)
        self.manifest.write()
        if report is not None:
            self.report.setdefault(entry.target, {})[entry.graph] = report
            write_json(self.out / "report.json", self.report)
