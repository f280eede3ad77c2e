"""QFormer stage: 77 learnable queries cross-attend to the 32 <img_i> states -> [B, 77, 768] (SD-1.5 text space).

The release's QFormer is a copy of LAVIS's BLIP-2 Q-Former (model/LLMSD_QFormerv01.py), randomly initialised from the
bert-base-uncased config: 6 layers, cross-attention in layers 0/2/4 with k/v Linear(H_llm -> 768), the query FFN only.
transformers' Blip2QFormerModel is the same network (equal to ~6e-8 in fp32), so it is used as is.

Official checkpoint keys (embeddings_qformer/checkpoint-<step>_embeddings_qformer.bin) -> ours:
    sd_query_tokens                                   -> query_tokens
    sd_qformer.embeddings.LayerNorm.*                 -> qformer.layernorm.*
    sd_qformer.encoder.layer.N.attention.self.*       -> qformer.encoder.layer.N.attention.attention.*
    sd_qformer.encoder.layer.N.crossattention.self.*  -> qformer.encoder.layer.N.crossattention.attention.*
    sd_qformer.embeddings.position_ids                -> dropped (a buffer of arange ids; no word/position tables)
    everything else under sd_qformer.                 -> qformer. (same suffix)
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from .config import QFormerConfig


def official_qformer_key(key: str) -> str | None:
    """Map one official `sd_qformer.*` / `sd_query_tokens` key to ours; None for keys that are dropped."""
    if key == "sd_query_tokens":
        return "query_tokens"
    if not key.startswith("sd_qformer."):
        raise KeyError(f"not a QFormer key: {key!r}")
    k = key[len("sd_qformer."):]
    if k == "embeddings.position_ids":
        return None
    k = k.replace("embeddings.LayerNorm.", "layernorm.")
    k = re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", k)
    return "qformer." + k


class QFormer(nn.Module):
    """img_hidden [B, 32, H_llm] -> q [B, 77, D]."""

    def __init__(self, cfg: QFormerConfig, encoder_hidden_size: int):
        super().__init__()
        self.cfg = cfg
        qcfg = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            cross_attention_frequency=cfg.cross_attention_frequency,
            encoder_hidden_size=encoder_hidden_size,
            layer_norm_eps=cfg.layer_norm_eps,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.qformer = Blip2QFormerModel(qcfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=0.02)  # LAVIS init; real values come from the checkpoint

    def forward(self, img_hidden: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(img_hidden.shape[0], -1, -1)  # [B, 77, D]
        return self.qformer(query_embeds=queries, encoder_hidden_states=img_hidden).last_hidden_state  # [B, 77, D]
