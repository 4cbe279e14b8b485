"""Tokenised sequences as data: the DATA spec `tokens:PATH`, for sequence sets.

    tokens:FILE.jsonl     one sequence a line: a JSON list of token ids, or an object whose
                          `field` (default: tokens, else input_ids) is that list
    tokens:FILE.parquet   a column `field` of integer lists (needs pyarrow); or a directory
                          of .parquet files, read in name order (`softlabels export --to parquet`)
    tokens:DIR            a Hugging Face `datasets` directory written by `save_to_disk`
                          (needs datasets)

Options: `field=NAME`, `mask=NAME` (a per-position 0/1 list: 1 = distil, e.g. 0 on prompt
tokens), `labels=NAME` (per-position hard targets instead of the next token).
Item i is the sequence's token ids as a (L,) int64 tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError, SpecError

DEFAULT_FIELDS = ("tokens", "input_ids")
MAX_TOKEN_ID = 2**31 - 1  # stored as int32


class TokenSequences(Dataset):
    """Variable-length token sequences held flat: `tokens` (N,), `offsets` (S+1,), optional
    per-position `mask` and `labels`."""

    is_token_sequences = True

    def __init__(self, sequences: list[list[int]], *, masks: list[list[int]] | None = None,
                 labels: list[list[int]] | None = None, where: str = "sequences") -> None:
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        if len(sequences) == 0 or (lengths == 0).any():
            first = int(np.argmin(lengths)) if len(sequences) else 0
            raise DataError(f"{where} holds no sequences or an empty one (sequence {first}); "
                            "every sequence needs at least one token")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.tokens = _flat(sequences, where, "tokens")
        if self.tokens.min() < 0 or self.tokens.max() > MAX_TOKEN_ID:
            raise DataError(f"{where} holds token ids outside [0, {MAX_TOKEN_ID}]")
        self.mask = None if masks is None else _flat(masks, where, "mask", lengths)
        if self.mask is not None and not np.isin(self.mask, (0, 1)).all():
            raise DataError(f"{where}: a mask holds values other than 0 and 1")
        self.labels = None if labels is None else _flat(labels, where, "labels", lengths)
        self.classes: list[str] = []

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        a, b = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(self.tokens[a:b].copy())

    def sequence_mask(self, i: int) -> np.ndarray:
        """(L,) uint8, 1 where position is distilled."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.ones(b - a, np.uint8) if self.mask is None else self.mask[a:b].astype(np.uint8)

    def sequence_labels(self, i: int, num_classes: int) -> np.ndarray:
        """(L,) int64 hard targets: the data's labels, else the next token (-1 at the end and
        where the next token is not a class)."""
        a, b = self.offsets[i], self.offsets[i + 1]
        if self.labels is not None:
            return self.labels[a:b].astype(np.int64)
        nxt = np.append(self.tokens[a + 1:b], -1).astype(np.int64)
        return np.where(nxt >= num_classes, -1, nxt)


def _flat(lists: list[list[int]], where: str, what: str,
          lengths: np.ndarray | None = None) -> np.ndarray:
    if lengths is not None:
        got = np.array([len(x) for x in lists])
        if len(got) != len(lengths) or (got != lengths).any():
            raise DataError(f"{where}: the {what} lists do not have their sequences' lengths")
    try:
        return np.concatenate([np.asarray(x, dtype=np.int64) for x in lists])
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{where}: {what} must be lists of integers") from None


def _pick(row: Any, field: str | None, where: str) -> Any:
    if isinstance(row, list):
        return row
    if isinstance(row, dict):
        for name in ([field] if field else DEFAULT_FIELDS):
            if name in row:
                return row[name]
    raise DataError(f"{where}: expected a list of token ids or an object with "
                    f"{field or ' or '.join(DEFAULT_FIELDS)!r}, found {str(row)[:60]!r}")


def _columns(rows: list[Any], where: str, field: str | None, mask: str | None,
             labels: str | None) -> TokenSequences:
    seqs = [_pick(r, field, f"{where} row {i}") for i, r in enumerate(rows)]

    def column(name: str | None) -> list[list[int]] | None:
        if name is None:
            return None
        if not all(isinstance(r, dict) and name in r for r in rows):
            raise DataError(f"{where}: not every row has the field {name!r}")
        return [r[name] for r in rows]

    return TokenSequences(seqs, masks=column(mask), labels=column(labels), where=where)


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {n} is not JSON ({exc.msg}); write one JSON "
                                    "list of token ids per line") from None
    return rows


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SpecError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


def _read_saved_dataset(path: Path) -> list[Any]:
    try:
        import datasets
    except ImportError:
        raise SpecError(f"reading {path} needs the `datasets` package: pip install datasets"
                        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(ds)}); name one split's "
                        "directory")
    return ds.to_list()


def load_tokens(body: str, options: dict[str, Any], spec: str) -> TokenSequences:
    """The dataset a `tokens:PATH?field=..&mask=..&labels=..` spec names."""
    unknown = set(options) - {"field", "mask", "labels"}
    if unknown:
        raise SpecError(f"unknown tokens options {sorted(unknown)} in {spec!r}; use field, "
                        "mask, labels")
    path = Path(body)
    if path.is_dir() and not (path / "state.json").is_file() and any(path.glob("*.parquet")):
        rows = [r for f in sorted(path.glob("*.parquet")) for r in _read_parquet(f)]
    elif path.is_dir():
        rows = _read_saved_dataset(path)
    elif not path.is_file():
        raise DataError(f"no such file or directory {body!r} (from {spec!r})")
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        rows = _read_jsonl(path)
    return _columns(rows, str(path), options.get("field"), options.get("mask"),
                    options.get("labels"))


def is_sequence_data(data: Any) -> bool:
    """A DATA spec or dataset of token sequences (made into a sequence set)."""
    if isinstance(data, str):
        return data.partition(":")[0] == "tokens"
    return bool(getattr(data, "is_token_sequences", False))
