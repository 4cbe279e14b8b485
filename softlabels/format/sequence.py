"""Sequence sets: one row per position (token or frame) of variable-length sequences.

A sequence set is a transfer set whose rows are the positions of S sequences laid end to end,
without padding: sequence s owns rows [offsets[s], offsets[s+1]). Every row array of an example
set keeps its meaning per position (`index` = the sequence's index in the source data,
`labels` = the position's hard target), and four arrays say where each row sits:

    seq/offsets  (S+1,) int64   row boundaries of the sequences (not a row array)
    seq/position (R,)   int32   the row's position inside its sequence
    seq/tokens   (R,)   int32   the input token at that position
    seq/mask     (R,)   uint8   1 where the position is distilled, 0 where not (e.g. a prompt)

Targets are the example set's: dense `logits`/`probs` for small C, or `topk/*` and
`sample/indices` for large C. In a sequence set `topk/logits` and `topk/logsumexp` are shifted
by the row's largest logit (the largest stored logit is 0), so float16 keeps its precision where
the mass is; `exp(topk/logits / T - topk/logsumexp[:, k])` is unchanged by the shift. The k
classes are stored in ascending class order (not largest first): sorted ids compress far better.
Blocks, checksums and resume are the example set's: the same writer writes the row arrays, and
`seq/offsets` is written whole when the set is created (its hash is in the metadata).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from softlabels.errors import IntegrityError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.integrity import VerifyReport
from softlabels.format.layout import SEQUENCE_LABELS, Layout
from softlabels.format.reader import TransferSet
from softlabels.format.writer import RowHashes, TransferSetWriter

SEQ_OFFSETS, SEQ_POSITION, SEQ_TOKENS, SEQ_MASK = (S.SEQ_OFFSETS, S.SEQ_POSITION, S.SEQ_TOKENS,
                                                   S.SEQ_MASK)
SEQ_ARRAYS = (SEQ_POSITION, SEQ_TOKENS, SEQ_MASK)
LABEL_SOURCES = SEQUENCE_LABELS
# A sequence set's layout is a `Layout` with `num_sequences > 0`: layout.py defines its arrays
# (`seq/*`, the top-k dtype) and its `sequence` metadata, covered by the digest.


def offsets_hash(offsets: np.ndarray) -> str:
    """XXH3-64 (hex) of the offsets as little-endian int64: recorded in the metadata."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(offsets, dtype="<i8").tobytes())


def check_offsets(offsets: np.ndarray, num_rows: int) -> str | None:
    """Why `offsets` cannot describe `num_rows` rows, or None."""
    if offsets.ndim != 1 or len(offsets) < 2:
        return f"offsets must be one-dimensional with at least 2 entries, found {offsets.shape}"
    if offsets[0] != 0 or offsets[-1] != num_rows:
        return f"offsets must run from 0 to {num_rows}, found {offsets[0]}..{offsets[-1]}"
    if (np.diff(offsets) <= 0).any():
        s = int(np.argmax(np.diff(offsets) <= 0))
        return f"sequence {s} is empty or out of order (offsets {offsets[s]}, {offsets[s + 1]})"
    return None


def with_offsets(layout: Layout, offsets: np.ndarray, *, where: str | Path,
                 labels: str | None = None) -> Layout:
    """`layout` for these sequences: checked against the offsets, their hash recorded."""
    problem = check_offsets(offsets, layout.num_rows)
    if problem is None and len(offsets) - 1 != layout.num_sequences:
        problem = "offsets and layout disagree on the number of sequences"
    if problem:
        raise TransferSetError(f"cannot write {where}: {problem}")
    return dataclasses.replace(layout, offsets_xxh3=offsets_hash(offsets),
                               sequence_labels=labels or layout.sequence_labels)


class SequenceSetWriter(TransferSetWriter):
    """The example-set writer (lease, creation aside, resume), with `seq/offsets` written
    whole while the set is laid out. A rerun resumes like any set; a set laid out for other
    sequences is refused (the offsets' hash is part of the layout's metadata)."""

    def __init__(self, path: str | Path, layout: Layout, meta: dict[str, Any], *,
                 offsets: np.ndarray, labels: str | None = None, overwrite: bool = False,
                 row_hashes: RowHashes | None = None, backend: str | None = None) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        layout = with_offsets(layout, offsets, where=path, labels=labels)
        super().__init__(path, layout, meta, overwrite=overwrite, row_hashes=row_hashes,
                         backend=backend, whole={SEQ_OFFSETS: offsets})


# --- reading ------------------------------------------------------------------------------


def read_offsets(ts: TransferSet) -> np.ndarray:
    """(S+1,) int64 row boundaries, checked against the hash recorded in the metadata."""
    if ts.layout.kind != "sequences":
        raise TransferSetError(f"{ts.path} is not a sequence set (no 'sequence' metadata)")
    try:
        offsets = ts.store.read(SEQ_OFFSETS).astype(np.int64)
    except Exception as exc:  # a missing or corrupted array fails in the backend
        raise IntegrityError(f"{ts.path}: {SEQ_OFFSETS} cannot be read ({type(exc).__name__}); "
                             "get a fresh copy of the set") from None
    if offsets_hash(offsets) != ts.layout.offsets_xxh3:
        raise IntegrityError(f"{ts.path}: {SEQ_OFFSETS} does not match the hash recorded in its "
                             "metadata; run `softlabels verify` and get a fresh copy")
    return offsets


def row_sequences(offsets: np.ndarray) -> np.ndarray:
    """(R,) the sequence number (0..S-1, in set order) of every row."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def check_sequences(ts: TransferSet, report: VerifyReport) -> None:
    """Set-only checks of a sequence set: offsets, positions, one index per sequence, masks and
    next-token labels."""
    try:
        offsets = read_offsets(ts)
    except IntegrityError as exc:
        report.add("sequences", False, str(exc))
        return
    problem = check_offsets(offsets, ts.num_rows)
    if problem is None and len(offsets) - 1 != ts.layout.num_sequences:
        problem = (f"{len(offsets) - 1} sequences in {SEQ_OFFSETS}, "
                   f"{ts.layout.num_sequences} in the metadata")
    if problem:
        report.add("sequences", False, problem)
        return
    seq = row_sequences(offsets)
    position, tokens = ts.read(SEQ_POSITION), ts.read(SEQ_TOKENS)
    mask, index, labels = ts.read(SEQ_MASK), ts.index(), ts.labels()
    starts = offsets[:-1]
    bad = []
    wrong = np.flatnonzero(position != np.arange(ts.num_rows) - starts[seq])
    if len(wrong):
        bad.append(f"row {wrong[0]} has position {position[wrong[0]]}, expected "
                   f"{wrong[0] - starts[seq[wrong[0]]]}")
    wrong = np.flatnonzero(index != index[starts][seq])
    if len(wrong):
        bad.append(f"row {wrong[0]} has another dataset index than its sequence's first row")
    if not np.isin(mask, (0, 1)).all():
        bad.append("seq/mask holds values other than 0 and 1")
    if (tokens < 0).any():
        bad.append(f"seq/tokens holds negative ids (first at row {int(np.argmax(tokens < 0))})")
    if ts.layout.sequence_labels == "next-token":
        last = np.zeros(ts.num_rows, bool)
        last[offsets[1:] - 1] = True
        nxt = np.append(tokens[1:], -1).astype(np.int64)
        want = np.where(last | (nxt >= ts.num_classes), -1, nxt)
        wrong = np.flatnonzero(labels != want)
        if len(wrong):
            bad.append(f"row {wrong[0]}'s label {labels[wrong[0]]} is not the next token "
                       f"{want[wrong[0]]}")
    report.add("sequences", not bad, "; ".join(bad) or
               f"{len(offsets) - 1} sequences ({ts.num_rows} positions): offsets, positions, "
               "indices, masks and labels consistent")
