"""The writer: lays out a transfer set, writes it block by block, resumes, and finalises.

A block is the unit one writer owns: one chunk along rows (one shard when sharded). A block is
marked done in `block_done` only after all of its arrays are in place, so a killed run resumes by
rewriting exactly the blocks not marked done (docs/FORMAT.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import MismatchError, TransferSetError, WriterBusyError
from softlabels.format import schema as S
from softlabels.format.aside import CREATING, beside, clear_staging, remove_set
from softlabels.format.backends import backend_of, open_store
from softlabels.format.layout import DIGEST, FILE_KEYS, Layout, digest, resume_identity
from softlabels.format.lease import WriterLease
from softlabels.format.location import Remote, is_url
from softlabels.format.store import Store
from softlabels.redact import redact_obj

log = logging.getLogger(__name__)

# (start, stop) -> the current data's sample hashes of rows [start, stop): proves on resume that
# the rows an earlier run wrote came from the same examples.
RowHashes = Callable[[int, int], np.ndarray]


def write_block(store: Store, layout: Layout, block: int, arrays: dict[str, np.ndarray]) -> None:
    """Write every array's rows of one block, then (only then) mark the block done."""
    start, stop = layout.block_range(block)
    expected = layout.arrays()
    if set(arrays) != set(expected):
        raise TransferSetError(f"block {block} has arrays {sorted(arrays)}, "
                               f"expected {sorted(expected)}")
    stored = {name: np.asarray(data, dtype=expected[name][1]) for name, data in arrays.items()}
    writes = []
    for name, data in stored.items():
        sel = [slice(None)] * len(expected[name][0])
        sel[S.row_axis(name)] = slice(start, stop)
        writes.append((name, tuple(sel), data))
    writes.append((S.ARRAY_CHECKSUM, (slice(block, block + 1), slice(None)),
                   layout.block_checksums(stored)[None]))
    store.write_many(writes)  # together: one round trip to an object store, not one each
    store.flush()
    store.write(S.BLOCK_DONE, slice(block, block + 1), np.ones(1, np.uint8))
    store.flush()


class BlockWriter:
    """What one worker holds: an existing set opened to write whole blocks, never metadata."""

    def __init__(self, path: str | Path, layout: Layout) -> None:
        self.layout = layout
        self.store = open_store(path, "r+")

    def erase(self, blocks: list[int]) -> None:
        """Drop any partial earlier attempt at these blocks (a retried task is idempotent)."""
        for name in self.layout.arrays():
            for b in blocks:
                self.store.erase_block(name, b, self.layout.block_rows, S.row_axis(name))

    def write_block(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        write_block(self.store, self.layout, block, arrays)

    def close(self) -> None:
        self.store.close()


def _all_done(store: Store) -> bool:
    """Every block marked done (a complete set; one whose marker was lost is resumed)."""
    try:
        return bool((store.read(S.BLOCK_DONE) == 1).all())
    except Exception:  # unreadable markers: rewrite what they cannot vouch for
        return False


class TransferSetWriter:
    """Create or resume a transfer set; a context manager that finalises only on a clean exit.

    Holds the output's writer lease (`lease.WriterLease`) from construction to exit, so a second
    writer of the same path is refused. On resume, `row_hashes` (when given) must reproduce the
    stored sample hashes of every block an earlier run wrote, or the resume is refused. `whole`:
    arrays that are not written by block (a sequence set's `seq/offsets`), written in full while
    the set is laid out aside, so they are in place before the set appears at `path`.

    `path` may be an `s3://` or `gs://` URL: there is no rename in an object store, so the set
    is created in place, its root metadata (status `writing`) first and `block_done` last, and
    a rerun lays out again a set whose `block_done` is missing (docs/FORMAT.md).
    """

    def __init__(self, path: str | Path, layout: Layout, meta: dict[str, Any], *,
                 overwrite: bool = False, row_hashes: RowHashes | None = None,
                 backend: str | None = None, whole: dict[str, np.ndarray] | None = None,
                 ) -> None:
        self._remote = Remote(path) if is_url(path) else None
        self.path: Path | str = Path(path) if self._remote is None else self._remote.url
        self.layout = layout
        self._whole = dict(whole or {})
        specs, rows = layout.specs(), layout.arrays()
        for name, data in self._whole.items():
            if name not in specs or name in rows or np.shape(data) != specs[name].shape:
                raise TransferSetError(f"cannot write {self.path}: {name!r} of shape "
                                       f"{np.shape(data)} is not an array the layout writes whole")
        self.backend = backend or backend_of(self.path)
        self.already_complete = False
        if self.backend == "zarr-zip":
            raise TransferSetError(f"cannot write {self.path}: zip-packed sets are read-only; "
                                   "write a .zarr directory and convert it")
        if self._remote is not None and self.backend != "zarr":
            raise TransferSetError(f"cannot write {self.path}: only Zarr sets are written to a "
                                   "URL (an object store cannot rewrite part of an HDF5 file); "
                                   "name a `.zarr` set")
        if self._remote is not None and self._remote.read_only:
            raise TransferSetError(f"cannot write {self.path}: {self._remote.scheme}:// is "
                                   "read-only; write to a local path, s3:// or gs://")
        self.meta = redact_obj({**{k: v for k, v in meta.items() if k not in FILE_KEYS},
                                **layout.to_meta(), "format_version": S.FORMAT_VERSION,
                                "status": S.STATUS_WRITING})  # no URL credentials stored
        self._lease = WriterLease(self.path).acquire()
        try:
            if self._remote is None and self.path.is_symlink():
                raise TransferSetError(f"{self.path} is a symbolic link (to "
                                       f"{os.readlink(self.path)}); a writer never follows one: "
                                       "name the set's real path")
            if self._remote is None:
                clear_staging(self.path)
            if overwrite and self._exists():
                remove_set(self.path, backend=self.backend)
            self.store = self._open_existing() if self._exists() else self._create()
            done = self.store.read(S.BLOCK_DONE)
            self.pending = [int(b) for b in np.flatnonzero(done != 1)]
            self.resumed = bool(self.pending) and len(self.pending) < layout.num_blocks
            if self.resumed and row_hashes is not None:
                self._prove_rows(np.flatnonzero(done == 1), row_hashes)
        except BaseException:
            if getattr(self, "store", None) is not None:
                self.store.close()
            self._lease.release()
            raise

    def _exists(self) -> bool:
        return self._remote.exists() if self._remote is not None else self.path.exists()

    def _open_existing(self) -> Store:
        try:
            store = open_store(self.path, "r+", backend=self.backend)
            old = store.get_meta()
        except TransferSetError:
            store, old = None, None
        if old is None:
            if store is not None:
                store.close()
            raise TransferSetError(f"{self.path} exists and is not a transfer set; choose "
                                   "another --out (--overwrite removes only transfer sets)")
        new = resume_identity(self.meta)
        diff = {k: (v, new[k]) for k, v in resume_identity(old).items() if v != new[k]}
        if diff:
            store.close()
            what = "; ".join(f"{k}: existing {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise MismatchError(f"{self.path} was made from a different run ({what}); "
                                "it was left untouched: use another --out, or --overwrite")
        if old.get("status") == S.STATUS_COMPLETE and _all_done(store):
            self.meta, self.already_complete = old, True
        elif old.get("format_version") != S.FORMAT_VERSION:
            store.close()
            raise TransferSetError(
                f"{self.path} was begun by another softlabels version (format version "
                f"{old.get('format_version')!r}; this one writes {S.FORMAT_VERSION}); finish it "
                "with the softlabels that began it, or start again with --overwrite")
        else:
            links = store.links()
            if links:
                store.close()
                raise TransferSetError(
                    f"{self.path} holds a link that leads out of the set ({links[0]}); a "
                    "writer never writes through one: replace it with a copy, or --overwrite")
            self.meta["created_at"] = old.get("created_at", self.meta.get("created_at"))
            if old.get("status") == S.STATUS_COMPLETE:  # a block's done marker was lost
                log.warning("%s is marked complete but not every block is marked done: "
                            "rewriting those blocks", self.path)
                store.set_meta({**old, "status": S.STATUS_WRITING})  # readers refuse it now
            if self._remote is not None and not store.has(S.BLOCK_DONE):
                store.close()  # killed while laying it out in place: lay it out again
                log.info("laying out %s again: a killed run left it half laid out", self.path)
                return self._create()
            self._prepare_resume(store)
        return store

    def _prove_rows(self, blocks: np.ndarray, row_hashes: RowHashes) -> None:
        """Refuse the resume unless the rows written earlier hash like the current data's."""
        for b in blocks:
            start, stop = self.layout.block_range(int(b))
            stored = self.store.read(S.SAMPLE_HASH, slice(start, stop))
            current = np.asarray(row_hashes(start, stop), dtype=np.uint64)
            if not np.array_equal(stored, current):
                row = start + int(np.argmax(stored != current))
                raise MismatchError(
                    f"{self.path} holds rows written from other data: row {row} (block {b}) "
                    f"was hashed {int(stored[row - start]):#018x}, the current data's example "
                    f"hashes {int(current[row - start]):#018x}; the set was left untouched and "
                    "incomplete: use another --out, or --overwrite")

    def _prepare_resume(self, store: Store) -> None:
        done = store.read(S.BLOCK_DONE)
        pending = np.flatnonzero(done != 1)
        removed = store.discard_partial_files()
        if removed:
            log.info("removed %d partial file(s) left by a killed writer", removed)
        for name in self.layout.arrays():
            for b in pending:
                store.erase_block(name, int(b), self.layout.block_rows, S.row_axis(name))
        log.info("resuming %s: %d of %d blocks to write", self.path, len(pending),
                 self.layout.num_blocks)

    def _create(self) -> Store:
        """Lay the set out at `OUT.creating`, then rename it to `OUT`: a set at `OUT` always
        carries its metadata, so `--overwrite` and a rerun can tell it is one. At a URL (no
        rename): in place, the group created with its metadata in one write."""
        if self._remote is not None:
            store = open_store(self.path, "w", backend=self.backend, meta=self.meta)
            try:
                self._lay_out(store)
            except BaseException:
                store.close()
                raise
            return store
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = beside(self.path, CREATING)
        store = open_store(staged, "w", backend=self.backend)
        try:
            store.set_meta(self.meta)
            self._lay_out(store)
        finally:
            store.close()
        os.rename(staged, self.path)
        return open_store(self.path, "r+", backend=self.backend)

    def _lay_out(self, store: Store) -> None:
        """Every array, the whole ones written, `block_done` created last: a set that has it
        is laid out completely."""
        lay = self.layout
        specs = sorted(lay.specs().values(), key=lambda a: a.name == S.BLOCK_DONE)
        for a in specs:
            if a.name == S.BLOCK_DONE:
                for name, data in self._whole.items():
                    store.write(name, slice(None), data)
            store.create(a.name, a.shape, a.dtype, chunks=a.chunks, shards=a.shards,
                         dims=a.dims, shuffle_compress=a.shuffle_compress)
        store.write(S.BLOCK_DONE, slice(None), np.zeros(lay.num_blocks, np.uint8))
        store.flush()

    def write_block(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array's rows of one block, then mark the block done."""
        self._check_lease()
        write_block(self.store, self.layout, block, arrays)

    def _check_lease(self) -> None:
        if self._lease.lost:
            raise WriterBusyError(f"the lease on {self.path} was taken over by another writer "
                                  "(this one stalled past its expiry); the set was left "
                                  "incomplete: let that writer finish")

    def finish(self) -> dict[str, Any]:
        """Check every block is done, record the fingerprint, mark the set complete."""
        if self.already_complete:
            return self.meta
        self._check_lease()
        missing = np.flatnonzero(self.store.read(S.BLOCK_DONE) != 1)
        if len(missing):
            raise TransferSetError(f"{len(missing)} block(s) unwritten (first: {missing[0]}); "
                                   "rerun the same command to finish")
        self.meta["dataset"] = {**self.meta.get("dataset", {}),
                                "fingerprint": S.fingerprint(self.store.read(S.SAMPLE_HASH))}
        self.meta["status"] = S.STATUS_COMPLETE
        self.meta["completed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.meta[DIGEST] = digest(self.meta)
        self.store.set_meta(self.meta)
        self.store.flush()
        return self.meta

    def __enter__(self) -> TransferSetWriter:
        return self

    def close(self) -> None:
        """Close the store and release the lease (without finishing)."""
        try:
            self.store.close()
        finally:
            self._lease.release()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()
