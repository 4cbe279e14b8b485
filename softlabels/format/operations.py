"""Sharing transfer sets between teams: subset, merge and convert, each into a new set that
records where it came from (its `provenance`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from softlabels.errors import MismatchError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.copying import (
    Source,
    indices_digest,
    output_path,
    refuse_existing,
    source_record,
    write_output,
)
from softlabels.format.layout import ROW_KEYS, Layout
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.selection import read_indices, select_rows
from softlabels.progress import Progress
from softlabels.tempering import combine_logits, ensemble_probs


def _layout(ts: TransferSet, **changes: Any) -> Layout:
    """The source's layout (from its metadata), with `changes` (a row count, members)."""
    return dataclasses.replace(ts.layout, **changes)
























def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
            progress: Progress | None = None) -> dict[str, Any]:
    """Copy a set into another container (`.zarr`, `.h5`, `.zarr.zip`), content identical."""
    out = output_path(out)
    with open_transfer_set(src) as ts:
        if ts.layout.num_sequences:
            from softlabels.format.sequence_ops import convert_sequences

            return convert_sequences(ts, out, progress=progress)
        layout = _layout(ts)
        names = list(layout.arrays())
        meta = {**ts.meta, "provenance": {**ts.meta.get("provenance", {}),
                                          "converted_from": source_record(ts)}}
        source = Source(ts)
        return write_output(out, layout, meta, lambda a, b: source.range(names, a, b), progress)


def subset(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
           fraction: float | None = None, seed: int = 0, classes: Sequence[int] | None = None,
           exclude_classes: Sequence[int] | None = None,
           indices: str | os.PathLike[str] | None = None,
           progress: Progress | None = None) -> dict[str, Any]:
    """A new set holding the selected rows; `index` still points into the source dataset."""
    out = output_path(out)
    refuse_existing(out, early=True)
    with open_transfer_set(src) as ts:
        if ts.layout.num_sequences:  # cut by whole sequences
            from softlabels.format.sequence_ops import subset_sequences

            return subset_sequences(ts, out, fraction=fraction, seed=seed, classes=classes,
                                    exclude_classes=exclude_classes, indices=indices,
                                    progress=progress)
        source = Source(ts)
        # every block is checked before its labels and index choose rows
        columns = source.range([S.LABELS, S.INDEX], 0, ts.num_rows)
        rows = select_rows(columns[S.LABELS], index=columns[S.INDEX], fraction=fraction, seed=seed,
                           classes=classes, exclude_classes=exclude_classes,
                           indices=read_indices(indices) if indices is not None else None,
                           num_examples=int(ts.meta["num_examples"]))
        layout = _layout(ts, num_rows=len(rows))
        names = list(layout.arrays())
        selection = {"fraction": fraction, "seed": seed, "classes": classes,
                     "exclude_classes": exclude_classes,
                     "indices": str(indices) if indices is not None else None,
                     "indices_digest": indices_digest(indices)}
        meta = {**ts.meta, "provenance": {**ts.meta.get("provenance", {}),
                                          "subset_of": {**source_record(ts), **selection}}}
        return write_output(out, layout, meta, lambda a, b: source.rows(names, rows[a:b]), progress)


def _members(source: Source, start: int, stop: int) -> np.ndarray:
    """(M, rows, C) member logits of one set: stored members, or its logits if it has one."""
    if source.ts.has(S.MEMBER_LOGITS):
        return source.range([S.MEMBER_LOGITS], start, stop)[S.MEMBER_LOGITS].astype(np.float32)
    return source.range([S.LOGITS], start, stop)[S.LOGITS].astype(np.float32)[None]


def _check_mergeable(sets: list[TransferSet]) -> None:
    for ts in sets:
        if ts.layout.num_sequences:
            raise SoftlabelsError(f"{ts.path} is a sequence set: merging sequence sets is not "
                                  "defined in this version; precompute the ensemble at once "
                                  "(repeat --teacher)")
    first = sets[0]
    for ts in sets[1:]:
        for what, a, b in (
                ("dataset fingerprint", first.meta["dataset"]["fingerprint"],
                 ts.meta["dataset"]["fingerprint"]),
                ("number of classes", first.num_classes, ts.num_classes),
                ("number of rows", first.num_rows, ts.num_rows),
                ("temperatures", first.temperatures, ts.temperatures),
                *((f"{key!r} (the augmented views)", first.meta.get(key), ts.meta.get(key))
                  for key in ROW_KEYS)):
            if a != b:
                raise MismatchError(f"cannot merge {ts.path} into {first.path}: {what} differs "
                                    f"({b} against {a}); merge sets made on the same data")
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
    out = output_path(out)
    refuse_existing(out, early=True)
    sets = [open_transfer_set(s) for s in sources]
    try:
        _check_mergeable(sets)
        first = sets[0]
        members = [m for ts in sets for m in ts.meta["teacher"]["members"]]
        layout = _layout(first, num_members=len(members))
        temps = first.temperatures
        sources = [Source(ts) for ts in sets]
        computed = (S.MEMBER_LOGITS, S.LOGITS, S.PROBS)
        columns = [n for n in layout.arrays() if n not in computed]  # labels, index, view_seed...

        def arrays(start: int, stop: int) -> dict[str, np.ndarray]:
            z = torch.from_numpy(np.concatenate([_members(s, start, stop) for s in sources]))
            rows = sources[0].range(columns, start, stop)
            for other in sources[1:]:  # checked reads: the rows' order, block by block
                if not np.array_equal(other.range([S.INDEX], start, stop)[S.INDEX],
                                      rows[S.INDEX]):
                    raise MismatchError(f"cannot merge {other.ts.path}: its rows are in "
                                        f"another order than {first.path}'s")
            return {S.MEMBER_LOGITS: z.numpy(), S.LOGITS: combine_logits(z, combine).numpy(),
                    S.PROBS: ensemble_probs(z, temps, combine).numpy(), **rows}

        applied = {k: v for k, v in first.meta["teacher"].items() if k == "preprocess"}
        meta = {**first.meta, "teacher": {"members": members, "combine": combine, **applied},
                "provenance": {"merged_from": [source_record(ts) for ts in sets]}}
        return write_output(out, layout, meta, arrays, progress)
    finally:
        for ts in sets:
            ts.close()

