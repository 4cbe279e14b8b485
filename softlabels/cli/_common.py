"""Shared pieces of the command line: parameter types, progress bars, JSON output."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from softlabels.format.info import Provenance
from softlabels.redact import redact

TRUST_CODE_HELP = ("Let python: specs found inside files (checkpoints' model specs, a set's "
                   "augment, a pipeline file) import and run code. Only for files you trust.")


class NumberList(click.ParamType):
    """A comma-separated list of numbers of one type, e.g. 1,4,20."""

    def __init__(self, cast: type, example: str) -> None:
        self.cast, self.example = cast, example
        self.name = "N1,N2,.."

    def convert(self, value: Any, param: Any, ctx: Any) -> list[Any]:
        if isinstance(value, list):
            return value
        try:
            return [self.cast(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            kind = "integers" if self.cast is int else "numbers"
            self.fail(f"{value!r} is not a comma-separated list of {kind} (e.g. "
                      f"{self.example})", param, ctx)


def FloatList() -> NumberList:  # noqa: N802  (reads like the type it makes)
    return NumberList(float, "1,4,20")


def IntList() -> NumberList:  # noqa: N802
    return NumberList(int, "0,1,2")


@contextmanager
def progress_bar(desc: str, unit: str = "row") -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr driven by the library's (done, total) callback."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True,
               disable=None)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
            bar.update(done)
        else:
            bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def echo_json(obj: Any) -> None:
    """`obj` as strict JSON: a non-finite float (an infinite perplexity) is written as null,
    since JSON has no Infinity or NaN and strict parsers refuse them."""
    echo(json.dumps(_finite_or_null(obj), indent=None, default=str, allow_nan=False))


def echo(message: str, *, err: bool = False) -> None:
    """`click.echo` with URL credentials redacted: every summary line goes through here."""
    click.echo(redact(str(message)), err=err)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def provenance_lines(prov: Provenance | None) -> list[str]:
    """Where a set came from, if it was cut, merged or converted from others."""
    if prov is None:
        return []
    lines = []
    for what, src in (("subset of", prov.subset_of), ("converted from", prov.converted_from)):
        if src:
            lines.append(f"{what} {src.path} (fingerprint {(src.fingerprint or '')[:16]}…)")
    for src in prov.merged_from or ():
        lines.append(f"merged from {src.path} (teacher sha256 "
                     + ", ".join(h[:12] for h in src.teacher or ()) + ")")
    return lines


def epoch_bars() -> Callable[[str, dict[str, Any]], None]:
    """A trainer callback drawing one tqdm bar per epoch with the running loss (and accuracy)."""
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None}

    def callback(event: str, info: dict[str, Any]) -> None:
        if event == "batch":
            if state["bar"] is None:
                state["bar"] = tqdm(total=info["batches"], desc=f"epoch {info['epoch'] + 1}",
                                    unit="batch", file=sys.stderr, leave=False, disable=None)
            state["bar"].set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
            state["bar"].update(1)
        elif state["bar"] is not None:
            bar, state["bar"] = state["bar"], None
            bar.close()
            acc = f"  val_accuracy {info['val_accuracy']:.4f}" if "val_accuracy" in info else ""
            logging.getLogger("softlabels.train").info(
                "epoch %d/%d  loss %.4f%s", info["epoch"], info["epochs"], info["loss"], acc)
            if bar.disable is False:
                tqdm.write(f"epoch {info['epoch']}/{info['epochs']}  loss {info['loss']:.4f}{acc}",
                           file=sys.stderr)

    return callback


def parse_bias(values: tuple[str, ...]) -> dict[int, float]:
    out = {}
    for v in values:
        k, sep, b = v.partition("=")
        try:
            out[int(k)] = float(b)
        except ValueError:
            raise click.BadParameter(f"{v!r} is not CLASS=VALUE (e.g. 3=3.5)",
                                     param_hint="--bias-adjust") from None
    return out
