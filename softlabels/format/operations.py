"""Sharing transfer sets between teams: subset, merge and convert, each into a new set that
records where it came from (its `provenance`). Written once for every kind of row: what
differs (whole sequences and their offsets, or single rows) is the kind's `rows.RowKind`."""

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
    output_path,
    refuse_existing,
    source_record,
    write_output,
)
from softlabels.format.info import Provenance, TeacherInfo
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.rows import KINDS, RowChoice, RowKind
from softlabels.progress import Progress
from softlabels.tempering import combine_logits, ensemble_probs


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
            progress: Progress | None = None) -> dict[str, Any]:
    """Copy a set into another container (`.zarr`, `.h5`, `.zarr.zip`), content identical."""
    out = output_path(out)
    with open_transfer_set(src) as ts:
        whole = KINDS[ts.layout.kind].whole(ts)
        source, names = Source(ts), list(ts.layout.arrays())
        info = ts.info.derived(converted_from=source_record(ts))
        return write_output(out, ts.layout, info, lambda a, b: source.range(names, a, b),
                            progress, whole=whole)


def subset(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
           fraction: float | None = None, seed: int = 0, classes: Sequence[int] | None = None,
           exclude_classes: Sequence[int] | None = None,
           indices: str | os.PathLike[str] | None = None,
           progress: Progress | None = None) -> dict[str, Any]:
    """A new set holding the selected rows (of a sequence set, whole sequences); `index`
    still points into the source dataset."""
    out = output_path(out)
    refuse_existing(out, early=True)
    choice = RowChoice(fraction=fraction, seed=seed, classes=classes,
                       exclude_classes=exclude_classes, indices=indices)
    with open_transfer_set(src) as ts:
        source = Source(ts)
        chosen = KINDS[ts.layout.kind].select(source, choice, where=out)
        info = ts.info.derived(subset_of=source_record(ts, **chosen.record))
        names = list(chosen.layout.arrays())
        return write_output(out, chosen.layout, info,
                            lambda a, b: source.rows(names, chosen.rows[a:b]), progress,
                            whole=chosen.whole)


def _members(source: Source, start: int, stop: int) -> np.ndarray:
    """(M, rows, C) member logits of one set: stored members, or its logits if it has one."""
    if source.ts.has(S.MEMBER_LOGITS):
        return source.range([S.MEMBER_LOGITS], start, stop)[S.MEMBER_LOGITS].astype(np.float32)
    return source.range([S.LOGITS], start, stop)[S.LOGITS].astype(np.float32)[None]


def _rows_are(ts: TransferSet) -> dict[str, Any]:
    """Beside the data, what each row is (which augmented view): merged sets must agree."""
    return {"views": ts.layout.views or None, "augment": ts.info.augment,
            "view_seed": ts.info.view_seed}


def _check_mergeable(sets: list[TransferSet], kinds: list[RowKind]) -> None:
    for ts, kind in zip(sets, kinds):
        refusal = kind.merge_refusal(ts)
        if refusal:
            raise SoftlabelsError(f"{ts.path} {refusal}")
    first = sets[0]
    for ts in sets[1:]:
        for what, a, b in (
                ("dataset fingerprint", first.info.dataset.fingerprint,
                 ts.info.dataset.fingerprint),
                ("number of classes", first.num_classes, ts.num_classes),
                ("number of rows", first.num_rows, ts.num_rows),
                ("temperatures", first.temperatures, ts.temperatures),
                *((f"{key!r} (the augmented views)", value, _rows_are(ts)[key])
                  for key, value in _rows_are(first).items())):
            if a != b:
                raise MismatchError(f"cannot merge {ts.path} into {first.path}: {what} differs "
                                    f"({b} against {a}); merge sets made on the same data")
    for ts in sets:
        if ts.target.sparse:
            raise SoftlabelsError(f"{ts.path} is sparse ({ts.target.name}): merging needs "
                                  "dense member logits; merge dense sets, then cut them down")
        if len(ts.info.teacher.members) > 1 and not ts.has(S.MEMBER_LOGITS):
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
        kinds = [KINDS[ts.layout.kind] for ts in sets]
        _check_mergeable(sets, kinds)
        first = sets[0]
        members = tuple(m for ts in sets for m in ts.info.teacher.members)
        layout = dataclasses.replace(first.layout, num_members=len(members))
        temps = first.temperatures
        readers = [Source(ts) for ts in sets]
        computed = (S.MEMBER_LOGITS, S.LOGITS, S.PROBS)
        columns = [n for n in layout.arrays() if n not in computed]  # labels, index, view_seed...

        def arrays(start: int, stop: int) -> dict[str, np.ndarray]:
            z = torch.from_numpy(np.concatenate([_members(s, start, stop) for s in readers]))
            rows = readers[0].range(columns, start, stop)
            for other in readers[1:]:  # checked reads: the rows' order, block by block
                if not np.array_equal(other.range([S.INDEX], start, stop)[S.INDEX],
                                      rows[S.INDEX]):
                    raise MismatchError(f"cannot merge {other.ts.path}: its rows are in "
                                        f"another order than {first.path}'s")
            return {S.MEMBER_LOGITS: z.numpy(), S.LOGITS: combine_logits(z, combine).numpy(),
                    S.PROBS: ensemble_probs(z, temps, combine).numpy(), **rows}

        applied = first.info.teacher  # the preprocessing the inputs went through, if any
        teacher = TeacherInfo(members=members, combine=combine, preprocess=applied.preprocess,
                              nulls=applied.nulls & {"preprocess"})
        info = first.info.replace(
            teacher=teacher, provenance=Provenance(merged_from=tuple(map(source_record, sets))),
            nulls=first.info.nulls - {"provenance"})
        return write_output(out, layout, info, arrays, progress,
                            whole=kinds[0].whole(first))
    finally:
        for ts in sets:
            ts.close()
