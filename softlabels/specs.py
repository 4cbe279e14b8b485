"""DATA and MODEL specs (DESIGN §6): short strings that name a dataset or a model, and the
self-describing checkpoints that `softlabels train` writes.

DATA:  npz:PATH | mnist:ROOT?split=train|test | torchvision:NAME?root=ROOT&split=..
       | imagefolder:DIR?size=N | python:package.module:factory?key=value
MODEL: CHECKPOINT.pt | mlp:784-1200-1200-10?dropout=0.5 | torchvision:NAME?num_classes=..
       | python:package.module:factory?key=value
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import DataError, SpecError

DATA_FORMS = (
    "npz:PATH",
    "mnist:ROOT?split=train|test",
    "torchvision:NAME?root=ROOT&split=..",
    "imagefolder:DIR?size=N",
    "transferset:PATH (a set made with --store-inputs)",
    "tokens:FILE.jsonl|FILE.parquet|DIR?field=..&mask=.. (token sequences)",
    "python:package.module:factory",
)
MODEL_FORMS = (
    "PATH.pt (a checkpoint written by `softlabels train`)",
    "mlp:784-1200-1200-10?dropout=0.5",
    "torchvision:NAME?num_classes=N",
    "hf:DIR (a local transformers causal LM)",
    "python:package.module:factory",
)
CHECKPOINT_FORMAT = "softlabels-checkpoint"


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_spec(spec: str, forms: tuple[str, ...], what: str) -> tuple[str, str, dict[str, Any]]:
    """Split 'scheme:body?k=v&..' into (scheme, body, options)."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SpecError(f"malformed {what} spec {spec!r}; valid forms: {', '.join(forms)}")
    body, _, query = rest.partition("?")
    try:
        options = {k: _value(v) for k, v in parse_qsl(query, strict_parsing=bool(query))}
    except ValueError:
        raise SpecError(
            f"malformed options {query!r} in {what} spec {spec!r}; use ?key=value&.."
        ) from None
    return scheme, body, options


def import_factory(body: str, spec: str) -> Callable[..., Any]:
    module_name, _, attr = body.partition(":")
    if not module_name or not attr:
        raise SpecError(f"malformed spec {spec!r}; expected python:package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"cannot import module {module_name!r} of {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"module {module_name!r} has no callable {attr!r} (from {spec!r})")
    return factory


# --- data -------------------------------------------------------------------------------------


class NpzDataset(Dataset):
    """Arrays `x` (N, ...) and optional `y` (N,) from an .npz; uint8 inputs are scaled to [0, 1]."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            with np.load(path, allow_pickle=False) as f:
                if "x" not in f.files:
                    raise DataError(
                        f"{path} has no array 'x' (found {sorted(f.files)}); save inputs as x="
                    )
                x, y = f["x"], (f["y"] if "y" in f.files else None)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path} as .npz: {exc}") from None
        scale = 1 / 255 if x.dtype == np.uint8 else 1.0
        self.x = torch.from_numpy(np.ascontiguousarray(x)).float() * scale
        if y is not None and len(y) != len(x):
            raise DataError(f"{path}: y has {len(y)} rows but x has {len(x)}; they must match")
        self.y = torch.full((len(x),), -1) if y is None else torch.from_numpy(y.astype(np.int64))
        labelled = self.y[self.y >= 0]
        self.classes = [str(c) for c in range(int(labelled.max()) + 1)] if len(labelled) else []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def _to_tensor(size: int | None = None) -> Callable[[Any], torch.Tensor]:
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage()]
    if size:
        steps += [v2.Resize(size), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


def _torchvision_dataset(name: str, root: str, options: dict[str, Any], spec: str) -> Dataset:
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if not inspect.isclass(cls):
        raise SpecError(f"torchvision.datasets has no dataset {name!r} (from {spec!r})")
    split = str(options.pop("split", "train"))
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"transform": _to_tensor(options.pop("size", None)), **options}
    if "train" in params:
        if split not in ("train", "test"):
            raise SpecError(f"split must be train or test for {name}, got {split!r}")
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    if "download" in params:
        kwargs["download"] = False  # never touch the network
    if not Path(root).exists():
        raise DataError(f"data root {root!r} of {spec!r} does not exist")
    try:
        return cls(root, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(
            f"cannot load {name} from {root!r}: {str(exc).splitlines()[0]}; put the files under "
            "ROOT as torchvision expects (nothing is downloaded)"
        ) from None


def load_data(spec: str) -> Dataset:
    """Build the dataset a DATA spec names. Items are (input tensor, label or -1)."""
    scheme, body, options = parse_spec(spec, DATA_FORMS, "DATA")
    if scheme == "npz":
        if not Path(body).is_file():
            raise DataError(f"no such file {body!r} (from {spec!r})")
        return NpzDataset(body)
    if scheme == "mnist":
        return _torchvision_dataset("MNIST", body, options, spec)
    if scheme == "torchvision":
        return _torchvision_dataset(body, str(options.pop("root", ".")), options, spec)
    if scheme == "imagefolder":
        from torchvision.datasets import ImageFolder

        if not Path(body).is_dir():
            raise DataError(f"no such directory {body!r} (from {spec!r})")
        return ImageFolder(body, transform=_to_tensor(options.get("size")))
    if scheme == "transferset":
        from .format.reader import TransferSetInputs

        return TransferSetInputs(body)
    if scheme == "tokens":
        from .tokens import load_tokens

        return load_tokens(body, options, spec)
    if scheme == "python":
        data = import_factory(body, spec)(**options)
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise SpecError(f"{spec!r} returned {type(data).__name__}, not a map-style Dataset")
        return data
    raise SpecError(f"unknown DATA scheme {scheme!r} in {spec!r}; valid forms: "
                    + ", ".join(DATA_FORMS))


def class_names(data: Dataset) -> list[str]:
    """The dataset's class names where it has them (torchvision's `classes`), else []."""
    return [str(c) for c in getattr(data, "classes", None) or []]


def split_item(item: Any) -> tuple[torch.Tensor, int]:
    """(input, label) from a dataset item; a bare input gets label -1."""
    if isinstance(item, (tuple, list)):
        x, y = item[0], (item[1] if len(item) > 1 else -1)
    else:
        x, y = item, -1
    return torch.as_tensor(x), int(y)


# --- models -----------------------------------------------------------------------------------


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


def build_model(spec: str) -> nn.Module:
    """A freshly initialised model from a MODEL spec (checkpoints: see `load_model`)."""
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
        return mlp(sizes, **options)
    if scheme == "torchvision":
        import torchvision

        if body not in torchvision.models.list_models():
            raise SpecError(
                f"torchvision has no model {body!r}; see torchvision.models.list_models()"
            )
        return torchvision.models.get_model(body, weights=None, **options)
    if scheme == "hf":
        from .hf import load_hf

        return load_hf(body, options, spec)
    if scheme == "python":
        model = import_factory(body, spec)(**options)
        if not isinstance(model, nn.Module):
            raise SpecError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise SpecError(f"unknown MODEL scheme {scheme!r} in {spec!r}; valid forms: "
                    + ", ".join(MODEL_FORMS))


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], *, spec: str, meta: dict[str, Any] | None = None
) -> None:
    """Write a self-describing checkpoint: the MODEL spec that rebuilds it plus its weights."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "model_spec": spec,
               "state_dict": state, "meta": meta or {}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """(model, payload) from a checkpoint written by `save_checkpoint`; loads no pickled code."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise SpecError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise SpecError(f"{path} is not a softlabels checkpoint; write one with `softlabels train`")
    model = build_model(payload["model_spec"])
    model.load_state_dict(payload["state_dict"])
    return model, payload


def load_model(spec: str) -> tuple[nn.Module, str]:
    """(model, the spec that rebuilds it) for a checkpoint path or any MODEL spec."""
    if Path(spec).is_file():
        model, payload = load_checkpoint(spec)
        return model, payload["model_spec"]
    if spec.endswith((".pt", ".pth")):
        raise SpecError(f"no checkpoint at {spec!r}; check the path or train one first")
    return build_model(spec), spec


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes) in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
