"""The model a MODEL spec names: built-in architectures, pretrained weights files
(torchvision, timm, hf), and the self-describing checkpoints that `softlabels train` writes
(docs/TEACHERS.md)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softlabels.errors import SpecError
from softlabels.redact import redact_obj
from softlabels.safe_write import atomic_write
from softlabels.specs import (
    MODEL_FORMS,
    MODEL_SCHEMES,
    WEIGHTS_OPTIONS,
    import_factory,
    parse_spec,
    require_trusted,
)
from softlabels.teachers.size import module_bytes, refuse_past_bound, skeleton_bytes
from softlabels.teachers.weights import Built, WeightsFile, file_sha256, unreadable_reason

CHECKPOINT_FORMAT = "softlabels-checkpoint"


def mlp(sizes: list[int], dropout: float = 0.0, input_dropout: float = 0.0) -> nn.Sequential:
    """Flatten, then Linear-ReLU-Dropout blocks; the last Linear gives the logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    if input_dropout:
        layers.append(nn.Dropout(input_dropout))
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers += [nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers)


def build(spec: str) -> Built:
    """A model from a MODEL spec (checkpoints: see `load_built`), with what its files say:
    weights files and their SHA-256, its own preprocessing and class names, and whether it is
    only an initialisation (`untrained`: an architecture spec without weights)."""
    scheme, body, options = parse_spec(spec, MODEL_FORMS, "MODEL")
    if scheme == "mlp":
        try:
            sizes = [int(s) for s in body.split("-")]
        except ValueError:
            sizes = []
        if len(sizes) < 2 or min(sizes) < 1:
            raise SpecError(f"malformed mlp spec {spec!r}; expected e.g. mlp:784-1200-1200-10")
        unknown = set(options) - {"dropout", "input_dropout"}
        if unknown:
            raise SpecError(f"unknown mlp options {sorted(unknown)}; use dropout, input_dropout")
        try:
            return Built(mlp(sizes, **options), untrained=True)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"bad option value in {spec!r}: {exc}; e.g. dropout=0.5") from None
    if scheme == "torchvision":
        from softlabels.teachers.torchvision import build_torchvision

        return build_torchvision(body, options, spec)
    if scheme == "timm":
        from softlabels.teachers.timm import build_timm

        return build_timm(body, options, spec)
    if scheme == "gpt":
        from softlabels.teachers.gpt import build_gpt

        return Built(build_gpt(body, options, spec), untrained=True)
    if scheme == "hf":
        from softlabels.teachers.hf import build_hf

        return build_hf(body, options, spec)
    if scheme == "python":
        model = import_factory(body, spec)(**options)
        if not isinstance(model, nn.Module):
            raise SpecError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return Built(model)  # the user's code may load weights: we cannot tell, so accepted
    raise SpecError(f"unknown MODEL scheme {scheme!r} in {spec!r}; valid forms: "
                    + ", ".join(MODEL_FORMS))


def build_model(spec: str) -> nn.Module:
    """A model from a MODEL spec (checkpoints: see `load_model`); weights where the spec
    names a file (`weights=`, `checkpoint=`, `hf:DIR`), else freshly initialised."""
    return build(spec).model


def architecture_spec(spec: str) -> str:
    """`spec` without the options that name a weights file: what a checkpoint records to
    rebuild its architecture (its own state dict then replaces the weights)."""
    scheme, sep, rest = spec.partition(":")
    body, qmark, query = rest.partition("?")
    if not qmark or scheme not in ("torchvision", "timm"):
        return spec
    kept = [item for item in query.split("&") if item.partition("=")[0] not in WEIGHTS_OPTIONS]
    return f"{scheme}{sep}{body}" + (f"?{'&'.join(kept)}" if kept else "")


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], *, spec: str, meta: dict[str, Any] | None = None
) -> None:
    """Write a self-describing checkpoint: the MODEL spec that rebuilds it plus its weights."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "model_spec": architecture_spec(spec),
               "state_dict": state, "meta": redact_obj(meta or {})}  # no URL credentials
    with atomic_write(path, what="checkpoint") as f:  # never through a link
        torch.save(payload, f)


def load_checkpoint(path: str | os.PathLike[str], *, trust_code: bool = False,
                    max_bytes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model, payload) from a checkpoint written by `save_checkpoint`; loads no pickled code.

    Its `model_spec` is data: only a built-in architecture is built from it unless
    `trust_code`. Weights with NaN or inf (a diverged run) are refused. With `max_bytes`, a
    file, or a built-in model spec measured on the meta device, past it is refused before
    being allocated."""
    if max_bytes is not None:
        refuse_past_bound(os.path.getsize(path), max_bytes, f"checkpoint {path} (its file)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise SpecError(f"cannot read checkpoint {path}: {unreadable_reason(exc)}; give a "
                        "checkpoint `softlabels train` wrote") from None
    if (not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT
            or not isinstance(payload.get("model_spec"), str)
            or not isinstance(payload.get("state_dict"), dict)):
        raise SpecError(f"{path} is not a softlabels checkpoint; write one with `softlabels train`")
    require_trusted(payload["model_spec"], f"checkpoint {path}", trust_code)
    _refuse_larger_than_weights(payload, path, max_bytes)
    model = build_model(architecture_spec(payload["model_spec"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise SpecError(f"checkpoint {path}: its weights do not fit {payload['model_spec']!r} "
                        f"({str(exc).splitlines()[0]}); the file was edited or damaged") from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SpecError(f"checkpoint {path} has NaN or inf in {name!r}: it was saved from a "
                            "diverged run or damaged; retrain it (e.g. a lower --lr)")
    return model, payload


def _refuse_larger_than_weights(payload: dict[str, Any], path: object,
                                max_bytes: int | None) -> None:
    """Refuse, before allocating it, a built-in model whose spec names more parameters than
    the checkpoint's tensors hold (a 6 KB file naming a 30000-wide MLP), or more bytes than
    `max_bytes`: the model is built on the meta device (shapes only, no memory) and its
    elements counted."""
    spec = architecture_spec(payload["model_spec"])
    if spec.split(":", 1)[0] not in BUILT_IN:
        return
    try:
        with torch.device("meta"):
            skeleton = build_model(spec)
    except Exception:  # noqa: BLE001  (not buildable on meta: the real build says why)
        return
    want = sum(t.numel() for t in skeleton.state_dict().values())
    have = sum(t.numel() for t in payload["state_dict"].values() if isinstance(t, torch.Tensor))
    if want > have:
        raise SpecError(f"checkpoint {path}: its model spec {spec!r} has {want} weights, the "
                        f"file holds {have}; the file was edited or damaged (nothing was "
                        "allocated)")
    refuse_past_bound(module_bytes(skeleton), max_bytes, f"checkpoint {path} ({spec})")


BUILT_IN = ("mlp", "gpt", "torchvision", "timm")  # measured on the meta device from the spec


def spec_bytes(spec: str) -> int | None:
    """Bytes of parameters and buffers of the model `spec` names, measured on the meta device
    before anything is allocated; None where it cannot be measured (`python:` factories run
    the user's code, which is run once, as asked)."""
    scheme = spec.partition(":")[0]
    if scheme in BUILT_IN:
        return skeleton_bytes(lambda: build_model(architecture_spec(spec)))
    if scheme == "hf":
        from softlabels.teachers.hf import hf_skeleton_bytes

        return hf_skeleton_bytes(spec)
    return None


def load_built(spec: str, *, trust_code: bool = False,
               max_bytes: int | None = None) -> tuple[Built, str]:
    """(the model with what its files say, the spec that rebuilds it) for a checkpoint path or
    any MODEL spec.

    A spec the caller names is built as named (`python:` included: the caller chose it); a
    checkpoint's own spec only when built in, unless `trust_code`. A model measured past
    `max_bytes` on the meta device is refused before it is allocated."""
    if not isinstance(spec, str):
        raise SpecError(f"a MODEL spec is a string, got {spec!r}; valid forms: "
                        + ", ".join(MODEL_FORMS))
    if Path(spec).is_file():
        model, payload = load_checkpoint(spec, trust_code=trust_code, max_bytes=max_bytes)
        return Built(model, files=(WeightsFile(spec, file_sha256(spec)),)), payload["model_spec"]
    if spec.endswith((".pt", ".pth")) and spec.partition(":")[0] not in MODEL_SCHEMES:
        raise SpecError(f"no checkpoint at {spec!r}; check the path or train one first")
    if max_bytes is not None:
        need = spec_bytes(spec)
        if need is not None:
            refuse_past_bound(need, max_bytes, f"teacher {spec!r}")
    return build(spec), spec


def load_model(spec: str, *, trust_code: bool = False) -> tuple[nn.Module, str]:
    """(model, the spec that rebuilds it) for a checkpoint path or any MODEL spec."""
    built, rebuilt = load_built(spec, trust_code=trust_code)
    return built.model, rebuilt


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes) in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
