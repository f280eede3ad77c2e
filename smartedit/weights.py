"""Where an edit's weights come from, and loading them: a converted SmartEdit folder, or a preset with random weights.

`ModelSource` names the source (and records it in an export's manifest: the checkpoint's file hashes, or the preset
and seed); `ModelSource.load` gives the `Weights` every backend starts from: the config, the tokenizer, the
null-text embedding, and the stages it asks for (none for a backend whose graphs run from exported artifacts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from . import checkpoint as ckpt
from .config import PRESETS, SmartEditConfig, derived_seed
from .errors import InputError
from .files import sha256_file, sha256_json
from .model import STAGE_NAMES, Stages, build_stages
from .scheduler import DEFAULT_SAMPLER
from .tokenizer import build_offline_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Weights:
    config: SmartEditConfig
    tokenizer: PreTrainedTokenizerBase
    stages: Stages  # stages not loaded stay on the meta device
    null_text_embeds: torch.Tensor  # [1, 77, D]: the CLIP text embedding of ""
    random_weights: bool = False
    sampler: str = DEFAULT_SAMPLER  # the folder's sampler (smartedit.scheduler.SAMPLERS)


def from_preset(name: str, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                only: Iterable[str] | None = None) -> Weights:
    """Random weights with the preset's shapes (for tests and latency work: speed does not depend on values).

    `only` limits which stages get real (random) weights; the others stay on the meta device. The values of a
    stage do not depend on `only`: every stage draws from its own seeded generator state.
    """
    cfg = SmartEditConfig.from_name(name)
    log.warning("SmartEdit %s with RANDOM weights (seed %d): outputs are noise, shapes and costs are real", name, seed)
    stages = build_stages(cfg, device, dtype, init=True, only=only, seed=seed)
    # peft initialises lora_B to zero (a no-op adapter); a trained release's is not, so give it values too
    if not stages.llm.lm_head.weight.is_meta:
        torch.manual_seed(derived_seed(seed, 99))
        for pname, p in stages.llm.named_parameters():
            if "lora_B" in pname:
                nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(seed)
    null = torch.randn(1, cfg.qformer.num_queries, cfg.qformer.hidden_size, generator=g).to(device, dtype)
    return Weights(cfg, build_offline_tokenizer(), stages, null, random_weights=True)


def from_pretrained(model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    only: Iterable[str] | None = None) -> Weights:
    """Load a converted folder; `only` loads just those stages (the others stay on the meta device). Nothing is
    fetched from any hub: the tokenizer is the folder's own."""
    model_dir = Path(model_dir)
    cfg, meta = ckpt.read_config(model_dir)
    sampler = ckpt.read_sampler(model_dir)  # checked before the weights load
    wanted = list(STAGE_NAMES if only is None else only)
    missing = ckpt.iter_missing([model_dir / f"{n}.safetensors" for n in wanted] + [model_dir / ckpt.NULL_TEXT_FILE])
    missing += [] if (model_dir / "tokenizer").is_dir() else [model_dir / "tokenizer"]
    if missing:
        raise ckpt.CheckpointError(f"{model_dir} is incomplete, missing: {', '.join(str(p) for p in missing)}")
    shapes = build_stages(cfg, "meta", dtype, init=False, only=[])  # every file's header first: no allocation
    for name in wanted:
        ckpt.check_stage_header(getattr(shapes, name), model_dir / f"{name}.safetensors")
    null = ckpt.load_torch_file(model_dir / ckpt.NULL_TEXT_FILE)
    if "null_text_embeds" not in null:
        raise ckpt.CheckpointError(f"{model_dir / ckpt.NULL_TEXT_FILE} has no tensor 'null_text_embeds' "
                                   f"(it holds {sorted(null)})")
    ckpt.check_finite(null, str(model_dir / ckpt.NULL_TEXT_FILE))
    stages = build_stages(cfg, device, dtype, init=False, only=wanted)  # uninitialised, on the target device
    for name, module in stages.items():
        if name in wanted:
            ckpt.load_stage(module, model_dir / f"{name}.safetensors")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"cannot load the tokenizer in {model_dir / 'tokenizer'}: {e}") from None
    return Weights(cfg, tokenizer, stages, null["null_text_embeds"].to(device, dtype),
                   random_weights=bool(meta.get("random_weights", False)), sampler=sampler)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a converted SmartEdit folder, or a preset with random weights (and its seed)."""

    model: Path | None = None
    preset: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.model is None) == (self.preset is None):
            raise InputError("give a converted model folder (--model DIR) or a preset with random weights "
                             "(--preset NAME --random-weights), not both or neither")
        if self.preset is not None and self.preset not in PRESETS:
            raise InputError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))

    def __str__(self) -> str:
        return str(self.model) if self.model else f"preset {self.preset!r} (random weights, seed {self.seed})"

    def config(self) -> SmartEditConfig:
        return ckpt.read_config(self.model)[0] if self.model else SmartEditConfig.from_name(self.preset)

    def sampler(self) -> str:
        """The sampler this source runs by default: its folder's, or EulerAncestral for a preset."""
        return ckpt.read_sampler(self.model) if self.model else DEFAULT_SAMPLER

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             only: Iterable[str] | None = None) -> Weights:
        if self.model is not None:
            return from_pretrained(self.model, device=device, dtype=dtype, only=only)
        return from_preset(self.preset, seed=self.seed, device=device, dtype=dtype, only=only)

    def describe(self, progress=log.info) -> dict:
        """The record an export keeps of its source: the checkpoint's file hashes, or the preset and seed."""
        if self.model is None:
            src = {"kind": "random", "preset": self.preset, "seed": self.seed}
            return src | {"sha256": sha256_json(src)}
        cfg, meta = ckpt.read_config(self.model)
        progress(f"hashing the checkpoint at {self.model} ...")
        names = ["config.json", ckpt.NULL_TEXT_FILE] + [f"{s}.safetensors" for s in STAGE_NAMES]
        hashes = {f: sha256_file(self.model / f) for f in names if (self.model / f).exists()}
        return {"kind": "checkpoint", "path": str(self.model.resolve()), "files": hashes,
                "random_weights": bool(meta.get("random_weights")), "sha256": sha256_json(hashes)}

    def mismatch(self, recorded: dict) -> str | None:
        """Why artifacts exported from the source `recorded` (a manifest's) are not from this one (None: they are).
        A checkpoint is matched by its config.json hash (the weights are hashed at export, not at every load)."""
        if self.model is not None:
            want = recorded.get("files", {}).get("config.json")
            if recorded.get("kind") == "checkpoint" and want == sha256_file(self.model / "config.json"):
                return None
        elif recorded.get("kind") == "random" and (recorded.get("preset"), recorded.get("seed")) == (self.preset,
                                                                                                       self.seed):
            return None
        if recorded.get("kind") == "random":
            was = f"preset {recorded.get('preset')!r} (random weights, seed {recorded.get('seed')})"
        else:
            was = recorded.get("path") or "an unrecorded source"
        return f"the artifacts were exported from {was}, not from {self}"
