"""Import: a transfer set from what another tool made, written once for every kind of set.

Every importer (`write_set` for arrays, `import_vllm`, `import_parquet`) checks its input,
describes the set (`imported_meta`) and hands its rows to `write_rows`, the one writing path:
the writer is leased, the set laid out aside, checksummed per block, resumable, complete last.
What differs between kinds of row (`Layout.kind`) is the `Rows` given, one class per kind
(`KINDS`):

- `ExampleRows`: any block's rows are made on demand from arrays held in memory or mapped
  (so only the blocks not yet done are made, the next while one is written), and the data's
  sample hashes prove a resume.
- `SequenceRows`: an importer reads its input twice. The first pass checks every sequence and
  returns its length and token hash (the set's offsets and sample hashes must be known before
  it is laid out; `seq/offsets` is written whole then); the second pass yields each sequence's
  rows (`sequence_columns`), packed here into whole blocks. Memory holds one block and one
  sequence.

Top-k rows of a sequence set are stored as docs/FORMAT.md says: classes in ascending id order,
`topk/logits` shifted by the row's largest value, `topk/logsumexp` per stored T. From
log-probabilities at T = 1, `log p` shifted by its maximum m gives `topk/logits = log p - m` and
`topk/logsumexp = -m`, so `exp(topk/logits - topk/logsumexp) = p` exactly (up to float32); no
other temperature can be served exactly (the log-probs of the classes outside the top k are
unknown), so such a set stores T = 1 alone and every other T is refused.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from softlabels.compute.record import versions
from softlabels.errors import DataError, OptionError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.sequence import SEQ_MASK, SEQ_POSITION, SEQ_TOKENS, SequenceSetWriter
from softlabels.format.writer import TransferSetWriter
from softlabels.progress import Progress
from softlabels.safe_read import open_input
from softlabels.sources.tokens import MAX_TOKEN_ID

# exp(log p) summed over a row's k classes may exceed 1 by rounding only
MASS_TOLERANCE = 1e-4


# --- the rows of each kind ---------------------------------------------------------------------


class Rows(Protocol):
    """How one kind of set's imported rows reach the writer."""

    kind: ClassVar[str]  # the Layout.kind these rows make

    def open(self, out: str | os.PathLike[str], layout: Layout, meta: dict[str, Any], *,
             overwrite: bool) -> TransferSetWriter:
        """The writer of this kind of set (created, or resumed when it can be)."""

    def blocks(self, layout: Layout, pending: Sequence[int], progress: Progress | None,
               ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(block, every row array of its rows) of each `pending` block, in order; progress is
        reported once the block yielded has been written."""


@dataclass
class ExampleRows:
    """Rows by example: `block(b)` makes every row array of block b, `hashes(start, stop)` the
    sample hashes of rows [start, stop) (they prove the rows a rerun resumes onto). Progress
    counts the blocks written."""

    block: Callable[[int], dict[str, np.ndarray]]
    hashes: Callable[[int, int], np.ndarray]
    kind: ClassVar[str] = "examples"

    def open(self, out: str | os.PathLike[str], layout: Layout, meta: dict[str, Any], *,
             overwrite: bool) -> TransferSetWriter:
        return TransferSetWriter(out, layout, meta, overwrite=overwrite, row_hashes=self.hashes)

    def blocks(self, layout: Layout, pending: Sequence[int], progress: Progress | None,
               ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        pending = list(pending)
        with ThreadPoolExecutor(1) as pool:  # the next block is made while one is written
            ahead = pool.submit(self.block, pending[0]) if pending else None
            for n, block in enumerate(pending):
                arrays = ahead.result()
                if n + 1 < len(pending):
                    ahead = pool.submit(self.block, pending[n + 1])
                yield block, arrays
                if progress:
                    progress(n + 1, len(pending))


@dataclass
class SequenceRows:
    """Rows by position of token sequences: `offsets` (S + 1,) from the first pass, and
    `sequences`, the second pass, yielding each sequence's row arrays in order
    (`sequence_columns`). Progress counts the positions passed."""

    offsets: np.ndarray
    sequences: Iterable[dict[str, np.ndarray]]
    kind: ClassVar[str] = "sequences"

    def open(self, out: str | os.PathLike[str], layout: Layout, meta: dict[str, Any], *,
             overwrite: bool) -> TransferSetWriter:
        if any(S.row_axis(name) for name in layout.arrays()):
            raise DataError("imports write top-k sequence sets only")
        return SequenceSetWriter(out, layout, meta, offsets=self.offsets, overwrite=overwrite)

    def blocks(self, layout: Layout, pending: Sequence[int], progress: Progress | None,
               ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        arrays, offsets, pending = layout.arrays(), self.offsets, set(pending)
        buf = {n: np.empty((layout.block_rows, *shape[1:]), dtype)
               for n, (shape, dtype) in arrays.items()}
        block = fill = 0
        for s, cols in enumerate(self.sequences):
            n, pos = len(cols[SEQ_TOKENS]), 0
            if n != offsets[s + 1] - offsets[s]:
                raise DataError(f"sequence {s} changed length between the two passes over the "
                                "input; do not edit the input while it is imported")
            while pos < n:  # the sequence's rows, into as many blocks as they reach
                start, stop = layout.block_range(block)
                take = min(n - pos, stop - start - fill)
                for name in arrays:
                    buf[name][fill:fill + take] = cols[name][pos:pos + take]
                fill, pos = fill + take, pos + take
                if fill == stop - start:
                    if block in pending:
                        yield block, {k: v[:fill] for k, v in buf.items()}
                    if progress:
                        progress(stop, layout.num_rows)
                    block, fill = block + 1, 0
        if block != layout.num_blocks:
            raise DataError("the input ended before its second pass wrote every position; do "
                            "not edit the input while it is imported")


KINDS: dict[str, type[Rows]] = {"examples": ExampleRows, "sequences": SequenceRows}


def write_rows(out: str | os.PathLike[str], layout: Layout, meta: dict[str, Any], rows: Rows,
               *, overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Write the set `layout` describes from `rows`, block by block; a rerun resumes, writing
    only the blocks not marked done. Returns the completed set's metadata."""
    if not isinstance(rows, KINDS[layout.kind]):
        raise TransferSetError(f"cannot write {out}: its layout is of {layout.kind}, the rows "
                               f"given are of {rows.kind}")
    with rows.open(out, layout, meta, overwrite=overwrite) as writer:
        if writer.already_complete:
            return writer.meta
        with closing(rows.blocks(layout, writer.pending, progress)) as blocks:
            for block, arrays in blocks:
                writer.write_block(block, arrays)
    return writer.meta


# --- the description ---------------------------------------------------------------------------


def imported_meta(*, teacher_name: str, dataset: dict[str, Any], targets: dict[str, Any],
                  provenance: dict[str, Any], class_names: Sequence[str] = (),
                  sha256: str = "") -> dict[str, Any]:
    """The descriptive metadata of an imported set: the teacher as the user named it (no weights
    to hash: `sha256` is that of the input files the targets were read from, where there are
    any, so that a rerun resumes only onto the same input), how its targets were made
    (`teacher.targets`), and the data (`dataset`: its spec, length and probe) that
    `verify --data` checks the rows against."""
    return {
        "num_examples": dataset["length"], "class_names": list(class_names),
        "teacher": {"members": [{"spec": f"imported:{teacher_name}", "sha256": sha256,
                                 "source": teacher_name}],
                    "combine": "mean-logits", "targets": targets},
        "dataset": dataset,
        "views": None, "augment": None, "view_seed": None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "device": "imported", "precision": "unknown",
        "provenance": {"imported_from": provenance},
    }


def sequence_hash(tokens: np.ndarray) -> int:
    """A sequence's sample hash: XXH3-64 of its token ids as little-endian int64."""
    return S.sample_hash(np.ascontiguousarray(tokens, dtype="<i8"))


def token_dataset(spec: str, hashes: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """The `dataset` description of token sequences, from their hashes: the probe `precompute`
    records (`compute.record.dataset_probe`), the hashes of up to 16 evenly spaced sequences."""
    picks = np.unique(np.linspace(0, len(hashes) - 1, num=min(16, len(hashes))).astype(int))
    probe = S.fingerprint(np.asarray(hashes, dtype=np.uint64)[picks])[:32]
    return {"spec": spec, "length": len(hashes), "probe": probe}


def input_sha256(files: Iterable[Path]) -> str:
    """The SHA-256 of the files an import reads: of one file's bytes; of several, of the lines
    `sha256sum` prints for them in the order read."""
    sums = []
    for f in files:
        h = hashlib.sha256()
        with open_input(f, "input") as stream:
            while block := stream.read(1 << 20):
                h.update(block)
        sums.append((h.hexdigest(), Path(f).name))
    if len(sums) == 1:
        return sums[0][0]
    return hashlib.sha256("".join(f"{sha}  {name}\n" for sha, name in sums).encode()).hexdigest()


# --- sequences ------------------------------------------------------------------------


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary that token ids (int32) cannot index."""
    if not 2 <= vocab_size <= MAX_TOKEN_ID + 1:
        raise OptionError(f"--vocab-size must lie in [2, {MAX_TOKEN_ID + 1}] (token ids are "
                          f"int32), got {vocab_size}; pass the teacher's vocabulary size")


def first_pass(sequences: Iterable[np.ndarray], empty: str) -> tuple[np.ndarray, list[int]]:
    """An import's first pass over its checked token sequences: their offsets (S + 1,) and
    sample hashes, which the set is laid out with; `empty` refuses an input of none."""
    lengths, hashes = [], []
    for tokens in sequences:
        lengths.append(len(tokens))
        hashes.append(sequence_hash(tokens))
    if not lengths:
        raise DataError(empty)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), hashes


def logprob_targets(lp: np.ndarray, classes: np.ndarray, dtype: str,
                    ) -> dict[str, np.ndarray]:
    """Top-k rows from log-probabilities at T = 1: `lp`, `classes` (L, k) in any order ->
    classes ascending, `topk/logits` = lp - max (in `dtype`), `topk/logsumexp` = -max (L, 1)."""
    order = np.argsort(classes, axis=1, kind="stable")
    classes = np.take_along_axis(classes, order, 1)
    lp = np.take_along_axis(np.asarray(lp, np.float64), order, 1)
    top = lp.max(1, keepdims=True)
    return {S.TOPK_INDICES: classes.astype(np.int32),
            S.TOPK_LOGITS: (lp - top).astype(dtype),
            S.TOPK_LOGSUMEXP: (-top).astype(np.float32)}


def placeholder_targets(n: int, k: int, dtype: str) -> dict[str, np.ndarray]:
    """Targets for `n` positions that have none (masked out, e.g. a sequence's last position
    in vLLM prompt log-probs): classes 0..k-1 at probability 1/k each. Never trained on."""
    return {S.TOPK_INDICES: np.tile(np.arange(k, dtype=np.int32), (n, 1)),
            S.TOPK_LOGITS: np.zeros((n, k), dtype),
            S.TOPK_LOGSUMEXP: np.full((n, 1), math.log(k), np.float32)}


def check_logprobs(lp: np.ndarray, ids: np.ndarray, num_classes: int, where: str) -> None:
    """Refuse log-probs that no model emits (`check_topk` at T = 1, positions named)."""
    check_topk(ids, lp, num_classes, where, row="position")


def check_topk(ids: np.ndarray, values: np.ndarray, num_classes: int, where: str, *,
               logsumexp: np.ndarray | None = None, temperatures: Sequence[float] = (1.0,),
               row: str = "row") -> None:
    """Refuse top-k rows that no model emits, in a few numpy passes over the block: `ids`
    (n, k) outside [0, C) or repeated in a row; `values` (n, k) not finite; a row whose
    probabilities sum past 1 at some T, p = exp(values / T - logsumexp[:, j]) with `logsumexp`
    (n, K) over all C classes at T_j, or p = exp(values) where `values` are log-probabilities
    at T = 1 (no `logsumexp`; they must be <= 0)."""
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        bad = ids[(ids < 0) | (ids >= num_classes)][0]
        raise DataError(f"{where}: class id {int(bad)} outside the vocabulary [0, {num_classes})"
                        "; pass the teacher's --vocab-size / --num-classes")
    what = "log-probabilities must be finite and <= 0" if logsumexp is None else \
        "top-k logits and their logsumexp must be finite"
    if not np.isfinite(values).all() or (logsumexp is None and (values > 0).any()):
        bad = values[~np.isfinite(values) | (values > 0 if logsumexp is None else False)]
        raise DataError(f"{where}: {what}, found {float(bad.flat[0])!r}")
    if logsumexp is not None and not np.isfinite(logsumexp).all():
        raise DataError(f"{where}: {what}, found {float(logsumexp[~np.isfinite(logsumexp)][0])!r}")
    if ids.shape[1] > 1:
        s = np.sort(ids, 1)
        same = s[:, 1:] == s[:, :-1]
        if same.any():
            raise DataError(f"{where}: {row} {int(np.flatnonzero(same.any(1))[0])} lists a "
                            "class twice")
    p = np.empty(values.shape, np.result_type(values.dtype, np.float32))
    ones = np.ones(values.shape[1], p.dtype)  # p @ ones: the row sums, ~15x sum(1) at small k
    for j, t in enumerate(temperatures):
        np.divide(values, t, out=p) if t != 1 else np.copyto(p, values)
        if logsumexp is not None:
            np.subtract(p, logsumexp[:, j:j + 1], out=p)
        mass = np.exp(p, out=p) @ ones
        if (mass > 1 + MASS_TOLERANCE).any():
            r = int(np.argmax(mass))
            raise DataError(f"{where}: the probabilities of {row} {r} at T = {t:g} sum to "
                            f"{mass[r]:.6f} > 1; these are not the top k of one distribution "
                            "(a logsumexp must be over all classes)")


def sequence_columns(tokens: np.ndarray, index: int, mask: np.ndarray, labels: np.ndarray,
                     targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every row array of one sequence's rows."""
    n = len(tokens)
    return {S.LABELS: labels.astype(np.int64), S.INDEX: np.full(n, index, np.int64),
            S.SAMPLE_HASH: np.full(n, sequence_hash(tokens), np.uint64),
            SEQ_POSITION: np.arange(n, dtype=np.int32), SEQ_TOKENS: tokens.astype(np.int32),
            SEQ_MASK: mask.astype(np.uint8), **targets}


def next_token_labels(tokens: np.ndarray, num_classes: int) -> np.ndarray:
    """(L,) the next token at each position, -1 at the last (and where not a class)."""
    nxt = np.append(tokens[1:], -1).astype(np.int64)
    return np.where(nxt >= num_classes, -1, nxt)
