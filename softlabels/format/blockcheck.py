"""The checks a block of a complete set passes before a reader uses it: marked done, readable,
matching its recorded checksums, finite targets, dataset indices and labels in range.
`reader.TransferSet` applies them; each returns why the block cannot be trusted, or None."""

from __future__ import annotations

import numpy as np

from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.targets.hybrid import PAD


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


def value_problem(arrays: dict[str, np.ndarray], num_classes: int, num_examples: int, *,
                  temperatures: list[float] | None = None) -> str | None:
    """Why a block's values cannot be trusted (non-finite targets, dataset indices or labels
    out of range, targets that are not probabilities: `target_problem`), or None."""
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
    return target_problem(arrays, num_classes, temperatures)


# A row's probabilities sum to 1 within this, by the dtype they are stored in (C roundings of
# at most u each, plus float16's underflow of tiny probabilities).
PROBS_SUM_TOLERANCE = {"float16": 1e-2, "float32": 1e-4}
_UNIT = {np.dtype("float16"): 2.0 ** -11, np.dtype("float32"): 2.0 ** -24,
         np.dtype("float64"): 2.0 ** -53}


def target_problem(arrays: dict[str, np.ndarray], num_classes: int,
                   temperatures: list[float] | None = None) -> str | None:
    """Why a block's targets are not probabilities, whatever their checksums say, or None:
    dense `probs` outside [0, 1] or whose rows do not sum to 1; class ids in `topk/indices`
    or `sample/indices` outside [0, C), in `hybrid/indices` outside [-1, C) (-1: unused);
    top-k logits whose per-T probabilities exp(z_i / T - logsumexp_T) exceed 1 (a log-sum-exp
    below the row's top logit / T) or whose top-k mass exceeds 1 + eps (`temperatures` needed
    for these two)."""
    probs = arrays.get(S.PROBS)
    if probs is not None and probs.size:
        tol = PROBS_SUM_TOLERANCE.get(str(probs.dtype), 1e-4)
        p = probs.astype(np.float32, copy=False)  # read only: no copy of float32 probs
        if p.min() < 0 or p.max() > 1 + tol:
            return (f"holds probabilities outside [0, 1] in {S.PROBS!r} (found "
                    f"{float(p.min()):.3g}..{float(p.max()):.3g})")
        # float32 sums first (numpy sums a row pairwise: off by ~1e-6 at most for 10^5
        # classes); only rows off by over half the tolerance can fail, and they are summed
        # again in float64, so the verdict and its figure are the float64 ones
        near = np.abs(p.sum(-1) - 1) > tol / 2
        worst = float(np.abs(p[near].sum(-1, dtype=np.float64) - 1).max()) if near.any() else 0.0
        if worst > tol:
            return (f"holds rows of {S.PROBS!r} that do not sum to 1 (off by {worst:.3g}, "
                    f"tolerance {tol:g} for {probs.dtype})")
    # a hybrid's unused columns hold PAD (-1): decoding drops them, a class past C fails the
    # loss, so both bounds are checked here and not only by verify's recipe check
    for name, low in ((S.TOPK_INDICES, 0), (S.SAMPLE_INDICES, 0), (S.HYBRID_INDICES, PAD)):
        ids = arrays.get(name)
        if ids is not None and ids.size and (ids.min() < low or ids.max() >= num_classes):
            return (f"holds class ids outside [{low}, {num_classes}) in {name!r} "
                    f"(found {int(ids.min())}..{int(ids.max())})")
    z, lse = arrays.get(S.TOPK_LOGITS), arrays.get(S.TOPK_LOGSUMEXP)
    if z is None or lse is None or not z.size or temperatures is None:
        return None
    return _topk_problem(z, lse, temperatures)


def _topk_problem(z: np.ndarray, lse: np.ndarray, temperatures: list[float]) -> str | None:
    """Top-k logits z (rows, k) and normalisers lse (rows, K): at each T_k the largest
    log-probability max(z) / T - lse must be <= 0 and the top-k mass sum exp(z / T - lse)
    <= 1, within the rounding of the stored dtypes."""
    u = max(_UNIT.get(z.dtype, 2.0 ** -24), _UNIT.get(lse.dtype, 2.0 ** -24))
    z64, top = z.astype(np.float64), z.astype(np.float64).max(-1)
    for j, t in enumerate(temperatures):
        norm = lse[:, j].astype(np.float64)
        slack = 8 * u * (1 + np.abs(top) / t + np.abs(norm))  # rounding of z / T and of lse
        over = top / t - norm - slack
        if over.max() > 0:
            row = int(over.argmax())
            return (f"holds a top-k log-sum-exp below its row's top logit / T at T={t:g} (row "
                    f"{row} of the block: max z / T = {top[row] / t:.6g} > logsumexp "
                    f"{norm[row]:.6g}, a probability above 1)")
        mass = np.exp(z64 / t - norm[:, None]).sum(-1)
        bound = 1 + 1e-3 + z.shape[1] * 8 * u
        if mass.max() > bound:
            row = int(mass.argmax())
            return (f"holds top-k probabilities summing to {mass[row]:.4g} > 1 at T={t:g} "
                    f"(row {row} of the block)")
    return None


def missing_checksums_problem(meta: dict[str, object]) -> str | None:
    """Why a set labelled version 1 without block checksums cannot be one, or None: its
    metadata records what only writers with checksums wrote (a `digest`, the `sparse` key, a
    `sequence`), so its checksums were removed and its version lowered (a downgrade that would
    switch the checks off)."""
    found = [key for key in ("digest", "sparse") if key in meta] + (
        ["sequence"] if meta.get("sequence") else [])
    if not found:
        return None
    return (f"is labelled format version {meta.get('format_version')} without block "
            f"checksums, but its metadata records {', '.join(found)}, which only versions with "
            "checksums write: its checksums were removed")


# A set declaring more than this many bytes of arrays has its stored bytes measured on opening
# (a listing) before anything reads whole columns; smaller sets cannot exhaust memory.
MEASURE_ABOVE_BYTES = 256 << 20
# Bytes per row no set can store less of: its `sample_hash` column holds random 64-bit values,
# which no codec compresses (half of that, for headroom).
MIN_STORED_BYTES_PER_ROW = 4


def declared_bytes(layout: Layout) -> int:
    """Bytes the set's arrays take in memory as its metadata declares them."""
    return sum(int(np.prod(spec.shape, dtype=np.float64)) * np.dtype(spec.dtype).itemsize
               for spec in layout.specs().values())


def size_problem(layout: Layout, stored: int | None) -> str | None:
    """Why a set cannot hold the rows it declares, or None: it stores fewer bytes than
    `MIN_STORED_BYTES_PER_ROW` per declared row (a small file claiming 1e8 rows, which would
    make readers allocate gigabytes of fill values). None when `stored` is unknown (http)."""
    if stored is None or stored >= MIN_STORED_BYTES_PER_ROW * layout.num_rows:
        return None
    return (f"declares {layout.num_rows} rows ({declared_bytes(layout) / 2**30:.1f} GiB of "
            f"arrays) but stores only {stored} bytes, fewer than the "
            f"{MIN_STORED_BYTES_PER_ROW} bytes per row its sample hashes alone take")
