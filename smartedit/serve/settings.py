"""The `smartedit` model's settings: one typed object, built by smartedit-serve (or the export of a container
repository), carried as JSON in the model config's "settings" parameter, and read back into the same object, with
the same bounds, when Triton loads the model (serve/model.py). A config that carries a value the command line
refuses (`max_steps` 5000: past the sampler's 1000) is refused at load, naming the value."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smartedit.config import DEFAULT_STEPS, PRECISIONS, check_seed
from smartedit.errors import ArtifactError, InputError
from smartedit.scheduler import MAX_STEPS
from smartedit.weights import ModelSource

RUNNERS = ("registry", "bls")  # the graphs in the model's process on a registry backend, or as BLS graph models
WARM_UPS = ("min", "max")
MAX_VARIANTS = 4  # variants per request by default (each is one more sample through the UNet loop)
MAX_MEGAPIXELS = 16.0  # the largest input image by default


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-").replace("max-evaluations", "max-unet-evaluations")


def _count(name: str, value: object, high: int | None = None, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
        bound = f"from 1 to {what}{high}" if high is not None else ">= 1"
        raise InputError(f"{_flag(name)} must be an integer {bound}, got {value!r}")


@dataclass(frozen=True)
class ServeSettings:
    """What the `smartedit` model runs and what it admits. Checked at construction: the command line's refusals
    and the model's at load are the same. Bounds name the smartedit-serve flag of the field (max_steps:
    --max-steps)."""

    source: ModelSource  # a relative model folder (a container repository's) is relative to the version folder
    runner: str = "registry"
    backend: str | None = None  # registry: what runs the graphs (smartedit.engines.registry)
    artifacts: str | None = None  # registry: the smartedit-export folder of an exported backend
    device: str = "cpu"
    dtype: str = "fp32"
    max_steps: int = DEFAULT_STEPS  # the largest `steps` a request may ask for: 1..the sampler's MAX_STEPS
    max_megapixels: float = MAX_MEGAPIXELS
    max_batch: int = 4  # samples through the graphs at once (an exported profile may lower it)
    max_variants: int | None = None  # per request, at most max_batch (None: MAX_VARIANTS, or max_batch if lower)
    max_evaluations: int | None = None  # UNet evaluations per request (None: what max_steps and max_variants allow)
    warm_up: str = "min"  # the one-step edit before ready: at the smallest request or the largest admitted
    graphs: dict[str, Any] | None = None  # bls: {graph: {spec, precision, fold_cfg[, cache_branch]}}
    files: dict[str, str] | None = None  # bls: {path in the repository: sha256} of every other file
    repository: str | None = None  # bls, the stream twin: the exported repository it checks

    def __post_init__(self) -> None:
        if not isinstance(self.source, ModelSource):
            raise InputError(f"settings source must be a model folder or a preset, got {self.source!r}")
        if self.runner not in RUNNERS:
            raise InputError(f"settings runner must be one of {list(RUNNERS)}, got {self.runner!r}")
        if self.runner == "registry" and not isinstance(self.backend, str):
            raise InputError(f"--backend must name a backend, got {self.backend!r}")
        if self.runner == "bls" and not (isinstance(self.graphs, dict) and isinstance(self.files, dict)):
            raise ArtifactError("the `smartedit` model's settings record no graphs or no repository files: re-run "
                                "smartedit-export --target triton")
        check_seed(self.source.seed, "--seed")
        if self.dtype not in PRECISIONS:
            raise InputError(f"--precision must be one of {sorted(PRECISIONS)}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise InputError(f"--device must name a device, got {self.device!r}")
        _count("max_steps", self.max_steps, MAX_STEPS, "the sampler's ")
        m = self.max_megapixels
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (m > 0 and math.isfinite(m)):
            raise InputError(f"--max-megapixels must be a finite number > 0, got {m}")
        _count("max_batch", self.max_batch)
        if self.max_variants is None:
            object.__setattr__(self, "max_variants", min(MAX_VARIANTS, self.max_batch))
        _count("max_variants", self.max_variants)
        if self.max_variants > self.max_batch:
            raise InputError(f"--max-variants {self.max_variants} is over --max-batch {self.max_batch}: a request's "
                             "variants run as one batch")
        if self.max_evaluations is not None:
            _count("max_evaluations", self.max_evaluations)
        if self.warm_up not in WARM_UPS:
            raise InputError(f"--warm-up must be one of {list(WARM_UPS)}, got {self.warm_up!r}")

    def model_source(self, version_dir: Path) -> ModelSource:
        """The source, a relative model folder taken relative to the model's version folder."""
        model = self.source.model
        if model is None or model.is_absolute():
            return self.source
        return ModelSource(model=Path(version_dir) / model)

    def to_dict(self) -> dict[str, Any]:
        """JSON values; the source as {"model": folder} or {"preset", "seed"}; unset (None) fields left out."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        src = self.source
        d["source"] = {"model": str(src.model)} if src.model else {"preset": src.preset, "seed": src.seed}
        return {k: v for k, v in d.items() if v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: object, where: str = "the model config") -> "ServeSettings":
        """The settings of a config's JSON object; InputError naming the field and its value for one that is
        unknown, of the wrong type or out of bounds."""
        def bad(why: str) -> InputError:
            return InputError(f"the settings of {where}: {why}")

        if not isinstance(d, dict):
            raise bad(f"expected a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise bad(f"unknown fields {unknown}")
        src = d.get("source")
        if not isinstance(src, dict) or sorted(src) not in (["model"], ["preset", "seed"], ["preset"]):
            raise bad(f"source must be {{\"model\": FOLDER}} or {{\"preset\": NAME, \"seed\": N}}, got {src!r}")
        kwargs = dict(d)
        try:
            kwargs["source"] = (ModelSource(model=Path(str(src["model"]))) if "model" in src
                                else ModelSource(preset=src["preset"], seed=src.get("seed", 0)))
            for name in ("max_megapixels",):  # JSON writes 16.0 as 16.0, but a hand-written config may say 16
                if isinstance(kwargs.get(name), int) and not isinstance(kwargs[name], bool):
                    kwargs[name] = float(kwargs[name])
            return cls(**kwargs)
        except (InputError, ValueError, TypeError) as e:
            field = next((k for k in d if k != "source" and _flag(k) in str(e)), None)
            named = f"{field} = {d[field]!r}: " if field else ""
            raise (type(e) if isinstance(e, InputError) else InputError)(f"the settings of {where}: {named}{e}") \
                from None

    @classmethod
    def from_json(cls, text: str, where: str = "the model config") -> "ServeSettings":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise InputError(f"the settings of {where} are not JSON ({e})") from None
        return cls.from_dict(d, where)
