"""The BIM attention kernel against an fp64 reference: on a GPU, or on the CPU under TRITON_INTERPRET=1
(tests/test_kernels_interpreter.py runs this file that way in CI)."""

import os

import pytest
import torch

from smartedit.kernels import bim_attention as ka

CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not ka.HAVE_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(not (CUDA or INTERPRETING),
                       reason="runs on a GPU, or on the CPU under TRITON_INTERPRET=1 (tests/test_kernels_interpreter.py)"),
]
DEVICE = "cuda" if CUDA else "cpu"
LENGTHS = (1, 7, 77, 255, 256, 300)


def _qkv(b, h, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as a head-split view of a [B, Nq, H*D] projection (strided, as the BIM passes it); k, v contiguous
    q = torch.randn(b, nq, h * d, generator=g).view(b, nq, h, d).transpose(1, 2)
    k = torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, d, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("nk", LENGTHS)
@pytest.mark.parametrize("nq", LENGTHS)
def test_kernel_error_is_bounded_by_pytorch_error(nq, nk, d, b, dtype):
    h = 2
    q, k, v = _qkv(b, h, nq, nk, d, dtype)
    scale = d**-0.5
    out = ka.attention_triton(q, k, v, scale)
    ref = ka.attention_ref(q.double(), k.double(), v.double(), scale)
    err = (out.double() - ref).abs().max().item()
    # PyTorch at the inputs' own dtype (the BIM's reference math): the error budget's yardstick
    torch_err = (ka.attention_ref(q, k, v, scale).double() - ref).abs().max().item()
    # flash-attention's rule: at most twice PyTorch's own error at this dtype (+ a floor for fp32's near-zero)
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    assert err <= 2 * torch_err + floor, f"kernel err {err:.3e} vs PyTorch {torch_err:.3e}"
    assert out.shape == (b, h, nq, d) and out.dtype == dtype


def test_output_is_written_in_merged_heads_layout():
    q, k, v = _qkv(2, 8, 77, 256, 64, torch.float32)
    out = ka.bim_attention_op(q, k, v, 0.125)  # [B, Nq, H, D], contiguous
    assert out.shape == (2, 77, 8, 64) and out.is_contiguous()
    ref = ka.attention_ref(q, k, v, 0.125).transpose(1, 2)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_whole_bim_with_kernels_equals_bim_with_references(dtype):
    from smartedit.bim import BIM
    from smartedit.config import BIMConfig

    torch.manual_seed(0)
    # 7b's head dims (1024 / 8 = 128 self-attention, 512 / 8 = 64 cross-attention) at a small width would need
    # dim 1024; use dim 256 with 2 heads: self-attention 128 per head, cross-attention 64 per head
    cfg = BIMConfig(dim=256, depth=2, num_heads=2, mlp_dim=512, attention_downsample_rate=2, num_pos_feats=128)
    bim = BIM(cfg, text_dim=64, residual_channels=32).to(DEVICE, dtype).eval()
    q = torch.randn(3, 77, 64, device=DEVICE, dtype=dtype)
    feats = torch.randn(3, 256, 256, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref = bim.set_kernels("off")(q, feats)
        fast = bim.set_kernels("on")(q, feats)
        exact = BIM(cfg, 64, 32).to(DEVICE, torch.float64).eval()
        exact.load_state_dict(bim.state_dict())
        oracle = exact.set_kernels("off")(q.double(), feats.double())
    for name, a, r, o in zip(("prompt_embeds", "bim_residual"), fast, ref, oracle):
        err, torch_err = (a.double() - o).abs().max().item(), (r.double() - o).abs().max().item()
        assert err <= 2 * torch_err + (1e-5 if dtype == torch.float32 else 1e-3), (name, err, torch_err)


def test_dispatcher_falls_back_with_a_reason():
    q = torch.randn(1, 2, 5, 64)
    assert ka.kernel_unusable(q, "off") == "kernels switched off"
    assert "fp16/bf16" in ka.kernel_unusable(q.to(DEVICE), "auto")  # fp32 stays with PyTorch unless forced
    if not CUDA:
        assert ka.kernel_unusable(q.half(), "auto") == "tensors are on cpu, not CUDA"
        assert ka.kernel_unusable(q, "on") is None  # interpreter
    with pytest.raises(ValueError, match="kernel mode"):
        ka.kernel_unusable(q, "fast")
    out = ka.bim_attention(q, q, q, mode="off")
    assert out.shape == (1, 5, 128)


@pytest.mark.skipif(not CUDA, reason="torch.compile / torch.export of the Triton op need a GPU")
def test_op_under_compile_and_export():
    from smartedit.bim import BIM
    from smartedit.config import PRESETS

    bim = BIM(PRESETS["7b"].bim, 768, 320).cuda().half().eval()
    q = torch.randn(1, 77, 768, device="cuda", dtype=torch.float16)
    feats = torch.randn(1, 256, 1024, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = bim.set_kernels("off")(q, feats)
        bim.set_kernels("auto")
        compiled = torch.compile(bim)(q, feats)
        ep = torch.export.export(bim, (q, feats))
        assert any("bim_attention" in str(n.target) or "triton_kernel_wrapper" in str(n.target)
                   for n in ep.graph.nodes)
        exported = ep.module()(q, feats)
    for a, b in zip(compiled + exported, ref + ref):
        assert (a.float() - b.float()).abs().max().item() < 2e-2
