"""Image preprocessing as data: what turns a decoded image into a model's input.

A `Preprocess` is recorded in a transfer set's metadata (so `verify --teacher` replays it and
another team sees exactly what the teacher saw) and rebuilt from it; it never names code.
Image sources (imagefolder, hfds, wds) yield decoded uint8 tensors (3, H, W); a `Preprocess`
maps one to a float32 tensor: resize the shorter side, centre crop, scale to [0, 1], normalise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from softlabels.errors import DataError, SpecError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
OPTION_NAMES = ("resize", "crop", "mean", "std", "interpolation")
MAX_SIDE = 4096  # pixels: a larger resize or crop is a typo, not a teacher's input
CHANNELS = 3  # image sources decode to RGB


@dataclass(frozen=True)
class Preprocess:
    """resize: the shorter side in pixels (None: keep), or with keep_aspect=False both sides
    (a square, as Hugging Face processors' {height, width} and timm's `squash` resize);
    crop: a centre square (None: none); mean/std: per-channel normalisation after scaling
    to [0, 1] (None: none)."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"
    keep_aspect: bool = True

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 1 <= value <= MAX_SIDE):
                raise SpecError(f"preprocessing {name}={value!r} must be a whole number of "
                                f"pixels in [1, {MAX_SIDE}]")
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise SpecError(f"preprocessing crop={self.crop} is larger than resize="
                            f"{self.resize}: the crop would be padded with black; give a crop "
                            "<= resize (e.g. resize=256&crop=224)")
        if not isinstance(self.keep_aspect, bool):
            raise SpecError(f"keep_aspect={self.keep_aspect!r} must be true or false")
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(f"interpolation={self.interpolation!r}; use one of "
                            + ", ".join(INTERPOLATIONS))
        if (self.mean is None) != (self.std is None):
            raise SpecError("give mean and std together (e.g. mean=0.485,0.456,0.406&"
                            "std=0.229,0.224,0.225), or neither")
        if self.mean is not None and len(self.mean) not in (1, CHANNELS):
            raise SpecError(f"mean={self.mean} has {len(self.mean)} values; images are RGB: "
                            "give 3 (one per channel) or 1 (for all)")
        if any(not math.isfinite(v) for v in (*(self.mean or ()), *(self.std or ()))):
            raise SpecError(f"mean={self.mean} and std={self.std} must be finite numbers")
        if self.std is not None and (len(self.std) != len(self.mean or ())
                                     or min(self.std) <= 0):
            raise SpecError(f"std={self.std} must be positive, one value per channel of "
                            f"mean={self.mean}")

    def to_meta(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: Any) -> Preprocess:
        """Rebuilt from a set's metadata; anything else than the recorded fields is refused."""
        if not isinstance(meta, dict) or set(meta) - {f.name for f in fields(cls)}:
            raise SpecError(f"not a recorded preprocessing: {meta!r}")
        values = dict(meta)
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    def with_options(self, options: dict[str, Any]) -> Preprocess:
        """This preprocessing with the spec's overrides (resize=, crop=, mean=, std=,
        interpolation=) applied; the overrides are popped from `options`."""
        changes: dict[str, Any] = {}
        for key in OPTION_NAMES:
            if key in options:
                value = options.pop(key)
                if key in ("mean", "std"):
                    value = _floats(value, key)
                changes[key] = value
        return replace(self, **changes) if changes else self

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (3, crop, crop)."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode(self.interpolation)
        x = image
        if self.resize is not None:
            size = [self.resize] if self.keep_aspect else [self.resize, self.resize]
            x = F.resize(x, size, interpolation=mode, antialias=True)
        if self.crop is not None:
            if self.crop > min(x.shape[-2:]):
                raise DataError(f"an image of {x.shape[-2]}x{x.shape[-1]} pixels is smaller "
                                f"than crop={self.crop} (it would be padded with black); give "
                                f"resize={self.crop} or more in the teacher's spec")
            x = F.center_crop(x, [self.crop, self.crop])
        x = F.to_dtype(x, torch.float32, scale=True)
        if self.mean is not None:
            x = F.normalize(x, list(self.mean), list(self.std or ()))
        return x


def _floats(value: Any, key: str) -> tuple[float, ...]:
    try:
        if isinstance(value, (int, float)):
            return (float(value),)
        return tuple(float(v) for v in str(value).split(","))
    except ValueError:
        raise SpecError(f"{key}={value!r} must be numbers separated by commas, "
                        "e.g. 0.485,0.456,0.406") from None


def describe(meta: dict[str, Any] | None) -> str:
    """One line for `info`: what a recorded preprocessing does (or that there was none)."""
    if not meta:
        return "none"
    p = Preprocess.from_meta(meta)
    parts = []
    if p.resize is not None:
        side = "shorter side" if p.keep_aspect else "square"
        parts.append(f"resize {side} to {p.resize} ({p.interpolation})")
    if p.crop is not None:
        parts.append(f"centre crop {p.crop}")
    parts.append("scale to [0, 1]")
    if p.mean is not None:
        parts.append(f"normalise mean {list(p.mean)} std {list(p.std or ())}")
    return ", ".join(parts)
