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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..errors import IntegrityError, MismatchError, TransferSetError
from . import schema as S
from ._store import open_store
from .integrity import VerifyReport
from .layout import Layout
from .reader import TransferSet
from .writer import TransferSetWriter

SEQ_OFFSETS = S.SEQ_OFFSETS
SEQ_POSITION = "seq/position"
SEQ_TOKENS = "seq/tokens"
SEQ_MASK = "seq/mask"
SEQ_ARRAYS = (SEQ_POSITION, SEQ_TOKENS, SEQ_MASK)
TOPK_DTYPES = ("float32", "float16")
LABEL_SOURCES = ("next-token", "data")


@dataclass(frozen=True)
class SequenceLayout(Layout):
    """An example set's layout plus the per-position arrays of a sequence set."""

    num_sequences: int = 0
    topk_dtype: str = "float32"  # storage dtype of topk/logits (shifted by the row's max)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.topk_dtype not in TOPK_DTYPES:
            raise TransferSetError(f"topk dtype must be one of {TOPK_DTYPES}, "
                                   f"got {self.topk_dtype!r}")
        if not 0 < self.num_sequences <= self.num_rows:
            raise TransferSetError(f"a sequence set needs 1..{self.num_rows} sequences of at "
                                   f"least one position, got {self.num_sequences}")
        if self.views or self.input_shape is not None or self.num_members:
            raise TransferSetError("sequence sets store tokens, not views, inputs or member "
                                   "logits; drop --views, --store-inputs and --keep-members")

    # byte-shuffled and zstd-compressed: sorted, shifted top-k logits halve (measured in
    # benchmarks/sequence_storage.py); the writer reads this
    shuffle_compressed = (S.TOPK_LOGITS,)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = super().arrays()
        r = self.num_rows
        out |= {SEQ_POSITION: ((r,), "int32"), SEQ_TOKENS: ((r,), "int32"),
                SEQ_MASK: ((r,), "uint8")}
        if self.topk:
            out[S.TOPK_LOGITS] = ((r, self.topk), self.topk_dtype)
        return out


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


def sequence_meta(offsets: np.ndarray, layout: SequenceLayout, *,
                  labels: str = "next-token") -> dict[str, Any]:
    """The `sequence` entry of the root attribute."""
    return {"num_sequences": len(offsets) - 1, "topk_dtype": layout.topk_dtype,
            "topk_shifted": True, "topk_order": "class", "labels": labels,
            "offsets_xxh3": offsets_hash(offsets)}


def layout_from_meta(meta: dict[str, Any], *, num_rows: int | None = None,
                     num_sequences: int | None = None) -> SequenceLayout:
    """The layout a sequence set's metadata describes (row and sequence counts replaceable)."""
    seq, sparse = meta["sequence"], meta.get("sparse") or {}
    return SequenceLayout(
        num_rows=int(meta["num_rows"] if num_rows is None else num_rows),
        num_classes=int(meta["num_classes"]), temperatures=tuple(meta["temperatures"]),
        dtype=meta["dtype"], probs_dtype=meta["probs_dtype"],
        chunk_rows=int(meta["chunk_rows"]), shard_rows=meta.get("shard_rows"),
        topk=sparse.get("k", 0) if sparse.get("kind") == "topk" else 0,
        sample_k=sparse.get("k", 0) if sparse.get("kind") == "sample" else 0,
        num_sequences=int(seq["num_sequences"] if num_sequences is None else num_sequences),
        topk_dtype=seq.get("topk_dtype", "float32"))


class SequenceSetWriter(TransferSetWriter):
    """The example-set writer, plus `seq/offsets` written whole before any block.

    A rerun resumes like any set; a set laid out for other sequences is refused.
    """

    def __init__(self, path: str | Path, layout: SequenceLayout, meta: dict[str, Any], *,
                 offsets: np.ndarray, labels: str = "next-token", overwrite: bool = False,
                 ) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        problem = check_offsets(offsets, layout.num_rows)
        if problem is None and len(offsets) - 1 != layout.num_sequences:
            problem = "offsets and layout disagree on the number of sequences"
        if problem:
            raise TransferSetError(f"cannot write {path}: {problem}")
        meta = {**meta, "sequence": sequence_meta(offsets, layout, labels=labels)}
        if Path(path).exists() and not overwrite:
            _refuse_other_sequences(Path(path), meta["sequence"])
        super().__init__(path, layout, meta, overwrite=overwrite)
        if not self.already_complete:  # idempotent: rewritten on every resume
            if not self.store.has(SEQ_OFFSETS):
                self.store.create(SEQ_OFFSETS, offsets.shape, "int64",
                                  chunks=(min(len(offsets), 1 << 17),))
            self.store.write(SEQ_OFFSETS, slice(None), offsets)
            self.store.flush()


def _refuse_other_sequences(path: Path, new: dict[str, Any]) -> None:
    try:
        with open_store(path, "r") as store:
            old = (store.get_meta() or {}).get("sequence")
    except TransferSetError:
        return  # not a set: the writer says so
    if old is not None and old != new:
        what = "; ".join(f"{k}: existing {old.get(k)!r}, now {v!r}" for k, v in new.items()
                         if old.get(k) != v)
        raise MismatchError(f"{path} holds other sequences ({what}); it was left untouched: "
                            "use another --out, or --overwrite")


# --- reading ------------------------------------------------------------------------------


def is_sequence_set(ts: TransferSet) -> bool:
    return ts.meta.get("sequence") is not None


def read_offsets(ts: TransferSet) -> np.ndarray:
    """(S+1,) int64 row boundaries, checked against the hash recorded in the metadata."""
    if not is_sequence_set(ts):
        raise TransferSetError(f"{ts.path} is not a sequence set (no 'sequence' metadata)")
    try:
        offsets = ts.store.read(SEQ_OFFSETS).astype(np.int64)
    except Exception as exc:  # a missing or corrupted array fails in the backend
        raise IntegrityError(f"{ts.path}: {SEQ_OFFSETS} cannot be read ({type(exc).__name__}); "
                             "get a fresh copy of the set") from None
    if offsets_hash(offsets) != ts.meta["sequence"].get("offsets_xxh3"):
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
    if problem is None and len(offsets) - 1 != ts.meta["sequence"]["num_sequences"]:
        problem = (f"{len(offsets) - 1} sequences in {SEQ_OFFSETS}, "
                   f"{ts.meta['sequence']['num_sequences']} in the metadata")
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
    if ts.meta["sequence"].get("labels") == "next-token":
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
