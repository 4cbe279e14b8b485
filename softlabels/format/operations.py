"""Sharing transfer sets between teams: subset, merge and convert, each into a new set that
records where it came from (its `provenance`)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MismatchError, SoftlabelsError
from ..progress import Progress
from ..tempering import combine_logits, ensemble_probs
from . import schema as S
from ._store import backend_of
from .layout import Layout
from .reader import TransferSet, open_transfer_set
from .selection import read_indices, select_rows
from .sequence_ops import convert_sequences, refuse_merge, subset_sequences
from .writer import TransferSetWriter

BlockArrays = Callable[[int, int], dict[str, np.ndarray]]

# Metadata the writer sets itself, or that describes one particular file.
_OWN_KEYS = ("format_version", "status", "num_rows", "num_classes", "temperatures", "dtype",
             "probs_dtype", "chunk_rows", "shard_rows", "block_rows", "keep_members",
             "completed_at")


def _layout(ts: TransferSet, *, num_rows: int | None = None,
            num_members: int | None = None) -> Layout:
    m = ts.meta
    members = len(m["teacher"]["members"]) if ts.has(S.MEMBER_LOGITS) else 0
    inputs = m.get("inputs") or {}
    return Layout(num_rows=num_rows if num_rows is not None else ts.num_rows,
                  num_classes=ts.num_classes, temperatures=tuple(ts.temperatures),
                  dtype=m["dtype"], probs_dtype=m["probs_dtype"],
                  num_members=members if num_members is None else num_members,
                  chunk_rows=ts.chunk_rows, shard_rows=m.get("shard_rows"),
                  input_shape=tuple(inputs["shape"]) if inputs else None,
                  input_dtype=inputs.get("dtype", "float32"),
                  topk=ts.sparse["k"] if ts.sparse and ts.sparse["kind"] == "topk" else 0,
                  sample_k=ts.sparse["k"] if ts.sparse and ts.sparse["kind"] == "sample" else 0)


def _source(ts: TransferSet) -> dict[str, Any]:
    return {"path": str(ts.path), "fingerprint": ts.meta["dataset"]["fingerprint"],
            "teacher": [m["sha256"] for m in ts.meta["teacher"]["members"]]}


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise SoftlabelsError(f"{out} already exists; choose a new --out (nothing was written)")


def _write(out: Path, layout: Layout, meta: dict[str, Any], arrays: BlockArrays,
           progress: Progress | None) -> dict[str, Any]:
    """Write a new set block by block; a zip target is written as a directory, then packed."""
    _refuse_existing(out)
    meta = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    if backend_of(out) != "zarr-zip":
        return _write_blocks(out, layout, meta, arrays, progress)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / "set.zarr"
        written = _write_blocks(staged, layout, meta, arrays, progress)
        with zipfile.ZipFile(f"{out}.partial", "w", zipfile.ZIP_STORED) as z:
            for f in sorted(staged.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(staged).as_posix())
        os.replace(f"{out}.partial", out)
    return written


def _write_blocks(out: Path, layout: Layout, meta: dict[str, Any], arrays: BlockArrays,
                  progress: Progress | None) -> dict[str, Any]:
    with TransferSetWriter(out, layout, meta) as writer:
        for b in writer.pending:
            start, stop = layout.block_range(b)
            writer.write_block(b, arrays(start, stop))
            if progress:
                progress(stop, layout.num_rows)
    return writer.meta


def _rows(ts: TransferSet, names: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays at arbitrary sorted source rows, read as one contiguous range."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    out = {}
    for name in names:
        data = ts.read(name, lo, hi)
        out[name] = np.take(data, rows - lo, axis=S.row_axis(name))
    return out


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
            progress: Progress | None = None) -> dict[str, Any]:
    """Copy a set into another container (`.zarr`, `.h5`, `.zarr.zip`), content identical."""
    out = Path(out)
    with open_transfer_set(src) as ts:
        if ts.meta.get("sequence"):
            return convert_sequences(ts, out, progress=progress)
        layout = _layout(ts)
        names = list(layout.arrays())
        meta = {**ts.meta, "provenance": {**ts.meta.get("provenance", {}),
                                          "converted_from": _source(ts)}}
        return _write(out, layout, meta, lambda a, b: {n: ts.read(n, a, b) for n in names},
                      progress)


def subset(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
           fraction: float | None = None, seed: int = 0, classes: Sequence[int] | None = None,
           exclude_classes: Sequence[int] | None = None,
           indices: str | os.PathLike[str] | None = None,
           progress: Progress | None = None) -> dict[str, Any]:
    """A new set holding the selected rows; `index` still points into the source dataset."""
    out = Path(out)
    _refuse_existing(out)
    with open_transfer_set(src) as ts:
        if ts.meta.get("sequence"):  # cut by whole sequences
            return subset_sequences(ts, out, fraction=fraction, seed=seed, classes=classes,
                                    exclude_classes=exclude_classes, indices=indices,
                                    progress=progress)
        rows = select_rows(ts.labels(), index=ts.index(), fraction=fraction, seed=seed,
                           classes=classes, exclude_classes=exclude_classes,
                           indices=read_indices(indices) if indices is not None else None)
        layout = _layout(ts, num_rows=len(rows))
        names = list(layout.arrays())
        selection = {"fraction": fraction, "seed": seed, "classes": classes,
                     "exclude_classes": exclude_classes,
                     "indices": str(indices) if indices is not None else None}
        meta = {**ts.meta, "provenance": {**ts.meta.get("provenance", {}),
                                          "subset_of": {**_source(ts), **selection}}}
        return _write(out, layout, meta, lambda a, b: _rows(ts, names, rows[a:b]), progress)


def _members(ts: TransferSet, start: int, stop: int) -> np.ndarray:
    """(M, rows, C) member logits of one set: stored members, or its logits if it has one."""
    if ts.has(S.MEMBER_LOGITS):
        return ts.read(S.MEMBER_LOGITS, start, stop).astype(np.float32)
    return ts.logits(start, stop)[None]


def _check_mergeable(sets: list[TransferSet]) -> None:
    for ts in sets:
        if ts.meta.get("sequence"):
            refuse_merge(ts)
    first = sets[0]
    for ts in sets[1:]:
        for what, a, b in (
                ("dataset fingerprint", first.meta["dataset"]["fingerprint"],
                 ts.meta["dataset"]["fingerprint"]),
                ("number of classes", first.num_classes, ts.num_classes),
                ("number of rows", first.num_rows, ts.num_rows),
                ("temperatures", first.temperatures, ts.temperatures)):
            if a != b:
                raise MismatchError(f"cannot merge {ts.path} into {first.path}: {what} differs "
                                    f"({b} against {a}); merge sets made on the same data")
        if not np.array_equal(first.index(), ts.index()):
            raise MismatchError(f"cannot merge {ts.path}: its rows are in another order than "
                                f"{first.path}'s")
    for ts in sets:
        if ts.sparse:
            raise SoftlabelsError(f"{ts.path} is sparse ({ts.sparse['kind']}): merging needs "
                                  "dense member logits; merge dense sets, then cut them down")
        if len(ts.meta["teacher"]["members"]) > 1 and not ts.has(S.MEMBER_LOGITS):
            raise SoftlabelsError(f"{ts.path} is an ensemble without member logits; remake it "
                                  "with --keep-members to merge it")


def merge(sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
          combine: str = "mean-logits", progress: Progress | None = None) -> dict[str, Any]:
    """One ensemble set from sets of the same data made by different teachers: the same as
    precomputing with all those teachers at once (to the stored dtype), member logits kept."""
    if len(sources) < 2:
        raise SoftlabelsError("merge needs at least two transfer sets")
    if combine not in S.COMBINE_CHOICES:
        raise SoftlabelsError(f"combine must be one of {S.COMBINE_CHOICES}, got {combine!r}")
    out = Path(out)
    _refuse_existing(out)
    sets = [open_transfer_set(s) for s in sources]
    try:
        _check_mergeable(sets)
        first = sets[0]
        members = [m for ts in sets for m in ts.meta["teacher"]["members"]]
        layout = _layout(first, num_members=len(members))
        temps = first.temperatures

        def arrays(start: int, stop: int) -> dict[str, np.ndarray]:
            z = torch.from_numpy(np.concatenate([_members(ts, start, stop) for ts in sets]))
            return {S.MEMBER_LOGITS: z.numpy(), S.LOGITS: combine_logits(z, combine).numpy(),
                    S.PROBS: ensemble_probs(z, temps, combine).numpy(),
                    **{n: first.read(n, start, stop)
                       for n in (S.LABELS, S.INDEX, S.SAMPLE_HASH, S.INPUTS) if first.has(n)}}

        meta = {**first.meta, "teacher": {"members": members, "combine": combine},
                "provenance": {"merged_from": [_source(ts) for ts in sets]}}
        return _write(out, layout, meta, arrays, progress)
    finally:
        for ts in sets:
            ts.close()

