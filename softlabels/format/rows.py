"""How the rows of a set are grouped, for the set operations: one row per example, or the
positions of whole sequences with their offsets (format/sequence.py).

What differs between the kinds of row (`Layout.kind`, from `layout.ROW_KINDS`) is one small
strategy, `RowKind`, with one implementation per kind, chosen once through `KINDS`:
convert, subset and merge (operations.py) are written once over it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from softlabels.errors import SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.copying import Source, indices_digest
from softlabels.format.layout import ROW_KINDS, Layout
from softlabels.format.reader import TransferSet
from softlabels.format.selection import read_indices, select_rows, select_sequences
from softlabels.format.sequence import SEQ_OFFSETS, read_offsets, with_offsets


@dataclass(frozen=True)
class RowChoice:
    """What a subset keeps, as asked (`subset`'s options)."""

    fraction: float | None = None
    seed: int = 0
    classes: Sequence[int] | None = None
    exclude_classes: Sequence[int] | None = None
    indices: str | os.PathLike[str] | None = None  # a file of dataset indices

    def read_indices(self) -> np.ndarray | None:
        return read_indices(self.indices) if self.indices is not None else None

    def recorded(self, **kind_fields: Any) -> dict[str, Any]:
        """How the subset's provenance records the choice (beside the source's record)."""
        return {"fraction": self.fraction, "seed": self.seed, **kind_fields,
                "indices": str(self.indices) if self.indices is not None else None,
                "indices_digest": indices_digest(self.indices)}


@dataclass(frozen=True)
class Selection:
    """The rows a subset keeps, and the new set they make."""

    rows: np.ndarray  # (R',) sorted source rows
    layout: Layout  # the subset's layout
    whole: dict[str, np.ndarray]  # its arrays written whole, not by block
    record: dict[str, Any]  # the choice as provenance records it


class RowKind(Protocol):
    """What the set operations do differently for one kind of row."""

    def whole(self, ts: TransferSet) -> dict[str, np.ndarray]:
        """The arrays this kind adds outside the row blocks, read checked (a copy writes them
        whole)."""

    def select(self, source: Source, choice: RowChoice, *, where: str | Path) -> Selection:
        """The rows of `source` that `choice` keeps, in whole groups, and the subset's layout
        (`where`: the output, for messages)."""

    def merge_refusal(self, ts: TransferSet) -> str | None:
        """Why sets of this kind cannot be merged (said after the set's path), or None."""


class ExampleRows:
    """One row per example (or per view of one): any rows may be kept."""

    def whole(self, ts: TransferSet) -> dict[str, np.ndarray]:
        return {}

    def select(self, source: Source, choice: RowChoice, *, where: str | Path) -> Selection:
        ts = source.ts
        # every block is checked before its labels and index choose rows
        columns = source.range([S.LABELS, S.INDEX], 0, ts.num_rows)
        rows = select_rows(columns[S.LABELS], index=columns[S.INDEX], fraction=choice.fraction,
                           seed=choice.seed, classes=choice.classes,
                           exclude_classes=choice.exclude_classes,
                           indices=choice.read_indices(), num_examples=ts.info.num_examples)
        return Selection(rows, dataclasses.replace(ts.layout, num_rows=len(rows)), {},
                         choice.recorded(classes=choice.classes,
                                         exclude_classes=choice.exclude_classes))

    def merge_refusal(self, ts: TransferSet) -> str | None:
        return None


class SequenceRows:
    """The positions of whole sequences, placed by `seq/offsets`: kept or dropped whole."""

    def whole(self, ts: TransferSet) -> dict[str, np.ndarray]:
        return {SEQ_OFFSETS: read_offsets(ts)}

    def select(self, source: Source, choice: RowChoice, *, where: str | Path) -> Selection:
        ts = source.ts
        if choice.classes or choice.exclude_classes:
            raise SoftlabelsError(f"{ts.path} is a sequence set: it is cut by whole sequences; "
                                  "use --fraction or --indices (dataset indices of sequences), "
                                  "not --classes or --exclude-classes")
        offsets = read_offsets(ts)
        chosen = select_sequences(source, offsets, fraction=choice.fraction, seed=choice.seed,
                                  indices=choice.read_indices())
        lengths = np.diff(offsets)[chosen]
        rows = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in chosen])
        new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        layout = with_offsets(dataclasses.replace(ts.layout, num_rows=len(rows),
                                                  num_sequences=len(chosen)),
                              new_offsets, where=where)
        return Selection(rows, layout, {SEQ_OFFSETS: new_offsets},
                         choice.recorded(sequences=int(len(chosen))))

    def merge_refusal(self, ts: TransferSet) -> str | None:
        return ("is a sequence set: merging sequence sets is not defined in this version; "
                "precompute the ensemble at once (repeat --teacher)")


KINDS: dict[str, RowKind] = dict(zip(ROW_KINDS, (ExampleRows(), SequenceRows())))
