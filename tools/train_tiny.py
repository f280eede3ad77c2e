"""Train the `tiny` SmartEdit architecture on the shapes editing task (tools/synthetic_edits.py), on a CPU.

The recipe follows the official second stage, scaled down:
  1. the VAE alone, as an autoencoder on the task's pictures (reconstruction MSE + a small KL term); its latent
     scale is then measured and written into the model's config (vae.scaling_factor), as SD's 0.18215 was;
  2. LLaVA's LoRA (q/v, r 8, alpha 16) with the 35 new token rows of embed_tokens, lm_head and mm_projector, the
     QFormer with its queries, the BIM (its two output heads zero-initialised) and the UNet, together:
       - the LLM reads prompt + 256 image embeds + the canonical answer ending in <img_0>..<img_31> in one
         teacher-forced pass; the QFormer reads the states of those 32 tokens;
       - loss = epsilon MSE of the UNet (DDPMScheduler with the pipeline's betas: at inference EulerAncestral's
         scaled input x / sqrt(sigma^2 + 1) is exactly this noisy latent) + the LM cross-entropy of the answer;
       - InstructPix2Pix conditioning: the edited picture's latents (mode x scaling factor) are noised, the input
         picture's latents (mode, unscaled) are concatenated; with p 0.1 the prompt embeds become the null-text
         embedding, with p 0.1 (overlapping in 0.05) the image latents become zeros, as the official training;
         the BIM residual is never dropped;
       - the vision tower (CLIP) and the LLM's base weights stay frozen; embed_tokens rows below 32000 stay frozen.
  The weights saved are an exponential moving average of the trained ones, in fp16, with save_pretrained, and
  provenance.json beside them: the recipe, the seed, the git commit, the time taken and each file's sha256.

The prompt's system part and template (template 0, the pipeline's default) are the same for every sample and a
causal LLM's states there do not depend on what follows, so they are computed once per step and their keys/values
shared by the batch (the same numbers as the full pass, tested in the script's self-check).

Deterministic for a seed on one machine and thread count (CPU kernels may sum in another order elsewhere).

    python tools/train_tiny.py --out models/tiny-shapes [--seed 0] [--overwrite]
"""

from __future__ import annotations

import os

# libgomp's default spin-waiting makes 2 threads 10x slower when other processes share the 2 cores (measured: a UNet
# step 11 s instead of 1 s); passive waiting costs nothing when the cores are free
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import dataclasses
import json
import math
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tokenizers import Tokenizer
from transformers import DynamicCache, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_edits as task

from smartedit.config import BASE_VOCAB_SIZE, NUM_IMG_TOKENS, SCHEDULER_CONFIG, SmartEditConfig
from smartedit.files import sha256_file, write_json
from smartedit.mllm import EDIT_TEMPLATES, SYSTEM_PROMPT, PAD_ID, pad_prompts, tokenize_prompt
from smartedit.model import Stages, build_stages
from smartedit.pipeline import SmartEditPipeline
from smartedit.tokenizer import add_smartedit_tokens, build_offline_tokenizer
from smartedit.vision import preprocess_clip

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    preset: str = "tiny"  # the architecture; the saved config differs from it only in name and vae.scaling_factor
    name: str = "tiny-shapes"
    examples: int = 24000  # training examples, from task.TRAIN_SEEDS
    vae_steps: int = 1500
    vae_batch: int = 8  # per unit of CPU time, 8 x 1200 steps reached 27.5 dB where 16 x 600 reached 26.4
    vae_lr: float = 3e-3
    kl_weight: float = 1e-6
    align_steps: int = 1000
    align_batch: int = 24
    align_lr: float = 3e-3
    read_weight: float = 1.0  # the instruction readout's cross-entropy in stage 2
    steps: int = 2400
    batch: int = 24  # UNet samples per step
    cond_repeats: int = 2  # each conditioning (LLM, QFormer, BIM: 80% of a step's work) serves this many noisings
    min_snr: float = 5.0  # eps loss weighted by min(SNR, 5) / SNR (Min-SNR weighting); 0: unweighted
    lr: float = 1e-3
    warmup: int = 100
    lm_weight: float = 1.0  # the official loss is LM cross-entropy + diffusion MSE
    lm_rows: int = 2  # samples per batch whose answer gets the LM loss (its logits span 32035 ids)
    drop_text: float = 0.10  # official: p < 0.1 -> null text
    drop_image_from: float = 0.05  # official: 0.05 <= p < 0.15 -> zero image latents
    drop_image_to: float = 0.15
    ema: float = 0.999
    grad_clip: float = 1.0
    threads: int = 2


def log(msg: str) -> None:
    print(msg, flush=True)


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- data --------------------------------------------------------------------------------------------------------------


def to_tensor(images) -> torch.Tensor:
    """PIL images -> [N, 3, R, R] in [-1, 1] (the pipeline's preprocess_vae at the task's own resolution)."""
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


@dataclass
class Data:
    inputs: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    targets: torch.Tensor  # [N, 3, R, R]
    clip_feats: torch.Tensor  # [N, 256, Dv] fp16: the frozen CLIP tower's features of the inputs, computed once
    instruction: list[int]  # [N] index into `texts`
    texts: list[str]


@torch.no_grad()
def make_data(n: int, stages: Stages, chunk: int = 512) -> Data:
    texts = task.instructions()
    index = {t: i for i, t in enumerate(texts)}
    inputs, targets, feats, which = [], [], [], []
    for start in range(0, n, chunk):
        pics = []
        for seed in task.TRAIN_SEEDS[start:min(n, start + chunk)]:
            sc, edit = task.drawn_edit(seed)
            pics.append(task.pictures(sc, edit))
            which.append(index[edit.instruction(sc)])
        inputs.append(to_tensor([a for a, _ in pics]))
        targets.append(to_tensor([b for _, b in pics]))
        clip = stages.vision.clip(pixel_values=preprocess_clip([a for a, _ in pics])).last_hidden_state[:, 1:]
        feats.append(clip.half())
    return Data(torch.cat(inputs), torch.cat(targets), torch.cat(feats), which, texts)


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """The offline LLaMA-shaped tokenizer (smartedit.tokenizer) with every word of `texts` made one piece, as
    LLaMA's sentencepiece vocabulary has whole words: the same special ids, byte fallback and 32000 base ids, the new
    pieces taking unused ids, reached by BPE merges from characters, with and without the leading "▁". Anything
    else still tokenizes by characters. The model folder carries it (tokenizer/)."""
    base = build_offline_tokenizer(add_tokens=False)
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    free = sorted(i for piece, i in vocab.items() if piece.startswith("<unused_"))
    unused = {i: piece for piece, i in vocab.items() if piece.startswith("<unused_")}
    words = sorted({w for t in texts for w in re.findall(r"[A-Za-z]+", t) if len(w) > 1})
    for form in ["▁" + w for w in words] + words:
        for k in range(2, len(form) + 1):
            if form[:k] not in vocab:
                i = free.pop(0)
                del vocab[unused[i]]
                vocab[form[:k]] = i
                merges.append([form[:k - 1], form[k - 1]])
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<unk>", padding_side="right",
                                   model_max_length=2048)
    return add_smartedit_tokens(fast)


# -- stage 1: the VAE --------------------------------------------------------------------------------------------------


def train_vae(stages: Stages, data: Data, r: Recipe, gen: torch.Generator) -> float:
    """Autoencoder training on inputs and targets (L1 + MSE, a small KL term keeps the latents bounded); -> the
    latent scaling factor (1 / std of the latent modes)."""
    vae = stages.vae.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    pool = torch.cat([data.inputs, data.targets])
    t0, ema_loss = time.perf_counter(), None
    for step in range(1, r.vae_steps + 1):
        lr = r.vae_lr * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / r.vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = pool[torch.randint(len(pool), (r.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample  # the mode, as the pipeline encodes: sampling halved the progress
        mse = F.mse_loss(rec, x)
        loss = F.l1_loss(rec, x) + mse + r.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), r.grad_clip)
        opt.step()
        ema_loss = mse.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * mse.item()
        if step % 100 == 0 or step == r.vae_steps:
            spent = time.perf_counter() - t0
            psnr = 10 * math.log10(4.0 / max(ema_loss, 1e-12))  # range [-1, 1]: peak 2
            log(f"vae   step {step}/{r.vae_steps}  mse {ema_loss:.5f} ({psnr:.1f} dB)  {clock(spent)} spent, "
                f"~{clock(spent / step * (r.vae_steps - step))} left of this stage")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        modes = torch.cat([vae.encode(pool[i:i + 256]).latent_dist.mode() for i in range(0, min(len(pool), 4096), 256)])
    return float(1.0 / modes.std())


@torch.no_grad()
def encode(stages: Stages, data: Data, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image latents (mode, unscaled) [N,4,h,w], target latents (mode x scaling) [N,4,h,w]."""
    img = [stages.vae.encode(data.inputs[i:i + 256]) for i in range(0, len(data.inputs), 256)]
    tgt = [stages.vae.encode(data.targets[i:i + 256]) * scaling for i in range(0, len(data.targets), 256)]
    return torch.cat(img), torch.cat(tgt)


# -- stage 2: everything else, with the diffusion loss ----------------------------------------------------------------


class Prompts:
    """Token ids of every instruction (template 0, forced answer), split where the prompt stops being shared."""

    def __init__(self, tokenizer, texts: list[str]):
        ids = [tokenize_prompt(tokenizer, t) for t in texts]
        self.prefix = ids[0].prefix
        assert all(p.prefix == self.prefix for p in ids)
        self.suffix = [p.suffix for p in ids]
        plain = [tokenize_prompt(tokenizer, t, forced=False).suffix for t in texts]
        self.answer_start = [len(p) for p in plain]  # suffix index of the answer's first token

    def batch(self, which: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> suffix ids [B, Ls] right-padded with 0, lengths [B]."""
        lens = torch.tensor([len(self.suffix[w]) for w in which])
        out = torch.zeros(len(which), int(lens.max()), dtype=torch.long)
        for i, w in enumerate(which):
            out[i, : lens[i]] = torch.tensor(self.suffix[w])
        return out, lens


def llm_states(stages: Stages, prompts: Prompts, clip_feats: torch.Tensor, which: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher-forced pass -> (img_hidden [B,32,H], hidden of the suffix [B,Ls,H], suffix ids, lengths).

    The shared prefix runs once (batch 1) and its keys/values are expanded to the batch; suffixes are right-padded,
    so no real token ever attends to a pad and each row's states are those of its unpadded prompt."""
    llm = stages.llm
    b = clip_feats.shape[0]
    table = llm.model.get_input_embeddings()
    cache = DynamicCache()
    prefix = torch.tensor([prompts.prefix])
    llm.model(inputs_embeds=table(prefix), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1)
    suffix, lens = prompts.batch(which)
    image_embeds = stages.vision.mm_projector(clip_feats)  # [B, 256, H]
    x = torch.cat([image_embeds, table(suffix)], dim=1)
    start = prefix.shape[1]
    pos = torch.arange(start, start + x.shape[1]).unsqueeze(0).expand(b, -1)
    hidden = llm.model(inputs_embeds=x, past_key_values=cache, use_cache=True, position_ids=pos).last_hidden_state
    n_img = image_embeds.shape[1]
    idx = n_img + lens.unsqueeze(1) - NUM_IMG_TOKENS + torch.arange(NUM_IMG_TOKENS)  # [B, 32]
    img_hidden = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return img_hidden, hidden[:, n_img:], suffix, lens


@torch.no_grad()
def check_shared_prefix(stages: Stages, tokenizer, prompts: Prompts, data: Data) -> float:
    """The <img_i> states of llm_states against the pipeline's own forced pass (left-padded batch, attention mask)
    for the two instructions of different lengths; -> the largest difference (RuntimeError above 1e-4)."""
    which = [data.texts.index(min(data.texts, key=len)), data.texts.index(max(data.texts, key=len))]
    feats = data.clip_feats[:2].float()
    ours = llm_states(stages, prompts, feats, which)[0]
    prefix, suffix, mask = pad_prompts([tokenize_prompt(tokenizer, data.texts[w]) for w in which], PAD_ID,
                                       feats.shape[1])
    ref = stages.llm.forced_img_states(prefix, stages.vision.mm_projector(feats), suffix, mask)
    err = float((ours - ref).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"the shared-prefix pass differs from the pipeline's forced pass by {err:.2e}")
    return err


def lm_loss(stages: Stages, prompts: Prompts, suffix_hidden: torch.Tensor, suffix: torch.Tensor, lens: torch.Tensor,
            which: list[int], rows: int) -> torch.Tensor:
    """Cross-entropy of the answer's tokens (the canonical answer ending in <img_31>), for the first `rows` rows."""
    losses = []
    for i in range(min(rows, len(which))):
        a, n = prompts.answer_start[which[i]], int(lens[i])
        logits = stages.llm.lm_head(suffix_hidden[i, a - 1: n - 1])  # position j predicts token j + 1
        losses.append(F.cross_entropy(logits.float(), suffix[i, a:n]))
    return torch.stack(losses).mean()


def text_embeddings(texts: list[str], dim: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for SD's CLIP text encoder, which has no counterpart at this size: a fixed random vector per word
    and per position; the first positions hold the words, in order, and every later one (CLIP's end and padding
    states, which depend on the whole text) a fixed random mix of them, each token layer-normed as CLIP's last
    hidden state is. "" gives the null-text embedding. -> targets [len(texts), length, dim], null [1, length, dim]."""
    g = torch.Generator().manual_seed(seed + 1)
    words = sorted({w for t in texts for w in t.split()})
    table = dict(zip(words, torch.randn(len(words), dim, generator=g)))
    position = 0.5 * torch.randn(length, dim, generator=g)
    slots = max(len(t.split()) for t in texts)
    mix = torch.randn(slots, dim, dim, generator=g) / dim**0.5  # word j's share of the text's summary

    def embed(text: str) -> torch.Tensor:
        w = [table[x] for x in text.split()]
        summary = sum((mix[j] @ v for j, v in enumerate(w)), torch.zeros(dim))
        rows = torch.stack(w + [summary] * (length - len(w)))
        return F.layer_norm(rows + position, (dim,))

    return torch.stack([embed(t) for t in texts]), embed("").unsqueeze(0)


def train_align(stages: Stages, prompts: Prompts, data: Data, targets: torch.Tensor, r: Recipe,
                gen: torch.Generator) -> None:
    """What the official second stage starts from, scaled down: the paper's first stage (the QFormer aligned to the
    instruction's text embedding, MSE, with the LM loss) and a language model that reads the instruction, which
    LLaVA brings from its own training and the tiny LLaMA, random, does not. So here the whole LLM trains (its base
    weights too; the 32000 base rows of embed_tokens stay), with mm_projector and the QFormer, and one more loss: a
    linear readout of the instruction (which of the task's instructions) from the mean <img_i> state, a head used
    only here. Without it the QFormer's MSE never started to read the instruction (measured: 1% of the instructions
    told apart after 600 steps, as chance; with it 60%): at the QFormer's 0.02 init a 32-wide cross-attention passes
    too little of the LLM's states for either side to learn from the other."""
    llm = stages.llm.model
    base = [m for name, m in llm.named_modules() if name.endswith("base_layer")] + [llm.norm] + [
        m for layer in llm.layers for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp,
                                            layer.self_attn.k_proj, layer.self_attn.o_proj)]
    readout = torch.nn.Linear(stages.llm.cfg.hidden_size, len(data.texts))
    params = trainable(stages, [stages.vision.mm_projector, stages.qformer, *base]) + list(readout.parameters())
    opt = torch.optim.AdamW(params, lr=r.align_lr, weight_decay=0.0)
    t0, avg = time.perf_counter(), {}
    for step in range(1, r.align_steps + 1):
        lr = r.align_lr * min(1.0, step / r.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / r.align_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(data.instruction), (r.align_batch,), generator=gen)
        which = [data.instruction[i] for i in idx.tolist()]
        img_hidden, suffix_hidden, suffix, lens = llm_states(stages, prompts, data.clip_feats[idx].float(), which)
        q = stages.qformer(img_hidden)  # [B, 77, D]
        align = F.mse_loss(q, targets[which])
        lm = lm_loss(stages, prompts, suffix_hidden, suffix, lens, which, r.lm_rows)
        read = F.cross_entropy(readout(img_hidden.mean(1)), torch.tensor(which))
        opt.zero_grad(set_to_none=True)
        (align + r.lm_weight * lm + r.read_weight * read).backward()
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        opt.step()
        with torch.no_grad():  # how often the QFormer's output is nearest to its own instruction's embedding
            nearest = torch.cdist(q.flatten(1), targets.flatten(1)).argmin(1)
            hit = (nearest == torch.tensor(which)).float().mean().item()
        for name, v in (("align", align.item()), ("lm", lm.item()), ("hit", hit), ("read", read.item())):
            avg[name] = v if name not in avg else 0.95 * avg[name] + 0.05 * v
        if step % 25 == 0 or step == r.align_steps:
            spent = time.perf_counter() - t0
            log(f"align step {step}/{r.align_steps}  mse {avg['align']:.4f}  QFormer output nearest to its "
                f"instruction {avg['hit']:.0%}  readout {avg['read']:.3f}  lm {avg['lm']:.4f}  {clock(spent)} spent, "
                f"~{clock(spent / step * (r.align_steps - step))} left of this stage")
    stages.requires_grad_(False)


def trainable(stages: Stages, modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Unfreeze the LLM's LoRA, its 35 new token rows (the base rows are kept by zeroing their gradient) and lm_head,
    as the official training does, and every parameter of `modules`."""
    params = []
    for name, p in stages.llm.named_parameters():
        if "lora_" in name or name in ("lm_head.weight", "model.embed_tokens.weight"):
            p.requires_grad_(True)
            params.append(p)
    keep = torch.zeros(stages.llm.cfg.vocab_size, 1)
    keep[BASE_VOCAB_SIZE:] = 1.0  # the 35 SmartEdit tokens
    if not getattr(stages.llm, "_rows_kept", False):
        stages.llm.model.embed_tokens.weight.register_hook(lambda g: g * keep)
        stages.llm._rows_kept = True
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def train_main(stages: Stages, prompts: Prompts, data: Data, latents, r: Recipe, gen: torch.Generator,
               null_text: torch.Tensor) -> dict[str, torch.Tensor]:
    image_latents, target_latents = latents
    params = trainable(stages, [stages.vision.mm_projector, stages.qformer, stages.bim, stages.unet])
    named = {n: p for n, p in stages.named_parameters() if p.requires_grad}
    ema = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=0.0)
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod
    t0, avg = time.perf_counter(), {}
    for step in range(1, r.steps + 1):
        lr = r.lr * min(1.0, step / r.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / r.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        k = r.cond_repeats
        idx = torch.randint(len(data.instruction), (r.batch // k,), generator=gen)
        which = [data.instruction[i] for i in idx.tolist()]
        feats = data.clip_feats[idx].float()
        img_hidden, suffix_hidden, suffix, lens = llm_states(stages, prompts, feats, which)
        prompt_embeds, bim_residual = stages.qformer_bim(img_hidden, feats)
        idx, prompt_embeds, bim_residual = (x.repeat_interleave(k, 0) for x in (idx, prompt_embeds, bim_residual))

        p = torch.rand(r.batch, generator=gen)
        no_text = (p < r.drop_text).view(-1, 1, 1)
        no_image = ((p >= r.drop_image_from) & (p < r.drop_image_to)).view(-1, 1, 1, 1)
        prompt_embeds = torch.where(no_text, null_text.expand_as(prompt_embeds), prompt_embeds)
        cond = torch.where(no_image, torch.zeros_like(image_latents[idx]), image_latents[idx])

        x0 = target_latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (r.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPMScheduler.add_noise
        eps = stages.unet(torch.cat([noisy, cond], dim=1), t, prompt_embeds, bim_residual)
        per_sample = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        if r.min_snr > 0:
            snr = a.view(-1) / (1 - a.view(-1))
            per_sample = per_sample * snr.clamp(max=r.min_snr) / snr
        diffusion = per_sample.mean()
        lm = lm_loss(stages, prompts, suffix_hidden, suffix, lens, which, r.lm_rows)
        loss = diffusion + r.lm_weight * lm

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        opt.step()
        decay = min(r.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for n, q in named.items():
                ema[n].lerp_(q.detach(), 1 - decay)
        for name, v in (("eps", diffusion.item()), ("lm", lm.item())):
            avg[name] = v if name not in avg else 0.98 * avg[name] + 0.02 * v
        if step % 25 == 0 or step == r.steps:
            spent = time.perf_counter() - t0
            log(f"main  step {step}/{r.steps}  eps mse {avg['eps']:.4f}  lm {avg['lm']:.4f}  lr {lr:.2e}  "
                f"{clock(spent)} spent, ~{clock(spent / step * (r.steps - step))} left of this stage")
    return ema


# -- the run -----------------------------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tools", "smartedit"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+uncommitted-changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train(out: Path, r: Recipe, overwrite: bool = False) -> Path:
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    commit = git_commit()  # the code that runs: taken before, as the tree may change during the run
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        times[name] = round(time.perf_counter() - wall0 - sum(times.values()), 1)

    base = SmartEditConfig.from_name(r.preset)
    stages = build_stages(base, init=True, seed=r.seed)
    with torch.no_grad():  # the official BIM heads start at zero (ControlNet-style zero_module)
        for head in (stages.bim.dimension_reduction_head_zeroconv, stages.bim.dimension_reduction_head_qformer_out):
            head.weight.zero_()
            head.bias.zero_()
    tokenizer = word_tokenizer([SYSTEM_PROMPT, *EDIT_TEMPLATES[0], "USER ASSISTANT", *task.instructions()])

    log(f"drawing {r.examples} training examples of the shapes task ({task.RESOLUTION} px) ...")
    data = make_data(r.examples, stages)
    prompts = Prompts(tokenizer, data.texts)
    log(f"shared-prefix pass vs the pipeline's forced pass: max difference "
        f"{check_shared_prefix(stages, tokenizer, prompts, data):.1e}")
    targets, null_text = text_embeddings(data.texts, base.qformer.hidden_size, base.qformer.num_queries, r.seed)
    lap("data")
    log(f"stage 1/3: the VAE as an autoencoder, {r.vae_steps} steps of {r.vae_batch} pictures")
    scaling = train_vae(stages, data, r, gen)
    stages.vae.cfg = dataclasses.replace(stages.vae.cfg, scaling_factor=scaling)
    log(f"latent scaling factor {scaling:.5f}; encoding the training set ...")
    latents = encode(stages, data, scaling)
    lap("vae")
    log(f"stage 2/3: LoRA and QFormer aligned to the instructions' text embeddings, {r.align_steps} steps of "
        f"{r.align_batch}")
    train_align(stages, prompts, data, targets, r, gen)
    lap("align")
    log(f"stage 3/3: LoRA, embeddings, QFormer, BIM and UNet with the diffusion loss, {r.steps} steps of {r.batch}")
    ema = train_main(stages, prompts, data, latents, r, gen, null_text)
    lap("main")

    with torch.no_grad():
        for n, p in stages.named_parameters():
            if n in ema:
                p.copy_(ema[n])
    stages.requires_grad_(False).eval()
    cfg = dataclasses.replace(base, name=r.name, vae=dataclasses.replace(base.vae, scaling_factor=scaling))
    pipe = SmartEditPipeline(cfg, tokenizer, stages, null_text).to(dtype=torch.float16)
    source = {"kind": "trained", "recipe": "tools/train_tiny.py", "task": "tools/synthetic_edits.py",
              "seed": r.seed}
    pipe.save_pretrained(out, overwrite=overwrite, source=source)
    lap("save")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    provenance = {
        "model": r.name, "task": "shapes editing (tools/synthetic_edits.py), "
        f"{task.RESOLUTION} px, train seeds {task.TRAIN_SEEDS.start}..{task.TRAIN_SEEDS.start + r.examples - 1}, "
        f"held-out seeds from {task.HELDOUT_SEEDS.start}",
        "recipe": dataclasses.asdict(r), "seed": r.seed, "git_commit": commit,
        "command": "python tools/train_tiny.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "time_s": {**times, "wall": round(time.perf_counter() - wall0, 1), "cpu": round(cpu_seconds() - cpu0, 1)},
        "vae_scaling_factor": scaling,
        "files": {str(p.relative_to(out)): sha256_file(p) for p in files},
    }
    write_json(out / "provenance.json", provenance)
    log(f"wrote {out} ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB) in {clock(provenance['time_s']['wall'])} "
        f"wall, {clock(provenance['time_s']['cpu'])} CPU")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the model folder to write")
    ap.add_argument("--overwrite", action="store_true", help="replace a model folder already there")
    for f in dataclasses.fields(Recipe):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        help=f"default {f.default}")
    args = ap.parse_args(argv)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    train(args.out, recipe, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
