"""DATA and MODEL specs (listed in the README): short strings that name a dataset or a model.

DATA:  npz:PATH | mnist:ROOT?split=train|test | torchvision:NAME?root=ROOT&split=..
       | imagefolder:DIR?resize=..&crop=.. | hfds:DIR?split=.. | wds:S-{0..9}.tar
       | tokens:PATH | text:PATH?tokenizer=DIR
       | python:package.module:factory?key=value
MODEL: CHECKPOINT.pt | mlp:784-1200-1200-10?dropout=0.5 | torchvision:NAME?weights=FILE&..
       | timm:NAME?checkpoint=FILE | hf:DIR | gpt:.. | python:package.module:factory?key=value
       (docs/TEACHERS.md)

Here: parsing a spec, the trust rule for specs read from files, and specs made portable to
other processes. The data a DATA spec names is built by sources/load.py, the model a MODEL spec
names by teachers/models.py.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote

from softlabels.errors import SpecError, UntrustedCodeError

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




# --- models -----------------------------------------------------------------------------------








WEIGHTS_OPTIONS = ("weights", "checkpoint")  # the options that name a weights file
















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
