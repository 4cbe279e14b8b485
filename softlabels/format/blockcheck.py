"""The checks a block of a complete set passes before a reader uses it: marked done, readable,
matching its recorded checksums, finite targets, dataset indices and labels in range.
`reader.TransferSet` applies them; each returns why the block cannot be trusted, or None."""

from __future__ import annotations

import numpy as np

from . import schema as S
from .layout import Layout


def all_finite(a: np.ndarray) -> bool:
    """No NaN or inf in `a`. float16 by its exponent bits: numpy's float16 isfinite is ~15x
    slower than reading the block (all-ones exponent = inf or NaN)."""
    if a.dtype == np.float16:
        return not ((a.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(a).all())


def undone_problem(marker: np.ndarray) -> str | None:
    """Why a block of a complete set whose `block_done` entry reads `marker` (one element)
    cannot be trusted, or None: every block of a complete set is marked 1. A deleted marker
    object reads as the fill value 0."""
    if int(marker[0]) == 1:
        return None
    return (f"is not marked done in {S.BLOCK_DONE!r} although the set is marked complete (its "
            f"marker is missing or altered: found {int(marker[0])}, expected 1; rerunning the "
            "`softlabels precompute` command that made the set rewrites the block)")


def undone_blocks(layout: Layout, done: np.ndarray) -> str:
    """Which blocks `done` (a `block_done` array) does not mark as written, in words; '' when
    every block is."""
    undone = np.flatnonzero(done != 1)
    if not len(undone):
        return ""
    start, stop = layout.block_range(int(undone[0]))
    more = f" and {len(undone) - 1} more" if len(undone) > 1 else ""
    return (f"block {int(undone[0])} (rows {start}-{stop - 1}){more} not marked done in "
            f"{S.BLOCK_DONE!r} (its marker is missing or altered: found "
            f"{int(done[undone[0]])}, expected 1)")


def checksum_problem(slots: dict[tuple[str, int | None], int], temperatures: list[float],
                     arrays: dict[str, np.ndarray], k: int | None, recorded: np.ndarray,
                     ) -> str | None:
    """The first array read whose checksum slot(s) differ from `recorded` (the block's row of
    `array_checksum`), or None. `slots`: column of each `Layout.checksum_slots()` entry; `k`:
    the temperature index the arrays on a temperature axis were read at, None when whole."""
    def which(name: str, j: int) -> str:
        return (f" at T={temperatures[j]:g}" if name in S.TEMPERATURE_AXIS
                else f" of member {j}")

    for name, data in arrays.items():
        if S.row_axis(name) == 0:
            parts = [(slots[(name, None)], data, "")]
        elif k is not None and name in S.TEMPERATURE_AXIS:
            parts = [(slots[(name, k)], data, which(name, k))]
        else:
            parts = [(slots[(name, j)], data[j], which(name, j)) for j in range(len(data))]
        for col, part, what in parts:
            if S.array_checksum(part) != int(recorded[col]):
                return (f"does not match its checksum (a flipped byte or a missing chunk in "
                        f"{name!r}{what})")
    return None


def value_problem(arrays: dict[str, np.ndarray], num_classes: int,
                  num_examples: int) -> str | None:
    """Why a block's values cannot be trusted (non-finite targets, dataset indices or labels
    out of range), or None."""
    for name in S.TARGET_ARRAYS:
        if name in arrays and not all_finite(arrays[name]):
            return f"holds NaN or inf in {name!r}"
    index = arrays.get(S.INDEX)
    if index is not None and len(index) and (index.min() < 0 or index.max() >= num_examples):
        return (f"holds dataset indices outside [0, {num_examples}) "
                f"(found {int(index.min())}..{int(index.max())})")
    labels = arrays.get(S.LABELS)
    if labels is not None and len(labels) and (labels.min() < -1 or labels.max() >= num_classes):
        return (f"holds labels outside [-1, {num_classes}) "
                f"(found {int(labels.min())}..{int(labels.max())})")
    return None
