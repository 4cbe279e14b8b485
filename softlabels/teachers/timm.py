"""The MODEL spec `timm:NAME?checkpoint=FILE&..`: a timm architecture built with
`pretrained=False` (nothing downloaded), its weights read strictly from a local state dict
(.pth/.pt with weights_only, or .safetensors), its preprocessing from timm's pretrained
config for NAME (input size, crop_pct, mean/std, interpolation). Needs the `timm` extra:
`pip install 'softlabels[timm]'`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from softlabels.errors import SpecError
from softlabels.preprocessing import INTERPOLATIONS, OPTION_NAMES, Preprocess
from softlabels.teachers.weights import Built, load_weights_file, take_preprocess


def timm_preprocess(model: Any, spec: str) -> Preprocess | None:
    """timm's eval transform for `model`'s pretrained config as a `Preprocess`: resize the
    shorter side to floor(crop / crop_pct), centre crop, normalise (timm's
    transforms_imagenet_eval, crop_mode center or squash)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    mode = cfg.get("crop_mode") or "center"
    interpolation = cfg.get("interpolation") or "bilinear"
    if height != width or mode not in ("center", "squash") or interpolation not in INTERPOLATIONS:
        raise SpecError(f"{spec!r}: timm's config asks for input {height}x{width}, crop_mode "
                        f"{mode}, interpolation {interpolation}, which softlabels does not "
                        "replay; give resize=, crop=, mean=, std=, interpolation= in the spec")
    crop_pct = cfg.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    return Preprocess(resize=math.floor(height / crop_pct), crop=int(height),
                      mean=tuple(float(v) for v in cfg["mean"]),
                      std=tuple(float(v) for v in cfg["std"]), interpolation=interpolation,
                      keep_aspect=mode == "center")


def build_timm(name: str, options: dict[str, Any], spec: str) -> Built:
    """The model `timm:NAME?..` names; weights from `checkpoint=FILE` when given."""
    try:
        import timm
    except ImportError:
        raise SpecError(f"{spec!r} needs timm: pip install 'softlabels[timm]'") from None
    checkpoint = options.pop("checkpoint", None)
    overrides = {k: options.pop(k) for k in list(options) if k in OPTION_NAMES}
    if not timm.is_model(name):
        raise SpecError(f"timm has no model {name!r} (from {spec!r}); see timm.list_models()")

    def build() -> Any:
        try:
            return timm.create_model(name, pretrained=False, **options)
        except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SpecError(f"bad options in {spec!r}: {msg}; see the model's timm "
                            "documentation") from None

    if checkpoint is None:
        return Built(build(), preprocess=take_preprocess(overrides, None), untrained=True)
    path = str(checkpoint)
    if not Path(path).is_file():
        raise SpecError(f"no checkpoint file {path!r} (from {spec!r}); pass the path of a "
                        "state dict (.pth, .pt or .safetensors); nothing is downloaded")
    model, file = load_weights_file(build, path, spec)
    base = None if _all_given(overrides) else timm_preprocess(model, spec)
    return Built(model, files=(file,), preprocess=take_preprocess(overrides, base))


def _all_given(overrides: dict[str, Any]) -> bool:
    return all(k in overrides for k in ("resize", "crop", "mean", "std"))
