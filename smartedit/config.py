"""Configs for every SmartEdit stage, with the presets "7b", "13b" (official dimensions) and "tiny" (CPU tests).

The 7b and 13b dimensions are the official release's (its config files and the official code's constructors). The
"tiny" preset is fixed, so that tests and outside tools can build tiny checkpoints in the official layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, UnavailableError

# Token ids of the 35 tokens SmartEdit adds to the 32000-token LLaMA vocabulary (official DS_SmartEdit_model.py:84-113).
BASE_VOCAB_SIZE = 32000
IMG_TOKEN_ID = 32000  # "<img>", named in the system prompt, never generated
IM_START_ID = 32001  # "<im_start>"
IM_END_ID = 32002  # "<im_end>"
IMG_START_ID = 32003  # "<img_0>"; "<img_i>" = 32003 + i
NUM_IMG_TOKENS = 32  # the hidden states of <img_0>..<img_31> feed the QFormer
VOCAB_SIZE = BASE_VOCAB_SIZE + 3 + NUM_IMG_TOKENS  # 32035


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT (transformers CLIPVisionModel); LLaVA-1.1 uses ViT-L/14 at 224 px, penultimate layer, CLS dropped."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 224
    patch_size: int = 14
    select_layer: int = -2  # LLaVA mm_vision_select_layer: hidden_states[-2] = output of layer num_layers - 1
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 256 at 224/14

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size  # 16

    @property
    def num_layers_used(self) -> int:
        # hidden_states[0] is the embedding output, so hidden_states[-2] is after layer num_layers - 1
        return self.num_layers + 1 + self.select_layer


@dataclass(frozen=True)
class LLMConfig:
    """LLaMA (Vicuna-1.1 / LLaVA-1.1) with the 35 SmartEdit tokens and the q/v LoRA of the release."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = VOCAB_SIZE
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # LoRA of the release (train/DS_SmartEdit_train.py:466-485): r 8, alpha 16, q_proj/v_proj. 0 = no LoRA (merged).
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 Q-Former (LAVIS copy in the release), built as transformers Blip2QFormerModel, randomly initialised."""

    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2  # cross-attention in layers 0, 2, 4
    num_queries: int = 77  # stands in for the 77 CLIP text tokens of SD-1.5
    layer_norm_eps: float = 1e-12  # bert-base-uncased


@dataclass(frozen=True)
class BIMConfig:
    """Bidirectional Interaction Module: SAM's two-way transformer between the queries and the CLIP patch grid."""

    dim: int = 1024  # = vision hidden size (the image side is the raw CLIP feature, before mm_projector)
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2  # cross-attention runs at dim / 2
    num_pos_feats: int = 512  # random-Fourier features; the PE has 2 * num_pos_feats = dim channels


@dataclass(frozen=True)
class UNetConfig:
    """SD-1.5 UNet (diffusers UNet2DConditionModel) with InstructPix2Pix's 8 input channels."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    attention_head_dim: int = 8
    cross_attention_dim: int = 768
    in_channels: int = 8  # 4 noisy latent + 4 image latent
    out_channels: int = 4

    def diffusers_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return dict(
            sample_size=64,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            attention_head_dim=self.attention_head_dim,
            cross_attention_dim=self.cross_attention_dim,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        )


@dataclass(frozen=True)
class VAEConfig:
    """SD-1.5 / InstructPix2Pix VAE (diffusers AutoencoderKL); 4 latent channels, downsampling factor 8."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    scaling_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            latent_channels=self.latent_channels,
            scaling_factor=self.scaling_factor,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            sample_size=512,
        )


@dataclass(frozen=True)
class Precision:
    """One precision, everywhere in the project (flags, manifests, specs): what its graphs take and give, whether
    smartedit-export builds it, how it quantizes and what runs it. A quantized precision quantizes the per-step graph
    (the UNet) to a Q/DQ graph with NVIDIA Model Optimizer's ONNX quantizer; its inputs and outputs, its layers kept
    high and the other graphs are in `dtype`. TensorRT builds every precision from a strongly typed network (the ONNX
    graph's own types, its Q/DQ nodes included), so a row asks of TensorRT only `min_capability`."""

    name: str
    dtype: torch.dtype  # the graphs' float inputs and outputs, and every layer not quantized
    exported: bool = True  # smartedit-export builds it (bf16: eager PyTorch only)
    quantize_mode: str | None = None  # Model Optimizer's quantize_mode for the UNet; None: nothing quantized
    calibrators: tuple[str, ...] = ()  # Model Optimizer's activation calibrators it takes, its default first
    min_capability: int | None = None  # the lowest CUDA compute capability with its tensor cores (89: 8.9); None: any
    onnxruntime_basic: bool = False  # ONNX Runtime optimises its graph up to BASIC only

    def __post_init__(self) -> None:
        if self.quantized != bool(self.calibrators):
            raise ValueError(f"precision {self.name}: a quantized precision names its calibrators, another none")

    @property
    def quantized(self) -> bool:
        return self.quantize_mode is not None

    @property
    def unquantized(self) -> "Precision":
        """What its graphs are exported in before the UNet is quantized, and what its other graphs stay in: the
        exported precision of its dtype that quantizes nothing (int8 -> fp16); itself when it quantizes nothing."""
        return next(p for p in PRECISIONS.values() if p.dtype == self.dtype and p.exported and not p.quantized)


# The one table of precisions: adding one is a row here (and, if it quantizes, its quantizer's code).
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", torch.float32),
    Precision("fp16", torch.float16),
    Precision("bf16", torch.bfloat16, exported=False),
    Precision("int8", torch.float16, quantize_mode="int8", calibrators=("entropy", "max")),
    # FP8 E4M3 tensor cores: Ada (SM89) and newer. ONNX Runtime 1.31's extended fusions reject FP8 Q/DQ graphs.
    Precision("fp8", torch.float16, quantize_mode="fp8", calibrators=("max",), min_capability=89,
              onnxruntime_basic=True),
)}
EXPORT_PRECISIONS = tuple(n for n, p in PRECISIONS.items() if p.exported)  # smartedit-export --precision
QUANTIZED_PRECISIONS = tuple(n for n, p in PRECISIONS.items() if p.quantized)  # the UNet quantized
RUN_PRECISIONS = tuple(n for n, p in PRECISIONS.items() if not p.quantized)  # a pipeline's dtype (edit, bench, serve)


def precision_named(name: str) -> Precision:
    if name not in PRECISIONS:
        raise InputError(f"unknown precision {name!r}; choose one of {list(PRECISIONS)}")
    return PRECISIONS[name]


def dtype_named(name: str) -> torch.dtype:
    """The dtype a pipeline runs in (smartedit-edit, -bench, -serve --precision): a precision quantizing nothing."""
    if name not in RUN_PRECISIONS:
        raise InputError(f"unknown precision {name!r} to run in; choose one of {sorted(RUN_PRECISIONS)}")
    return PRECISIONS[name].dtype


def precision_of(dtype: torch.dtype) -> str:
    return next(k for k in RUN_PRECISIONS if PRECISIONS[k].dtype == dtype)


# Image sides are multiples of 64 px on every backend: latents are pixels / 8, and SD's UNet halves them three
# times (an exported graph's latent dims are 8 * h8). Eager PyTorch could take multiples of 8 (diffusers resizes its
# skip connections), but then an edit that works eagerly would fail on every exported backend.
RESOLUTION_STEP = 64
MAX_RESOLUTION = 4096  # 64 MB of fp32 image; beyond it the VAE's activations run to tens of GB


# The edit's defaults, the official test script's: every command, the pipeline and the server take them from here.
DEFAULT_STEPS = 100
DEFAULT_RESOLUTION = 256
DEFAULT_GUIDANCE_SCALE = 7.5  # text
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.5  # image (the official script sweeps 1.4 / 1.5 / 1.6)
DEFAULT_SEED = 0  # of the edit's noise
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def derived_seed(seed: int, stream: int) -> int:
    """The seed of a preset's stream `stream` (0..99: a stage's random weights) drawn from `seed`: seed * 100 + stream,
    wrapped into 0..MAX_SEED so that every seed check_seed accepts draws."""
    return (seed * 100 + stream) % (MAX_SEED + 1)


def check_seed(value: object, name: str = "seed") -> int:
    """A seed of the edit's noise: an integer in 0..MAX_SEED (InputError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InputError(f"{name} must be an integer in 0..2^63-1, got {value!r}")
    return value


# Guidance scales: the official edit uses 7.5 (text) and 1.5 (image) and images saturate well before 50; past this
# bound a step's eps (~1e1 x 1e3 in fp32) gets near fp16's 65504 and the decoded image turns non-finite (3e38 did).
GUIDANCE_LIMIT = 1000.0


def check_guidance(name: str, value: object) -> float:
    """A guidance scale: a finite number within +-GUIDANCE_LIMIT (InputError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if abs(value) > GUIDANCE_LIMIT:
        raise InputError(f"{name} must be within +-{GUIDANCE_LIMIT:g}, got {value:.6g}")
    return float(value)


def check_device(text: str) -> str:
    """A device argument this machine has: "cpu", "cuda", "cuda:N" (bad spelling: InputError; no GPU here:
    UnavailableError), checked before any model is built."""
    try:
        d = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise InputError(f"--device {text!r}: smartedit runs on cpu or cuda, not {d.type}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UnavailableError(f"--device {text}: no CUDA GPU is usable here (torch {torch.__version__})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


def check_resolution(px: int, what: str = "resolution") -> int:
    if isinstance(px, bool) or not isinstance(px, int) or px < RESOLUTION_STEP or px % RESOLUTION_STEP \
            or px > MAX_RESOLUTION:
        raise InputError(f"{what} must be a multiple of {RESOLUTION_STEP} px between {RESOLUTION_STEP} and "
                         f"{MAX_RESOLUTION}, got {px!r}")
    return px


# timbrooks/instruct-pix2pix scheduler/scheduler_config.json (EulerAncestralDiscreteScheduler)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)


MAX_CONFIG_INT = 1 << 17  # above every size of the 13b model (vocab 32035, FFN 13824, hidden 5120)
SIGNED_FIELDS = {"vision.select_layer"}  # counts from the end when negative


def _checked_field(name: str, value: Any, default: Any) -> Any:
    """A config.json value of the default's type, in range: the sizes of a model folder are not trusted."""
    def bad(why: str) -> InputError:
        return InputError(f"config field {name} = {value!r}: {why}")

    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not value:
            raise bad("expected a non-empty list")
        return tuple(_checked_field(f"{name}[{i}]", v, default[0]) for i, v in enumerate(value))
    if isinstance(default, bool) or isinstance(default, str):
        if type(value) is not type(default):
            raise bad(f"expected a {type(default).__name__}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("expected an integer")
        low = -MAX_CONFIG_INT if name in SIGNED_FIELDS else 1
        if not low <= value <= MAX_CONFIG_INT:
            raise bad(f"expected {low}..{MAX_CONFIG_INT}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise bad("expected a finite number > 0")
        return float(value)
    return value


@dataclass(frozen=True)
class SmartEditConfig:
    name: str = "7b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    bim: BIMConfig = field(default_factory=BIMConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    def __post_init__(self) -> None:
        # The cross-stage contracts; a mismatch here means a config that cannot run, so fail at construction.
        checks = {
            "bim.dim == vision.hidden_size (BIM image side is the raw CLIP feature)": self.bim.dim
            == self.vision.hidden_size,
            "2 * bim.num_pos_feats == bim.dim (random-Fourier PE width)": 2 * self.bim.num_pos_feats == self.bim.dim,
            "qformer.hidden_size == unet.cross_attention_dim (QFormer output is the UNet text condition)": (
                self.qformer.hidden_size == self.unet.cross_attention_dim
            ),
            "bim.dim % bim.num_heads == 0": self.bim.dim % self.bim.num_heads == 0,
            "llm.hidden_size % llm.num_heads == 0": self.llm.hidden_size % self.llm.num_heads == 0,
            "vision.image_size % vision.patch_size == 0": self.vision.image_size % self.vision.patch_size == 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"inconsistent SmartEdit config {self.name!r}: " + "; ".join(bad))

    @property
    def unet_residual_channels(self) -> int:
        return self.unet.block_out_channels[0]  # conv_in output width: 320 in SD-1.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SmartEditConfig":
        subs = {"vision": VisionConfig, "llm": LLMConfig, "qformer": QFormerConfig, "bim": BIMConfig,
                "unet": UNetConfig, "vae": VAEConfig}
        kwargs: dict[str, Any] = {"name": d.get("name", "custom")}
        for key, sub in subs.items():
            raw = dict(d.get(key, {}))
            known = {f.name: f for f in dataclasses.fields(sub)}
            unknown = sorted(set(raw) - set(known))
            if unknown:
                raise InputError(f"config section {key!r} has unknown fields {unknown}")
            default = sub()
            for k, v in raw.items():
                raw[k] = _checked_field(f"{key}.{k}", v, getattr(default, k))
            kwargs[key] = sub(**raw)
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SmartEditConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_name(cls, name: str) -> "SmartEditConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, SmartEditConfig] = {
    "7b": SmartEditConfig(name="7b"),
    # LLaVA-13B = LLaMA-13B: hidden 5120, 40 layers, 40 heads, FFN 13824; the QFormer's cross-attention k/v read 5120.
    "13b": SmartEditConfig(
        name="13b",
        llm=LLMConfig(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824),
    ),
    "tiny": SmartEditConfig(
        name="tiny",
        vision=VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        llm=LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
        bim=BIMConfig(dim=64, depth=2, num_heads=8, mlp_dim=128, attention_downsample_rate=2, num_pos_feats=32),
        unet=UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                        cross_attention_dim=32),
        vae=VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    ),
}
