"""Merge the release's q/v LoRA into the LLaMA weights (peft's own merge), before any export.

W' = W + (alpha / r) * B @ A per target Linear (r 8, alpha 16). Merging first removes the two extra matmuls per
projection from every graph and avoids the PEFT-name refit problems TensorRT users hit (NVIDIA/TensorRT#4090).
"""

from __future__ import annotations

from torch import nn


def merge_lora(model: nn.Module) -> int:
    """Merge every peft LoRA layer in `model` in place and swap it for its base Linear -> number of layers merged."""
    from peft.tuners.lora import LoraLayer

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in targets:
        layer.merge(safe_merge=True)  # safe_merge: refuses (raises) if the merged weights hold NaN/inf
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(targets)
