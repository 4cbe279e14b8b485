"""`softlabels run PIPELINE.toml`: runnable experiments built from the library's stages.

A pipeline file names a recipe and its parameters (see pipelines/README.md). Each step's output
is a file in the output directory plus an entry in `steps.json` recording the parameters that
made it; a rerun skips every step whose parameters are unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softlabels.errors import SoftlabelsError
from softlabels.safe_write import write_text
from softlabels.specs import require_trusted

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'table.key=VALUE' (VALUE in TOML, e.g. 100, 2.5, "text", [1, 2]) as a nested dict."""
    path, sep, value = text.partition("=")
    keys = [k.strip() for k in path.split(".")]
    if not sep or not all(keys):
        raise SoftlabelsError("--set takes TABLE.KEY=VALUE (e.g. "
                              f"temperature_sweep.max_epochs=300), got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word: take it as a string
    out: dict[str, Any] = {keys[-1]: parsed}
    for key in reversed(keys[:-1]):
        out = {key: out}
    return out


def _refuse_code(cfg: Any, where: str, trust_code: bool) -> None:
    """A pipeline file is data: every `python:` spec in it needs the user's opt-in."""
    if isinstance(cfg, dict):
        for value in cfg.values():
            _refuse_code(value, where, trust_code)
    elif isinstance(cfg, list):
        for value in cfg:
            _refuse_code(value, where, trust_code)
    elif isinstance(cfg, str):
        require_trusted(cfg, where, trust_code)


MAX_PIPELINE_BYTES = 1 << 20  # a pipeline file is a page of TOML


def _read_pipeline_text(p: Path) -> str:
    """The file's text: a regular file of at most `MAX_PIPELINE_BYTES` (not /dev/zero, not a
    folder), in UTF-8, each refused in one line."""
    if p.exists() and not p.is_file():
        raise SoftlabelsError(f"{p} is not a regular file; a pipeline is a TOML file such as "
                              "pipelines/mnist_hinton.toml")
    with open(p, "rb") as f:
        raw = f.read(MAX_PIPELINE_BYTES + 1)
    if len(raw) > MAX_PIPELINE_BYTES:
        raise SoftlabelsError(f"{p} is larger than {MAX_PIPELINE_BYTES} bytes; a pipeline file "
                              "is a page of TOML: check the path")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SoftlabelsError(f"{p} is not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x})"
                              "; a pipeline file is TOML: save it as UTF-8") from None


def load_pipeline(path: str | os.PathLike[str], *, quick: bool = False,
                  overrides: Sequence[str] = (), trust_code: bool = False) -> dict[str, Any]:
    """The pipeline's configuration; with `quick`, its [quick] table merged over the rest;
    then each `overrides` entry (TABLE.KEY=VALUE) over that. A `python:` spec in the file is
    refused unless `trust_code` (one given in `overrides` the user named)."""
    p = Path(path)
    try:
        cfg = tomllib.loads(_read_pipeline_text(p))
    except FileNotFoundError:
        raise SoftlabelsError(f"no pipeline file at {p}; check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise SoftlabelsError(f"{p} is not valid TOML: {exc}") from None
    _refuse_code(cfg, f"pipeline file {p}", trust_code)
    recipe = cfg.get("recipe")
    if recipe not in RECIPES:
        raise SoftlabelsError(f"{p}: unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    quick_cfg = cfg.pop("quick", {})
    cfg = _merge(cfg, quick_cfg) if quick else cfg
    for text in overrides:
        cfg = _merge(cfg, parse_override(text))
    return cfg


class Steps:
    """Remembers finished steps (and their results) in OUT/steps.json, keyed by parameters."""

    def __init__(self, out: Path, say: Say) -> None:
        self.out, self.say = out, say
        self.file = out / "steps.json"
        self.done: dict[str, Any] = json.loads(self.file.read_text()) if self.file.exists() else {}

    @staticmethod
    def key(params: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()

    def run(self, name: str, params: dict[str, Any], fn: Callable[[], Any]) -> Any:
        entry = self.done.get(name)
        if entry and entry["key"] == self.key(params):
            self.say(f"[skip] {name} (finished earlier)")
            return entry["result"]
        self.say(f"[run ] {name}")
        t0 = time.perf_counter()
        result = fn()
        self.done[name] = {"key": self.key(params), "result": result,
                           "seconds": round(time.perf_counter() - t0, 1)}
        write_text(self.file, json.dumps(self.done, indent=1), what="pipeline progress")
        return result

    def seconds(self) -> float:
        return sum(e.get("seconds", 0) for e in self.done.values())


def run_pipeline(path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None,
                 quick: bool = False, overrides: Sequence[str] = (), say: Say = log.info,
                 callbacks: Sequence[Callable[[str, dict[str, Any]], None]] = (),
                 trust_code: bool = False) -> dict[str, Any]:
    """Run a pipeline file; returns its results (also written to OUT/results.json).
    `python:` specs in the file run only with `trust_code`."""
    cfg = load_pipeline(path, quick=quick, overrides=overrides, trust_code=trust_code)
    out_dir = Path(out or cfg.get("out") or "runs/pipeline")
    if quick and out is None:
        out_dir = out_dir.with_name(out_dir.name + "_quick")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = RECIPES[cfg["recipe"]](cfg, out_dir, say, list(callbacks))
    return {**results, "out_dir": f"{out_dir}/"}


def _hinton(cfg: dict[str, Any], out: Path, say: Say, callbacks: list[Any]) -> dict[str, Any]:
    from softlabels.experiments.hinton_mnist import hinton_mnist

    return hinton_mnist(cfg, out, Steps(out, say), callbacks)


def _tiny_lm(cfg: dict[str, Any], out: Path, say: Say, callbacks: list[Any]) -> dict[str, Any]:
    from softlabels.experiments.tiny_lm import tiny_lm

    return tiny_lm(cfg, out, Steps(out, say), callbacks)


RECIPES: dict[str, Callable[[dict[str, Any], Path, Say, list[Any]], dict[str, Any]]] = {
    "hinton-mnist": _hinton,
    "tiny-lm": _tiny_lm,
}
