"""The model itself, in PyTorch: `eager` (the reference) and `official` (the official script's cost structure).

eager      every graph is its Stages method (smartedit.graphs.EagerRunner) at the chosen dtype; the LLM reads the
           canonical answer in one prefill (forced mode).
official   the baseline the official test script sets (test/DS_SmartEdit_test.py): vision, LLM, QFormer and BIM in
           fp32, the LLM decoding its answer token by token with a KV cache ("stepwise": the canonical answer fed
           one token at a time, so random weights decode too), then the UNet loop and the VAE at the chosen dtype.
"""

from __future__ import annotations

import torch

from smartedit.graphs import EagerRunner

from .backend import Backend, Loaded

CONDITION_STAGES = ("vision", "llm", "qformer", "bim")


def _load_eager(source, device, dtype, artifacts):
    w = source.load(device, dtype)
    return Loaded(w, EagerRunner(w.stages, w.config))


def _load_official(source, device, dtype, artifacts):
    w = source.load(device, torch.float32)
    for name, module in w.stages.items():
        if name not in CONDITION_STAGES:
            module.to(dtype=dtype)
    w.null_text_embeds = w.null_text_embeds.to(dtype)
    runner = EagerRunner(w.stages, w.config)
    runner.name = "official"
    return Loaded(w, runner)


def _always(device) -> None:
    return None


EAGER = Backend("eager", "eager PyTorch, the reference (forced-mode LLM prefill)", ("cpu", "cuda"), None, _always,
                _load_eager)
OFFICIAL = Backend("official", "the official script's cost: fp32 LLM decoding token by token, eager UNet loop",
                   ("cpu", "cuda"), None, _always, _load_official, img_token_mode="stepwise")
