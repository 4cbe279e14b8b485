"""Tokenised sequences as data, for sequence sets: `TokenSequences` (read from files by
token_files.py, the `tokens:` spec; cut into windows by token_windows.py; made from raw text by
text_source.py). Item i is the sequence's token ids as a (L,) int64 tensor.

Strict (docs/TEXT.md, "Strictness"): token ids are integers in [0, 2^31 - 1] (a float such as
1.0 or 1.5, a boolean, a string is refused, never rounded); a mask value is 0 or 1, or false or
true (0.5, 1.0 refused); labels are integers >= -1. A refusal names the sequence: its number,
its file and its line or row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.errors import DataError

MAX_TOKEN_ID = 2**31 - 1  # stored as int32
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
















def data_kind(data: Any) -> str:
    """The kind of row a DATA spec or dataset makes (format.layout.ROW_KINDS): "sequences" for
    token sequences (`tokens:`/`text:` specs, datasets marked `is_token_sequences`; one row per
    position), "examples" otherwise."""
    if isinstance(data, str):
        tokens = data.partition(":")[0] in ("tokens", "text")
    else:
        tokens = bool(getattr(data, "is_token_sequences", False))
    return "sequences" if tokens else "examples"
