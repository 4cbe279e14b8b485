"""The MODEL spec `torchvision:NAME?weights=FILE&..`: a torchvision architecture, its weights
read from a local state dict (never downloaded), strictly.

Where FILE's name is the file name of one of torchvision's weights entries for NAME (e.g.
`resnet50-11ad3fa6.pth`), the SHA-256 prefix in the name is checked, as torch.hub does for a
download, and the entry gives the model's build options (class count, image size), its
preprocessing (resize, centre crop, mean/std, interpolation) and its class names.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from softlabels.errors import SpecError
from softlabels.preprocessing import OPTION_NAMES, Preprocess
from softlabels.teachers.weights import (
    Built,
    WeightsFile,
    check_hash_prefix,
    file_sha256,
    load_strict,
    precheck,
    read_state_dict,
    take_preprocess,
)

log = logging.getLogger(__name__)


def entries(name: str) -> list[Any]:
    """torchvision's weights entries for model `name` (none for a model without any)."""
    from torchvision.models import get_model_weights

    try:
        return list(get_model_weights(name))
    except (ValueError, KeyError):
        return []


def entry_for_file(name: str, path: str) -> Any | None:
    """The weights entry whose URL's file name is `path`'s file name, or None."""
    base = os.path.basename(path)
    return next((e for e in entries(name) if e.url.rsplit("/", 1)[-1] == base), None)


def entry_preprocess(entry: Any) -> Preprocess | None:
    """The preprocessing of a weights entry's transforms (torchvision's ImageClassification
    preset: resize_size, crop_size, mean, std, interpolation), or None for another kind."""
    t = entry.transforms()
    if type(t).__name__ != "ImageClassification":
        return None
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]),
                      mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std),
                      interpolation=t.interpolation.value)


def _entry_options(name: str, entry: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The build options torchvision's builder sets itself when given this entry."""
    meta, given = entry.meta, dict(options)
    given.setdefault("num_classes", len(meta["categories"]))
    if name.startswith("vit_"):
        given.setdefault("image_size", meta["min_size"][0])
    if name == "maxvit_t":
        given.setdefault("input_size", meta["min_size"])
    if name in ("inception_v3", "googlenet"):
        given.setdefault("transform_input", True)
        given["aux_logits"], given["init_weights"] = True, False
    return given


def _refuse_weights_name(name: str, value: str, spec: str) -> None:
    """A weights entry's name (IMAGENET1K_V1, DEFAULT) or a missing file: say what to pass."""
    known = {e.name: e for e in entries(name)}
    if value == "DEFAULT" and known:
        from torchvision.models import get_model_weights

        known["DEFAULT"] = get_model_weights(name).DEFAULT
    entry = known.get(value)
    if entry is not None:
        file = entry.url.rsplit("/", 1)[-1]
        raise SpecError(f"{spec!r} names torchvision's weights entry {value}; softlabels never "
                        f"downloads: download {entry.url} once and pass its path, "
                        f"torchvision:{name}?weights=DIR/{file}")
    raise SpecError(f"no weights file {value!r} (from {spec!r}); pass the path of a state "
                    "dict (.pth, .pt or .safetensors); nothing is downloaded")


def build_torchvision(name: str, options: dict[str, Any], spec: str) -> Built:
    """The model `torchvision:NAME?..` names; weights from `weights=FILE` when given."""
    import torchvision

    if name not in torchvision.models.list_models():
        raise SpecError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    weights = options.pop("weights", None)
    preprocess_options = {k: options.pop(k) for k in list(options) if k in OPTION_NAMES}
    if weights is None:
        model = _get_model(name, options, spec)
        return Built(model, preprocess=take_preprocess(preprocess_options, None), untrained=True)
    path = str(weights)
    if not Path(path).is_file():
        _refuse_weights_name(name, path, spec)
    sha = file_sha256(path)
    entry = entry_for_file(name, path)
    aux = options.get("aux_logits", name == "inception_v3")  # the builders' defaults
    if entry is not None:
        check_hash_prefix(path, sha, f"torchvision's {name} {entry.name}")
        options = _entry_options(name, entry, options)
    state = read_state_dict(path, spec)
    precheck(lambda: _get_model(name, options, spec), state, f"weights file {path}", spec)
    model = _get_model(name, options, spec)  # allocated once the file is known to fit
    load_strict(model, state, f"weights file {path}", spec)
    if entry is not None and not aux and name == "googlenet":  # as torchvision's builder does
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    if entry is not None and not aux and name == "inception_v3":
        model.aux_logits, model.AuxLogits = False, None
    base = entry_preprocess(entry) if entry is not None else None
    names = tuple(entry.meta["categories"]) if entry is not None else None
    if entry is None:
        log.info("%s is not one of torchvision's %s weights files: no preprocessing or class "
                 "names come with it (give resize=, crop=, mean=, std= in the spec)", path, name)
    return Built(model, files=(WeightsFile(path, sha),),
                 preprocess=take_preprocess(preprocess_options, base), class_names=names,
                 entry=f"{type(entry).__name__}.{entry.name}" if entry is not None else None)


def _get_model(name: str, options: dict[str, Any], spec: str) -> Any:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, **options)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"bad options in {spec!r}: {msg}; see the model's torchvision "
                        "documentation") from None
