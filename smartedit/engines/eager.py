"""The model itself, in PyTorch: `eager` (the reference) and `official` (the official script's cost structure).

eager      every graph is its Stages method (smartedit.graphs.EagerRunner) at the chosen dtype; the LLM reads the
           canonical answer in one prefill (forced mode).
official   the baseline the official test script sets (test/DS_SmartEdit_test.py): vision, LLM, QFormer and BIM in
           fp32, the LLM decoding its answer token by token with a KV cache ("stepwise": the canonical answer fed
           one token at a time, so random weights decode too), then the UNet loop and the VAE at the chosen dtype.
"""

from __future__ import annotations

import torch

from .backend import Backend

CONDITION_STAGES = ("vision", "llm", "qformer", "bim")


def _load_eager(source, device, dtype, artifacts):
    return source.load(device, dtype)


def _load_official(source, device, dtype, artifacts):
    pipe = source.load(device, torch.float32)
    for name, module in pipe.stages.items():
        if name not in CONDITION_STAGES:
            module.to(dtype=dtype)
    pipe.null_text_embeds = pipe.null_text_embeds.to(dtype)
    pipe.img_token_mode = "stepwise"
    return pipe


def _always(device) -> None:
    return None


EAGER = Backend("eager", "eager PyTorch, the reference (forced-mode LLM prefill)", ("cpu", "cuda"), None, _always,
                _load_eager)
OFFICIAL = Backend("official", "the official script's cost: fp32 LLM decoding token by token, eager UNet loop",
                   ("cpu", "cuda"), None, _always, _load_official)
