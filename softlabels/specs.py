"""DATA and MODEL specs (listed in the README): short strings that name a dataset or a model,
and the self-describing checkpoints that `softlabels train` writes.

DATA:  npz:PATH | mnist:ROOT?split=train|test | torchvision:NAME?root=ROOT&split=..
       | imagefolder:DIR?resize=..&crop=.. | hfds:DIR?split=.. | wds:S-{0..9}.tar
       | tokens:PATH | text:PATH?tokenizer=DIR
       | python:package.module:factory?key=value
MODEL: CHECKPOINT.pt | mlp:784-1200-1200-10?dropout=0.5 | torchvision:NAME?weights=FILE&..
       | timm:NAME?checkpoint=FILE | hf:DIR | gpt:.. | python:package.module:factory?key=value
       (docs/TEACHERS.md)

The example datasets themselves (NpzDataset, checked labels, items) are example_data.py's;
their names stay importable from here.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import DataError, SpecError, UntrustedCodeError
from .example_data import (  # noqa: F401  (importable from here, as before the split)
    NpzDataset,
    check_labels,
    class_names,
    example_hash,
    hashed_item,
    split_item,
    to_tensor,
    torchvision_dataset,
)
from .redact import redact_obj
from .safe_write import atomic_write
from .weights import Built, WeightsFile, file_sha256

DATA_FORMS = (
    "npz:PATH",
    "mnist:ROOT?split=train|test",
    "torchvision:NAME?root=ROOT&split=..",
    "imagefolder:DIR?resize=256&crop=224&mean=..&std=..&interpolation=..",
    "hfds:DIR|FILE.parquet?split=..&image=..&label=.. (+ the imagefolder options)",
    "wds:SHARDS-{000..009}.tar (+ the imagefolder options)",
    "transferset:PATH (a set made with --store-inputs)",
    "tokens:FILE.jsonl|FILE.parquet|DIR?field=..&mask=.. (token sequences)",
    "text:FILE|DIR?tokenizer=DIR&max_length=..&stride=.. (raw text, the teacher's tokenizer)",
    "python:package.module:factory",
)
MODEL_FORMS = (
    "PATH.pt (a checkpoint written by `softlabels train`)",
    "mlp:784-1200-1200-10?dropout=0.5",
    "torchvision:NAME?weights=FILE.pth&num_classes=N",
    "timm:NAME?checkpoint=FILE.pth",
    "hf:DIR (a local transformers causal LM or image classifier)",
    "gpt:256?dim=96&layers=3&heads=4&context=128 (a small causal transformer)",
    "python:package.module:factory",
)
MODEL_SCHEMES = ("mlp", "torchvision", "timm", "hf", "gpt", "python")
CHECKPOINT_FORMAT = "softlabels-checkpoint"
CODE_SCHEME = "python"  # the one scheme that imports and runs code


def require_trusted(spec: str, source: str, trust_code: bool) -> None:
    """The trust model: a spec read from a file (`source`: a checkpoint, a transfer set, a
    pipeline file) may name only built-in architectures and transforms; a `python:` spec from
    a file runs only with the user's opt-in, as the ecosystem's `trust_remote_code`."""
    if not trust_code and str(spec).strip().startswith(f"{CODE_SCHEME}:"):
        raise UntrustedCodeError(
            f"{source} names code to run ({spec!r}); files are data and only built-in specs "
            "are built from them; if you trust its author, pass --trust-code "
            "(trust_code=True in Python)")


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_spec(spec: str, forms: tuple[str, ...], what: str) -> tuple[str, str, dict[str, Any]]:
    """Split 'scheme:body?k=v&..' into (scheme, body, options)."""
    if not isinstance(spec, str):
        raise SpecError(f"a {what} spec is a string, got {spec!r}; valid forms: "
                        + ", ".join(forms))
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
        raise SpecError(f"cannot import module {module_name!r} of {spec!r} ({exc}); check the "
                        "name and that the module is on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"module {module_name!r} has no callable {attr!r} (from {spec!r})")
    return factory


# --- data -------------------------------------------------------------------------------------


def load_data(spec: str) -> Dataset:
    """Build the dataset a DATA spec names. Items are (input tensor, label or -1)."""
    scheme, body, options = parse_spec(spec, DATA_FORMS, "DATA")
    if scheme == "npz":
        if not Path(body).is_file():
            raise DataError(f"no such file {body!r} (from {spec!r}); check the path")
        return NpzDataset(body)
    if scheme == "mnist":
        return torchvision_dataset("MNIST", body, options, spec)
    if scheme == "torchvision":
        return torchvision_dataset(body, str(options.pop("root", ".")), options, spec)
    if scheme == "imagefolder":
        from .images import image_folder

        return image_folder(body, options, spec)
    if scheme == "hfds":
        from .hf_images import hf_images

        return hf_images(body, options, spec)
    if scheme == "wds":
        from .shards import tar_shards

        return tar_shards(body, options, spec)
    if scheme == "transferset":
        from .format.reader import TransferSetInputs

        return TransferSetInputs(body)
    if scheme == "tokens":
        from .token_files import load_tokens

        return load_tokens(body, options, spec)
    if scheme == "text":
        from .text_source import load_text

        return load_text(body, options, spec)
    if scheme == "python":
        data = import_factory(body, spec)(**options)
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise SpecError(f"{spec!r} returned {type(data).__name__}, not a map-style Dataset")
        return data
    raise SpecError(f"unknown DATA scheme {scheme!r} in {spec!r}; valid forms: "
                    + ", ".join(DATA_FORMS))


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
        from .torchvision_teacher import build_torchvision

        return build_torchvision(body, options, spec)
    if scheme == "timm":
        from .timm_teacher import build_timm

        return build_timm(body, options, spec)
    if scheme == "gpt":
        from .gpt import build_gpt

        return Built(build_gpt(body, options, spec), untrained=True)
    if scheme == "hf":
        from .hf import build_hf

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


WEIGHTS_OPTIONS = ("weights", "checkpoint")  # the options that name a weights file


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
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """(model, payload) from a checkpoint written by `save_checkpoint`; loads no pickled code.

    Its `model_spec` is data: only a built-in architecture is built from it unless
    `trust_code`. Weights with NaN or inf (a diverged run) are refused."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"cannot read checkpoint {path}: {msg}") from None
    if (not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT
            or not isinstance(payload.get("model_spec"), str)
            or not isinstance(payload.get("state_dict"), dict)):
        raise SpecError(f"{path} is not a softlabels checkpoint; write one with `softlabels train`")
    require_trusted(payload["model_spec"], f"checkpoint {path}", trust_code)
    _refuse_larger_than_weights(payload, path)
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


def _refuse_larger_than_weights(payload: dict[str, Any], path: object) -> None:
    """Refuse, before allocating it, a built-in model whose spec names more parameters than
    the checkpoint's tensors hold (a 6 KB file naming a 30000-wide MLP): the model is built
    on the meta device (shapes only, no memory) and its elements counted."""
    spec = architecture_spec(payload["model_spec"])
    if spec.split(":", 1)[0] not in ("mlp", "gpt", "torchvision", "timm"):
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


def load_built(spec: str, *, trust_code: bool = False) -> tuple[Built, str]:
    """(the model with what its files say, the spec that rebuilds it) for a checkpoint path or
    any MODEL spec.

    A spec the caller names is built as named (`python:` included: the caller chose it); a
    checkpoint's own spec only when built in, unless `trust_code`."""
    if not isinstance(spec, str):
        raise SpecError(f"a MODEL spec is a string, got {spec!r}; valid forms: "
                        + ", ".join(MODEL_FORMS))
    if Path(spec).is_file():
        model, payload = load_checkpoint(spec, trust_code=trust_code)
        return Built(model, files=(WeightsFile(spec, file_sha256(spec)),)), payload["model_spec"]
    if spec.endswith((".pt", ".pth")) and spec.partition(":")[0] not in MODEL_SCHEMES:
        raise SpecError(f"no checkpoint at {spec!r}; check the path or train one first")
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


# --- specs for other processes (a Dask cluster's workers) ------------------------------------


class Portable(NamedTuple):
    """A spec another process can load: its paths made absolute, and what that process must
    have to load it (the paths it must see, the modules it must import)."""

    spec: str
    paths: tuple[str, ...]
    modules: tuple[str, ...]


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def portable_spec(spec: str, *, kind: str) -> Portable:
    """`spec` (a DATA or MODEL spec, `kind`) with its path resolved against this process's
    working directory, so that a process started elsewhere (a Dask worker) loads the same
    files. Options and everything else are kept as written; URLs are left alone."""
    if kind == "MODEL" and (Path(spec).is_file() or spec.endswith((".pt", ".pth"))
                            and spec.partition(":")[0] not in MODEL_SCHEMES):
        path = _absolute(spec)
        return Portable(path, (path,), ())
    scheme, sep, rest = spec.partition(":")
    body, qmark, query = rest.partition("?")
    if scheme == CODE_SCHEME:
        return Portable(spec, (), (body.partition(":")[0],))
    if (kind == "DATA" and scheme in ("npz", "mnist", "imagefolder", "transferset", "tokens",
                                      "hfds", "wds")
            or kind == "MODEL" and scheme == "hf") and body:
        path = _absolute(body)
        return Portable(f"{scheme}:{path}{qmark}{query}", (path,), ())
    if kind == "MODEL" and scheme in ("torchvision", "timm") and query:
        pairs = parse_qsl(query)
        files = [_absolute(str(v)) for k, v in pairs if k in WEIGHTS_OPTIONS]
        items = [f"{k}={quote(_absolute(v), safe='/:')}" if k in WEIGHTS_OPTIONS else item
                 for item in query.split("&") if item
                 for k, _, v in [item.partition("=")]]
        return Portable(f"{scheme}:{body}?{'&'.join(items)}", tuple(files), ())
    if kind == "DATA" and scheme == "text" and body:
        path, items = _absolute(body), query.split("&") if query else []
        tokenizer = dict(parse_qsl(query)).get("tokenizer")
        items = [i for i in items if not i.startswith("tokenizer=")]
        if tokenizer:
            tokenizer = _absolute(tokenizer)
            items.append(f"tokenizer={quote(tokenizer, safe='/:')}")
        return Portable(f"{scheme}:{path}?{'&'.join(items)}",
                        (path, tokenizer) if tokenizer else (path,), ())
    if kind == "DATA" and scheme == "torchvision":
        pairs = parse_qsl(query)
        root = _absolute(str(dict(pairs).get("root", ".")))
        items = [item for item in query.split("&") if item and not item.startswith("root=")]
        items.append(f"root={quote(root, safe='/:')}")
        return Portable(f"{scheme}:{body}?{'&'.join(items)}", (root,), ())
    return Portable(spec, (), ())
