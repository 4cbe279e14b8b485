"""Set operations on sequence sets: convert (any container), subset by whole sequences; merge is
refused. They write like every set operation (`operations.write_output`: the output's lease, written
aside and renamed once complete) and read their source through `TransferSet.read_block`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.copying import Source, indices_digest, source_record, write_output
from softlabels.format.reader import TransferSet
from softlabels.format.selection import read_indices
from softlabels.format.sequence import SEQ_OFFSETS, read_offsets, with_offsets
from softlabels.progress import Progress


def convert_sequences(ts: TransferSet, out: Path | str, *,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Copy a sequence set into another container, content identical."""
    offsets = read_offsets(ts)
    meta = {**ts.meta, "provenance": {**ts.meta.get("provenance", {}),
                                      "converted_from": source_record(ts)}}
    layout, source = ts.layout, Source(ts)
    names = list(layout.arrays())
    return write_output(out, layout, meta, lambda a, b: source.range(names, a, b), progress,
                  whole={SEQ_OFFSETS: offsets})


def select_sequences(index: Source, offsets: np.ndarray, *, fraction: float | None,
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


def subset_sequences(ts: TransferSet, out: Path | str, *, fraction: float | None = None,
                     seed: int = 0, classes: Any = None, exclude_classes: Any = None,
                     indices: str | os.PathLike[str] | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """A new sequence set of whole sequences; `index` still points into the source data."""
    if classes or exclude_classes:
        raise SoftlabelsError(f"{ts.path} is a sequence set: it is cut by whole sequences; "
                              "use --fraction or --indices (dataset indices of sequences), "
                              "not --classes or --exclude-classes")
    offsets = read_offsets(ts)
    source = Source(ts)
    chosen = select_sequences(source, offsets, fraction=fraction, seed=seed,
                              indices=read_indices(indices) if indices is not None else None)
    lengths = np.diff(offsets)[chosen]
    rows = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in chosen])
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    layout = with_offsets(dataclasses.replace(ts.layout, num_rows=len(rows),
                                              num_sequences=len(chosen)),
                          new_offsets, where=out)
    selection = {"fraction": fraction, "seed": seed, "sequences": int(len(chosen)),
                 "indices": str(indices) if indices is not None else None,
                 "indices_digest": indices_digest(indices)}
    meta = {**ts.meta, "provenance": {**ts.meta.get("provenance", {}),
                                      "subset_of": {**source_record(ts), **selection}}}
    names = list(layout.arrays())
    return write_output(out, layout, meta, lambda a, b: source.rows(names, rows[a:b]), progress,
                  whole={SEQ_OFFSETS: new_offsets})
