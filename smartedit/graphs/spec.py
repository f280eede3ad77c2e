"""Graph specs: each graph of the export contract described once, as plain data.

A GraphSpec names its inputs and outputs, their dtypes, and their shapes as tuples of ints and dimension expressions
("B", "3*B", "8*h8"). Every named dimension has a min/opt/max range. The one spec drives the ONNX export (dynamic
shapes), TensorRT profiles, AOTInductor's dynamic shapes, every runner's input check, the manifest and the
C++ runtime's input check (which reads it from the manifest).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from smartedit.config import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_RESOLUTION,
    IMG_START_ID,
    NUM_IMG_TOKENS,
    PRECISIONS,
    RESOLUTION_STEP,
)
from smartedit.errors import InputError

# dtype tags: "float" follows the graph's precision (its row's dtype: fp16 for int8); the others are fixed
DTYPES = {"float32": torch.float32, "int64": torch.int64}
MIN_SUFFIX = NUM_IMG_TOKENS + 1  # a forced-mode suffix: at least one id, then <img_0>..<img_31>


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise InputError(f"dimension range must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float" (export precision), "float32" or "int64"
    shape: tuple[int | str, ...]  # ints, or "X" / "k*X" with X a named dimension
    values: str = "randn"  # how sample inputs are drawn: randn | image | token_ids | img_suffix_ids | timestep | sigma | guidance

    def torch_dtype(self, precision: str) -> torch.dtype:
        return PRECISIONS[precision].dtype if self.dtype == "float" else DTYPES[self.dtype]


_EXPR = re.compile(r"^(?:(\d+)\*)?([A-Za-z_]\w*)$")


def parse_dim(expr: int | str) -> tuple[int, str | None]:
    """3 -> (3, None); "B" -> (1, "B"); "3*B" -> (3, "B")."""
    if isinstance(expr, int):
        return expr, None
    m = _EXPR.match(expr)
    if not m:
        raise InputError(f"bad dimension expression {expr!r} (use an int, 'X' or 'k*X')")
    return int(m.group(1) or 1), m.group(2)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in self.inputs + self.outputs:
            for d in t.shape:
                _, name = parse_dim(d)
                if name is not None and name not in self.dims:
                    raise InputError(f"graph {self.name}: {t.name} uses dimension {name!r} with no range")

    def shape(self, tensor: TensorSpec, point: dict[str, int]) -> tuple[int, ...]:
        out = []
        for d in tensor.shape:
            k, name = parse_dim(d)
            out.append(k if name is None else k * point[name])
        return tuple(out)

    def point(self, which: str) -> dict[str, int]:
        """"min" / "opt" / "max" -> a value per dimension."""
        return {n: getattr(r, which) for n, r in self.dims.items()}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min shape, opt shape, max shape): a TensorRT optimization profile."""
        pts = [self.point(w) for w in ("min", "opt", "max")]
        return {t.name: tuple(self.shape(t, p) for p in pts) for t in self.inputs}

    def contains(self, point: dict[str, int]) -> bool:
        return all(r.min <= point[n] <= r.max for n, r in self.dims.items())

    def sample_inputs(self, point: dict[str, int], precision: str = "fp32", device: str | torch.device = "cpu",
                      seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            shape, dtype = self.shape(t, point), t.torch_dtype(precision)
            out[t.name] = _draw(t.values, shape, g).to(device=device, dtype=dtype)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphSpec":
        def tensor(t: dict) -> TensorSpec:
            return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t.get("values", "randn"))

        return cls(name=d["name"], inputs=tuple(tensor(t) for t in d["inputs"]),
                   outputs=tuple(tensor(t) for t in d["outputs"]),
                   dims={k: DimRange(**v) for k, v in d["dims"].items()})

    def check_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
        """Infer the dims from actual inputs; raise InputError naming any input or dim outside the profile (spatial
        dims in pixels, with the export options that set them)."""
        names = [t.name for t in self.inputs]
        if sorted(inputs) != sorted(names):
            raise InputError(f"{self.name}: expected inputs {names}, got {sorted(inputs)}")
        point: dict[str, int] = {}
        for t in self.inputs:
            shape = tuple(inputs[t.name].shape)
            if len(shape) != len(t.shape):
                raise InputError(f"{self.name}.{t.name}: rank {len(shape)}, expected shape {t.shape}")
            for size, d in zip(shape, t.shape):
                k, name = parse_dim(d)
                if name is None:
                    if size != k:
                        raise InputError(f"{self.name}.{t.name}: shape {shape} does not match {t.shape}")
                    continue
                if size % k:
                    raise InputError(f"{self.name}.{t.name}: size {size} is not a multiple of {k} ({d})")
                v = size // k
                if point.setdefault(name, v) != v:
                    raise InputError(f"{self.name}.{t.name}: {d} = {size} disagrees with {name} = {point[name]}")
        for name, v in point.items():
            r = self.dims[name]
            if not r.min <= v <= r.max:
                raise InputError(f"{self.name}: {_describe(name, v, r)}")
        return point

    def image_dims(self) -> tuple[str, str, int] | None:
        """(height dim, width dim, pixels per unit) of a graph with an image side (unet, VAE), else None."""
        sides = {DIM_MEANINGS[n].what: n for n in self.dims if n in DIM_MEANINGS and DIM_MEANINGS[n].px}
        if "image height" not in sides:
            return None
        h, w = sides["image height"], sides["image width"]
        return h, w, DIM_MEANINGS[h].px

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": [asdict(t) for t in self.inputs],
                "outputs": [asdict(t) for t in self.outputs],
                "dims": {k: asdict(v) for k, v in self.dims.items()}, "profile": self.profile()}


@dataclass(frozen=True)
class DimMeaning:
    what: str  # "batch", "image height", ...
    flag: str  # the smartedit-export flag(s) that set its range
    px: int = 0  # image pixels per unit of the dim (0: not an image side)


# What each named dim of the specs means, written once: the input checks, the verification points, TensorRT's
# exact-resolution profiles and the server's limits read it here. Latent h/w are pixels / 8, h8/w8 pixels / 64.
DIM_MEANINGS = {
    "B": DimMeaning("batch", "--max-batch"),
    "h8": DimMeaning("image height", "--min-res / --max-res", RESOLUTION_STEP),
    "w8": DimMeaning("image width", "--min-res / --max-res", RESOLUTION_STEP),
    "h": DimMeaning("image height", "--min-res / --max-res", 8),
    "w": DimMeaning("image width", "--min-res / --max-res", 8),
    "Lp": DimMeaning("prompt tokens before the image", "--max-prompt"),
    "Ls": DimMeaning("prompt tokens after the image", "--max-prompt"),
}


def _describe(name: str, v: int, r: DimRange) -> str:
    m = DIM_MEANINGS.get(name)
    if m and m.px:
        px = m.px
        return (f"{m.what} {v * px} px is outside the exported range {r.min * px}-{r.max * px} px "
                f"(re-export with {m.flag})")
    return (f"dimension {name} = {v} is outside the exported profile [{r.min}, {r.max}]"
            + (f" (re-export with {m.flag})" if m else ""))


def _draw(kind: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(shape, generator=g)
    if kind == "image":  # [-1, 1]
        return torch.rand(shape, generator=g) * 2 - 1
    if kind == "token_ids":  # ordinary ids (3..31999: no <unk>/pad, <s>, </s>)
        return torch.randint(3, 32000, shape, generator=g)
    if kind == "img_suffix_ids":  # forced-mode suffix: ordinary ids, then <img_0>..<img_31>
        ids = torch.randint(3, 32000, shape, generator=g)
        ids[..., -NUM_IMG_TOKENS:] = torch.arange(IMG_START_ID, IMG_START_ID + NUM_IMG_TOKENS)
        return ids
    if kind == "timestep":  # a scheduler timestep in [0, 999]
        return torch.randint(0, 1000, shape, generator=g).float()
    if kind == "sigma":  # an EulerAncestral sigma (0.03 .. 14.6 for SD-1.5)
        return torch.rand(shape, generator=g) * 14 + 0.03
    if kind == "guidance":  # (text, image) guidance scales around the official 7.5 / 1.5
        return torch.tensor([DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE]).expand(shape).clone()
    raise InputError(f"unknown sample kind {kind!r}")


# ProfileOptions field -> the smartedit-export flag that sets it
_PROFILE_FLAGS = {"min_res": "--min-res", "opt_res": "--opt-res", "max_res": "--max-res", "max_batch": "--max-batch",
                  "max_prefix": "--max-prompt", "max_suffix": "--max-prompt"}


@dataclass(frozen=True)
class ProfileOptions:
    """Ranges the specs are built from; defaults cover the official settings. Every optimisation profile range is
    set here (TensorRT's exact-resolution profiles: export/trt.py BuildOptions.static_res)."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_res: int = 256
    opt_res: int = DEFAULT_RESOLUTION  # the official resolution
    max_res: int = 768
    min_prefix: int = 1
    opt_prefix: int = 96
    max_prefix: int = 512  # prompt lengths: the official templates give ~80-100 ids with the Vicuna tokenizer
    min_suffix: int = MIN_SUFFIX
    opt_suffix: int = 96
    max_suffix: int = 512

    def __post_init__(self) -> None:
        """Refuse a profile at once, naming the smartedit-export flag (or the field, where no flag sets it)."""
        def flag(name: str) -> str:
            return _PROFILE_FLAGS.get(name, name)

        for name in ("min_res", "opt_res", "max_res"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < RESOLUTION_STEP or v % RESOLUTION_STEP:
                raise InputError(f"{flag(name)} must be a multiple of {RESOLUTION_STEP} (UNet latents are "
                                 f"multiples of 8) and at least {RESOLUTION_STEP}, got {v!r}")
        # the suffix first: --max-prompt sets both, and its rule is the suffix's (>= 33, not >= 1)
        for name in ("max_suffix", "min_suffix", "opt_suffix"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < MIN_SUFFIX:
                raise InputError(f"{flag(name)} must be >= {MIN_SUFFIX} (the forced suffix is at least one id and "
                                 f"the {NUM_IMG_TOKENS} <img_i> tokens), got {v!r}")
        for name in ("max_batch", "min_batch", "opt_batch", "max_prefix", "min_prefix", "opt_prefix"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{flag(name)} must be an integer >= 1, got {v!r}")
        for what in ("res", "batch", "prefix", "suffix"):
            lo, mid, hi = (f"{w}_{what}" for w in ("min", "opt", "max"))
            for a, b in ((lo, mid), (mid, hi), (lo, hi)):
                if getattr(self, a) > getattr(self, b):
                    raise InputError(f"{flag(a)} {getattr(self, a)} is above {flag(b)} {getattr(self, b)}: the "
                                     f"profile needs min <= opt <= max, got {getattr(self, lo)}/{getattr(self, mid)}/"
                                     f"{getattr(self, hi)}")

    def batch(self) -> DimRange:
        return DimRange(self.min_batch, self.opt_batch, self.max_batch)

    def latent8(self) -> DimRange:  # latent side / 8 = resolution / 64
        return DimRange(self.min_res // RESOLUTION_STEP, self.opt_res // RESOLUTION_STEP,
                        self.max_res // RESOLUTION_STEP)

    def latent(self) -> DimRange:  # latent side = resolution / 8
        return DimRange(self.min_res // 8, self.opt_res // 8, self.max_res // 8)
