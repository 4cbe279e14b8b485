"""Which rows a student trains on, or a subset keeps: a seeded stratified fraction, class lists,
index files; of a sequence set, whole sequences."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from softlabels.errors import SoftlabelsError
from softlabels.format import schema as S

# a text file of indices is read by numpy's text parser (slow, and its memory grows with the
# file); 100 million indices fit, more belong in a .npy array
MAX_INDEX_TEXT_BYTES = 1 << 30


def read_indices(path: str | os.PathLike[str]) -> np.ndarray:
    """Dataset indices from a .npy file or a text file of integers (one per line or spaced)."""
    p = Path(path)
    if not p.exists():
        raise SoftlabelsError(f"no index file at {p}; check the path")
    if not p.is_file():  # a fifo would be waited on, a device read without end
        raise SoftlabelsError(f"the index file {p} is not a regular file (a fifo, a device or "
                              "a folder); give the path of the file itself")
    size = p.stat().st_size
    if p.suffix != ".npy" and size > MAX_INDEX_TEXT_BYTES:
        raise SoftlabelsError(f"the index file {p} holds {size} bytes of text, more "
                              f"than {MAX_INDEX_TEXT_BYTES}; save that many indices as a .npy "
                              "array (numpy.save)")
    try:
        with warnings.catch_warnings():  # an empty file: said below, without numpy's warning
            warnings.simplefilter("ignore", UserWarning)
            values = (np.load(p, allow_pickle=False) if p.suffix == ".npy"
                      else np.loadtxt(p, ndmin=1))
    except (ValueError, MemoryError, EOFError) as exc:  # MemoryError: a header claiming TBs
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SoftlabelsError(f"cannot read indices from {p}: {why}; write one integer per "
                              "line, or a .npy array") from None
    if values.size and not np.array_equal(values, np.round(values)):
        raise SoftlabelsError(f"{p} holds non-integer indices; write whole numbers")
    return values.astype(np.int64).ravel()


def select_rows(
    labels: np.ndarray,
    *,
    index: np.ndarray | None = None,
    fraction: float | None = None,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    exclude_classes: Sequence[int] | None = None,
    indices: np.ndarray | None = None,
    num_examples: int | None = None,
) -> np.ndarray:
    """Sorted row numbers kept by every given filter.

    `labels` and `index` are per row (index: the dataset index of each row; default the row
    number). Class lists are checked against the labels present; `fraction` takes, per class
    (unknown labels form their own stratum), round(fraction * n_class) rows, at least one, with
    a generator seeded by `seed` — the same seed selects the same rows. `indices` outside
    [0, num_examples) (default: the number of rows, when `index` is not given) are refused,
    never silently dropped.
    """
    labels = np.asarray(labels)
    row_index = index is not None  # rows name dataset examples; their count is not known here
    index = np.arange(len(labels)) if index is None else np.asarray(index)
    keep = np.ones(len(labels), dtype=bool)
    present = set(np.unique(labels[labels >= 0]).tolist())
    for name, chosen in (("--classes", classes), ("--exclude-classes", exclude_classes)):
        missing = sorted(set(chosen or ()) - present)
        if missing:
            raise SoftlabelsError(f"{name} names classes the data lacks: {missing}; choose among "
                                  f"the labels present, {sorted(present)}")
    if classes:
        keep &= np.isin(labels, list(classes))
    if exclude_classes:
        keep &= ~np.isin(labels, list(exclude_classes))
    if indices is not None:
        if num_examples is None and not row_index:
            num_examples = len(labels)
        _check_indices(np.asarray(indices), num_examples)
        keep &= np.isin(index, indices)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise SoftlabelsError(f"--fraction must lie in (0, 1], got {fraction}")
        keep &= stratified_mask(labels, fraction, seed)
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise SoftlabelsError("the subset options select no rows; loosen --fraction, "
                              "--classes, --exclude-classes or --indices")
    return rows


def _check_indices(indices: np.ndarray, bound: int | None) -> None:
    bad = (indices < 0) | (indices >= bound if bound is not None else False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f"[0, {bound})" if bound is not None else "0 or above"
        raise SoftlabelsError(f"--indices holds index {int(indices[i])} (entry {i}), outside "
                              f"the dataset's examples {where}; fix the index file")


def stratified_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask keeping `fraction` of each label's rows (at least one), seeded."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = max(1, int(round(fraction * len(rows))))
        mask[rng.permutation(rows)[:take]] = True
    return mask


class IndexReader(Protocol):
    """What `select_sequences` reads a set's `index` through (a `copying.Source`)."""

    def rows(self, names: Sequence[str], rows: np.ndarray) -> dict[str, Any]: ...


def select_sequences(index: IndexReader, offsets: np.ndarray, *, fraction: float | None,
                     seed: int, indices: np.ndarray | None) -> np.ndarray:
    """Sorted sequence numbers kept: those whose dataset index is in `indices`, then a seeded
    `fraction` of them (at least one). `index`: the source, read checked."""
    keep = np.arange(len(offsets) - 1)
    if indices is not None:
        keep = keep[np.isin(index.rows([S.INDEX], offsets[:-1])[S.INDEX], indices)]
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise SoftlabelsError(f"--fraction must lie in (0, 1], got {fraction}")
        take = max(1, int(round(fraction * len(keep))))
        keep = np.sort(np.random.default_rng(seed).permutation(keep)[:take])
    if len(keep) == 0:
        raise SoftlabelsError("the subset options select no sequences; loosen --fraction or "
                              "--indices")
    return keep
