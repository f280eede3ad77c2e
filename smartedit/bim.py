"""BIM stage (Bidirectional Interaction Module): SAM's two-way transformer between the QFormer queries and the CLIP grid.

Official: model/DS_SmartEdit_model.py:234-246 (definition), :441-459 (inference_BIM_module), model/two_way_transformer.py
(a copy of SAM's mask-decoder transformer). Attribute names are the official ones, so the release's
`modulate-<step>/adapter_model.bin` loads with strict=True and no key map.

    q [B,77,Dq] -> modulate_head -> tokens [B,77,D]            clip_feats [B,256,D] -> image [B,D,16,16] (+ PE)
    two-way transformer (depth 2): tokens <-> image
    prompt_embeds = q + 0.5 * dimension_reduction_head_qformer_out(tokens)                  [B,77,Dq]
    bim_residual  = dimension_reduction_head_zeroconv(image)                                 [B,C0,16,16]

The official code resizes the image to the latent size first and applies the 1x1 conv after; a 1x1 conv and a
bilinear resize commute (both linear, the resize weights sum to 1), so the residual leaves here at 16x16, 320 channels
instead of 1024, and the UNet stage resizes it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import BIMConfig
from .errors import InputError
from .kernels import bim_attention as kernels


class Attention(nn.Module):
    """SAM attention: projections to dim / downsample_rate, multi-head softmax attention, projection back."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.internal_dim = dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise InputError(f"attention width {self.internal_dim} is not divisible by {num_heads} heads")
        self.kernel_mode = "auto"  # smartedit.kernels: Triton attention on CUDA ("on" / "off": see BIM.set_kernels)
        self.q_proj = nn.Linear(dim, self.internal_dim)
        self.k_proj = nn.Linear(dim, self.internal_dim)
        self.v_proj = nn.Linear(dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, heads, N, c/heads]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        # the Triton kernel on CUDA (fp16/bf16), else SAM's math (also what ONNX export traces): [B, Nq, internal_dim]
        out = kernels.bim_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]), self.kernel_mode)
        return self.out_proj(out)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)
        self.act = nn.ReLU()  # SAM's default activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attn, token->image cross-attn, MLP, image->token cross-attn; post-norm residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)  # 128 per head at dim 1024
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)  # 64 per head at dim 1024
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # queries [B, Nq, D] (tokens), keys [B, Nk, D] (image), *_pe of the same shapes
        if self.skip_first_layer_pe:  # first layer: no PE and no residual (the output replaces the queries)
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, D, h, w], image_pe [B or 1, D, h, w], tokens [B, N, D] -> (tokens [B, N, D], image [B, hw, D])."""
        keys = image.flatten(2).transpose(1, 2)  # [B, hw, D]
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=tokens, key_pe=key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class PositionEmbeddingRandom(nn.Module):
    """SAM's random-Fourier positional encoding of a grid: [2 * num_pos_feats, h, w]."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix",
                             torch.randn(2, num_pos_feats, dtype=torch.float32))  # scale 1

    def _apply(self, fn, recurse=True):
        # Keep the matrix fp32 when the model is cast to fp16/bf16 (device moves still apply): the phases
        # 2*pi*(coords @ G) reach tens of radians, where fp16's 1e-3 relative error is a visible PE error.
        g = self.positional_encoding_gaussian_matrix
        super()._apply(fn, recurse)
        moved = self.positional_encoding_gaussian_matrix
        self.positional_encoding_gaussian_matrix = g.to(device=moved.device, dtype=torch.float32)
        return self

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        g = self.positional_encoding_gaussian_matrix.float()  # fp32: the phases reach tens of radians
        y = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h  # pixel centres in [0, 1]
        x = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        coords = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # [h, w, 2] as (x, y)
        coords = 2 * math.pi * ((2 * coords - 1) @ g)  # [h, w, F]
        return torch.cat([coords.sin(), coords.cos()], dim=-1).permute(2, 0, 1)  # [2F, h, w]


class BIM(nn.Module):
    """(q [B,77,Dq], clip_feats [B,256,D]) -> (prompt_embeds [B,77,Dq], bim_residual [B,C0,16,16])."""

    def __init__(self, cfg: BIMConfig, text_dim: int, residual_channels: int):
        super().__init__()
        self.cfg = cfg
        self.modulate_head = nn.Linear(text_dim, cfg.dim)
        self.modulate_transformer = TwoWayTransformer(cfg.depth, cfg.dim, cfg.num_heads, cfg.mlp_dim,
                                                      cfg.attention_downsample_rate)
        self.pe_layer = PositionEmbeddingRandom(cfg.num_pos_feats)
        # Both heads are zero-initialised in training (ControlNet-style zero_module); their values always come from
        # the checkpoint, and random-weight presets keep PyTorch's default init so the BIM path is exercised.
        self.dimension_reduction_head_zeroconv = nn.Conv2d(cfg.dim, residual_channels, kernel_size=1)
        self.dimension_reduction_head_qformer_out = nn.Linear(cfg.dim, text_dim)

    def kernel_status(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """What the attentions run on for inputs on `device` in `dtype`: the Triton kernel, or PyTorch and why."""
        mode = next(m.kernel_mode for m in self.modules() if isinstance(m, Attention))
        probe = torch.empty(1, 1, 1, self.cfg.dim // self.cfg.num_heads, device=device, dtype=dtype)  # q's last dim
        reason = kernels.kernel_unusable(probe, mode)
        return "Triton kernel" if reason is None else f"PyTorch ({reason})"

    def set_kernels(self, mode: str = "auto") -> "BIM":
        """Triton attention kernels: "auto" (default: on CUDA), "off" (PyTorch reference, for comparison), "on"
        (also on CPU when TRITON_INTERPRET=1: the interpreter tests)."""
        if mode not in kernels.KERNEL_MODES:
            raise InputError(f"kernel mode must be one of {kernels.KERNEL_MODES}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.kernel_mode = mode
        return self

    def forward(self, q: torch.Tensor, clip_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = clip_feats.shape
        side = math.isqrt(n)
        if side * side != n or d != self.cfg.dim:
            raise InputError(f"clip_feats must be [B, side*side, {self.cfg.dim}], got {tuple(clip_feats.shape)}")
        tokens = self.modulate_head(q)  # [B, 77, D]
        image = clip_feats.transpose(1, 2).reshape(b, d, side, side)  # [B, D, 16, 16], row-major patches
        image_pe = self.pe_layer((side, side)).unsqueeze(0).to(image.dtype)  # [1, D, 16, 16]
        tokens, image = self.modulate_transformer(image, image_pe, tokens)  # [B, 77, D], [B, 256, D]
        prompt_embeds = q + 0.5 * self.dimension_reduction_head_qformer_out(tokens)  # [B, 77, Dq]
        image = image.transpose(1, 2).reshape(b, d, side, side)
        return prompt_embeds, self.dimension_reduction_head_zeroconv(image)  # [B, C0, 16, 16]
