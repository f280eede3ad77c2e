"""Triton kernels, each beside its PyTorch reference (see the BIM attention issue)."""
