"""What a backend is (its entry in registry.BACKENDS), what loading one hands back, and the check every CUDA backend
shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from smartedit.graphs import GraphRunner
from smartedit.weights import ModelSource, Weights


class Loaded(NamedTuple):
    weights: Weights  # config, tokenizer, null-text embedding, and the stages the runner reads (none: artifacts)
    runner: GraphRunner


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str  # one line, for --help and reports
    devices: tuple[str, ...]  # device types it runs on
    target: str | None  # the smartedit-export target whose artifacts it runs; None: it runs the model itself
    unavailable: Callable[[torch.device], str | None]  # why it cannot run on this machine (None: it can)
    load: Callable[[ModelSource, torch.device, torch.dtype, Path | None], Loaded]
    img_token_mode: str = "forced"  # how the pipeline gets the LLM's <img> states (`official`: "stepwise")


def cuda_unavailable(device: torch.device) -> str | None:
    """The common check of backends that need a CUDA GPU."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and there is none here"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None
