"""The writer: lays out a transfer set, writes it block by block, resumes, and finalises.

A block is the unit one writer owns: one chunk along rows (one shard when sharded). A block is
marked done in `block_done` only after all of its arrays are in place, so a killed run resumes by
rewriting exactly the blocks not marked done (DESIGN §3-4).
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MismatchError, TransferSetError
from . import schema as S
from ._store import Store, ZarrStore, backend_of, open_store
from .layout import Layout

log = logging.getLogger(__name__)

# Metadata fields that must agree for a rerun to resume into an existing set.
IDENTITY_FIELDS = ("num_rows", "num_classes", "temperatures", "dtype", "probs_dtype",
                   "chunk_rows", "shard_rows", "keep_members", "inputs", "sparse", "views",
                   "augment")


def write_block(store: Store, layout: Layout, block: int, arrays: dict[str, np.ndarray]) -> None:
    """Write every array's rows of one block, then (only then) mark the block done."""
    start, stop = layout.block_range(block)
    expected = layout.arrays()
    if set(arrays) != set(expected):
        raise TransferSetError(f"block {block} has arrays {sorted(arrays)}, "
                               f"expected {sorted(expected)}")
    stored = {name: np.asarray(data, dtype=expected[name][1]) for name, data in arrays.items()}
    for name, data in stored.items():
        sel = [slice(None)] * len(expected[name][0])
        sel[S.row_axis(name)] = slice(start, stop)
        store.write(name, tuple(sel), data)
    checksum = np.array([S.block_checksum(stored)], dtype=np.uint64)
    store.write(S.BLOCK_CHECKSUM, slice(block, block + 1), checksum)
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


def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    teacher = meta.get("teacher", {})
    dataset = meta.get("dataset", {})
    return {
        **{f: meta.get(f) for f in IDENTITY_FIELDS},
        "teacher weights": [m.get("sha256") for m in teacher.get("members", [])],
        "combine": teacher.get("combine"),
        "dataset length": dataset.get("length"),
        "dataset probe": dataset.get("probe"),
    }


class TransferSetWriter:
    """Create or resume a transfer set; a context manager that finalises only on a clean exit."""

    def __init__(self, path: str | Path, layout: Layout, meta: dict[str, Any], *,
                 overwrite: bool = False) -> None:
        self.path, self.layout = Path(path), layout
        self.already_complete = False
        if backend_of(self.path) == "zarr-zip":
            raise TransferSetError(f"cannot write {self.path}: zip-packed sets are read-only; "
                                   "write a .zarr directory and convert it")
        self.meta = {**meta, "format_version": S.FORMAT_VERSION, "status": S.STATUS_WRITING,
                     "num_rows": layout.num_rows, "num_classes": layout.num_classes,
                     "temperatures": list(layout.temperatures), "dtype": layout.dtype,
                     "probs_dtype": layout.probs_dtype, "chunk_rows": layout.chunk_rows,
                     "shard_rows": layout.shard_rows, "block_rows": layout.block_rows,
                     "keep_members": layout.num_members > 0,
                     "sparse": ({"kind": "topk", "k": layout.topk} if layout.topk else
                                {"kind": "sample", "k": layout.sample_k} if layout.sample_k
                                else None),
                     "inputs": (None if layout.input_shape is None else
                                {"shape": list(layout.input_shape), "dtype": layout.input_dtype})}
        if overwrite and self.path.exists():
            self._remove()
        self.store = self._open_existing() if self.path.exists() else self._create()
        done = self.store.read(S.BLOCK_DONE)
        self.pending = [int(b) for b in np.flatnonzero(done == 0)]
        self.resumed = bool(self.pending) and len(self.pending) < layout.num_blocks

    def _open_existing(self) -> Store:
        try:
            store = open_store(self.path, "r+")
            old = store.get_meta()
        except TransferSetError:
            store, old = None, None
        if old is None:
            if store is not None:
                store.close()
            raise TransferSetError(f"{self.path} exists and is not a transfer set; choose "
                                   "another --out or pass --overwrite")
        new = _identity(self.meta)
        diff = {k: (v, new[k]) for k, v in _identity(old).items() if v != new[k]}
        if diff:
            store.close()
            what = "; ".join(f"{k}: existing {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise MismatchError(f"{self.path} was made from a different run ({what}); "
                                "it was left untouched: use another --out, or --overwrite")
        if old.get("status") == S.STATUS_COMPLETE:
            self.meta, self.already_complete = old, True
        else:
            self.meta["created_at"] = old.get("created_at", self.meta.get("created_at"))
            self._prepare_resume(store)
        return store

    def _remove(self) -> None:
        """Delete an existing set (--overwrite); never a directory that is not a Zarr group."""
        if self.path.is_dir():
            if any(self.path.iterdir()) and not (self.path / "zarr.json").exists():
                raise TransferSetError(f"refusing to delete {self.path}: a non-empty directory "
                                       "that is not a Zarr group; remove it yourself")
            shutil.rmtree(self.path)
        else:
            self.path.unlink()

    def _prepare_resume(self, store: Store) -> None:
        done = store.read(S.BLOCK_DONE)
        pending = np.flatnonzero(done == 0)
        if isinstance(store, ZarrStore):
            removed = store.remove_partial_files()
            if removed:
                log.info("removed %d partial file(s) left by a killed writer", removed)
        for name in self.layout.arrays():
            for b in pending:
                store.erase_block(name, int(b), self.layout.block_rows, S.row_axis(name))
        log.info("resuming %s: %d of %d blocks to write", self.path, len(pending),
                 self.layout.num_blocks)

    def _create(self) -> Store:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        store = open_store(self.path, "w")
        lay = self.layout
        for name, (shape, dtype) in lay.arrays().items():
            shards = lay.grid(name, shape, lay.shard_rows) if lay.shard_rows else None
            rows = lay.input_chunk_rows if name == S.INPUTS else lay.chunk_rows
            store.create(name, shape, dtype, chunks=lay.grid(name, shape, rows), shards=shards,
                         shuffle_compress=name in getattr(lay, "shuffle_compressed", ()))
        store.create(S.BLOCK_DONE, (lay.num_blocks,), "uint8", chunks=(1,))
        store.write(S.BLOCK_DONE, slice(None), np.zeros(lay.num_blocks, np.uint8))
        store.create(S.BLOCK_CHECKSUM, (lay.num_blocks,), "uint64", chunks=(1,))
        store.set_meta(self.meta)
        store.flush()
        return store

    def write_block(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array's rows of one block, then mark the block done."""
        write_block(self.store, self.layout, block, arrays)

    def finish(self) -> dict[str, Any]:
        """Check every block is done, record the fingerprint, mark the set complete."""
        if self.already_complete:
            return self.meta
        missing = np.flatnonzero(self.store.read(S.BLOCK_DONE) == 0)
        if len(missing):
            raise TransferSetError(f"{len(missing)} block(s) unwritten (first: {missing[0]}); "
                                   "rerun the same command to finish")
        self.meta["dataset"] = {**self.meta.get("dataset", {}),
                                "fingerprint": S.fingerprint(self.store.read(S.SAMPLE_HASH))}
        self.meta["status"] = S.STATUS_COMPLETE
        self.meta["completed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.store.set_meta(self.meta)
        self.store.flush()
        return self.meta

    def __enter__(self) -> TransferSetWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.store.close()
