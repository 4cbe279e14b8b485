"""Storage backends behind one small interface: a Zarr v3 group (default) or an HDF5 file.

The store knows arrays, chunks and one JSON metadata object; it knows nothing of rows, teachers
or temperatures (that is `schema`, `writer` and `transfer_set`). The layout rules it enforces
come from docs/FORMAT.md: NaN fill for floats, empty chunks written, one writer per chunk or shard.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import TransferSetError
from softlabels.format.chunk_files import StoredFileError
from softlabels.format.chunk_writer import ChunkWriter
from softlabels.format.location import Remote
from softlabels.format.schema import ATTR_KEY
from softlabels.format.store import Mode, Store, fill_value


class ZarrStore(Store):
    """A Zarr v3 group in a directory (`*.zarr`), read-only inside a zip (`*.zarr.zip`), or
    under a URL (`location.Remote`, through zarr's FsspecStore).

    `meta`: with mode "w", the metadata the group is created with (one write of its root
    `zarr.json`, so a remote set created in place carries its metadata from its first object).
    `cache`: a local directory that caches a remote set's chunks (reads only)."""

    def __init__(self, path: Path | Remote, mode: Mode, *, meta: dict[str, Any] | None = None,
                 cache: str | None = None) -> None:
        import zarr

        self.read_only = mode == "r"
        self._remote = path if isinstance(path, Remote) else None
        self.path = path.url if isinstance(path, Remote) else path
        self._zip = str(path).endswith(".zip")
        attributes = {ATTR_KEY: json.loads(json.dumps(meta))} if meta is not None else None
        if self._remote is not None:
            if self._zip:
                raise TransferSetError(f"{self.path} is a zip-packed set at a URL, which is "
                                       "not read remotely; download it, or store sets as "
                                       "`.zarr` in the bucket (`softlabels convert`)")
            if mode != "r" and self._remote.read_only:
                raise TransferSetError(f"cannot write {self.path}: {self._remote.scheme}:// "
                                       "sets are read-only; write to a local path, s3:// or "
                                       "gs://")
            store: Any = self._remote.zarr_store(read_only=self.read_only,
                                                 cache=cache if self.read_only else None)
        elif self._zip:
            if mode != "r":
                raise TransferSetError(
                    f"{path} is a zip-packed Zarr set, which is read-only; convert it to a "
                    "`.zarr` directory with `softlabels convert` to write to it"
                )
            from softlabels.format.zip_bounds import check_zip_members

            check_zip_members(path)  # no member inflates past what its array can hold
            store: Any = zarr.storage.ZipStore(str(path), mode="r")
        else:
            from softlabels.format.local_files import LocalFiles

            store = LocalFiles(path, read_only=self.read_only)
        try:
            self._group = zarr.open_group(store=store,
                                          mode={"r": "r", "r+": "r+", "w": "w"}[mode],
                                          attributes=attributes if mode == "w" else None)
        except StoredFileError as exc:
            raise TransferSetError(f"{exc}: not a Zarr set's metadata") from None
        self._arrays: dict[str, Any] = {}  # each array's metadata, read once
        # whole chunks of a local directory's arrays are written straight to their files
        self._local = self._remote is None and not self._zip and not self.read_only
        self._chunk_writers: dict[str, ChunkWriter | None] = {}

    def _create(self, name, shape, dtype, *, chunks, shards=None, dims=None,
                shuffle_compress=False):
        from zarr.codecs import BloscCodec

        dt = np.dtype(dtype)
        # Float outputs barely compress (zstd saved ~2% at 3x the write CPU, measured on
        # teacher probabilities): raw. Integer columns compress well once their bytes are
        # grouped: byte-shuffle + lz4 gave the ratio of zstd (2.0 on top-16 ids of 32k) at
        # 10-50x its speed (zstd, 48-120 MB/s, was 60% of write_set's time; issue 22).
        default = None if dt.kind == "f" else BloscCodec(cname="lz4", clevel=5,
                                                         shuffle="shuffle")
        self._arrays.pop(name, None)
        self._chunk_writers.pop(name, None)
        self._group.create_array(
            name,
            shape=shape,
            dtype=dt,
            chunks=chunks,
            shards=shards,
            fill_value=fill_value(dt),
            # shifted top-k logits, hybrid ids and values: byte-shuffle + zstd at level 1
            # (level 5 compressed 16 shifted float16 logits a row at 25-73 MB/s, level 1 at
            # ~290 MB/s, for 6% more bytes; issue 22)
            compressors=(BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
                         if shuffle_compress else default),
            config={"write_empty_chunks": True},
            dimension_names=dims,
        )

    def _write(self, name, selection, data):
        if not self._write_chunks(name, selection, data):
            self.array(name)[selection] = data

    def _write_chunks(self, name: str, selection: Any, data: np.ndarray) -> bool:
        """Whole chunks of a local set written directly (chunk_writer.py); False when zarr
        must write this selection (part of a chunk, shards, a remote or zip store)."""
        if not self._local:
            return False
        if name not in self._chunk_writers:
            self._chunk_writers[name] = ChunkWriter.of(Path(self.path) / name, self.array(name))
        writer = self._chunk_writers[name]
        return writer is not None and writer.write(selection, data)

    def _write_many(self, requests):
        from zarr.core.sync import sync

        requests = [r for r in requests if not self._write_chunks(*r)]
        if not requests:
            return
        arrays = [self.array(name).async_array for name, _, _ in requests]

        async def gather() -> None:
            await asyncio.gather(*(a.setitem(selection, data)
                                   for a, (_, selection, data) in zip(arrays, requests)))

        sync(gather())

    def read(self, name, selection=slice(None)):
        return np.asarray(self.array(name)[selection])

    def drop_cache(self):  # a damaged object read through the cache is not kept in it
        if self._remote is not None:
            self._remote.drop_cache()

    reads_together = True

    def read_many(self, requests):
        from zarr.core.sync import sync

        arrays = [self.array(name).async_array for name, _ in requests]

        async def gather() -> list[Any]:
            return await asyncio.gather(*(a.getitem(selection)
                                          for a, (_, selection) in zip(arrays, requests)))

        return [np.asarray(a) for a in sync(gather())]

    def array(self, name):
        # An array's metadata does not change once laid out (a writer holds the lease; it is
        # re-read after `_create`), so it is read once: on an object store each read is a
        # round trip, and a writer used to pay one per array per block.
        if name not in self._arrays:
            try:
                self._arrays[name] = self._group[name]
            except (ValueError, TypeError, StoredFileError) as exc:  # names() lists
                # without parsing over http
                raise self._damaged_metadata(exc) from None
        return self._arrays[name]

    def names(self, expected=()):
        try:  # a folder without zarr.json (a damaged array) is left to the layout check
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                found = sorted(path for path, _ in self._group.arrays()) + sorted(
                    f"{g}/{a}" for g, sub in self._group.groups() for a, _ in sub.arrays())
        except (FileNotFoundError, PermissionError):  # a web server that does not list
            found = []
        except (ValueError, TypeError, StoredFileError) as exc:  # an array's zarr.json
            # garbled: not JSON (json.JSONDecodeError), fields zarr cannot parse (a NaN fill of
            # an int array), or a fifo
            self.drop_cache()
            raise self._damaged_metadata(exc) from None
        if found or self._remote is None or not self._remote.read_only:
            return found
        fs = self._remote.fs  # over http: probe each array's metadata instead
        return [n for n in sorted(expected, key=lambda n: (n.count("/"), n))
                if fs.exists(self._remote.child(f"{n}/zarr.json"))]

    def info(self, name):
        try:
            arr = self._group[name]
        except (ValueError, TypeError, StoredFileError) as exc:
            raise self._damaged_metadata(exc) from None
        return tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks)

    def _damaged_metadata(self, exc: Exception) -> TransferSetError:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return TransferSetError(f"{self.path} holds an array whose metadata (zarr.json) is "
                                f"damaged ({type(exc).__name__}: {first}); restore the set "
                                "from its source, or make it again with `softlabels "
                                "precompute`")

    def get_meta(self):
        return self._group.attrs.asdict().get(ATTR_KEY)

    def _set_meta(self, meta):
        self._group.attrs[ATTR_KEY] = json.loads(json.dumps(meta))

    def _erase_block(self, name, block, block_rows, axis):
        # The stored key grid is the shard grid when sharded, else the chunk grid; this backend
        # always makes a block exactly one key along the row axis.
        arr = self._group[name]
        grid = arr.shards or arr.chunks
        ranges = [range(-(-s // g)) for s, g in zip(arr.shape, grid)]
        ranges[axis] = range(block, block + 1)
        keys = [arr.metadata.encode_chunk_key(tuple(r[c] for r, c in zip(ranges, coords)))
                for coords in np.ndindex(*[len(r) for r in ranges])]
        if self._remote is not None:  # an object store: delete the block's objects
            self._remote.remove([self._remote.child(f"{name}/{key}") for key in keys])
            return
        for key in keys:
            (self.path / name / key).unlink(missing_ok=True)

    def discard_partial_files(self) -> int:
        # zarr's LocalStore writes `KEY.partial` and renames it into place; a kill leaves it.
        # An object store puts whole objects (or nothing): there is nothing to discard.
        self._writable("clean up")
        if self._remote is not None:
            return 0
        count = 0
        for leftover in self.path.rglob("*.partial"):
            if not leftover.is_symlink():
                leftover.unlink(missing_ok=True)
                count += 1
        return count

    def links(self):
        if self._zip or self._remote is not None:  # object stores have no links
            return []
        found = [str(self.path)] if self.path.is_symlink() else []
        for root, dirs, files in os.walk(self.path):
            found += [os.path.join(root, n) for n in dirs + files
                      if os.path.islink(os.path.join(root, n))]
        return found








