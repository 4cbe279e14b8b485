"""Set operations on sequence sets: convert (any container), subset by whole sequences; merge is
refused. Sources are read block by block through `TransferSet.read_block` (checked)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SoftlabelsError
from ..progress import Progress
from . import schema as S
from ._store import backend_of
from .reader import TransferSet
from .selection import read_indices
from .sequence import SequenceLayout, SequenceSetWriter, layout_from_meta, read_offsets

# Metadata the writer sets itself, or that describes one particular file.
_OWN_KEYS = ("format_version", "status", "num_rows", "num_classes", "temperatures", "dtype",
             "probs_dtype", "chunk_rows", "shard_rows", "block_rows", "keep_members",
             "completed_at", "sequence")


class _Blocks:
    """Checked source blocks, the last few kept: reads rows at sorted positions."""

    def __init__(self, ts: TransferSet, keep: int = 2) -> None:
        self.ts, self.keep, self.cache = ts, keep, {}

    def block(self, b: int) -> dict[str, np.ndarray]:
        if b not in self.cache:
            if len(self.cache) >= self.keep:
                self.cache.pop(next(iter(self.cache)))
            self.cache[b] = self.ts.read_block(b)
        return self.cache[b]

    def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every row array at source `rows` (sorted)."""
        parts: dict[str, list[np.ndarray]] = {}
        blocks = rows // self.ts.block_rows
        for b in np.unique(blocks):
            arrays, start = self.block(int(b)), int(b) * self.ts.block_rows
            local = rows[blocks == b] - start
            for name, data in arrays.items():
                parts.setdefault(name, []).append(np.take(data, local, axis=S.row_axis(name)))
        return {n: np.concatenate(p, axis=S.row_axis(n)) for n, p in parts.items()}


def _source(ts: TransferSet) -> dict[str, Any]:
    return {"path": str(ts.path), "fingerprint": ts.meta["dataset"]["fingerprint"],
            "teacher": [m["sha256"] for m in ts.meta["teacher"]["members"]]}


def _write(out: Path, layout: SequenceLayout, meta: dict[str, Any], offsets: np.ndarray,
           arrays: Callable[[int, int], dict[str, np.ndarray]],
           progress: Progress | None) -> dict[str, Any]:
    """A new sequence set, block by block; a zip target is staged as a directory, then packed."""
    if out.exists():
        raise SoftlabelsError(f"{out} already exists; choose a new --out (nothing was written)")
    labels = meta["sequence"].get("labels", "next-token")
    meta = {k: v for k, v in meta.items() if k not in _OWN_KEYS}

    def write(path: Path) -> dict[str, Any]:
        with SequenceSetWriter(path, layout, meta, offsets=offsets, labels=labels) as writer:
            for b in writer.pending:
                start, stop = layout.block_range(b)
                writer.write_block(b, arrays(start, stop))
                if progress:
                    progress(stop, layout.num_rows)
        return writer.meta

    if backend_of(out) != "zarr-zip":
        return write(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / "set.zarr"
        written = write(staged)
        with zipfile.ZipFile(f"{out}.partial", "w", zipfile.ZIP_STORED) as z:
            for f in sorted(staged.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(staged).as_posix())
        os.replace(f"{out}.partial", out)
    return written


def convert_sequences(ts: TransferSet, out: Path, *,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Copy a sequence set into another container, content identical."""
    offsets = read_offsets(ts)
    meta = {**ts.meta, "provenance": {**ts.meta.get("provenance", {}),
                                      "converted_from": _source(ts)}}
    blocks = _Blocks(ts)
    return _write(out, layout_from_meta(ts.meta), meta, offsets,
                  lambda a, b: blocks.rows(np.arange(a, b)), progress)


def select_sequences(ts: TransferSet, offsets: np.ndarray, *, fraction: float | None,
                     seed: int, indices: np.ndarray | None) -> np.ndarray:
    """Sorted sequence numbers kept: those whose dataset index is in `indices`, then a seeded
    `fraction` of them (at least one)."""
    keep = np.arange(len(offsets) - 1)
    if indices is not None:
        keep = keep[np.isin(ts.read(S.INDEX, 0, ts.num_rows)[offsets[:-1]], indices)]
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise SoftlabelsError(f"--fraction must lie in (0, 1], got {fraction}")
        take = max(1, int(round(fraction * len(keep))))
        keep = np.sort(np.random.default_rng(seed).permutation(keep)[:take])
    if len(keep) == 0:
        raise SoftlabelsError("the subset options select no sequences; loosen --fraction or "
                              "--indices")
    return keep


def subset_sequences(ts: TransferSet, out: Path, *, fraction: float | None = None,
                     seed: int = 0, classes: Any = None, exclude_classes: Any = None,
                     indices: str | os.PathLike[str] | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """A new sequence set of whole sequences; `index` still points into the source data."""
    if classes or exclude_classes:
        raise SoftlabelsError(f"{ts.path} is a sequence set: it is cut by whole sequences; "
                              "use --fraction or --indices (dataset indices of sequences), "
                              "not --classes or --exclude-classes")
    offsets = read_offsets(ts)
    chosen = select_sequences(ts, offsets, fraction=fraction, seed=seed,
                              indices=read_indices(indices) if indices is not None else None)
    lengths = np.diff(offsets)[chosen]
    rows = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in chosen])
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    layout = layout_from_meta(ts.meta, num_rows=len(rows), num_sequences=len(chosen))
    selection = {"fraction": fraction, "seed": seed, "sequences": int(len(chosen)),
                 "indices": str(indices) if indices is not None else None}
    meta = {**ts.meta, "num_examples": ts.meta["num_examples"],
            "provenance": {**ts.meta.get("provenance", {}),
                           "subset_of": {**_source(ts), **selection}}}
    blocks = _Blocks(ts)
    return _write(out, layout, meta, new_offsets, lambda a, b: blocks.rows(rows[a:b]),
                  progress)


def refuse_merge(ts: TransferSet) -> None:
    raise SoftlabelsError(f"{ts.path} is a sequence set: merging sequence sets is not defined "
                          "in this version; precompute the ensemble at once (repeat --teacher)")
