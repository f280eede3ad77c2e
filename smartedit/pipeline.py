"""SmartEditPipeline: image + instruction -> edited image, through any runtime of the graph contract.

Order of work (official test/DS_SmartEdit_test.py and InstructPix2PixSD_SM.py):
    CLIP(224) -> mm_projector -> LLaMA -> 32 <img_i> states -> QFormer -> BIM       graphs llava, qformer_bim
    VAE encode (latent mode)                                                        graph vae_encoder
    100 x (UNet on the 3-way CFG batch [cond; null+img; null+zero-img], eps = u + g_t (t - i) + g_i (i - u),
           EulerAncestral)                                                          graph unet (+ smartedit.scheduler)
    VAE decode                                                                      graph vae_decoder

The graphs run on `pipe.backend`, a GraphRunner (smartedit.graphs): by default the model itself (EagerRunner, the
reference); smartedit.engines' registry gives the others (CUDA graphs, ONNX Runtime, TensorRT, AOTInductor). The
pipeline owns everything between the graphs: tokenisation, image pre/post-processing, the sampler and the guidance.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from . import checkpoint as ckpt
from .config import PRESETS, SmartEditConfig, check_guidance, check_resolution, precision_of
from .errors import Cancelled, InputError, RunError
from .files import open_image, sha256_file, sha256_json
from .graphs import EagerRunner, GraphRunner, LoopRunner
from .mllm import IMG_MODES, NUM_IMG_TOKENS, PAD_ID, PromptIds, pad_prompts, pick_template, tokenize_prompt
from .model import STAGE_NAMES, Stages, build_stages, cfg_batch, cfg_combine
from .scheduler import (
    SIGMA,
    AncestralPlan,
    Generators,
    T,
    ancestral_step,
    draw_ancestral_noise,
    initial_latents,
    scale_model_input,
)
from .tokenizer import add_smartedit_tokens, build_offline_tokenizer
from .vae import postprocess, preprocess_vae
from .vision import preprocess_clip

log = logging.getLogger(__name__)
Guidance = Union[float, Sequence[float]]  # one value for the batch, or one per sample


def _as_image(x: Image.Image | str | Path) -> Image.Image:
    return x if isinstance(x, Image.Image) else open_image(x, "input image")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a converted SmartEdit folder, or a preset with random weights (and its seed)."""

    model: Path | None = None
    preset: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.model is None) == (self.preset is None):
            raise InputError("give a converted model folder (--model DIR) or a preset with random weights "
                             "(--preset NAME --random-weights), not both or neither")
        if self.preset is not None and self.preset not in PRESETS:
            raise InputError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))

    def __str__(self) -> str:
        return str(self.model) if self.model else f"preset {self.preset!r} (random weights, seed {self.seed})"

    def config(self) -> SmartEditConfig:
        return ckpt.read_config(self.model)[0] if self.model else SmartEditConfig.from_name(self.preset)

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             only: Iterable[str] | None = None) -> "SmartEditPipeline":
        if self.model is not None:
            return SmartEditPipeline.from_pretrained(self.model, device=device, dtype=dtype, only=only)
        return SmartEditPipeline.from_preset(self.preset, seed=self.seed, device=device, dtype=dtype, only=only)

    def describe(self, progress=log.info) -> dict:
        """The record an export keeps of its source: the checkpoint's file hashes, or the preset and seed."""
        if self.model is None:
            src = {"kind": "random", "preset": self.preset, "seed": self.seed}
            return src | {"sha256": sha256_json(src)}
        cfg, meta = ckpt.read_config(self.model)
        progress(f"hashing the checkpoint at {self.model} ...")
        names = ["config.json", ckpt.NULL_TEXT_FILE] + [f"{s}.safetensors" for s in STAGE_NAMES]
        hashes = {f: sha256_file(self.model / f) for f in names if (self.model / f).exists()}
        return {"kind": "checkpoint", "path": str(self.model.resolve()), "files": hashes,
                "random_weights": bool(meta.get("random_weights")), "sha256": sha256_json(hashes)}

    def mismatch(self, recorded: dict) -> str | None:
        """Why artifacts exported from the source `recorded` (a manifest's) are not from this one (None: they are).
        A checkpoint is matched by its config.json hash (the weights are hashed at export, not at every load)."""
        if self.model is not None:
            want = recorded.get("files", {}).get("config.json")
            if recorded.get("kind") == "checkpoint" and want == sha256_file(self.model / "config.json"):
                return None
        elif recorded.get("kind") == "random" and (recorded.get("preset"), recorded.get("seed")) == (self.preset,
                                                                                                       self.seed):
            return None
        if recorded.get("kind") == "random":
            was = f"preset {recorded.get('preset')!r} (random weights, seed {recorded.get('seed')})"
        else:
            was = recorded.get("path") or "an unrecorded source"
        return f"the artifacts were exported from {was}, not from {self}"


class SmartEditPipeline:
    def __init__(self, config: SmartEditConfig, tokenizer: PreTrainedTokenizerBase, stages: Stages,
                 null_text_embeds: torch.Tensor, random_weights: bool = False, backend: GraphRunner | None = None):
        if tuple(null_text_embeds.shape) != (1, config.qformer.num_queries, config.qformer.hidden_size):
            raise InputError(f"null_text_embeds must be [1, {config.qformer.num_queries}, "
                             f"{config.qformer.hidden_size}], got {tuple(null_text_embeds.shape)}")
        self.config = config
        self.tokenizer = add_smartedit_tokens(tokenizer)
        self.stages = stages
        self.null_text_embeds = null_text_embeds  # [1, 77, D]: CLIP text embedding of ""
        self.random_weights = random_weights
        self.backend: GraphRunner = backend or EagerRunner(stages, config)
        self.img_token_mode = "forced"  # the default of encode_condition / __call__ (`official`: "stepwise")

    # -- construction -------------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, only: Iterable[str] | None = None) -> "SmartEditPipeline":
        """Random weights with the preset's shapes (for tests and latency work: speed does not depend on values).

        `only` limits which stages get real (random) weights; the others stay on the meta device. The values of a
        stage do not depend on `only`: every stage draws from its own seeded generator state.
        """
        cfg = SmartEditConfig.from_name(name)
        log.warning("SmartEdit %s with RANDOM weights (seed %d): outputs are noise, shapes and costs are real", name, seed)
        stages = build_stages(cfg, device, dtype, init=True, only=only, seed=seed)
        # peft initialises lora_B to zero (a no-op adapter); a trained release's is not, so give it values too
        if not stages.llm.lm_head.weight.is_meta:
            torch.manual_seed(seed * 100 + 99)
            for pname, p in stages.llm.named_parameters():
                if "lora_B" in pname:
                    nn.init.normal_(p, std=0.02)
        g = torch.Generator().manual_seed(seed)
        null = torch.randn(1, cfg.qformer.num_queries, cfg.qformer.hidden_size, generator=g).to(device, dtype)
        return cls(cfg, build_offline_tokenizer(), stages, null, random_weights=True)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, only: Iterable[str] | None = None
                        ) -> "SmartEditPipeline":
        """Load a converted folder; `only` loads just those stages (the others stay on the meta device). Nothing is
        fetched from any hub: the tokenizer is the folder's own."""
        model_dir = Path(model_dir)
        cfg, meta = ckpt.read_config(model_dir)
        wanted = list(STAGE_NAMES if only is None else only)
        missing = ckpt.iter_missing([model_dir / f"{n}.safetensors" for n in wanted] + [model_dir / ckpt.NULL_TEXT_FILE])
        missing += [] if (model_dir / "tokenizer").is_dir() else [model_dir / "tokenizer"]
        if missing:
            raise ckpt.CheckpointError(f"{model_dir} is incomplete, missing: {', '.join(str(p) for p in missing)}")
        shapes = build_stages(cfg, "meta", dtype, init=False, only=[])  # every file's header first: no allocation
        for name in wanted:
            ckpt.check_stage_header(getattr(shapes, name), model_dir / f"{name}.safetensors")
        null = ckpt.load_torch_file(model_dir / ckpt.NULL_TEXT_FILE)
        if "null_text_embeds" not in null:
            raise ckpt.CheckpointError(f"{model_dir / ckpt.NULL_TEXT_FILE} has no tensor 'null_text_embeds' "
                                       f"(it holds {sorted(null)})")
        ckpt.check_finite(null, str(model_dir / ckpt.NULL_TEXT_FILE))
        stages = build_stages(cfg, device, dtype, init=False, only=wanted)  # uninitialised, on the target device
        for name, module in stages.items():
            if name in wanted:
                ckpt.load_stage(module, model_dir / f"{name}.safetensors")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
        except (OSError, ValueError) as e:
            raise ckpt.CheckpointError(f"cannot load the tokenizer in {model_dir / 'tokenizer'}: {e}") from None
        return cls(cfg, tokenizer, stages, null["null_text_embeds"].to(device, dtype),
                   random_weights=bool(meta.get("random_weights", False)))

    def save_pretrained(self, model_dir: str | Path, overwrite: bool = False, source: dict | None = None) -> Path:
        def write(tmp: Path) -> None:
            ckpt.write_config(tmp / "config.json", self.config, self.random_weights, source or {})
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            for name, module in self.stages.items():
                ckpt.save_stage(module, tmp / f"{name}.safetensors")
            ckpt.save_stage({"null_text_embeds": self.null_text_embeds.cpu()}, tmp / ckpt.NULL_TEXT_FILE)

        return ckpt.write_folder_atomically(Path(model_dir), write, overwrite=overwrite)

    @property
    def device(self) -> torch.device:
        return self.null_text_embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.null_text_embeds.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SmartEditPipeline":
        for _, m in self.stages.items():
            m.to(device=device, dtype=dtype)
        self.null_text_embeds = self.null_text_embeds.to(device=device, dtype=dtype)
        return self

    # -- stages -------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_condition(self, images: Sequence[Image.Image], instructions: Sequence[str],
                         img_token_mode: str | None = None, template: int | str = 0, temperature: float = 0.0,
                         seed: int | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompt_embeds [B, 77, D], bim_residual [B, C0, 16, 16]. `seed` (one, or one per sample) draws the
        template when template="random"."""
        mode = img_token_mode or self.img_token_mode
        if mode not in IMG_MODES:
            raise InputError(f"img_token_mode must be one of {IMG_MODES}, got {mode!r}")
        pixels = preprocess_clip(list(images), self.config.vision.image_size).to(self.device)
        if isinstance(seed, (list, tuple)):
            templates = [pick_template(template, random.Random(s)) for s in seed]
            seed = seed[0]
        else:
            rng = random.Random(seed)
            templates = [pick_template(template, rng) for _ in instructions]
        if mode == "forced":
            if self.tokenizer.pad_token_id != PAD_ID:
                raise InputError(f"the llava graph pads with id {PAD_ID} (<unk>); this tokenizer pads with "
                                 f"{self.tokenizer.pad_token_id}")
            prompts = [self._tokenize(text, t) for text, t in zip(instructions, templates)]
            prefix, suffix, _ = pad_prompts(prompts, PAD_ID, self.config.vision.num_patches)
            out = self.backend.run("llava", {"pixel_values": pixels, "prefix_ids": prefix.to(self.device),
                                             "suffix_ids": suffix.to(self.device)})
            img_hidden, clip_feats = out["img_hidden"], out["clip_feats"]
        else:
            img_hidden, clip_feats = self._decode_img_states(pixels, instructions, templates, mode, temperature, seed)
        out = self.backend.run("qformer_bim", {"img_hidden": img_hidden, "clip_feats": clip_feats})
        return out["prompt_embeds"].to(self.dtype), out["bim_residual"].to(self.dtype)

    def _tokenize(self, instruction: str, template: int, forced: bool = True) -> PromptIds:
        """The prompt's ids around the image, refused when prompt + image + answer exceed the LLM's positions."""
        p = tokenize_prompt(self.tokenizer, instruction, template, forced=forced)
        n = len(p.prefix) + self.config.vision.num_patches + len(p.suffix) + (0 if forced else NUM_IMG_TOKENS + 8)
        if n > self.config.llm.max_position_embeddings:
            raise InputError(f"instruction too long: the prompt would be {n} tokens (with the image's "
                             f"{self.config.vision.num_patches}), over the LLM's {self.config.llm.max_position_embeddings}")
        return p

    def _decode_img_states(self, pixels, instructions, templates, mode, temperature, seed):
        """generate / stepwise: token by token with a KV cache, one sample at a time, in eager PyTorch."""
        s = self.stages
        if s.llm is None or s.vision is None or s.llm.lm_head.weight.is_meta or s.vision.mm_projector.weight.is_meta:
            raise InputError(f"img_token_mode {mode!r} decodes token by token in eager PyTorch, and this pipeline has "
                             f"no LLM weights loaded (backend {self.backend.name!r} runs the exported forced-mode "
                             "graph)")
        clip_feats, image_embeds = s.vision(pixels.to(next(s.vision.parameters()).dtype))  # [B, 256, Dv], [B, 256, H]
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        states = []
        for i, (text, t) in enumerate(zip(instructions, templates)):
            prompt = self._tokenize(text, t, forced=False)
            answer = None
            if mode == "stepwise":  # the canonical answer, fed token by token (the official loop's cost)
                answer = tokenize_prompt(self.tokenizer, text, t, forced=True).suffix[len(prompt.suffix):]
            ids = lambda x: torch.tensor([x], device=self.device)  # noqa: E731
            states.append(s.llm.generate_img_states(ids(prompt.prefix), image_embeds[i:i + 1], ids(prompt.suffix),
                                                    temperature=temperature, generator=gen,
                                                    eos_token_id=self.tokenizer.eos_token_id, answer_ids=answer)[0])
        return torch.cat(states), clip_feats

    def runtime_inputs(self, images: Sequence[Image.Image], instructions: Sequence[str], resolution: int = 256,
                       template: int | str = 0, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors the C++ runtime's `Editor` takes (runtime/include/smartedit/editor.h), on the CPU:
        pixel_values [B,3,224,224], prefix_ids [B,Lp] / suffix_ids [B,Ls] int64 (forced mode, padded with 0),
        image [B,3,R,R] in [-1, 1], null_text_embeds [1,77,D]. The same preprocessing as an edit through __call__."""
        check_resolution(resolution)
        rng = random.Random(seed)
        prompts = [self._tokenize(text, pick_template(template, rng)) for text in instructions]
        prefix, suffix, _ = pad_prompts(prompts, PAD_ID, self.config.vision.num_patches)
        out = {"pixel_values": preprocess_clip(list(images), self.config.vision.image_size).to(self.dtype),
               "prefix_ids": prefix, "suffix_ids": suffix,
               "image": preprocess_vae(list(images), resolution).to(self.dtype),
               "null_text_embeds": self.null_text_embeds.cpu()}
        return {k: v.contiguous() for k, v in out.items()}  # safetensors stores contiguous tensors only

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
        """-> image latents [B, 4, R/8, R/8]."""
        x = preprocess_vae(list(images), resolution).to(self.device)
        return self.backend.run("vae_encoder", {"image": x})["latents"].to(self.dtype)

    def guided_eps(self, latents: torch.Tensor, image_latents: torch.Tensor, row: torch.Tensor,
                   prompt_embeds: torch.Tensor, bim_residual: torch.Tensor, guidance_scale: Guidance,
                   image_guidance_scale: Guidance) -> torch.Tensor:
        """One guided step: latents [B,4,h,w] (unscaled), row = the schedule's row -> eps [B,4,h,w] in the
        pipeline's dtype. The CFG batch and the fp32 combine are smartedit.model's, here or inside a folded graph.
        Guidance scales are one value for the batch or one per sample."""
        t, sigma = row[T].reshape(1), row[SIGMA]
        g_text, g_image = _per_sample(guidance_scale, latents), _per_sample(image_guidance_scale, latents)
        if self.backend.fold_cfg:
            if not (isinstance(g_text, float) and isinstance(g_image, float)):
                raise InputError("the --fold-cfg unet graph takes one pair of guidance scales per batch; give "
                                 "every sample the same, or run them apart")
            return self.backend.run("unet", {
                "latents": latents, "image_latents": image_latents, "timestep": t, "sigma": sigma.reshape(1),
                "prompt_embeds": prompt_embeds, "bim_residual": bim_residual,
                "guidance": torch.tensor([g_text, g_image], device=latents.device)})["eps"].to(self.dtype)
        sample, prompts = cfg_batch(scale_model_input(latents, sigma), image_latents, prompt_embeds,
                                    self.null_text_embeds)
        eps = self.backend.run("unet", {"sample": sample, "timestep": t, "prompt_embeds": prompts,
                                        "bim_residual": bim_residual})["eps"]
        return cfg_combine(eps, g_text, g_image).to(self.dtype)

    @torch.inference_mode()
    def denoise(self, prompt_embeds: torch.Tensor, bim_residual: torch.Tensor, image_latents: torch.Tensor,
                steps: int = 100, guidance_scale: Guidance = 7.5, image_guidance_scale: Guidance = 1.5,
                generator: Generators = None, progress: bool = False,
                latents: torch.Tensor | None = None, stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """EulerAncestral over the 3-way CFG batch -> latents [B, 4, h, w] (scaled, ready for decode). The seed's
        noise is drawn as diffusers draws it: the starting latents, then one tensor per step (one generator for the
        batch, or one per sample). `stop`, asked before each step, ends the loop with Cancelled when it answers True
        (a server whose clients went away); a runner that replays the whole loop as one program is not asked."""
        plan = AncestralPlan.build(steps, self.device)
        if latents is None:
            latents = initial_latents(generator, tuple(image_latents.shape), plan, self.device, self.dtype)
        noise = draw_ancestral_noise(generator, steps, tuple(latents.shape), latents.dtype, self.device)
        if isinstance(self.backend, LoopRunner):  # the whole loop in one program (engines/cudagraph.py)
            guidance = torch.stack([torch.as_tensor(_per_sample(g, latents), dtype=torch.float32, device=self.device)
                                    .reshape(-1).expand(latents.shape[0]) for g in (guidance_scale,
                                                                                    image_guidance_scale)], 1)
            return self.backend.denoise_loop(latents, image_latents, prompt_embeds, self.null_text_embeds,
                                             bim_residual, plan.table, noise, guidance)  # guidance [B, 2]
        for i in tqdm(range(steps), desc="denoise", disable=not progress):
            if stop is not None and stop():
                raise Cancelled(f"stopped before step {i + 1} of {steps}: the caller stopped waiting (cancelled, or "
                                "its timeout passed)")
            row = plan.table[i]
            eps = self.guided_eps(latents, image_latents, row, prompt_embeds, bim_residual, guidance_scale,
                                  image_guidance_scale)
            latents = ancestral_step(latents, eps, row, noise[i])
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.backend.run("vae_decoder", {"latents": latents})["image"]  # [B, 3, H, W]

    # -- the edit -----------------------------------------------------------------------------------------------------

    def __call__(self, image, instruction: str | Sequence[str] | None = None, steps: int = 100,
                 guidance_scale: Guidance = 7.5, image_guidance_scale: Guidance = 1.5, resolution: int = 256,
                 seed: int | Sequence[int] | None = None, img_token_mode: str | None = None,
                 template: int | str = 0, temperature: float = 0.0, progress: bool = False,
                 timings: dict[str, float] | None = None, stop: Callable[[], bool] | None = None):
        """One edit -> PIL image; lists of images and instructions (or a list of (image, instruction) pairs) -> a
        list of PIL images, run as one batch. seed=None draws a seed (the official script draws one per image).
        `seed` and the guidance scales may be one per sample: then each sample draws its own noise from its own
        seed and gets the image it would get alone (up to the batched kernels' rounding).

        `timings`, if given, receives the wall time in ms of each stage (device-synchronised): condition (vision +
        LLM + QFormer + BIM), vae_encode, denoise (all steps), vae_decode, total. `stop`: see denoise.

        Non-finite latents or a non-finite decoded image (a huge guidance can keep the latents finite and still
        overflow the decoder) are a RunError: NaN would otherwise be written as a black image.
        """
        single = not isinstance(image, (list, tuple))
        if instruction is None:
            if single or not all(isinstance(p, tuple) and len(p) == 2 for p in image):
                raise InputError("pass an instruction, or a list of (image, instruction) pairs")
            image, instruction = [p[0] for p in image], [p[1] for p in image]
            single = False
        images = [image] if single else list(image)
        instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        if len(images) != len(instructions) or not images:
            raise InputError(f"got {len(images)} images and {len(instructions)} instructions; need the same, >= 1")
        check_resolution(resolution)
        AncestralPlan.build(steps)  # checks steps before any work
        for name, g in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
            _check_guidance(name, g, len(images))
        pil = [_as_image(x) for x in images]
        if seed is None:
            seed = random.randrange(2**31)
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(images):
                raise InputError(f"got {len(seed)} seeds for {len(images)} images; give one, or one per image")
            generator = [torch.Generator().manual_seed(int(s)) for s in seed]
        else:
            generator = torch.Generator().manual_seed(seed)
        clock = _StageClock(self.device, timings)
        with clock("condition"):
            prompt_embeds, bim_residual = self.encode_condition(pil, instructions, img_token_mode, template,
                                                                temperature, seed)
        with clock("vae_encode"):
            image_latents = self.encode_image(pil, resolution)
        with clock("denoise"):
            latents = self.denoise(prompt_embeds, bim_residual, image_latents, steps, guidance_scale,
                                   image_guidance_scale, generator, progress, stop=stop)
        self._check_finite(latents, f"the latents are not finite after {steps} steps")
        with clock("vae_decode"):
            decoded = self.decode(latents)
        self._check_finite(decoded, "the decoded image is not finite")
        out = postprocess(decoded)
        clock.finish()
        return out[0] if single else out


    def _check_finite(self, x: torch.Tensor, what: str) -> None:
        """RunError naming the samples of x [B, ...] that hold NaN/inf (one sync): they would be written as black or
        white images that look like answers."""
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            raise RunError(f"sample(s) {bad}: {what} on backend {self.backend.name!r} in "
                           f"{precision_of(self.dtype)}: no image written")


def _check_guidance(name: str, g: Guidance, n: int) -> None:
    values = list(g) if isinstance(g, (list, tuple)) else [g]
    if isinstance(g, (list, tuple)) and len(values) != n:
        raise InputError(f"got {len(values)} values of {name} for {n} images; give one, or one per image")
    for v in values:
        check_guidance(name, v)


def _per_sample(g: Guidance, latents: torch.Tensor):
    """One value for the batch -> a float; one per sample -> [B,1,1,1] fp32 (one value repeated -> a float)."""
    if not isinstance(g, (list, tuple)):
        return float(g)
    if len(set(g)) == 1:
        return float(g[0])
    return torch.tensor(g, dtype=torch.float32, device=latents.device).view(-1, 1, 1, 1)


class _StageClock:
    """Wall time per stage in ms, synchronising the device before each reading (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device, sink: dict[str, float] | None):
        import time

        self._now, self.device, self.sink = time.perf_counter, device, sink
        self._start = self._read() if sink is not None else 0.0

    def _read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._now()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sink is None:
            yield
            return
        t0 = self._read()
        yield
        self.sink[name] = (self._read() - t0) * 1e3

    def finish(self) -> None:
        if self.sink is not None:
            self.sink["total"] = (self._read() - self._start) * 1e3
