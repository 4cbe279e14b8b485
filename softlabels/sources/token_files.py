"""The DATA spec `tokens:PATH`: token sequences read from files (docs/TEXT.md).

    tokens:FILE.jsonl     one sequence a line: a JSON list of token ids, or an object whose
                          `field` (default: tokens, else input_ids) is that list
    tokens:FILE.parquet   a column `field` of integer lists (needs pyarrow); or a directory
                          of .parquet files, read in name order (`softlabels export --to parquet`)
    tokens:DIR            a Hugging Face `datasets` directory written by `save_to_disk`
                          (needs datasets)

Options: `field=NAME`, `mask=NAME` (a per-position 0/1 list: 1 = distil, e.g. 0 on prompt
tokens), `labels=NAME` (per-position hard targets instead of the next token),
`max_length=N&stride=M` (sequences longer than N cut into windows overlapping by M tokens:
token_windows.py). The sequences themselves, and how strictly they are checked: tokens.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import DataError, SpecError
from softlabels.safe_read import input_lines
from softlabels.sources.saved_datasets import load_saved
from softlabels.sources.tokens import Origin, TokenSequences
from softlabels.sources.windows import window_options, windowed

DEFAULT_FIELDS = ("tokens", "input_ids")
TOKENS_OPTIONS = ("field", "mask", "labels", "max_length", "stride")


def _pick(row: Any, field: str | None, where: str) -> Any:
    if isinstance(row, list):
        return row
    if isinstance(row, dict):
        for name in ([field] if field else DEFAULT_FIELDS):
            if name in row:
                return row[name]
    raise DataError(f"{where}: expected a list of token ids or an object with "
                    f"{field or ' or '.join(DEFAULT_FIELDS)!r}, found {str(row)[:60]!r}")


def _columns(rows: list[Any], origin: Origin, field: str | None, mask: str | None,
             labels: str | None) -> TokenSequences:
    seqs = [_pick(r, field, origin.describe(i)) for i, r in enumerate(rows)]

    def column(name: str | None) -> list[Any] | None:
        if name is None:
            return None
        for i, r in enumerate(rows):
            if not (isinstance(r, dict) and name in r):
                raise DataError(f"{origin.describe(i)} has no field {name!r}; every row "
                                "needs it")
        return [r[name] for r in rows]

    return TokenSequences(seqs, masks=column(mask), labels=column(labels),
                          where=origin.files[0], origin=origin)


def read_jsonl(path: Path) -> tuple[list[Any], list[int]]:
    """(the JSON value of each non-blank line, its line number from 1)."""
    rows, lines = [], []
    try:
        for n, raw in input_lines(path, "JSON lines file"):
            line = raw.decode("utf-8")
            if line.strip():
                rows.append(json.loads(line))
                lines.append(n)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {n} is not JSON ({exc.msg}); write one JSON "
                        "value per line") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (after line {len(lines)}); write "
                        "JSON lines in UTF-8") from None
    return rows, lines


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SpecError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


def _read_saved_dataset(path: Path) -> list[Any]:
    import datasets  # load_saved has found it

    ds = load_saved(path)
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(ds)}); name one split's "
                        "directory")
    return ds.to_list()


def load_tokens(body: str, options: dict[str, Any], spec: str) -> TokenSequences:
    """The dataset a `tokens:PATH?field=..&mask=..&labels=..&max_length=..&stride=..` spec
    names."""
    unknown = set(options) - set(TOKENS_OPTIONS)
    if unknown:
        raise SpecError(f"unknown tokens options {sorted(unknown)} in {spec!r}; use "
                        + ", ".join(TOKENS_OPTIONS))
    cut = window_options(options, spec)
    path = Path(body)
    if path.is_dir() and not (path / "state.json").is_file() and any(path.glob("*.parquet")):
        rows = [r for f in sorted(path.glob("*.parquet")) for r in _read_parquet(f)]
        origin = Origin.of_rows(str(path), np.arange(len(rows)), "row")  # across the files
    elif path.is_dir():
        rows = _read_saved_dataset(path)
        origin = Origin.of_rows(str(path), np.arange(len(rows)), "row")
    elif not path.is_file():
        raise DataError(f"no such file or directory {body!r} (from {spec!r})")
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
        origin = Origin.of_rows(str(path), np.arange(len(rows)), "row")
    else:
        rows, lines = read_jsonl(path)
        origin = Origin.of_rows(str(path), lines, "line")
    names = {k: None if options.get(k) is None else str(options[k])
             for k in ("field", "mask", "labels")}
    data = _columns(rows, origin, **names)
    return windowed(data, *cut) if cut else data
