"""Write a release in the official SmartEdit layout from a pipeline's weights (tests and outside tools).

The inverse of `checkpoint.convert_official`, written from the official key names, so a tiny random
model can be saved as the real release is laid out, converted back, and compared exactly. It also writes the pieces
that come from elsewhere: a LLaVA-1.1 folder (32003-row embed_tokens/lm_head + a 32000-id tokenizer), a CLIP folder
(with the vision layers after the selected one, which conversion must drop) and an InstructPix2Pix folder (VAE, a
CLIP text encoder and tokenizer for the null-text embedding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import BASE_VOCAB_SIZE
from .pipeline import SmartEditPipeline

# peft's adapter_config.json of the release (data/adapter_config.json: r 8, alpha 16, q/v, dropout 0.05)
ADAPTER_CONFIG = {"base_model_name_or_path": "vicuna", "bias": "none", "fan_in_fan_out": False,
                  "inference_mode": True, "init_lora_weights": True, "lora_alpha": 16, "lora_dropout": 0.05,
                  "modules_to_save": None, "peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"],
                  "task_type": "CAUSAL_LM"}


def official_llm_state_dict(pipe: SmartEditPipeline) -> dict[str, torch.Tensor]:
    cfg = pipe.config.llm
    out = {}
    for k, v in pipe.stages.llm.state_dict().items():
        if not k.startswith("model."):
            continue  # lm_head lives in the QFormer file
        k = k[len("model."):].replace(".base_layer.", ".")
        out["model.base_model.model." + k] = v.clone()
    head_dim = cfg.hidden_size // cfg.num_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(cfg.num_layers):  # the release carries the rotary buffers of its transformers version
        out[f"model.base_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return out


def official_qformer_state_dict(pipe: SmartEditPipeline) -> dict[str, torch.Tensor]:
    out = {"sd_query_tokens": pipe.stages.qformer.query_tokens.detach().clone()}
    for k, v in pipe.stages.qformer.qformer.state_dict().items():
        k = k.replace("layernorm.", "embeddings.LayerNorm.") if k.startswith("layernorm.") else k
        k = re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", k)
        out["sd_qformer." + k] = v.clone()
    out["sd_qformer.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    vision = pipe.stages.vision
    out["mm_projector.weight"] = vision.mm_projector.weight.detach().clone()
    out["mm_projector.bias"] = vision.mm_projector.bias.detach().clone()
    return out


def write_official_release(pipe: SmartEditPipeline, root: str | Path, step: int = 15000) -> dict[str, Path]:
    """-> {"official": ..., "llava": ..., "clip": ..., "ip2p": ...} folders under root."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    from .tokenizer import build_offline_tokenizer

    root = Path(root)
    official, llava, clip, ip2p = (root / n for n in ("official", "llava", "clip", "ip2p"))
    for d in (official / f"LLM-{step}", official / "embeddings_qformer", official / f"modulate-{step}",
              official / f"unet-{step}", llava, clip, ip2p):
        d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    hidden = pipe.config.llm.hidden_size
    llm_sd = pipe.stages.llm.state_dict()

    # LLM-<step>: the official loader resets rows [:-35] of embed_tokens to LLaVA's, so store other values there
    llm = official_llm_state_dict(pipe)
    llm["model.base_model.model.embed_tokens.weight"][:BASE_VOCAB_SIZE] = torch.randn(BASE_VOCAB_SIZE, hidden,
                                                                                       generator=g)
    torch.save(llm, official / f"LLM-{step}" / "adapter_model.bin")
    (official / f"LLM-{step}" / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG, indent=2))

    # embeddings_qformer: only the last 35 rows of its lm_head are used
    q = official_qformer_state_dict(pipe)
    head = llm_sd["lm_head.weight"].clone()
    head[:BASE_VOCAB_SIZE] = torch.randn(BASE_VOCAB_SIZE, hidden, generator=g)
    q["lm_head.weight"] = head
    q["model.base_model.model.embed_tokens.weight"] = torch.zeros_like(head)  # present in some saves; dropped
    torch.save(q, official / "embeddings_qformer" / f"checkpoint-{step}_embeddings_qformer.bin")

    torch.save({k: v.clone() for k, v in pipe.stages.bim.state_dict().items()},
               official / f"modulate-{step}" / "adapter_model.bin")
    torch.save({k: v.clone() for k, v in pipe.stages.unet.state_dict().items()},
               official / f"unet-{step}" / "adapter_model.bin")

    # LLaVA-1.1: 32003 rows (its 3 extra tokens are dropped by SmartEdit), in two shards
    emb = torch.cat([llm_sd["model.embed_tokens.weight"][:BASE_VOCAB_SIZE], torch.randn(3, hidden, generator=g)])
    lmh = torch.cat([llm_sd["lm_head.weight"][:BASE_VOCAB_SIZE], torch.randn(3, hidden, generator=g)])
    torch.save({"model.embed_tokens.weight": emb}, llava / "pytorch_model-00001-of-00002.bin")
    torch.save({"lm_head.weight": lmh}, llava / "pytorch_model-00002-of-00002.bin")
    build_offline_tokenizer(add_tokens=False).save_pretrained(llava)

    # CLIP: the full tower (all layers), as openai/clip-vit-large-patch14 stores it under vision_model.
    vc = pipe.config.vision
    full = CLIPVisionModel(CLIPVisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                                            num_hidden_layers=vc.num_layers, num_attention_heads=vc.num_heads,
                                            image_size=vc.image_size, patch_size=vc.patch_size,
                                            hidden_act="quick_gelu"))
    tower = {k[len("clip."):]: v for k, v in pipe.stages.vision.state_dict().items() if k.startswith("clip.")}
    clip_sd = {k: tower.get(k, v).clone().contiguous() for k, v in full.state_dict().items()}
    clip_sd["embeddings.position_ids"] = torch.arange(vc.num_patches + 1).unsqueeze(0)  # older saves keep it
    save_file({"vision_model." + k: v for k, v in clip_sd.items()}, str(clip / "model.safetensors"))

    # InstructPix2Pix: VAE + a CLIP text encoder/tokenizer for the null text
    vae = AutoencoderKL(**pipe.config.vae.diffusers_kwargs())
    vae.load_state_dict(pipe.stages.vae.vae.state_dict())
    vae.save_pretrained(ip2p / "vae")
    dim = pipe.config.qformer.hidden_size
    text = CLIPTextModel(CLIPTextConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=16, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text.save_pretrained(ip2p / "text_encoder")
    tok_dir = ip2p / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                  pad_token="<|endoftext|>").save_pretrained(tok_dir)
    return {"official": official, "llava": llava, "clip": clip, "ip2p": ip2p}
