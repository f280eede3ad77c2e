"""Triton kernels, each beside its PyTorch reference (bim_attention: the BIM's short attentions)."""
