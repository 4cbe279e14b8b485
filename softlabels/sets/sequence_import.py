"""Import into a sequence set: what every importer shares (vLLM prompt log-probs, Parquet).

An importer reads its input twice. The first pass checks every sequence and returns its length
and token hash (the set's offsets and sample hashes must be known before it is laid out); the
second pass yields each sequence's rows, which `write_sequence_set` packs into whole blocks and
writes through the one writer (`format.sequence.SequenceSetWriter`): leased, laid out aside,
checksummed, resumable, complete last. Memory holds one block and one sequence.

Top-k rows are stored as a sequence set stores them (docs/FORMAT.md): classes in ascending id
order, `topk/logits` shifted by the row's largest value, `topk/logsumexp` per stored T. From
log-probabilities at T = 1, `log p` shifted by its maximum m gives `topk/logits = log p - m` and
`topk/logsumexp = -m`, so `exp(topk/logits - topk/logsumexp) = p` exactly (up to float32); no
other temperature can be served exactly (the log-probs of the classes outside the top k are
unknown), so such a set stores T = 1 alone and every other T is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.compute.record import versions
from softlabels.errors import DataError
from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.sequence import SEQ_MASK, SEQ_POSITION, SEQ_TOKENS, SequenceSetWriter
from softlabels.progress import Progress

# exp(log p) summed over a position's k classes may exceed 1 by rounding only
MASS_TOLERANCE = 1e-4


def sequence_hash(tokens: np.ndarray) -> int:
    """A sequence's sample hash: XXH3-64 of its token ids as little-endian int64."""
    return S.sample_hash(np.ascontiguousarray(tokens, dtype="<i8"))


def probe(hashes: np.ndarray) -> str:
    """The dataset probe `precompute` records (`precompute.dataset_probe`), from the sequences'
    hashes: the hashes of up to 16 evenly spaced sequences."""
    picks = np.unique(np.linspace(0, len(hashes) - 1, num=min(16, len(hashes))).astype(int))
    return S.fingerprint(np.asarray(hashes, dtype=np.uint64)[picks])[:32]


def input_sha256(files: Iterable[Path]) -> str:
    """The SHA-256 of the files an import reads: of one file's bytes; of several, of the lines
    `sha256sum` prints for them in the order read."""
    sums = []
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as stream:
            while block := stream.read(1 << 20):
                h.update(block)
        sums.append((h.hexdigest(), Path(f).name))
    if len(sums) == 1:
        return sums[0][0]
    return hashlib.sha256("".join(f"{sha}  {name}\n" for sha, name in sums).encode()).hexdigest()


def imported_meta(*, teacher_name: str, data_spec: str, hashes: np.ndarray,
                  targets: dict[str, Any], provenance: dict[str, Any],
                  sha256: str = "") -> dict[str, Any]:
    """The descriptive metadata of an imported sequence set: the teacher as the user named it
    (no weights to hash: `sha256` is that of the input files the targets were read from, so
    that a rerun resumes only onto the same input), how its targets were made
    (`teacher.targets`), the token data that `verify --data` checks it against."""
    return {
        "num_examples": len(hashes), "class_names": [],
        "teacher": {"members": [{"spec": f"imported:{teacher_name}", "sha256": sha256,
                                 "source": teacher_name}],
                    "combine": "mean-logits", "targets": targets},
        "dataset": {"spec": data_spec, "length": len(hashes), "probe": probe(hashes)},
        "views": None, "augment": None, "view_seed": None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "device": "imported", "precision": "unknown",
        "provenance": {"imported_from": provenance},
    }


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
    """Refuse log-probs that no model emits: ids outside [0, V) or repeated in a position,
    non-finite or positive log-probs, or a position whose probabilities sum past 1."""
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        bad = ids[(ids < 0) | (ids >= num_classes)][0]
        raise DataError(f"{where}: token id {int(bad)} outside the vocabulary [0, {num_classes})"
                        "; pass the teacher's --vocab-size")
    if not np.isfinite(lp).all() or (lp > 0).any():
        raise DataError(f"{where}: log-probabilities must be finite and <= 0, found "
                        f"{float(lp[~np.isfinite(lp) | (lp > 0)][0])!r}")
    if ids.shape[1] > 1:
        s = np.sort(ids, 1)
        if (s[:, 1:] == s[:, :-1]).any():
            p = int(np.flatnonzero((s[:, 1:] == s[:, :-1]).any(1))[0])
            raise DataError(f"{where}: position {p} lists a token id twice")
    mass = np.exp(lp).sum(1)
    if (mass > 1 + MASS_TOLERANCE).any():
        p = int(np.argmax(mass))
        raise DataError(f"{where}: the probabilities of position {p} sum to {mass[p]:.6f} > 1; "
                        "these are not log-probabilities of one distribution")


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


def write_sequence_set(out: str | Path, layout: Layout, meta: dict[str, Any],
                       offsets: np.ndarray, sequences: Iterable[dict[str, np.ndarray]], *,
                       labels: str, overwrite: bool = False,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Write a sequence set whose rows come, one sequence at a time and in order, from
    `sequences` (each a dict of every row array of that sequence: `sequence_columns`). Rows are
    packed into whole blocks; a rerun resumes, rewriting only the blocks not marked done.
    Returns the completed set's metadata."""
    arrays = layout.arrays()
    if any(S.row_axis(name) for name in arrays):
        raise DataError("imports write top-k sequence sets only")
    with SequenceSetWriter(out, layout, meta, offsets=offsets, labels=labels,
                           overwrite=overwrite) as writer:
        if writer.already_complete:
            return writer.meta
        pending = set(writer.pending)
        rows = layout.block_rows
        buf = {n: np.empty((rows, *shape[1:]), dtype) for n, (shape, dtype) in arrays.items()}
        block = fill = 0
        for s, cols in enumerate(sequences):
            n, pos = len(cols[SEQ_TOKENS]), 0
            if n != offsets[s + 1] - offsets[s]:
                raise DataError(f"sequence {s} changed length between the two passes over the "
                                "input; do not edit the input while it is imported")
            while pos < n:
                start, stop = layout.block_range(block)
                take = min(n - pos, stop - start - fill)
                for name in arrays:
                    buf[name][fill:fill + take] = cols[name][pos:pos + take]
                fill, pos = fill + take, pos + take
                if fill == stop - start:
                    if block in pending:
                        writer.write_block(block, {k: v[:fill] for k, v in buf.items()})
                    if progress:
                        progress(stop, layout.num_rows)
                    block, fill = block + 1, 0
        if block != layout.num_blocks:
            raise DataError("the input ended before its second pass wrote every position; do "
                            "not edit the input while it is imported")
    return writer.meta
