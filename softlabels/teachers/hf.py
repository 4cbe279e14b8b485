"""The MODEL spec `hf:DIR`: a local Hugging Face `transformers` model saved with
`save_pretrained` as a teacher (or student): a causal language model mapping (B, L) token ids
to (B, L, V) logits, or an image classifier mapping (B, 3, H, W) images to (B, C) logits with
the `AutoImageProcessor` saved in DIR giving its preprocessing.

Nothing is downloaded (`local_files_only`), weights load from safetensors only (never a pickle),
no code from the directory runs (`trust_remote_code=False`), and the load is strict: a file
lacking tensors, holding extra or mis-shaped ones, or a config naming another architecture is
refused (transformers would initialise what is missing at random). Needs the `hf` extra:
`pip install 'softlabels[hf]'`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softlabels.errors import SpecError
from softlabels.preprocessing import OPTION_NAMES, Preprocess
from softlabels.teachers.size import skeleton_bytes
from softlabels.teachers.weights import Built, WeightsFile, file_sha256, take_preprocess

# PIL's resampling filters, as image processors record them
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class CausalLM(nn.Module):
    """(B, L) int64 token ids -> (B, L, V) logits of a `transformers` causal LM.

    Causal: a position's logits depend only on the tokens up to it, so right-padding a batch
    leaves every real position's logits unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


class ImageClassifier(nn.Module):
    """(B, 3, H, W) float images -> (B, C) logits of a `transformers` image classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_hf(directory: str, options: dict[str, Any], spec: str) -> Built:
    """The model in `directory` with its weights files' hashes and, for an image classifier,
    its preprocessing and class names. Only preprocessing overrides are taken as options."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SpecError(f"{spec!r} needs transformers and safetensors: "
                        "pip install 'softlabels[hf]'") from None
    overrides = {k: options.pop(k) for k in list(options) if k in OPTION_NAMES}
    if options:
        raise SpecError(f"hf: specs take only preprocessing options ({', '.join(OPTION_NAMES)}),"
                        f" got {sorted(options)} in {spec!r}")
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise SpecError(f"{directory!r} (from {spec!r}) holds no config.json; save the model "
                        "there with save_pretrained (nothing is downloaded)")
    hf_logging.disable_progress_bar()  # the library never draws progress bars
    architecture = _architecture(path, spec)
    image = _is_image_classifier(architecture)
    if overrides and not image:
        raise SpecError(f"{spec!r}: preprocessing options apply to image classifiers only, "
                        f"and {directory} holds a {architecture or 'causal LM'}")
    weights = sorted(path.glob("*.safetensors"))
    for f in weights:  # hashing a link to a device or a pipe would read without end
        if not f.is_file():
            raise SpecError(f"{f} (from {spec!r}) is not a regular file (a device, a pipe, or "
                            "a link to one or to nothing); remove it from the directory")
    model = _from_pretrained(path, spec, image, architecture)
    files = tuple(WeightsFile(str(f), file_sha256(f)) for f in weights)
    if not image:
        return Built(CausalLM(model), files=files)
    labels = getattr(model.config, "id2label", None) or {}
    names = tuple(str(labels[i]) for i in range(len(labels))) if len(labels) else None
    base = None if all(k in overrides for k in ("resize", "crop", "mean", "std")) else \
        processor_preprocess(path, spec)
    return Built(ImageClassifier(model), files=files,
                 preprocess=take_preprocess(overrides, base), class_names=names)


def _architecture(path: Path, spec: str) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read {path / 'config.json'} (from {spec!r}): {exc}") from None
    names = config.get("architectures") if isinstance(config, dict) else None
    return str(names[0]) if isinstance(names, list) and names else None


def _is_image_classifier(architecture: str | None) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as NAMES,
    )

    known = {n for v in NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return architecture is not None and (architecture in known
                                         or architecture.endswith("ForImageClassification"))


def _from_pretrained(path: Path, spec: str, image: bool, architecture: str | None) -> nn.Module:
    """Load strictly: transformers' loading report must be empty and the class it built the
    one config.json names."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    auto = AutoModelForImageClassification if image else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError) as exc:
        # SafetensorError: a truncated or garbage *.safetensors (the safetensors library's own)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"cannot load {spec!r}: {first[:300]}; it needs config.json and "
                        "model.safetensors from save_pretrained") from None
    problems = [f"{len(keys)} {what} ({', '.join(sorted(map(str, keys))[:3])}"
                + (", ..." if len(keys) > 3 else "") + ")"
                for what, keys in (("missing", info.get("missing_keys") or ()),
                                   ("unexpected", info.get("unexpected_keys") or ()),
                                   ("of another shape", info.get("mismatched_keys") or ()))
                if keys]
    if problems:
        raise SpecError(f"{spec!r}: the safetensors do not hold the weights config.json "
                        f"describes: tensors {'; '.join(problems)}; transformers would "
                        "initialise them at random. Save the model again with save_pretrained")
    built = type(model).__name__
    if architecture is not None and built != architecture:
        raise SpecError(f"{spec!r}: config.json names {architecture} but its files load as "
                        f"{built}; save the model again with save_pretrained")
    return model.eval()


def processor_preprocess(path: Path, spec: str) -> Preprocess:
    """The preprocessing of the image processor saved in `path` (size: shortest_edge, or
    height == width; crop_size; image_mean/std; resample), respecting do_resize,
    do_center_crop, do_rescale and do_normalize."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{spec!r}: no image processor in {path} ({first[:200]}); save it there "
                        "with processor.save_pretrained, or give resize=, crop=, mean=, std= "
                        "in the spec") from None
    unsupported = _unsupported(proc)
    if unsupported:
        raise SpecError(f"{spec!r}: its image processor ({type(proc).__name__}) {unsupported}, "
                        "which softlabels does not replay; give resize=, crop=, mean=, std= "
                        "and interpolation= in the spec")
    resize, keep = (None, True)
    if getattr(proc, "do_resize", False):
        resize, keep = _side(_get(proc.size, "shortest_edge"), _get(proc.size, "height"),
                             _get(proc.size, "width"))
    crop = None
    if getattr(proc, "do_center_crop", False) and getattr(proc, "crop_size", None):
        crop, _ = _side(None, _get(proc.crop_size, "height"), _get(proc.crop_size, "width"))
    mean = std = None
    if getattr(proc, "do_normalize", False):
        mean, std = tuple(map(float, proc.image_mean)), tuple(map(float, proc.image_std))
    return Preprocess(resize=resize, crop=crop, mean=mean, std=std, keep_aspect=keep,
                      interpolation=_RESAMPLE[_resample(proc)])


def _resample(proc: Any) -> int:
    value = getattr(proc, "resample", None)
    return 2 if value is None else int(value)


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _side(shortest: Any, height: Any, width: Any) -> tuple[int | None, bool]:
    """(pixels, keep_aspect) of a processor's size: the shorter side, or a square."""
    if shortest:
        return int(shortest), True
    if height and height == width:
        return int(height), False
    raise SpecError(f"an image processor size of height {height} and width {width} is not a "
                    "square; give resize= and crop= in the spec")


def _unsupported(proc: Any) -> str:
    """What of `proc` a `Preprocess` cannot express, or ''."""
    if getattr(proc, "do_rescale", True) and abs(
            float(getattr(proc, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        return f"rescales by {proc.rescale_factor} (not 1/255)"
    if not getattr(proc, "do_rescale", True):
        return "does not rescale to [0, 1]"
    if getattr(proc, "crop_pct", None) not in (None, 1.0):
        return f"crops a fraction crop_pct={proc.crop_pct} of the image"
    if _resample(proc) not in _RESAMPLE:
        return f"resamples with filter {proc.resample}"
    return ""


def hf_skeleton_bytes(spec: str) -> int | None:
    """Bytes of the model an `hf:DIR` spec's config.json describes, built on the meta device
    from the config alone (no weights read, nothing allocated); None where the config cannot
    be read (the real load then says why)."""
    path = Path(spec.partition(":")[2].partition("?")[0])
    if not (path / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        image = _is_image_classifier(_architecture(path, spec))
    except Exception:  # noqa: BLE001  (missing package, bad config: the real load says why)
        return None
    auto = AutoModelForImageClassification if image else AutoModelForCausalLM
    return skeleton_bytes(lambda: auto.from_config(config))
