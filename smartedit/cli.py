"""Command-line shells over typed functions: `smartedit-edit` and `smartedit-convert`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _positive_multiple_of_8(text: str) -> int:
    v = int(text)
    if v <= 0 or v % 8:
        raise argparse.ArgumentTypeError(f"resolution must be a positive multiple of 8, got {v}")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


BACKENDS = ("eager", "cudagraph", "compile", "onnxruntime", "trt", "trt-rtx", "aoti")
EXPORTED = ("onnxruntime", "trt", "trt-rtx", "aoti")  # run smartedit-export artifacts, not the PyTorch stages


def load_pipeline(model: str | None, preset: str | None, random_weights: bool, device: str, dtype: torch.dtype,
                  seed: int = 0, backend: str = "eager", artifacts: str | None = None):
    """The pipeline, with its stages on `backend`. Exported backends need no stage weights in PyTorch: only the
    config, tokenizer and null-text embedding are loaded, and the artifacts must come from the same model."""
    from .pipeline import SmartEditPipeline

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend in EXPORTED and not artifacts:
        raise ValueError(f"--backend {backend} runs exported graphs: pass --artifacts OUT (smartedit-export output)")
    if not model and not random_weights:
        raise SystemExit("--preset builds random weights: add --random-weights to say that is what you want, "
                         "or load a converted checkpoint with --model DIR")
    only = [] if backend in EXPORTED else None
    if model:
        pipe = SmartEditPipeline.from_pretrained(model, device=device, dtype=dtype, only=only)
    else:
        pipe = SmartEditPipeline.from_preset(preset, seed=seed, device=device, dtype=dtype, only=only)
    if backend == "onnxruntime":
        from smartedit.engines.onnxruntime import OnnxRuntimeBackend

        pipe.backend = OnnxRuntimeBackend(artifacts)
    elif backend in ("trt", "trt-rtx"):
        from smartedit.engines.trt import TensorRTBackend

        pipe.backend = TensorRTBackend(artifacts, target=backend, device=device)
    elif backend == "aoti":
        from smartedit.engines.aoti import AOTIBackend

        pipe.backend = AOTIBackend(artifacts, device=device)
    elif backend in ("cudagraph", "compile"):
        from smartedit.engines.cudagraph import CudaGraphBackend

        pipe.backend = CudaGraphBackend(pipe, torch_compile=backend == "compile")
    if backend in EXPORTED:
        _check_same_source(pipe.backend.manifest, model, preset, seed)
    return pipe


def _check_same_source(manifest: dict, model: str | None, preset: str | None, seed: int) -> None:
    src = manifest.get("source", {})
    if model:
        from smartedit.export.run import sha256_file

        want = src.get("files", {}).get("config.json")
        if src.get("kind") != "checkpoint" or want != sha256_file(Path(model) / "config.json"):
            raise ValueError(f"the artifacts were exported from {src.get('path') or src}, not from {model}")
    elif src.get("kind") != "random" or (src.get("preset"), src.get("seed")) != (preset, seed):
        raise ValueError(f"the artifacts were exported from {src}, not from preset {preset!r} seed {seed}")


def edit(model: str | None, preset: str | None, random_weights: bool, image: str, instruction: str, out: str,
         steps: int = 100, seed: int = 0, resolution: int = 256, device: str = "cpu", dtype: str = "fp32",
         guidance_scale: float = 7.5, image_guidance_scale: float = 1.5, img_token_mode: str = "forced",
         template: str = "0", progress: bool = True, timings: dict[str, float] | None = None, warmup: int = 0,
         backend: str = "eager", artifacts: str | None = None) -> Path:
    """Run one edit and write the PNG atomically (temp file + rename): a failed run leaves no partial file."""
    out_path = Path(out)
    if out_path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise SystemExit(f"--out must end in .png, .jpg or .webp, got {out_path.name!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA GPU is available here")
    pipe = load_pipeline(model, preset, random_weights, device, DTYPES[dtype], seed, backend, artifacts)
    for _ in range(warmup):  # untimed: first calls pay for allocator growth, cuDNN/cuBLAS autotuning
        pipe(image, instruction, steps=steps, resolution=resolution, seed=seed, img_token_mode=img_token_mode)
    result = pipe(image, instruction, steps=steps, guidance_scale=guidance_scale,
                  image_guidance_scale=image_guidance_scale, resolution=resolution, seed=seed,
                  img_token_mode=img_token_mode, template=template if template == "random" else int(template),
                  progress=progress, timings=timings)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=out_path.suffix, dir=out_path.parent)
    os.close(fd)
    try:
        result.save(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def edit_cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="smartedit-edit",
        description="Edit an image from an instruction with SmartEdit (eager PyTorch reference).",
        epilog="Example: smartedit-edit --preset tiny --random-weights --image in.png "
               "--instruction 'make it blue' --out out.png --seed 0",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a converted SmartEdit folder (smartedit-convert output)")
    src.add_argument("--preset", choices=["tiny", "7b", "13b"], help="build this preset with random weights")
    p.add_argument("--random-weights", action="store_true", help="required with --preset: outputs are noise")
    p.add_argument("--image", required=True, help="input image file")
    p.add_argument("--instruction", required=True, help='edit instruction, e.g. "make it blue"')
    p.add_argument("--out", required=True, help="output image (.png/.jpg/.webp)")
    p.add_argument("--steps", type=_positive, default=100, help="denoising steps (official: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for the noise (and random weights)")
    p.add_argument("--resolution", type=_positive_multiple_of_8, default=256, help="square output size (official 256)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="text CFG scale (official 7.5)")
    p.add_argument("--image-guidance-scale", type=float, default=1.5, help="image CFG scale (official 1.4/1.5/1.6)")
    p.add_argument("--img-token-mode", choices=["forced", "generate"], default="forced",
                   help="forced: canonical answer in one pass (default); generate: decode token by token")
    p.add_argument("--template", default="0", help="prompt template index 0-29, or 'random' as the official script")
    p.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="eager PyTorch (the reference); cudagraph: the denoising loop replayed from a CUDA graph "
                        "(GPU; compile: the UNet torch.compiled too); or exported graphs from --artifacts: "
                        "onnxruntime, trt, trt-rtx (TensorRT backends need a GPU and TensorRT), aoti "
                        "(AOTInductor packages compiled for --device)")
    p.add_argument("--artifacts", help="smartedit-export output folder, for --backend onnxruntime, trt, trt-rtx, aoti")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--timings", metavar="JSON", help="write per-stage wall times (ms, device-synchronised), the "
                   "device and the arguments to this file (see --warmup)")
    p.add_argument("--warmup", type=int, default=0, help="untimed edits before the timed one (with --timings)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    stage_ms: dict[str, float] | None = {} if a.timings else None
    try:
        out = edit(a.model, a.preset, a.random_weights, a.image, a.instruction, a.out, a.steps, a.seed,
                   a.resolution, a.device, a.dtype, a.guidance_scale, a.image_guidance_scale, a.img_token_mode,
                   a.template, progress=not a.quiet, timings=stage_ms, warmup=a.warmup, backend=a.backend,
                   artifacts=a.artifacts)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        print(f"smartedit-edit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    if stage_ms is not None:
        record = {"stage_ms": stage_ms, "per_step_ms": stage_ms["denoise"] / a.steps,
                  "device": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu",
                  "torch": torch.__version__, "peak_gpu_GB": (torch.cuda.max_memory_allocated() / 2**30
                                                             if a.device.startswith("cuda") else None),
                  "warmup_edits": a.warmup, "args": sys.argv[1:] if argv is None else argv}
        Path(a.timings).write_text(json.dumps(record, indent=2) + "\n")
        print(" ".join(f"{k} {v:.1f} ms" for k, v in stage_ms.items()))


def convert_cli(argv: list[str] | None = None) -> None:
    from .checkpoint import convert_official

    p = argparse.ArgumentParser(
        prog="smartedit-convert",
        description="Convert the official SmartEdit release (LLM-<step>/, embeddings_qformer/, modulate-<step>/, "
                    "unet-<step>/) into this project's safetensors layout. The LoRA stays unmerged.",
        epilog="The release alone is not enough: LLaVA-1.1 gives rows 0..31999 of embed_tokens/lm_head (and the "
               "Vicuna tokenizer), CLIP ViT-L/14 the vision tower, InstructPix2Pix the VAE and the null-text "
               "embedding. No root adapter_config.json is needed.",
    )
    p.add_argument("official_dir", help="folder of the official release (e.g. TencentARC/SmartEdit-7B)")
    p.add_argument("out_dir", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--preset", choices=["7b", "13b", "tiny"], required=True)
    p.add_argument("--llava", required=True, help="LLaVA-1.1 folder (transformers weights, *.bin or *.safetensors)")
    p.add_argument("--ip2p", required=True, help="timbrooks/instruct-pix2pix folder (vae/, text_encoder/, tokenizer/)")
    p.add_argument("--clip", help="openai/clip-vit-large-patch14 folder; default: the vision tower inside --llava")
    p.add_argument("--tokenizer", help="Vicuna-1.1 / LLaMA tokenizer folder (32000 ids); default: --llava")
    p.add_argument("--step", type=int, help="training step to convert when the folder holds several")
    p.add_argument("--null-text", help="safetensors file with the [1,77,768] embedding of \"\" (skips the encoder)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        convert_official(a.official_dir, a.out_dir, a.preset, a.llava, ip2p_dir=a.ip2p, clip_dir=a.clip,
                         tokenizer_dir=a.tokenizer, step=a.step, null_text=a.null_text, overwrite=a.overwrite,
                         progress=lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True))
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"smartedit-convert: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
