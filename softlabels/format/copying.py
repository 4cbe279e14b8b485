"""What every set operation (convert, subset, merge; their kinds of row in rows.py)
shares: reading a source set by rows (`Source`), recording it in provenance, and writing the
output under its lease, aside, resumable and never over another set (`write_output`)."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from softlabels.errors import SoftlabelsError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.aside import PACKING, PARTIAL, beside, clear_staging, publish, remove_set
from softlabels.format.backends import backend_of, open_store
from softlabels.format.info import SetInfo, SourceRecord
from softlabels.format.layout import DIGEST, Layout
from softlabels.format.lease import WriterLease
from softlabels.format.location import Remote, is_url
from softlabels.format.reader import TransferSet
from softlabels.format.writer import TransferSetWriter
from softlabels.input_proof import file_digest
from softlabels.progress import Progress
from softlabels.redact import redact_obj

BlockArrays = Callable[[int, int], dict[str, np.ndarray]]


ALREADY_COMPLETE = "already_complete"  # in what an operation returns when it did nothing


def source_record(ts: TransferSet, **selection: Any) -> SourceRecord:
    """A source set as provenance records it, with a subset's `selection`; `identity` (the
    XXH3 of its metadata digest) changes when a different set is put at the same path, so a
    resume onto it is refused."""
    return SourceRecord(path=str(ts.path), fingerprint=ts.info.dataset.fingerprint,
                        teacher=tuple(ts.info.teacher.weights),
                        identity=xxhash.xxh3_64_hexdigest(
                            json.dumps(ts.meta.get(DIGEST), sort_keys=True).encode()),
                        extra=selection)


def indices_digest(indices: str | os.PathLike[str] | None) -> str | None:
    """The digest of an --indices file, recorded in a subset's provenance."""
    return file_digest(indices) if indices is not None and os.path.isfile(indices) else None


def output_path(out: str | os.PathLike[str]) -> Path | str:
    """An output as a local Path, or as its URL (a set in an object store)."""
    return Remote(out).url if is_url(out) else Path(out)


def refuse_existing(out: Path | str, provenance: Any = None, *, early: bool = False) -> None:
    """Refuse an existing output, after clearing what a killed earlier run left beside it
    (its lease file, staging paths): taken and released under the lease, never raced.

    At a URL, where a set is written in place: an unfinished set whose provenance is
    `provenance` (this very command, killed) is let through, to be resumed. `early` (before
    the provenance is known): a complete set is let through, for `write_output` to compare."""
    if early and _complete_meta(out) is not None:
        return
    if isinstance(out, str):
        _refuse_existing_remote(out, provenance)
        return
    if out.exists() or out.is_symlink():
        with WriterLease(out):
            clear_staging(out)
        raise SoftlabelsError(f"{out} already exists; choose a new --out (nothing was written)")


def _refuse_existing_remote(out: str, provenance: Any) -> None:
    remote = Remote(out)
    if not remote.exists():
        return
    try:
        with open_store(out, "r") as store:
            old = store.get_meta()
    except SoftlabelsError:
        old = None
    unfinished = isinstance(old, dict) and old.get("status") == S.STATUS_WRITING
    if unfinished and provenance is not None:
        if _recorded_provenance(old) == provenance:
            return  # this same command, stopped earlier: resumed block by block
        raise SoftlabelsError(f"{out} holds an unfinished set written by another command "
                              "(its provenance differs); nothing was written: choose a new "
                              "--out, or finish or remove that set")
    if unfinished:
        return  # checked again, under the lease, once the provenance is known
    raise SoftlabelsError(f"{out} already exists; choose a new --out (nothing was written)")


def _complete_meta(out: Path | str) -> dict[str, Any] | None:
    """The metadata of a complete set at `out`, or None (nothing there, or not a set)."""
    if isinstance(out, str) and not Remote(out).exists() or \
            not isinstance(out, str) and (not out.exists() or out.is_symlink()):
        return None
    try:
        with open_store(out, "r") as store:
            meta = store.get_meta()
    except (SoftlabelsError, OSError):
        return None
    return meta if isinstance(meta, dict) and meta.get("status") == S.STATUS_COMPLETE else None


def _normal(value: Any) -> Any:
    return redact_obj(json.loads(json.dumps(value)))  # as the writer stores it


def _provenance(info: SetInfo) -> Any:
    """The provenance `info` records, as the writer stores it (redacted)."""
    return _normal(info.provenance.to_meta() if info.provenance is not None else None)


def _recorded_provenance(meta: Any) -> Any:
    """The provenance an existing output's metadata records, as stored; None where its
    metadata is not a set's."""
    try:
        return _provenance(SetInfo.from_meta(meta))
    except TransferSetError:
        return None


def write_output(out: Path | str, layout: Layout, info: SetInfo, arrays: BlockArrays,
                 progress: Progress | None, *, whole: dict[str, np.ndarray] | None = None,
                 ) -> dict[str, Any]:
    """Write a new set aside (`OUT.partial`) and rename it to `OUT` once complete, holding the
    output's lease throughout; a zip target is packed from the staged directory. A rerun after a
    kill clears what the killed run left and starts again. `whole`: arrays not written by block
    (a sequence set's offsets). Returns the output's metadata.

    At a URL (no rename in an object store) the set is written in place, marked complete
    last; a rerun after a kill resumes it (its provenance names the same sources and
    selection)."""
    meta, provenance = info.to_meta(), _provenance(info)
    old = _complete_meta(out)
    if old is not None and _recorded_provenance(old) == provenance:
        if not isinstance(out, str):  # what a run killed after publishing left beside it
            with WriterLease(out):
                clear_staging(out)
        return {**old, ALREADY_COMPLETE: True}  # this same command finished earlier
    if isinstance(out, str):
        with WriterLease(out):
            refuse_existing(out, provenance)
            return _write_blocks(out, layout, meta, arrays, progress, backend_of(out), whole)
    zipped = backend_of(out) == "zarr-zip"
    with WriterLease(out):
        clear_staging(out)
        refuse_existing(out)
        staged = beside(out, PARTIAL)
        try:
            written = _write_blocks(staged, layout, meta, arrays, progress,
                                    "zarr" if zipped else backend_of(out), whole)
            if zipped:
                packing = beside(out, PACKING)
                with zipfile.ZipFile(packing, "w", zipfile.ZIP_STORED) as z:
                    for f in sorted(staged.rglob("*")):
                        if f.is_file():
                            z.write(f, f.relative_to(staged).as_posix())
                remove_set(staged, backend="zarr", what="clean-up")
                staged = packing
            publish(staged, out)
        except BaseException:
            clear_staging(out)  # a refused or failed operation leaves nothing behind
            raise
    return written


def _write_blocks(out: Path | str, layout: Layout, meta: dict[str, Any], arrays: BlockArrays,
                  progress: Progress | None, backend: str,
                  whole: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    with TransferSetWriter(out, layout, meta, backend=backend, whole=whole) as writer:
        for b in writer.pending:
            start, stop = layout.block_range(b)
            writer.write_block(b, arrays(start, stop))
            if progress:
                progress(stop, layout.num_rows)
    return writer.meta


class Source:
    """A source set's rows, read through `TransferSet.read_block`: every block a set operation
    copies from is checked (readable, checksum, finite, labels) before it is used, so damage is
    refused, naming its block, and never copied under fresh checksums."""

    def __init__(self, ts: TransferSet) -> None:
        self.ts = ts
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def _block(self, b: int) -> dict[str, np.ndarray]:
        if b not in self._cache:
            if len(self._cache) >= 2:  # rows come in order: two blocks cover any window
                self._cache.pop(next(iter(self._cache)))
            self._cache[b] = self.ts.read_block(b)
        return self._cache[b]

    def rows(self, names: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays at sorted source rows `rows`."""
        blocks = rows // self.ts.block_rows
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for b in np.unique(blocks):
            data = self._block(int(b))
            local = rows[blocks == b] - self.ts.block_range(int(b))[0]
            for n in names:
                if n not in data:
                    raise TransferSetError(f"{self.ts.path} has no array {n!r}, which this "
                                           "set's metadata implies; get a fresh copy")
                parts[n].append(np.take(data[n], local, axis=S.row_axis(n)))
        return {n: np.concatenate(p, axis=S.row_axis(n)) for n, p in parts.items()}

    def range(self, names: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
        return self.rows(names, np.arange(start, stop))
