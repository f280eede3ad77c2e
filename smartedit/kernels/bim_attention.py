"""Fused attention for the BIM's short sequences: Triton kernel, PyTorch reference, custom op, dispatcher.

The 7b BIM runs seven attentions per forward, all short:
    token self-attention      Nq = Nk = 77,          8 heads x 128
    token -> image            Nq = 77,  Nk = 256,    8 heads x 64   (x3: two blocks + the final one)
    image -> token            Nq = 256, Nk = 77,     8 heads x 64   (x2)
Eager PyTorch spends each one in ~8 launches (transposes, matmul, scale, softmax, matmul, transpose, copy). Here one
program per (query block, batch x head) holds its query block and, for Nk <= BLOCK_N (all of the above), the whole K
and V on chip: one pass, exact softmax; longer keys fall back to the online (flash) softmax over K/V blocks.
fp16/bf16/fp32 inputs, fp32 accumulation, any lengths (masked tails), any batch.

Fusions:
- head split/merge: the kernel reads q/k/v through strides of [B, N, H*D] projections and writes [B, N, H*D]
  directly, so the transpose + contiguous copies of the split and merge disappear (free, always on).
- PE adds before the q/k projections, residual + LayerNorm after out_proj: not fused. Prediction: each saves one
  elementwise launch and one read+write of a [B, N, 1024] tensor (~0.3-0.6 MB at batch 1, well under 1 us of H100
  bandwidth), i.e. a few percent of a launch-bound BIM, while moving them into Triton would fork nn.Linear /
  nn.LayerNorm. smartedit-bench-kernels times the whole BIM forward, where that share shows on a GPU.

Traffic per call (reads q, k, v once, writes o once): 2 * B*H*(Nq + 2 Nk + Nq)*D bytes at fp16;
FLOPs: 4 * B*H*Nq*Nk*D (two matmuls).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton: the reference runs instead
    triton = tl = None
    HAVE_TRITON = False


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The BIM's own attention math (SAM's), at the inputs' dtype: the eager reference, what ONNX export traces, the
    kernel benchmark's "eager" row and, on fp64 inputs, the tests' oracle. q [B,H,Nq,D], k/v [B,H,Nk,D] ->
    [B,H,Nq,D]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # [B, H, Nq, Nk]
    return attn @ v


if HAVE_TRITON:

    @triton.jit
    def _bim_attention_kernel(
        Q, K, V, O,
        sqb, sqh, sqn, sqd,  # strides of q as [B, H, Nq, D]
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, son, sod,
        H, NQ, NK, D, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        m_mask = offs_m < NQ
        d_mask = offs_d < D

        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        # online softmax state: running max, running sum, unnormalised output (fp32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634  # log2(e): exp2 is the native instruction
        for start in range(0, NK, BLOCK_N):
            n = start + offs_n
            n_mask = n < NK
            k = tl.load(K + b * skb + h * skh + n[None, :] * skn + offs_d[:, None] * skd,
                        mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], fp32
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + h * svh + n[:, None] * svn + offs_d[None, :] * svd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    dot_precision: str  # tl.dot input_precision; only fp32 inputs read it


def launch_config(nq: int, nk: int, d: int, dtype: torch.dtype) -> LaunchConfig:
    """Block sizes and launch parameters for one call; chosen from the kernel compiled for sm_80 and sm_90 on the
    CPU (smartedit.kernels.ahead_of_time, tests/test_kernels_compiled.py), at the 7b shapes, fp16/bf16:

      BLOCK_M 64, 4 warps    255 registers and 48-192 B/thread of spills at 77x77x128 and 77x256x64 (sm_90)
      BLOCK_M 32, 4 warps    0 spills at every shape, 152-221 registers, 28-53 KB shared memory (sm_80 and sm_90)
      num_stages 3 (default) 139-213 KB shared memory at 77x256x64 and 77x77x128: over A100's 166,912 B per block

    Keys up to 256 (every BIM shape) fit in one block: the whole K/V on chip, one pass, so there is nothing to
    pipeline and num_stages is 1; longer keys stream in blocks of 128 with two stages. tl.dot needs every block dim
    >= 16. fp32 inputs take "ieee" (full fp32 products, as cuBLAS without TF32): Triton's default on CUDA is TF32,
    ~1e-3 relative error, which the interpreter does not show (it always computes in fp32).
    """
    block_d = max(16, triton.next_power_of_2(d))
    block_n = max(16, min(triton.next_power_of_2(nk), 256 if block_d <= 64 else 128))
    block_m = max(16, min(32, triton.next_power_of_2(nq)))
    one_pass = nk <= block_n
    return LaunchConfig(block_m, block_n, block_d, num_warps=4, num_stages=1 if one_pass else 2,
                        dot_precision="ieee")


def _launch(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, scale: float, **extra):
    """q [B,H,Nq,D], k/v [B,H,Nk,D], o [B,H,Nq,D] (any strides) -> launches `kernel` (the @triton.jit function, or
    wrap_triton of it inside the custom op); `extra` goes to the launcher (warmup=True: compile only)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    c = launch_config(nq, nk, d, q.dtype)
    grid = (triton.cdiv(nq, c.block_m), b * h)
    args = (q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(), h, nq, nk, d, scale)
    meta = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=c.block_d, DOT_PRECISION=c.dot_precision,
                num_warps=c.num_warps, num_stages=c.num_stages)
    if extra.pop("warmup", False):
        return kernel.warmup(*args, grid=grid, **meta, **extra)
    return kernel[grid](*args, **meta, **extra)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on [B,H,N,D] tensors of any strides (views of [B,N,H*D] projections need no copy)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if k.shape != (b, h, nk, d) or v.shape != (b, h, nk, d):
        raise ValueError(f"attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if out is None:
        out = torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # merged-heads layout
    _launch(_bim_attention_kernel, q, k, v, out, 1.0 / math.sqrt(d) if scale is None else scale)
    return out


# -- custom op: the kernel inside torch.compile / torch.export (AOTInductor) graphs ----------------------------------
# torch.library.triton_op (not custom_op): Inductor sees the Triton kernel through wrap_triton and compiles it into
# the graph / the AOTInductor package, instead of calling back into Python.


def _merged_heads_out(q: torch.Tensor) -> torch.Tensor:
    b, h, nq, d = q.shape
    return torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device)  # [B, Nq, H, D]: heads merged when viewed


if HAVE_TRITON:

    @torch.library.triton_op("smartedit::bim_attention", mutates_args=())
    def bim_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """[B,H,Nq,D] x [B,H,Nk,D] -> [B,Nq,H,D] (merged-heads layout, contiguous)."""
        out = _merged_heads_out(q)
        _launch(torch.library.wrap_triton(_bim_attention_kernel), q, k, v, out.transpose(1, 2), scale)
        return out

else:

    @torch.library.custom_op("smartedit::bim_attention", mutates_args=())
    def bim_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return attention_ref(q.float(), k.float(), v.float(), scale).to(q.dtype).transpose(1, 2).contiguous()

    @bim_attention_op.register_fake
    def _(q, k, v, scale):
        return _merged_heads_out(q)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and HAVE_TRITON


# auto: the kernel for fp16/bf16 on CUDA; on: forced wherever it can run (fp32 too, and on the CPU under
# TRITON_INTERPRET=1: the interpreter tests); off: never
KERNEL_MODES = ("auto", "on", "off")
# fp32 stays with PyTorch under "auto": with full-precision ("ieee") products the kernel spills 11-30 KB per thread
# at the 7b shapes (compiled for sm_80/sm_90), and TF32 would no longer match the fp32 reference it stands for
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def kernel_unusable(q: torch.Tensor, mode: str = "auto") -> str | None:
    """Why the kernel does not run for this call (None: it does). Pure: callers report it (BIM.kernel_status)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "off":
        return "kernels switched off"
    if torch.onnx.is_in_onnx_export():
        return "ONNX export uses standard ops (TensorRT fuses attention itself)"
    if not HAVE_TRITON:
        return "triton is not installed"
    if mode == "auto" and q.dtype not in KERNEL_DTYPES:
        return f"{q.dtype}: the kernel serves fp16/bf16, fp32 runs PyTorch's exact math"
    if not q.is_cuda and not (mode == "on" and _interpreting()):
        return f"tensors are on {q.device.type}, not CUDA"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def bim_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  mode: str = "auto") -> torch.Tensor:
    """The one dispatcher: [B,H,Nq,D] x [B,H,Nk,D] -> [B,Nq,H*D] (heads merged): the Triton kernel (as the custom
    op, so torch.compile and AOTInductor compile it in) where `kernel_unusable` allows it, else `attention_ref`."""
    b, h, nq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if kernel_unusable(q, mode) is None:
        return bim_attention_op(q, k, v, scale).view(b, nq, h * d)
    return attention_ref(q, k, v, scale).transpose(1, 2).flatten(2)
