"""Tokenised sequences as data: the DATA spec `tokens:PATH`, for sequence sets.

    tokens:FILE.jsonl     one sequence a line: a JSON list of token ids, or an object whose
                          `field` (default: tokens, else input_ids) is that list
    tokens:FILE.parquet   a column `field` of integer lists (needs pyarrow); or a directory
                          of .parquet files, read in name order (`softlabels export --to parquet`)
    tokens:DIR            a Hugging Face `datasets` directory written by `save_to_disk`
                          (needs datasets)

Options: `field=NAME`, `mask=NAME` (a per-position 0/1 list: 1 = distil, e.g. 0 on prompt
tokens), `labels=NAME` (per-position hard targets instead of the next token),
`max_length=N&stride=M` (sequences longer than N cut into windows overlapping by M tokens:
token_windows.py). Item i is the sequence's token ids as a (L,) int64 tensor.

Strict (docs/TEXT.md, "Strictness"): token ids are integers in [0, 2^31 - 1] (a float such as
1.0 or 1.5, a boolean, a string is refused, never rounded); a mask value is 0 or 1, or false or
true (0.5, 1.0 refused); labels are integers >= -1. A refusal names the sequence: its number,
its file and its line or row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError, SpecError

DEFAULT_FIELDS = ("tokens", "input_ids")
MAX_TOKEN_ID = 2**31 - 1  # stored as int32
TOKENS_OPTIONS = ("field", "mask", "labels", "max_length", "stride")
# per kind of column: the Python types a value may have, the numpy kinds an array may have,
# and what the message asks for
_KINDS = {"tokens": ((int,), "iu", "integer token ids (not floats, booleans or strings)"),
          "mask": ((int, bool), "iub", "mask values 0 or 1 (or false/true)"),
          "labels": ((int,), "iu", "integer labels (-1: no target)")}
_NAMES = {"tokens": "token id", "mask": "mask value", "labels": "label"}
_RANGES = {"tokens": (0, MAX_TOKEN_ID), "mask": (0, 1), "labels": (-1, MAX_TOKEN_ID)}


@dataclass(frozen=True)
class Origin:
    """Where each of S sequences came from, for messages: `files[file[s]]`, and there its
    `unit` number `item[s]` (a line, counted from 1, or a row, from 0; unit "" when the file is
    the sequence); `span[s]` = (first, end) token of a window cut from a longer sequence."""

    files: tuple[str, ...]
    file: np.ndarray
    item: np.ndarray
    unit: str
    span: np.ndarray | None = None

    @classmethod
    def of_rows(cls, path: str, items: list[int] | np.ndarray, unit: str) -> Origin:
        items = np.asarray(items, dtype=np.int64)
        return cls((path,), np.zeros(len(items), np.int32), items, unit)

    def describe(self, s: int) -> str:
        where = self.files[int(self.file[s])]
        if self.unit:
            where += f" {self.unit} {int(self.item[s])}"
        if self.span is not None and self.span[s, 1] >= 0:
            where += f", tokens {int(self.span[s, 0])}-{int(self.span[s, 1])}"
        return f"sequence {s} ({where})"

    def take(self, rows: np.ndarray, span: np.ndarray) -> Origin:
        """The origin of windows cut from sequences `rows`, each spanning `span` (n, 2)."""
        return Origin(self.files, self.file[rows], self.item[rows], self.unit, span)


class TokenSequences(Dataset):
    """Variable-length token sequences held flat: `tokens` (N,), `offsets` (S+1,), optional
    per-position `mask` and `labels`; `origin` names each sequence in messages and
    `provenance` goes into a set's `dataset` metadata (a tokenizer's hash, windows)."""

    is_token_sequences = True

    def __init__(self, sequences: list[Any], *, masks: list[Any] | None = None,
                 labels: list[Any] | None = None, where: str = "sequences",
                 origin: Origin | None = None) -> None:
        self.where, self.origin = where, origin
        parts = self._lists(sequences, "tokens")
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._check_lengths(lengths)
        self.tokens = self._flat(parts, "tokens")
        self.mask = None if masks is None else self._flat(self._lists(masks, "mask"), "mask")
        self.labels = None if labels is None else self._flat(self._lists(labels, "labels"),
                                                             "labels")
        self.classes: list[str] = []
        self.provenance: dict[str, Any] = {}
        self.next_token_labels = False  # labels that are the next token (token_windows.py)

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, offsets: np.ndarray, *,
                    mask: np.ndarray | None = None, labels: np.ndarray | None = None,
                    where: str = "sequences", origin: Origin | None = None,
                    ) -> TokenSequences:
        """Sequences from flat int64 arrays (checked as the lists are)."""
        self = cls.__new__(cls)
        self.where, self.origin = where, origin
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._check_lengths(np.diff(self.offsets))
        self.tokens = self._checked(tokens, "tokens")
        self.mask = None if mask is None else self._checked(mask, "mask")
        self.labels = None if labels is None else self._checked(labels, "labels")
        self.classes, self.provenance, self.next_token_labels = [], {}, False
        return self

    def describe(self, s: int) -> str:
        """'sequence s (FILE line n)': what a message calls sequence s."""
        return self.origin.describe(s) if self.origin is not None else \
            f"sequence {s} of {self.where}"

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
            labels = self.labels[a:b].astype(np.int64)
            return np.where(labels >= num_classes, -1, labels) if self.next_token_labels \
                else labels
        nxt = np.append(self.tokens[a + 1:b], -1).astype(np.int64)
        return np.where(nxt >= num_classes, -1, nxt)

    def sequence_at(self, position: int) -> int:
        """The sequence holding flat position `position`."""
        return int(np.searchsorted(self.offsets, position, side="right")) - 1

    # --- checks -------------------------------------------------------------------------------

    def _check_lengths(self, lengths: np.ndarray) -> None:
        if len(lengths) == 0 or (lengths <= 0).any():
            where = self.describe(int(np.argmin(lengths))) if len(lengths) else self.where
            raise DataError(f"{self.where} holds no sequences or an empty one ({where}); "
                            "every sequence needs at least one token")

    def _lists(self, lists: list[Any], what: str) -> list[np.ndarray]:
        """Each sequence's `what` values as an array, each value checked for `what`'s kind."""
        if not isinstance(lists, (list, tuple)):
            raise DataError(f"{self.where}: expected a list of {what} lists, found "
                            f"{type(lists).__name__}")
        parts = []
        for s, values in enumerate(lists):
            array, found = _strict(values, what)
            if array is None:
                raise DataError(f"{self.describe(s)}: expected {_KINDS[what][2]}, found "
                                f"{found}; fix that {what} list")
            parts.append(array)
        return parts

    def _flat(self, parts: list[np.ndarray], what: str) -> np.ndarray:
        """The per-sequence arrays laid end to end, after checking their lengths and range."""
        if what != "tokens":
            if len(parts) != len(self):
                raise DataError(f"{self.where}: {len(parts)} {what} lists for {len(self)} "
                                "sequences; give one list per sequence")
            got = np.array([len(p) for p in parts], dtype=np.int64)
            if (got != self.lengths).any():
                s = int(np.argmax(got != self.lengths))
                raise DataError(f"{self.describe(s)}: its {what} list has {got[s]} values for "
                                f"{self.lengths[s]} tokens; give one value per token")
        return self._checked(np.concatenate(parts) if parts else np.zeros(0, np.int64), what)

    def _checked(self, values: np.ndarray, what: str) -> np.ndarray:
        """`values` as int64, after refusing a non-integer array or a value out of range."""
        values = np.asarray(values)
        if values.dtype.kind not in _KINDS[what][1] or values.ndim != 1 \
                or len(values) != self.offsets[-1]:
            raise DataError(f"{self.where}: expected one {_KINDS[what][2]} a position, found "
                            f"a {values.dtype} array of shape {values.shape}")
        low, high = _RANGES[what]
        if values.dtype.kind == "u" and values.size and values.max() > high:
            bad = int(np.argmax(values > high))
        else:
            values = values.astype(np.int64)
            out = (values < low) | (values > high)
            bad = int(np.argmax(out)) if out.any() else -1
        if bad >= 0:
            s = self.sequence_at(bad)
            raise DataError(f"{self.describe(s)}: {_NAMES[what]} {values[bad]} at position "
                            f"{bad - int(self.offsets[s])} is outside [{low}, {high}]")
        return values.astype(np.int64)


def _strict(values: Any, what: str) -> tuple[np.ndarray | None, str]:
    """(values as int64, '') if every value is of `what`'s kind, else (None, what was found):
    no float, boolean (except in a mask) or string is coerced."""
    types, kinds, _ = _KINDS[what]
    if isinstance(values, np.ndarray):
        if values.ndim == 1 and values.dtype.kind in kinds:
            return values, ""
        return None, f"a {values.dtype} array of shape {values.shape}"
    if not isinstance(values, (list, tuple)):
        return None, f"{type(values).__name__} {str(values)[:40]!r}, not a list"
    for j, v in enumerate(values):
        if type(v) not in types and not isinstance(v, np.integer):
            return None, f"{v!r} ({type(v).__name__}) at position {j}"
    try:
        return np.array(values, dtype=np.int64), ""
    except OverflowError:
        return None, "an integer too large for int64"


# --- tokens: files --------------------------------------------------------------------------


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
    with path.open(encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
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
    """The dataset a `tokens:PATH?field=..&mask=..&labels=..&max_length=..&stride=..` spec
    names."""
    from .token_windows import window_options, windowed

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


def is_sequence_data(data: Any) -> bool:
    """A DATA spec or dataset of token sequences (made into a sequence set)."""
    if isinstance(data, str):
        return data.partition(":")[0] in ("tokens", "text")
    return bool(getattr(data, "is_token_sequences", False))
