"""Command-line shells over typed functions: `smartedit-edit` and `smartedit-convert`."""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

import torch

from .arguments import (
    add_denoise_levers,
    add_model_source,
    deepcache,
    guidance_schedule,
    model_source,
    non_negative,
    positive,
    resolution,
)
from .config import RESOLUTION_STEP, RUN_PRECISIONS, check_device, dtype_named
from .edit_options import EditOptions
from .errors import InputError, run_command
from .guidance import DEFAULT_GUIDANCE
from .files import check_writable_parent, open_image, refuse_overwriting_inputs, write_atomic, write_json
from .weights import ModelSource

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _check_output(path: Path, what: str) -> Path:
    """Refuse at once an output the edit could not write (after minutes of work it would be too late)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    check_writable_parent(path, what)
    return path


def _template(text: str) -> str:
    from .mllm import EDIT_TEMPLATES

    if text == "random" or (text.isdigit() and int(text) < len(EDIT_TEMPLATES)):
        return text
    raise argparse.ArgumentTypeError(f"must be 0..{len(EDIT_TEMPLATES) - 1} or 'random', got {text!r}")


def edit(source: ModelSource, image: str, instruction: str, out: str, options: EditOptions = EditOptions(),
         device: str = "cpu", dtype: str = "fp32", progress: bool = True, timings: dict[str, float] | None = None,
         warmup: int = 0, backend: str = "eager", artifacts: str | None = None) -> Path:
    """Run one edit on `backend` and write the image atomically (temp file + rename): a failed run leaves no file.
    `options` were checked when made (before anything loads)."""
    from .pipeline import SmartEditPipeline

    out_path = _check_output(Path(out), "--out")
    if out_path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--out must end in {', '.join(OUTPUT_SUFFIXES)}, got {out_path.name!r}")
    refuse_overwriting_inputs({"--out": out_path}, {"--image": image, "--model": source.model,
                                                    "--artifacts": artifacts})
    device = check_device(device)
    pipe = SmartEditPipeline.on_backend(backend, source, device, dtype_named(dtype), artifacts)
    kwargs = options.pipeline_kwargs()
    for _ in range(warmup):  # untimed: first calls pay for allocator growth, cuDNN/cuBLAS autotuning, capture
        pipe(image, instruction, **kwargs)
    result = pipe(image, instruction, progress=progress, timings=timings, **kwargs)
    buf = io.BytesIO()
    result.save(buf, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(out_path.suffix.lower(), "PNG"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_path, buf.getvalue())


def edit_cli(argv: list[str] | None = None) -> None:
    from .engines.registry import BACKENDS

    p = argparse.ArgumentParser(
        prog="smartedit-edit", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Edit an image from an instruction with SmartEdit, on any backend (default: eager PyTorch).",
        epilog="Example: smartedit-edit --preset tiny --random-weights --image in.png "
               "--instruction 'make it blue' --out out.png --seed 0",
    )
    add_model_source(p)
    p.add_argument("--image", required=True, help="input image file")
    p.add_argument("--instruction", required=True, help='edit instruction, e.g. "make it blue"')
    p.add_argument("--out", required=True, help="output image (.png/.jpg/.webp)")
    p.add_argument("--steps", type=positive, default=EditOptions.steps,
                   help=f"denoising steps (official: {EditOptions.steps})")
    p.add_argument("--resolution", type=resolution, default=EditOptions.resolution,
                   help=f"square output side in px, a multiple of {RESOLUTION_STEP} (official "
                        f"{EditOptions.resolution})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=sorted(RUN_PRECISIONS), default="fp32",
                   help="the precision the graphs run in")
    p.add_argument("--guidance-scale", type=float, default=EditOptions.guidance_scale,
                   help=f"text CFG scale (official {EditOptions.guidance_scale})")
    p.add_argument("--image-guidance-scale", type=float, default=EditOptions.image_guidance_scale,
                   help="image CFG scale (official 1.4/1.5/1.6)")
    p.add_argument("--img-token-mode", choices=["forced", "generate", "stepwise"], default=EditOptions.img_token_mode,
                   help="forced: canonical answer in one pass; generate: decode token by token (official); "
                        "stepwise: the canonical answer fed token by token (the official cost)")
    p.add_argument("--template", type=_template, default="0",
                   help="prompt template index 0-29, or 'random' as the official script")
    p.add_argument("--backend", choices=list(BACKENDS), default="eager",
                   help="; ".join(f"{b.name}: {b.summary}" for b in BACKENDS.values()))
    p.add_argument("--artifacts", help="smartedit-export output folder, for the backends that run exported graphs: "
                   + ", ".join(b.name for b in BACKENDS.values() if b.target))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--timings", metavar="JSON", help="write per-phase wall times (ms, device-synchronised), the "
                   "device and the arguments to this file (see --warmup)")
    p.add_argument("--warmup", type=non_negative, default=0, help="untimed edits before the timed one (with --timings)")
    add_denoise_levers(p)
    a = p.parse_args(argv)
    source = model_source(p, a)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        t0 = time.perf_counter()
        options = EditOptions(a.sampler or source.sampler(), a.steps, a.resolution, a.seed, a.guidance_scale,
                              a.image_guidance_scale, a.img_token_mode,
                              a.template if a.template == "random" else int(a.template), guidance_schedule(a),
                              deepcache(a))  # before anything loads
        phase_ms: dict[str, float] | None = {} if a.timings else None
        if a.timings:
            _check_output(Path(a.timings), "--timings")
            refuse_overwriting_inputs({"--timings": Path(a.timings), "--out": Path(a.out)},
                                      {"--image": a.image, "--model": a.model, "--artifacts": a.artifacts})
        out = edit(source, a.image, a.instruction, a.out, options, a.device, a.precision, progress=not a.quiet,
                   timings=phase_ms, warmup=a.warmup, backend=a.backend, artifacts=a.artifacts)
        where = a.model or f"preset {a.preset} (random weights, seed {a.seed})"
        schedule = options.guidance or DEFAULT_GUIDANCE
        cache = options.deepcache
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s: {where}, backend {a.backend}, {a.precision} on "
              f"{a.device}, {a.resolution} px, {a.steps} steps of {options.sampler}"
              + ("" if schedule.is_default else f", guidance {schedule.describe()} "
                 f"({schedule.evaluations(a.steps)} UNet evaluations, the default {3 * a.steps})")
              + ("" if cache is None else f", DeepCache every {cache.interval} steps")
              + (f", artifacts {a.artifacts}" if a.artifacts and BACKENDS[a.backend].target else ""))
        if phase_ms is not None:
            record = {"phase_ms": phase_ms, "per_step_ms": phase_ms["denoise"] / options.steps,
                      "device": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu",
                      "torch": torch.__version__, "peak_gpu_GB": (torch.cuda.max_memory_allocated() / 2**30
                                                                 if a.device.startswith("cuda") else None),
                      "warmup_edits": a.warmup, "args": sys.argv[1:] if argv is None else argv}
            Path(a.timings).parent.mkdir(parents=True, exist_ok=True)
            write_json(Path(a.timings), record)
            print(" ".join(f"{k} {v:.1f} ms" for k, v in phase_ms.items()))

    run_command("smartedit-edit", body)


def convert_cli(argv: list[str] | None = None) -> None:
    from .checkpoint import convert_official

    p = argparse.ArgumentParser(
        prog="smartedit-convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    run_command("smartedit-convert", lambda: convert_official(
        a.official_dir, a.out_dir, a.preset, a.llava, ip2p_dir=a.ip2p, clip_dir=a.clip, tokenizer_dir=a.tokenizer,
        step=a.step, null_text=a.null_text, overwrite=a.overwrite,
        progress=lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True)))


def tensors_cli(argv: list[str] | None = None) -> None:
    """The C++ runtime's files: its inputs from an image and an instruction, its output image as a PNG."""
    p = argparse.ArgumentParser(
        prog="smartedit-tensors", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Files of the C++ runtime (smartedit-runtime). pack: the inputs of `smartedit-runtime edit` "
                    "from an image and an instruction (the tokenizer and preprocessing of the model folder or "
                    "preset). png: its output tensor `image` ([B,3,R,R], values in [-1, 1]) as PNG files.")
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="image + instruction -> in.safetensors (pixel_values, prefix_ids, suffix_ids, image, "
                             "null_text_embeds)")
    add_model_source(pk, what=": the one the packages were exported from")
    pk.add_argument("--image", required=True, help="input image file")
    pk.add_argument("--instruction", required=True)
    pk.add_argument("--resolution", type=resolution, default=EditOptions.resolution,
                    help="output side in px (the edit's resolution)")
    pk.add_argument("--out", required=True, help="the .safetensors file to write")
    png = sub.add_parser("png", help="smartedit-runtime's image.safetensors -> PNG (one file per batch item)")
    png.add_argument("tensors", help="the .safetensors file smartedit-runtime edit wrote")
    png.add_argument("out", help="output .png (batch item i > 0: NAME-i.png, refused where such a file exists)")
    png.add_argument("--overwrite", action="store_true", help="replace existing NAME-i.png files of batch items i > 0")
    a = p.parse_args(argv)
    source = model_source(pk, a) if a.command == "pack" else None

    def body() -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save

        from .pipeline import SmartEditPipeline
        from .vae import postprocess

        if a.command == "pack":
            out = _check_output(Path(a.out), "--out")
            refuse_overwriting_inputs({"--out": out}, {"--image": a.image, "--model": a.model})
            image = open_image(a.image, "--image")
            pipe = SmartEditPipeline.from_weights(source.load("cpu", torch.float32, only=[]))  # no stage weights
            tensors = pipe.runtime_inputs([image], [a.instruction], resolution=a.resolution)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, save(tensors))
            print(f"wrote {a.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items()))
            return
        refuse_overwriting_inputs({"out": Path(a.out)}, {"tensors": a.tensors})
        try:
            image = load_file(a.tensors).get("image")
        except (SafetensorError, OSError) as e:
            raise InputError(f"{a.tensors}: not a readable safetensors file ({e})") from None
        if image is None or image.dim() != 4 or image.shape[1] != 3:
            raise InputError(f"{a.tensors}: no tensor 'image' of shape [B, 3, H, W] (the output of "
                             "smartedit-runtime edit)")
        if not torch.isfinite(image).all():
            raise InputError(f"{a.tensors}: 'image' holds non-finite values")
        if image.shape[0] == 0:
            raise InputError(f"{a.tensors}: 'image' holds a batch of 0 images: nothing to write")
        out = Path(a.out)
        paths = [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, image.shape[0])]
        for path in paths:  # every output checked before the first is written
            _check_output(path, "out")
        refuse_overwriting_inputs({str(q): q for q in paths}, {"tensors": a.tensors})
        taken = [str(q) for q in paths[1:] if q.exists() or q.is_symlink()]
        if taken and not a.overwrite:
            raise InputError(f"{taken[0]} exists (batch item {paths.index(Path(taken[0]))} of {len(paths)} would "
                             "replace it): choose another out name, or add --overwrite")
        for path, img in zip(paths, postprocess(image)):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, buf.getvalue())
            print(f"wrote {path}")

    run_command("smartedit-tensors", body)


if __name__ == "__main__":  # python -m smartedit.cli (the console scripts are the usual way)
    edit_cli()
