"""Checkpoints: our layout (safetensors per stage) and conversion from the official SmartEdit release.

Our layout (written by `save_pretrained` and `smartedit-convert`):
    DIR/config.json              SmartEditConfig + {"format": "smartedit", "format_version", "random_weights", "source"}
    DIR/tokenizer/               LLaMA tokenizer with the 35 SmartEdit tokens
    DIR/<stage>.safetensors      vision, llm (LoRA unmerged), qformer, bim, unet, vae
    DIR/null_text.safetensors    {"null_text_embeds": [1, 77, 768]}: CLIP text embedding of "" (IP2P's text encoder)
    DIR/sampler.json             the sampler and its diffusers config (smartedit.scheduler); absent: EulerAncestral

Official release (HF TencentARC/SmartEdit-7B / -13B):
    LLM-<step>/adapter_model.bin                             whole PEFT-wrapped LLaMA (base + lora_A/B + embed_tokens)
    embeddings_qformer/checkpoint-<step>_embeddings_qformer.bin   sd_query_tokens, sd_qformer.*, mm_projector.*, lm_head
    modulate-<step>/adapter_model.bin                        BIM (our attribute names)
    unet-<step>/adapter_model.bin                            unet.<diffusers key>
and, from elsewhere: the CLIP ViT-L/14 vision tower, rows 0..31999 of embed_tokens / lm_head (LLaVA-1.1), the
Vicuna tokenizer, the VAE and the null-text embedding (InstructPix2Pix). All .bin files are read with
torch.load(weights_only=True): a pickle that needs code to load is refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import BASE_VOCAB_SIZE, SmartEditConfig
from .errors import CheckpointError, InputError
from .files import read_json, refuse_overwriting_inputs, staged, write_json
from .model import STAGE_NAMES, build_stages
from .qformer import official_qformer_key
from .scheduler import DEFAULT_SAMPLER, Sampler, sampler_from_record

log = logging.getLogger(__name__)

FORMAT = "smartedit"
FORMAT_VERSION = 1
STAGE_FILES = STAGE_NAMES  # <stage>.safetensors
NULL_TEXT_FILE = "null_text.safetensors"
SAMPLER_FILE = "sampler.json"  # outside the files an export hashes: changing the sampler changes no graph


# ---------------------------------------------------------------------------------------------------------------------
# Reading and checking state dicts


@contextlib.contextmanager
def open_safetensors(path: Path):
    """safe_open whose errors (a header of 2^62 bytes, offsets past the end, a shape whose size overflows, a pickle
    under a .safetensors name) are a CheckpointError naming the file; the header is read, no data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A .bin / .pt with weights_only=True (never runs pickled code), or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # not a zip archive (legacy torch.save format): mmap is impossible, plain read
            if "mmap" not in str(e):
                raise CheckpointError(f"cannot read {path}: {e}") from None
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # pickle.UnpicklingError and friends
        raise CheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint (weights_only=True failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Loading it would run code from the file."
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return sd


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: they would reach the image as black pixels."""
    for k, v in tensors.items():  # aminmax: one pass, no temporary, NaN propagates (~30x isfinite().all() on CPU)
        if v.is_floating_point() and v.numel() and not all(math.isfinite(float(x)) for x in torch.aminmax(v)):
            raise CheckpointError(f"{where}: tensor {k!r} holds non-finite values (NaN or inf)")


def check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor] | dict[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches (key, expected, found).

    `sd` maps keys to tensors, or to bare shapes (a safetensors header, read without loading any data).
    """
    expected = module.state_dict()
    found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in sd.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [(k, tuple(expected[k].shape), found[k]) for k in expected
              if k in found and found[k] != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append("shape mismatches (key, expected, found): " + _few([f"{k} {a} vs {b}" for k, a, b in shapes]))
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def stage_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) of a stage file, from its header alone (no data read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    with open_safetensors(path) as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def check_stage_header(module: nn.Module, path: Path) -> None:
    """Keys, shapes and dtypes of a stage file against `module` (which may live on the meta device): run before
    anything is allocated, so a 7b config over tiny weights or a config with absurd sizes costs nothing."""
    header = stage_header(path)
    check_state_dict(module, {k: shape for k, (_, shape) in header.items()}, str(path))
    bad = [f"{k} ({dt})" for k, (dt, _) in header.items() if dt not in FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{path}: weights must be floating point ({', '.join(sorted(FLOAT_DTYPES))}), "
                              f"got {_few(bad)}")


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def load_stage(module: nn.Module, path: Path) -> None:
    """Check a stage file's keys, shapes and dtypes from its header, then copy it in one tensor at a time, refusing
    a non-finite one.

    Peak host memory is the module plus one tensor (a 7b LLM file is 13.5 GB in fp16), and the copy goes straight
    to wherever the module was built (e.g. the GPU), casting to the module's dtype.
    """
    check_stage_header(module, path)
    with open_safetensors(path) as f:
        targets = module.state_dict(keep_vars=True)
        with torch.no_grad():
            for k in f.keys():
                targets[k].copy_(f.get_tensor(k))
                check_finite({k: targets[k]}, str(path))  # after the cast: fp32 weights past 65504 are inf in fp16


def save_stage(module: nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    sd = module.state_dict() if isinstance(module, nn.Module) else module
    # safetensors refuses shared storage and non-contiguous views: store plain copies
    save_file({k: v.detach().contiguous().clone() if _shares(v) else v.detach().contiguous()
               for k, v in sd.items()}, str(path))


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------------------------------
# Atomic folder writes


def write_folder_atomically(out_dir: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run write(tmp) on a temporary sibling folder, then rename it to out_dir: a failure leaves nothing behind."""
    check_output_folder(out_dir, overwrite)
    with staged(out_dir, folder=True) as tmp:
        write(tmp)
    return out_dir


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """A model folder may be written to a new or empty folder, or (overwrite) over a SmartEdit model folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output folder {out_dir} exists and is not a folder")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held and not overwrite:
        raise CheckpointError(f"output folder {out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    if held and not _is_model_folder(out_dir):  # --overwrite replaces a model folder, never a user's files
        raise CheckpointError(f"output folder {out_dir} is not a SmartEdit model folder (it holds {_few(held, 4)}): "
                              "--overwrite replaces only a folder this project wrote; choose an empty folder")


def _is_model_folder(path: Path) -> bool:
    try:
        return read_json(path / "config.json", CheckpointError).get("format") == FORMAT
    except (CheckpointError, OSError):
        return False


def write_config(path: Path, cfg: SmartEditConfig, random_weights: bool, source: dict[str, Any]) -> None:
    d = {"format": FORMAT, "format_version": FORMAT_VERSION, "random_weights": random_weights, "source": source,
         **cfg.to_dict()}
    write_json(path, d)


def write_sampler(model_dir: Path, sampler: Sampler) -> None:
    write_json(Path(model_dir) / SAMPLER_FILE, sampler.record())


def read_sampler(model_dir: Path) -> str:
    """The sampler a model folder records (its name); a folder without the file runs the official EulerAncestral."""
    path = Path(model_dir) / SAMPLER_FILE
    if not path.exists():
        return DEFAULT_SAMPLER
    try:
        return sampler_from_record(read_json(path, CheckpointError), str(path)).name
    except CheckpointError:
        raise
    except InputError as e:
        raise CheckpointError(str(e)) from None


def read_config(model_dir: Path) -> tuple[SmartEditConfig, dict[str, Any]]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a SmartEdit model folder: missing {path.name} "
                              "(convert the official release with `smartedit-convert` first)")
    d = read_json(path, CheckpointError)
    if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {d.get('format')!r} v{d.get('format_version')}, expected "
                              f"{FORMAT!r} v{FORMAT_VERSION}")
    meta = {k: d.pop(k) for k in ("format", "format_version", "random_weights", "source") if k in d}
    return SmartEditConfig.from_dict(d), meta


# ---------------------------------------------------------------------------------------------------------------------
# The official release -> our stage state dicts


def find_step(official_dir: Path, step: int | None = None) -> int:
    """The training step shared by LLM-<step>/, modulate-<step>/, unet-<step>/ and the QFormer file."""
    official_dir = Path(official_dir)
    if not official_dir.is_dir():
        raise CheckpointError(f"official checkpoint folder {official_dir} does not exist")
    found: dict[str, set[int]] = {}
    for prefix in ("LLM", "modulate", "unet"):
        found[prefix] = {int(m.group(1)) for p in official_dir.iterdir()
                         if (m := re.fullmatch(rf"{prefix}-(\d+)", p.name)) and p.is_dir()}
    qdir = official_dir / "embeddings_qformer"
    found["embeddings_qformer"] = {int(m.group(1)) for p in (qdir.iterdir() if qdir.is_dir() else [])
                                   if (m := re.fullmatch(r"checkpoint-(\d+)_embeddings_qformer\.bin", p.name))}
    common = set.intersection(*found.values())
    if step is not None:
        if step not in common:
            raise CheckpointError(f"step {step} is not complete in {official_dir}: found {found}")
        return step
    if not common:
        missing = [k for k, v in found.items() if not v]
        raise CheckpointError(
            f"{official_dir} is not an official SmartEdit release: no training step common to all four parts "
            f"(found {found}; missing {missing}). Expected LLM-<step>/adapter_model.bin, "
            "embeddings_qformer/checkpoint-<step>_embeddings_qformer.bin, modulate-<step>/adapter_model.bin, "
            "unet-<step>/adapter_model.bin"
        )
    if len(common) > 1:
        raise CheckpointError(f"several complete steps in {official_dir}: {sorted(common)}; choose one with --step")
    return common.pop()


def official_paths(official_dir: Path, step: int) -> dict[str, Path]:
    d = Path(official_dir)
    return {
        "llm": d / f"LLM-{step}" / "adapter_model.bin",
        "qformer": d / "embeddings_qformer" / f"checkpoint-{step}_embeddings_qformer.bin",
        "bim": d / f"modulate-{step}" / "adapter_model.bin",
        "unet": d / f"unet-{step}" / "adapter_model.bin",
    }


def load_hf_weights(model_dir: Path, what: str, keep: Callable[[str], bool] = lambda k: True
                    ) -> dict[str, torch.Tensor]:
    """The tensors whose key passes `keep` from a transformers/diffusers folder: *.safetensors, else *.bin shards.

    Only kept tensors are read: a 7b LLaVA folder is 13.5 GB, of which conversion needs embed_tokens, lm_head and
    (when it embeds one) the vision tower. safetensors are opened lazily; .bin shards are memory-mapped.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{what} folder {model_dir} does not exist")
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    files = [f for f in files if f.name != "training_args.bin"]
    if not files:
        raise CheckpointError(f"no *.safetensors or *.bin weights in {what} folder {model_dir}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with open_safetensors(f) as handle:
                sd.update({k: handle.get_tensor(k) for k in handle.keys() if keep(k)})
        else:
            sd.update({k: v for k, v in load_torch_file(f).items() if keep(k)})
    return sd


def convert_llm(llm_sd: dict[str, torch.Tensor], qformer_sd: dict[str, torch.Tensor],
                llava_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLM-<step> + QFormer file (lm_head) + LLaVA rows -> SmartEditLLM state dict (LoRA kept as peft layers).

    Official: load_pretrained_LLaMA_for_inference (DS_SmartEdit_model.py:307-321): embed_tokens from LLM-<step>, rows
    [:-35] reset to LLaVA's; load_pretrained_for_inference (:325-352): lm_head rows [-35:] from the QFormer file,
    rows [:-35] from LLaVA.
    """
    prefix = "model.base_model.model."
    out: dict[str, torch.Tensor] = {}
    for k, v in llm_sd.items():
        if not k.startswith(prefix):
            raise CheckpointError(f"unexpected key in LLM-<step>/adapter_model.bin: {k!r} (expected {prefix}*)")
        k = k[len(prefix):]
        if k.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by transformers from rope_theta
        k = re.sub(r"\.(q_proj|v_proj)\.weight$", r".\1.base_layer.weight", k)
        k = re.sub(r"\.(q_proj|v_proj)\.bias$", r".\1.base_layer.bias", k)
        out["model." + k] = v
    emb = out.get("model.embed_tokens.weight")
    if emb is None:
        raise CheckpointError("LLM-<step>/adapter_model.bin has no embed_tokens.weight")
    llava_emb = _llava_tensor(llava_sd, "embed_tokens.weight")
    llava_head = _llava_tensor(llava_sd, "lm_head.weight")
    head = qformer_sd.get("lm_head.weight")
    if head is None:
        raise CheckpointError("the embeddings_qformer checkpoint has no lm_head.weight")
    n_new = emb.shape[0] - BASE_VOCAB_SIZE
    emb = emb.clone()
    emb[:BASE_VOCAB_SIZE] = llava_emb[:BASE_VOCAB_SIZE].to(emb.dtype)
    new_head = torch.empty(emb.shape[0], head.shape[1], dtype=head.dtype)
    new_head[:BASE_VOCAB_SIZE] = llava_head[:BASE_VOCAB_SIZE].to(head.dtype)
    new_head[BASE_VOCAB_SIZE:] = head[-n_new:]
    out["model.embed_tokens.weight"] = emb
    out["lm_head.weight"] = new_head
    return out


def _llava_tensor(llava_sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    for k in (f"model.{name}", name):
        if k in llava_sd:
            return llava_sd[k]
    raise CheckpointError(f"the LLaVA-1.1 weights have no {name} (looked for model.{name} and {name})")


def convert_vision(clip_sd: dict[str, torch.Tensor], qformer_sd: dict[str, torch.Tensor], n_layers_used: int
                   ) -> dict[str, torch.Tensor]:
    """CLIP ViT weights (a CLIPVisionModel / CLIPModel folder, or LLaVA's embedded tower) + mm_projector."""
    out: dict[str, torch.Tensor] = {}
    nested = any("vision_model." in k for k in clip_sd)  # CLIPModel / older CLIPVisionModel keep `vision_model.`
    for k, v in clip_sd.items():
        m = re.search(r"vision_model\.(.*)$", k) if nested else re.match(
            r"((?:embeddings|pre_layrnorm|encoder|post_layernorm)\..*)$", k)
        if not m or ("text_model" in k):
            continue
        rest = m.group(1)
        if rest == "embeddings.position_ids":
            continue  # a persistent buffer in older transformers saves; recomputed (non-persistent) now
        layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
        if layer and int(layer.group(1)) >= n_layers_used:
            continue  # layers after the selected one are never computed (vision.py)
        out["clip." + rest] = v
    if not out:
        raise CheckpointError("no CLIP vision weights (keys containing 'vision_model.') in the given CLIP folder")
    for p in ("weight", "bias"):
        key = f"mm_projector.{p}"
        if key not in qformer_sd:
            raise CheckpointError(f"the embeddings_qformer checkpoint has no {key}")
        out[key] = qformer_sd[key]
    return out


def convert_qformer(qformer_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in qformer_sd.items():
        if k in ("mm_projector.weight", "mm_projector.bias", "lm_head.weight") or k.endswith("embed_tokens.weight"):
            continue  # consumed by convert_vision / convert_llm, or dropped (official loader pops it)
        new = official_qformer_key(k)
        if new is not None:
            out[new] = v
    return out


def convert_unet(unet_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bad = [k for k in unet_sd if not k.startswith("unet.")]
    if bad:
        raise CheckpointError(f"unexpected keys in unet-<step>/adapter_model.bin (expected unet.*): {_few(bad)}")
    return dict(unet_sd)  # our SmartEditUNet keeps diffusers' UNet under `unet.`: same keys


def null_text_from_ip2p(ip2p_dir: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CLIP text embedding of "" with IP2P's own text encoder and tokenizer -> [1, 77, 768] (computed once, here)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    ip2p_dir = Path(ip2p_dir)
    for sub in ("text_encoder", "tokenizer"):
        if not (ip2p_dir / sub).is_dir():
            raise CheckpointError(f"missing {ip2p_dir / sub} (the InstructPix2Pix folder keeps its {sub} there); "
                                  "or pass the embedding itself with --null-text FILE")
    tok = CLIPTokenizer.from_pretrained(ip2p_dir / "tokenizer")
    enc = CLIPTextModel.from_pretrained(ip2p_dir / "text_encoder", torch_dtype=dtype).eval()
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return enc(ids.input_ids).last_hidden_state  # [1, 77, 768]


def iter_missing(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths if not Path(p).is_file()]


# ---------------------------------------------------------------------------------------------------------------------
# smartedit-convert


def convert_official(official_dir: str | Path, out_dir: str | Path, preset: str, llava_dir: str | Path,
                     ip2p_dir: str | Path | None = None, clip_dir: str | Path | None = None,
                     tokenizer_dir: str | Path | None = None, step: int | None = None,
                     null_text: str | Path | None = None, overwrite: bool = False,
                     progress: Callable[[str], None] = log.info) -> Path:
    """Official release (+ LLaVA-1.1, CLIP, InstructPix2Pix) -> our layout in out_dir, written atomically.

    Every stage is checked against the preset's shapes before anything is written: a mismatch names the key, the
    expected and the found shape. The LoRA stays unmerged (merging is the export's job).
    """
    from transformers import AutoTokenizer

    from .tokenizer import add_smartedit_tokens

    cfg = SmartEditConfig.from_name(preset)
    official_dir = Path(official_dir)
    refuse_overwriting_inputs({"output folder": Path(out_dir)}, {
        "release": official_dir, "--llava": llava_dir, "--ip2p": ip2p_dir, "--clip": clip_dir,
        "--tokenizer": tokenizer_dir, "--null-text": null_text})
    check_output_folder(Path(out_dir), overwrite)
    step = find_step(official_dir, step)
    paths = official_paths(official_dir, step)
    missing = iter_missing(paths.values())
    if missing:
        raise CheckpointError(f"missing official checkpoint files: {', '.join(map(str, missing))}")
    if ip2p_dir is None:
        raise CheckpointError("the VAE comes from InstructPix2Pix (timbrooks/instruct-pix2pix): pass --ip2p DIR")
    progress(f"official release at {official_dir}, step {step}")

    tok_dir = Path(tokenizer_dir or llava_dir)
    try:
        tokenizer = add_smartedit_tokens(AutoTokenizer.from_pretrained(tok_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the LLaMA tokenizer from {tok_dir}: {e}") from e

    progress("reading LLaVA-1.1 weights")
    def is_vision(k: str) -> bool:
        return "vision_model." in k or (clip_dir is not None and "text_model" not in k)

    llava_sd = load_hf_weights(Path(llava_dir), "LLaVA-1.1", keep=lambda k: k.endswith(
        ("embed_tokens.weight", "lm_head.weight")) or (clip_dir is None and is_vision(k)))
    clip_sd = load_hf_weights(Path(clip_dir), "CLIP ViT-L/14", keep=is_vision) if clip_dir else llava_sd
    progress(f"reading {paths['qformer'].name}")
    qformer_sd = load_torch_file(paths["qformer"])
    stage_sds: dict[str, dict[str, torch.Tensor]] = {}
    progress(f"reading {paths['llm'].relative_to(official_dir)} (the whole LLaMA; large)")
    stage_sds["llm"] = convert_llm(load_torch_file(paths["llm"]), qformer_sd, llava_sd)
    stage_sds["vision"] = convert_vision(clip_sd, qformer_sd, cfg.vision.num_layers_used)
    stage_sds["qformer"] = convert_qformer(qformer_sd)
    progress(f"reading {paths['bim'].relative_to(official_dir)}")
    stage_sds["bim"] = load_torch_file(paths["bim"])
    progress(f"reading {paths['unet'].relative_to(official_dir)}")
    stage_sds["unet"] = convert_unet(load_torch_file(paths["unet"]))
    progress("reading the InstructPix2Pix VAE")
    stage_sds["vae"] = {"vae." + k: v for k, v in _ip2p_vae_state_dict(Path(ip2p_dir)).items()}
    # shapes only: modules on the meta device cost no memory
    stages = build_stages(cfg, "meta", torch.float32, init=False)
    for name, module in stages.items():
        check_state_dict(module, stage_sds[name], f"{name} (preset {preset!r})")

    if null_text is not None:
        nt = load_torch_file(Path(null_text))
        if len(nt) != 1:
            raise CheckpointError(f"{null_text} must hold exactly one tensor (the [1, 77, D] embedding of \"\")")
        null = next(iter(nt.values()))
    else:
        progress("computing the null-text embedding with InstructPix2Pix's CLIP text encoder")
        null = null_text_from_ip2p(Path(ip2p_dir))
    want = (1, cfg.qformer.num_queries, cfg.qformer.hidden_size)
    if tuple(null.shape) != want:
        raise CheckpointError(f"null-text embedding has shape {tuple(null.shape)}, expected {want}")

    source = {"official_dir": str(official_dir.resolve()), "step": step, "preset": preset,
              "llava_dir": str(Path(llava_dir).resolve()), "ip2p_dir": str(Path(ip2p_dir).resolve()),
              "clip_dir": str(Path(clip_dir).resolve()) if clip_dir else None,
              "files": {k: {"path": str(p.relative_to(official_dir)), "bytes": p.stat().st_size}
                        for k, p in paths.items()}}

    def write(tmp: Path) -> None:
        write_config(tmp / "config.json", cfg, random_weights=False, source=source)
        tokenizer.save_pretrained(tmp / "tokenizer")
        for name in STAGE_FILES:
            progress(f"writing {name}.safetensors")
            save_stage(stage_sds[name], tmp / f"{name}.safetensors")
        save_stage({"null_text_embeds": null.detach().float().cpu()}, tmp / NULL_TEXT_FILE)

    out = write_folder_atomically(Path(out_dir), write, overwrite=overwrite)
    progress(f"wrote {out}")
    return out


def _ip2p_vae_state_dict(ip2p_dir: Path) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL

    vae_dir = ip2p_dir / "vae"
    if not vae_dir.is_dir():
        raise CheckpointError(f"missing {vae_dir} (the InstructPix2Pix folder keeps its VAE there)")
    # diffusers reads safetensors or weights_only .bin and renames the keys of older diffusers releases
    return AutoencoderKL.from_pretrained(vae_dir).state_dict()
