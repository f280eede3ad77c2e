"""Each stage against an independent reference (segment-anything, transformers, diffusers) on the tiny preset."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, load_sam_modeling

from smartedit.bim import BIM
from smartedit.config import PRESETS
from smartedit.mllm import SmartEditLLM, conversation, pad_prompts, tokenize_prompt
from smartedit.qformer import QFormer, official_qformer_key
from smartedit.testing import official_qformer_state_dict
from smartedit.tokenizer import build_offline_tokenizer
from smartedit.unet import SmartEditUNet

TINY = PRESETS["tiny"]


def test_stage_shapes(tiny_pipe, test_image):
    s, cfg = tiny_pipe.stages, TINY
    with torch.no_grad():
        clip_feats, embeds = s.vision(torch.randn(2, 3, 224, 224))
        assert clip_feats.shape == (2, 256, 64) and embeds.shape == (2, 256, 64)
        q = s.qformer(torch.randn(2, 32, cfg.llm.hidden_size))
        assert q.shape == (2, 77, 32)
        prompt, residual = s.bim(q, clip_feats)
        assert prompt.shape == (2, 77, 32) and residual.shape == (2, 32, 16, 16)
        eps = s.unet(torch.randn(6, 8, 40, 24), torch.tensor(999), torch.randn(6, 77, 32), residual)
        assert eps.shape == (6, 4, 40, 24)
        lat = s.vae.encode(torch.rand(2, 3, 64, 48) * 2 - 1)
        assert lat.shape == (2, 4, 8, 6) and s.vae.decode(lat).shape == (2, 3, 64, 48)
    pe, res = tiny_pipe.encode_condition([test_image, test_image], ["make it blue", "add a hat to the dog"])
    assert pe.shape == (2, 77, 32) and res.shape == (2, 32, 16, 16)


def test_random_weights_are_seeded():
    from smartedit.pipeline import SmartEditPipeline

    a = SmartEditPipeline.from_preset("tiny", seed=3).stages.unet.state_dict()
    b = SmartEditPipeline.from_preset("tiny", seed=3).stages.unet.state_dict()
    c = SmartEditPipeline.from_preset("tiny", seed=4).stages.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# -- BIM --------------------------------------------------------------------------------------------------------------

def test_bim_equals_segment_anything_two_way_transformer():
    tr, pe_mod = load_sam_modeling()
    torch.manual_seed(0)
    c = TINY.bim
    bim = BIM(c, text_dim=32, residual_channels=32).double().eval()
    sam = tr.TwoWayTransformer(depth=c.depth, embedding_dim=c.dim, num_heads=c.num_heads, mlp_dim=c.mlp_dim,
                               attention_downsample_rate=c.attention_downsample_rate).double().eval()
    sam.load_state_dict(bim.modulate_transformer.state_dict(), strict=True)  # same attribute names as SAM
    sam_pe = pe_mod.PositionEmbeddingRandom(c.num_pos_feats)
    sam_pe.load_state_dict(bim.pe_layer.state_dict(), strict=True)

    q = torch.randn(3, 77, 32, dtype=torch.float64)
    clip_feats = torch.randn(3, 256, 64, dtype=torch.float64)
    # the official inference_BIM_module (DS_SmartEdit_model.py:441-459), written out with SAM's modules
    with torch.no_grad():
        tokens = bim.modulate_head(q)
        image = clip_feats.permute(0, 2, 1).reshape(3, 64, 16, 16)
        image_pe = sam_pe((16, 16)).double().unsqueeze(0).expand(3, -1, -1, -1)
        ref_tokens, ref_image = sam(image, image_pe, tokens)
        ref_prompt = q + 0.5 * bim.dimension_reduction_head_qformer_out(ref_tokens)
        ref_image = ref_image.transpose(1, 2).view(3, 64, 16, 16)
        for size in [(32, 32), (48, 40)]:  # official: resize to the latent size first, then the 1x1 conv
            ref_residual = bim.dimension_reduction_head_zeroconv(F.interpolate(ref_image, size=size, mode="bilinear",
                                                                               align_corners=False))
            prompt, residual16 = bim(q, clip_feats)
            from smartedit.unet import resize_residual

            assert_close(resize_residual(residual16, size), ref_residual, atol=1e-12, msg=f"residual at {size}")
        assert residual16.shape == (3, 32, 16, 16)
        assert_close(prompt, ref_prompt, atol=1e-12, msg="prompt_embeds")


def test_bim_loads_official_keys_strictly():
    bim = BIM(TINY.bim, 32, 32)
    keys = set(bim.state_dict())
    for k in ["modulate_head.weight", "pe_layer.positional_encoding_gaussian_matrix",
              "modulate_transformer.layers.1.cross_attn_image_to_token.out_proj.bias",
              "modulate_transformer.layers.0.norm4.weight", "modulate_transformer.layers.0.mlp.lin2.weight",
              "modulate_transformer.final_attn_token_to_image.q_proj.weight",
              "modulate_transformer.norm_final_attn.bias", "dimension_reduction_head_zeroconv.weight",
              "dimension_reduction_head_qformer_out.bias"]:
        assert k in keys
    assert bim.pe_layer.positional_encoding_gaussian_matrix.shape == (2, 32)


# -- QFormer ----------------------------------------------------------------------------------------------------------

def test_qformer_loads_lavis_keys_and_equals_blip2_qformer():
    from transformers import Blip2QFormerModel

    torch.manual_seed(0)
    src = QFormer(TINY.qformer, encoder_hidden_size=64)
    src.query_tokens.data.normal_()

    class _Pipe:  # official_qformer_state_dict reads stages.qformer and stages.vision.mm_projector
        class stages:
            qformer = src
            vision = type("V", (), {"mm_projector": torch.nn.Linear(64, 64)})()

    official = official_qformer_state_dict(_Pipe)
    assert "sd_qformer.embeddings.LayerNorm.weight" in official
    assert "sd_qformer.encoder.layer.0.crossattention.self.key.weight" in official
    assert "sd_qformer.encoder.layer.1.crossattention.self.key.weight" not in official  # layers 0, 2, 4 only
    mapped = {official_qformer_key(k): v for k, v in official.items() if not k.startswith("mm_projector")}
    mapped.pop(None)  # embeddings.position_ids
    ours = QFormer(TINY.qformer, encoder_hidden_size=64).eval()
    ours.load_state_dict(mapped, strict=True)

    direct = Blip2QFormerModel(src.qformer.config).eval()
    direct.load_state_dict(src.qformer.state_dict(), strict=True)
    h = torch.randn(2, 32, 64)
    with torch.no_grad():
        ref = direct(query_embeds=src.query_tokens.expand(2, -1, -1), encoder_hidden_states=h).last_hidden_state
        assert_close(ours(h), ref, atol=0, msg="QFormer")


# -- LLM --------------------------------------------------------------------------------------------------------------

def test_prompt_is_the_official_one():
    prompt, answer = conversation("turn them into woodcuts", template=8)
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant can generate <img>. "
        "The assistant needs to conduct the image to image translation task based on given image and text "
        "information. The assistant gives helpful, detailed, and polite answers to the user's questions. "
        'USER: I need an image that represents the prior image and caption "<im_start> <img_0> <im_end>turn them '
        'into woodcuts". Can you create it? ASSISTANT:')
    assert answer.startswith(" Certainly, I have created the image that represents the prior image and caption <img_0> <img_1>")
    assert answer.endswith("<img_30> <img_31>")


def _fit_lm_head_to(llm, hidden, targets, steps=2000):
    """Make greedy decoding emit `targets`: fit lm_head (the only thing changed) on the forced hidden states."""
    head = llm.lm_head
    head.weight.data.zero_()
    opt = torch.optim.Adam([head.weight], lr=0.1)
    head.weight.requires_grad_(True)
    for step in range(steps):
        opt.zero_grad()
        logits = head(hidden)
        if step % 25 == 0 and (logits.argmax(-1) == targets).all():  # fitted: no need for the remaining steps
            break
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        opt.step()
    head.weight.requires_grad_(False)
    return (head(hidden).argmax(-1) == targets).all().item()


def test_forced_states_equal_generated_states_when_decoding_emits_the_answer():
    torch.manual_seed(0)
    tok = build_offline_tokenizer()
    llm = SmartEditLLM(TINY.llm).eval()
    forced = tokenize_prompt(tok, "make it blue", template=3, forced=True)
    open_ = tokenize_prompt(tok, "make it blue", template=3, forced=False)
    n_answer = len(forced.suffix) - len(open_.suffix)  # answer tokens, ending with the 32 <img_i>
    image = torch.randn(1, 256, 64)
    prefix, suffix = torch.tensor([forced.prefix]), torch.tensor([forced.suffix])
    with torch.no_grad():
        hidden = llm(llm.embed(prefix, image, suffix))[0]  # [L, H]
    # position j predicts token j + 1: the last prompt position .. <img_30> predict the answer tokens
    targets = suffix[0, -n_answer:]
    assert _fit_lm_head_to(llm, hidden[-n_answer - 1:-1].detach(), targets), "could not make decoding emit the answer"

    with torch.no_grad():
        states_forced = llm.forced_img_states(prefix, image, suffix)
        states_gen, generated = llm.generate_img_states(prefix, image, torch.tensor([open_.suffix]))
    assert generated == targets.tolist()
    assert_close(states_gen, states_forced, atol=1e-5, msg="generate vs forced <img_i> states")


def test_generate_mode_fails_clearly_without_32_img_tokens():
    torch.manual_seed(0)
    tok = build_offline_tokenizer()
    llm = SmartEditLLM(TINY.llm).eval()
    p = tokenize_prompt(tok, "make it blue", forced=False)
    with pytest.raises(RuntimeError, match=r"0 <img_i> tokens, not 32"):
        llm.generate_img_states(torch.tensor([p.prefix]), torch.randn(1, 256, 64), torch.tensor([p.suffix]),
                                max_new_tokens=5)


def test_padded_batch_equals_single_samples():
    torch.manual_seed(0)
    tok = build_offline_tokenizer()
    llm = SmartEditLLM(TINY.llm).eval()
    prompts = [tokenize_prompt(tok, "make it blue"), tokenize_prompt(tok, "replace the cat with a rabbit", 5)]
    image = torch.randn(2, 256, 64)
    prefix, suffix, mask = pad_prompts(prompts, tok.pad_token_id, 256)
    with torch.no_grad():
        both = llm.forced_img_states(prefix, image, suffix, mask)
        for i, p in enumerate(prompts):
            one = llm.forced_img_states(torch.tensor([p.prefix]), image[i:i + 1], torch.tensor([p.suffix]))
            assert_close(both[i:i + 1], one, atol=1e-5, msg=f"sample {i}")


# -- UNet ---------------------------------------------------------------------------------------------------------------

def test_residual_is_added_to_conv_in_output():
    torch.manual_seed(0)
    ours = SmartEditUNet(TINY.unet).eval()
    x, t, text = torch.randn(3, 8, 32, 24), torch.tensor(501), torch.randn(3, 77, 32)
    residual = torch.randn(1, 32, 16, 16)

    # independent recomputation: diffusers' UNet whose conv_in computes conv_in(x) + resize(residual) explicitly
    class ConvInPlusResidual(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, s):
            return self.conv(s) + F.interpolate(residual, size=s.shape[-2:], mode="bilinear",
                                                align_corners=False).repeat(3, 1, 1, 1)

    ref = copy.deepcopy(ours.unet)
    ref.conv_in = ConvInPlusResidual(ref.conv_in)
    with torch.no_grad():
        eps = ours(x, t, text, residual)
        assert_close(eps, ref(x, t, encoder_hidden_states=text).sample, atol=1e-6, msg="UNet with residual")
        plain = ours.unet(x, t, encoder_hidden_states=text).sample  # the hook is gone after the call
        assert (plain - eps).abs().max() > 1e-3, "the residual must change the output"
    with pytest.raises(ValueError, match="not a multiple"):
        ours(torch.randn(4, 8, 32, 32), t, torch.randn(4, 77, 32), torch.randn(3, 32, 16, 16))


def test_bim_positional_encoding_stays_fp32_in_half_precision():
    torch.manual_seed(0)
    bim = BIM(TINY.bim, 32, 32)
    ref = bim.pe_layer((16, 16))
    bim.half()
    assert bim.modulate_head.weight.dtype == torch.float16
    assert bim.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    assert torch.equal(bim.pe_layer((16, 16)), ref)
    prompt, residual = bim(torch.randn(1, 77, 32).half(), torch.randn(1, 256, 64).half())
    assert prompt.dtype == residual.dtype == torch.float16


def test_unet_with_residual_exports_with_dynamic_batch_and_size():
    """smartedit-export builds on this: torch.export traces the conv_in hook with symbolic B, h, w."""
    torch.manual_seed(0)
    u = SmartEditUNet(TINY.unet).eval()
    b, h, w = torch.export.Dim("B", min=1, max=4), torch.export.Dim("h8", min=4, max=12), torch.export.Dim(
        "w8", min=4, max=12)
    # example batch 2: torch.export specialises example sizes of 1
    args = (torch.randn(6, 8, 32, 32), torch.tensor(500.0), torch.randn(6, 77, 32), torch.randn(2, 32, 16, 16))
    ep = torch.export.export(u, args, dynamic_shapes=({0: 3 * b, 2: 8 * h, 3: 8 * w}, None, {0: 3 * b}, {0: b}))
    for n, hh, ww in [(1, 40, 48), (3, 64, 32)]:
        x, text, res = torch.randn(3 * n, 8, hh, ww), torch.randn(3 * n, 77, 32), torch.randn(n, 32, 16, 16)
        with torch.no_grad():
            assert_close(ep.module()(x, args[1], text, res), u(x, args[1], text, res), atol=1e-5,
                         msg=f"exported UNet at B={n}, {hh}x{ww}")


def test_partial_build_keeps_each_stage_weights():
    from smartedit.pipeline import SmartEditPipeline

    full = SmartEditPipeline.from_preset("tiny", seed=3)
    part = SmartEditPipeline.from_preset("tiny", seed=3, only=["unet"])
    assert part.stages.llm.lm_head.weight.is_meta and not part.stages.unet.unet.conv_in.weight.is_meta
    a, b = full.stages.unet.state_dict(), part.stages.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
