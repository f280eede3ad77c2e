import pytest

from smartedit.config import PRESETS, SmartEditConfig, VisionConfig
from smartedit.tokenizer import IMG_TOKENS, build_offline_tokenizer


def test_tiny_preset_is_exactly_the_issue_spec():
    t = PRESETS["tiny"]
    assert (t.vision.hidden_size, t.vision.num_layers, t.vision.num_heads, t.vision.intermediate_size,
            t.vision.image_size, t.vision.patch_size, t.vision.num_patches) == (64, 2, 4, 128, 224, 14, 256)
    assert (t.llm.hidden_size, t.llm.num_layers, t.llm.num_heads, t.llm.num_kv_heads, t.llm.intermediate_size,
            t.llm.vocab_size, t.llm.rms_norm_eps) == (64, 2, 4, 4, 128, 32035, 1e-6)
    assert (t.qformer.hidden_size, t.qformer.num_layers, t.qformer.num_heads, t.qformer.intermediate_size,
            t.qformer.cross_attention_frequency, t.qformer.num_queries) == (32, 2, 4, 64, 2, 77)
    assert (t.bim.dim, t.bim.depth, t.bim.num_heads, t.bim.mlp_dim, t.bim.attention_downsample_rate,
            t.bim.num_pos_feats) == (64, 2, 8, 128, 2, 32)
    assert (t.unet.block_out_channels, t.unet.layers_per_block, t.unet.norm_num_groups, t.unet.attention_head_dim,
            t.unet.cross_attention_dim, t.unet.in_channels, t.unet.out_channels) == ((32, 64), 1, 8, 8, 32, 8, 4)
    assert (t.vae.block_out_channels, t.vae.layers_per_block, t.vae.norm_num_groups, t.vae.latent_channels,
            t.vae.downsample_factor) == ((8, 16, 32, 32), 1, 8, 4, 8)


def test_official_dimensions():
    s = PRESETS["7b"]
    assert (s.vision.hidden_size, s.vision.num_layers, s.vision.num_layers_used, s.vision.num_patches) == (1024, 24, 23, 256)
    assert (s.llm.hidden_size, s.llm.num_layers, s.llm.vocab_size, s.llm.lora_rank, s.llm.lora_alpha) == (4096, 32, 32035, 8, 16)
    assert (s.qformer.hidden_size, s.qformer.num_layers, s.qformer.num_queries) == (768, 6, 77)
    assert (s.bim.dim, s.bim.mlp_dim, s.bim.num_heads, s.bim.num_pos_feats) == (1024, 2048, 8, 512)
    assert s.unet.block_out_channels == (320, 640, 1280, 1280) and s.unet_residual_channels == 320
    assert PRESETS["13b"].llm.hidden_size == 5120 and PRESETS["13b"].llm.num_layers == 40


def test_config_round_trip_and_validation(tmp_path):
    PRESETS["tiny"].save(tmp_path / "c.json")
    assert SmartEditConfig.load(tmp_path / "c.json") == PRESETS["tiny"]
    with pytest.raises(ValueError, match="bim.dim == vision.hidden_size"):
        SmartEditConfig(name="bad", vision=VisionConfig(hidden_size=64))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        SmartEditConfig.from_name("huge")


def test_offline_tokenizer_has_official_ids(tmp_path):
    tok = build_offline_tokenizer()
    assert len(tok) == 32035
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<img>", "<im_start>", "<im_end>")] == [
        0, 1, 2, 32000, 32001, 32002]
    assert tok.convert_tokens_to_ids(list(IMG_TOKENS)) == list(range(32003, 32035))
    # whitespace around added tokens is stripped, as the official slow tokenizer did: adjacent <img_i> ids
    assert tok(" done <img_0> <img_1>", add_special_tokens=False).input_ids[-2:] == [32003, 32004]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("make it blue <img_5>").input_ids == tok("make it blue <img_5>").input_ids
