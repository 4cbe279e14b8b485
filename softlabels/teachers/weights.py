"""Weights files as data: a state dict read from `.pth`/`.pt` (torch.load, weights_only) or
`.safetensors`, the SHA-256 of the file's bytes, and strict loading into a model that names
missing, unexpected and mis-shaped tensors in one line.

`Built` is what a MODEL spec yields: the model, plus what is known about it (its weights files,
its own preprocessing, its class names, and whether its weights are only an initialisation).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softlabels.errors import SpecError
from softlabels.preprocessing import OPTION_NAMES, Preprocess
from softlabels.safe_read import open_input

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_NAMED = 3  # keys named in a message
# torch.hub's HASH_REGEX: a file named NAME-<hex>.EXT carries a prefix of its SHA-256
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")


def unreadable_reason(exc: BaseException) -> str:
    """Why `torch.load(..., weights_only=True)` failed, in words that never pass on torch's
    advice to turn `weights_only` off (which would let the file run code)."""
    if "Unsupported global" in str(exc):
        return ("it holds pickled Python objects besides tensors, which softlabels does not "
                "unpickle (they could run code)")
    return f"not a file torch.save wrote (damaged, or another kind of file: {type(exc).__name__})"


@dataclass(frozen=True)
class WeightsFile:
    """A weights file a model was loaded from: its path and the SHA-256 of its bytes."""

    path: str
    sha256: str

    def to_meta(self) -> dict[str, str]:
        return {"file": os.path.basename(self.path), "sha256": self.sha256}


@dataclass
class Built:
    """A model built from a MODEL spec, with what the spec's files say about it.

    untrained: every weight is at its initialisation (an architecture spec with no weights
    file or checkpoint): `precompute` refuses such a teacher unless asked for one."""

    model: nn.Module
    files: tuple[WeightsFile, ...] = ()
    preprocess: Preprocess | None = None
    class_names: tuple[str, ...] | None = None
    untrained: bool = False
    entry: str | None = None  # the library's weights entry the file is (e.g. torchvision's)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open_input(path, "weights file") as f:  # a fifo or a device is refused, not read
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def hash_prefix(filename: str) -> str | None:
    """The SHA-256 prefix a file name carries as torch.hub names downloads
    (`resnet50-11ad3fa6.pth` -> `11ad3fa6`), or None."""
    match = _HASH_IN_NAME.search(os.path.basename(filename))
    return match.group(1) if match and match.group(1) else None


def check_hash_prefix(path: str | os.PathLike[str], sha256: str, what: str) -> None:
    """Refuse a file whose SHA-256 does not begin with the prefix its name carries (as
    torch.hub's check_hash does for a download)."""
    prefix = hash_prefix(str(path))
    if prefix and not sha256.startswith(prefix):
        raise SpecError(f"{path}: its name says its SHA-256 begins with {prefix} ({what}), but "
                        f"it begins with {sha256[:len(prefix)]}: the file is damaged or another "
                        "file; download it again, or rename a file of your own")


def read_state_dict(path: str | os.PathLike[str], spec: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a torch.save'd state dict read with
    weights_only (no pickled code runs). A dict holding the state dict under `state_dict` or
    `model` (a training checkpoint) is unwrapped; a DataParallel `module.` prefix is dropped."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no weights file at {str(path)!r} (from {spec!r}); check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise SpecError(f"{path} is a safetensors file: pip install safetensors") from None
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not a state dict at all: damaged
            raise SpecError(f"cannot read weights file {path} (from {spec!r}): not a file "
                            "torch.save wrote (damaged, or another kind of file); it must be a "
                            "state dict (.pth/.pt from torch.save, or .safetensors)") from None
        raise SpecError(f"{path} (from {spec!r}) holds pickled Python objects besides "
                        "tensors, which softlabels does not unpickle (they could run code); "
                        "save the model's state dict alone: torch.save(model.state_dict(), "
                        "PATH), or as .safetensors") from None
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        first = ((str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
                 if path.suffix == ".safetensors" else unreadable_reason(exc))
        raise SpecError(f"cannot read weights file {path} (from {spec!r}): {first}; it "
                        "must be a state dict (.pth/.pt from torch.save, or .safetensors)"
                        ) from None
    if isinstance(state, Mapping) and state.get("format") == "softlabels-checkpoint":
        raise SpecError(f"{path} is a softlabels checkpoint: pass its path as the MODEL itself "
                        f"(--teacher {path}), not as weights")
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise SpecError(f"{path} (from {spec!r}) holds no state dict (a mapping of names to "
                        "tensors); save one with torch.save(model.state_dict(), PATH)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _named(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > _NAMED else ""
    return ", ".join(keys[:_NAMED]) + more


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str,
                spec: str) -> None:
    """Load `state` into `model`, refusing missing, unexpected or mis-shaped tensors in one
    line (a file of another architecture, or another class count), and NaN or inf."""
    check_tensors(model.state_dict(), state, where, spec)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SpecError(f"{where} has NaN or inf in {name!r}: it is damaged or saved from "
                            "a diverged run; get a good copy")
    model.load_state_dict(state, strict=True)


def precheck(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], where: str,
             spec: str) -> None:
    """Check the file's tensors against the architecture built on the meta device (shapes,
    no memory), so that a file that does not fit is refused before a large model is
    allocated. A constructor that computes on its tensors cannot run there: the real build's
    check then decides."""
    try:
        with torch.device("meta"):
            shadow = build()
    except Exception:  # noqa: BLE001  (any constructor error: the real build reports it)
        return
    check_tensors(shadow.state_dict(), state, where, spec)


def check_tensors(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                  where: str, spec: str) -> None:
    """Refuse a state dict whose names or shapes differ from the model's, in one line."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if shaped and not missing and not unexpected and _head_only(own, state, shaped):
        n_file, n_spec = int(state[shaped[0]].shape[0]), int(own[shaped[0]].shape[0])
        raise SpecError(f"{where} holds a {n_file}-class head ({shaped[0]} "
                        f"{tuple(state[shaped[0]].shape)}) but {spec!r} builds {n_spec} classes;"
                        f" set num_classes={n_file}, or train a "
                        f"{n_spec}-class student from this teacher's soft targets")
    problems = ([f"{len(missing)} missing ({_named(missing)})"] if missing else []) + (
        [f"{len(unexpected)} unexpected ({_named(unexpected)})"] if unexpected else []) + (
        [f"{len(shaped)} of another shape ("
         + _named([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shaped])
         + ")"] if shaped else [])
    if problems:
        raise SpecError(f"{where} does not hold the weights of {spec!r}: tensors "
                        f"{'; '.join(problems)}; was it saved from another architecture or "
                        "other options? name the ones it was saved from")


def _head_only(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
               shaped: list[str]) -> bool:
    """Whether the mis-shaped tensors differ only in their first dimension, all by the same
    sizes: a classifier head with another class count."""
    pairs = {(tuple(state[k].shape), tuple(own[k].shape)) for k in shaped}
    return all(len(a) and len(a) == len(b) and a[1:] == b[1:] for a, b in pairs) and len(
        {(a[0], b[0]) for a, b in pairs}) == 1


def load_weights_file(build: Callable[[], nn.Module], path: str,
                      spec: str) -> tuple[nn.Module, WeightsFile]:
    """The model `build` makes with the weights of `path` loaded strictly (checked on the meta
    device first), and the file with its SHA-256."""
    state = read_state_dict(path, spec)
    where = f"weights file {path}"
    precheck(build, state, where, spec)
    model = build()
    load_strict(model, state, where, spec)
    return model, WeightsFile(str(path), file_sha256(path))


def take_preprocess(options: dict[str, Any], base: Preprocess | None) -> Preprocess | None:
    """The teacher's preprocessing with the spec's overrides (resize=, crop=, mean=, std=,
    interpolation=) popped from `options` and applied; None when neither gives any."""
    if not any(k in options for k in OPTION_NAMES):
        return base
    return (base or Preprocess()).with_options(options)
