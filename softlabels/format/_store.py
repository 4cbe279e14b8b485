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
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import TransferSetError
from .location import Remote, deadline_errors, is_url
from .schema import ATTR_KEY

Mode = Literal["r", "r+", "w"]
Selection = tuple[slice | int, ...] | slice


def _fill_value(dtype: np.dtype) -> Any:
    return np.nan if np.issubdtype(dtype, np.floating) else 0


class Store(ABC):
    """A container of named, chunked n-d arrays plus one JSON metadata object.

    The contract every backend keeps (tests/test_store_backends.py runs it against each:
    local Zarr, HDF5, zip, s3, gs, http): a store opened
    "r" refuses every write with `TransferSetError`; `erase_block` makes a block read as never
    written (fill values); `discard_partial_files` removes what a killed writer may have left;
    `links` lists anything that would make a write land outside the store.
    """

    path: Path | str  # a local path, or the URL of a remote set (see `location`)
    read_only: bool
    # whether `read_many` issues its reads together (one round trip), so one more small read
    # in it costs little; else they run one after another
    reads_together: bool = False

    # --- writes: checked here, done by the backend ----------------------------------------
    def create(self, name: str, shape: tuple[int, ...], dtype: str, *,
               chunks: tuple[int, ...], shards: tuple[int, ...] | None = None,
               dims: tuple[str, ...] | None = None, shuffle_compress: bool = False) -> None:
        """A new array filled with NaN (floats) or 0; `dims` names its dimensions where the
        backend records names (Zarr's `dimension_names`, HDF5's dimension labels).
        `shuffle_compress`: byte-shuffle then zstd (HDF5: shuffle then gzip), for floats that
        compress once their bytes are grouped (shifted top-k logits); else the default (floats
        raw, integers zstd)."""
        self._writable(f"create array {name!r}")
        self._create(name, shape, dtype, chunks=chunks, shards=shards, dims=dims,
                     shuffle_compress=shuffle_compress)

    def write(self, name: str, selection: Selection, data: np.ndarray) -> None:
        self._writable(f"write {name!r}")
        self._write(name, selection, data)

    def write_many(self, requests: list[tuple[str, Selection, np.ndarray]]) -> None:
        """Several (name, selection, data) writes; Zarr issues them together, in one round
        trip (what an object store charges per request is its latency)."""
        for name, _, _ in requests:
            self._writable(f"write {name!r}")
        self._write_many(requests)

    def _write_many(self, requests: list[tuple[str, Selection, np.ndarray]]) -> None:
        for name, selection, data in requests:
            self._write(name, selection, data)

    def set_meta(self, meta: dict[str, Any]) -> None:
        self._writable("write its metadata")
        self._set_meta(meta)

    def erase_block(self, name: str, block: int, block_rows: int, axis: int) -> None:
        """Make rows [block * block_rows, (block + 1) * block_rows) of `name` read as never
        written, so a rewrite never reads a torn chunk or shard."""
        self._writable(f"erase a block of {name!r}")
        self._erase_block(name, block, block_rows, axis)

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise TransferSetError(f"cannot {what}: {self.path} was opened read-only; open it "
                                   "with mode 'r+' to write")

    @abstractmethod
    def _create(self, name: str, shape: tuple[int, ...], dtype: str, *,
                chunks: tuple[int, ...], shards: tuple[int, ...] | None,
                dims: tuple[str, ...] | None, shuffle_compress: bool = False) -> None: ...

    @abstractmethod
    def _write(self, name: str, selection: Selection, data: np.ndarray) -> None: ...

    @abstractmethod
    def _set_meta(self, meta: dict[str, Any]) -> None: ...

    @abstractmethod
    def _erase_block(self, name: str, block: int, block_rows: int, axis: int) -> None: ...

    @abstractmethod
    def discard_partial_files(self) -> int:
        """Delete temporary files a killed writer left behind; returns how many."""

    @abstractmethod
    def links(self) -> list[str]:
        """Entries through which a write would leave the store (symbolic links, HDF5 external
        or soft links, a file with other hard links)."""

    # --- reads ----------------------------------------------------------------------------
    @abstractmethod
    def read(self, name: str, selection: Selection = slice(None)) -> np.ndarray: ...

    def read_many(self, requests: list[tuple[str, Selection]]) -> list[np.ndarray]:
        """Several (name, selection) reads; Zarr issues them together, in one round trip."""
        return [self.read(name, selection) for name, selection in requests]

    @abstractmethod
    def array(self, name: str) -> Any:
        """The backend's array object (zarr.Array, h5py.Dataset): sliceable, for dask."""

    @abstractmethod
    def names(self, expected: Iterable[str] = ()) -> list[str]:
        """Every array, nested ones as 'group/name'. `expected`: the names to probe for where
        the store cannot be listed (a web server without directory listings)."""

    @abstractmethod
    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
        """(shape, dtype, chunks) of one array."""

    @abstractmethod
    def get_meta(self) -> dict[str, Any] | None: ...

    def flush(self) -> None:
        """Make written data durable where the backend can."""

    def close(self) -> None:
        """Release file handles."""

    def drop_cache(self) -> None:
        """Forget what a local chunk cache holds of this set (none by default)."""

    def has(self, name: str) -> bool:
        return name in self.names()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _block_selection(shape: tuple[int, ...], block: int, block_rows: int,
                     axis: int) -> tuple[slice, ...]:
    sel = [slice(None)] * len(shape)
    sel[axis] = slice(block * block_rows, min((block + 1) * block_rows, shape[axis]))
    return tuple(sel)


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
            from .zip_bounds import check_zip_members

            check_zip_members(path)  # no member inflates past what its array can hold
            store: Any = zarr.storage.ZipStore(str(path), mode="r")
        else:
            store = str(path)
        self._group = zarr.open_group(store=store, mode={"r": "r", "r+": "r+", "w": "w"}[mode],
                                      attributes=attributes if mode == "w" else None)
        self._arrays: dict[str, Any] = {}  # each array's metadata, read once

    def _create(self, name, shape, dtype, *, chunks, shards=None, dims=None,
                shuffle_compress=False):
        from zarr.codecs import BloscCodec

        dt = np.dtype(dtype)
        default = None if dt.kind == "f" else "auto"
        self._arrays.pop(name, None)
        self._group.create_array(
            name,
            shape=shape,
            dtype=dt,
            chunks=chunks,
            shards=shards,
            fill_value=_fill_value(dt),
            # Float outputs barely compress (zstd saved ~2% at 3x the write CPU, measured on
            # teacher probabilities); integer columns compress well and cost little.
            compressors=(BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
                         if shuffle_compress else default),
            config={"write_empty_chunks": True},
            dimension_names=dims,
        )

    def _write(self, name, selection, data):
        self.array(name)[selection] = data

    def _write_many(self, requests):
        from zarr.core.sync import sync

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
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def names(self, expected=()):
        try:  # a folder without zarr.json (a damaged array) is left to the layout check
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                found = sorted(path for path, _ in self._group.arrays()) + sorted(
                    f"{g}/{a}" for g, sub in self._group.groups() for a, _ in sub.arrays())
        except (FileNotFoundError, PermissionError):  # a web server that does not list
            found = []
        except ValueError as exc:  # an array's zarr.json garbled (json.JSONDecodeError)
            self.drop_cache()
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise TransferSetError(f"{self.path} holds an array whose metadata (zarr.json) is "
                                   f"damaged ({type(exc).__name__}: {first}); restore the set "
                                   "from its source, or make it again with `softlabels "
                                   "precompute`") from None
        if found or self._remote is None or not self._remote.read_only:
            return found
        fs = self._remote.fs  # over http: probe each array's metadata instead
        return [n for n in sorted(expected, key=lambda n: (n.count("/"), n))
                if fs.exists(self._remote.child(f"{n}/zarr.json"))]

    def info(self, name):
        arr = self._group[name]
        return tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks)

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


def backend_of(path: str | os.PathLike[str]) -> str:
    """'hdf5' for *.h5/*.hdf5, 'zarr-zip' for *.zarr.zip, else 'zarr'. A writer's path beside
    an output (`OUT.partial`, `OUT.creating`, ...; see `aside`) has its output's backend."""
    name = str(path).rstrip("/").lower()
    for staging in (".creating", ".partial", ".packing", ".removing"):
        name = name.removesuffix(staging)
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    return "zarr-zip" if name.endswith(".zip") else "zarr"


def open_store(path: str | os.PathLike[str], mode: Mode = "r", *,
               backend: str | None = None, meta: dict[str, Any] | None = None,
               cache: str | None = None) -> Store:
    """Open or create a store; the backend follows the path's suffix unless `backend` names
    it (a staging path such as `OUT.h5.partial` is written as its final name's backend).

    `path` may be a URL (`s3://`, `gs://`, `https://`; see `location`). `meta`: the metadata
    a new Zarr group ("w") is created with. `cache`: a local directory caching a remote set's
    chunks (mode "r")."""
    if is_url(path):
        remote = Remote(path)
        with deadline_errors(remote):  # a server past its deadline: one line naming it
            return _open_remote(remote, mode, backend=backend, meta=meta, cache=cache)
    p = Path(path)
    if mode != "w" and not p.exists():
        raise TransferSetError(f"no transfer set at {p}: the path does not exist")
    if (backend or backend_of(p)) == "hdf5":
        return HDF5Store(p, mode)
    if mode != "w" and p.is_dir() and not (p / "zarr.json").exists():
        raise TransferSetError(f"{p} is a directory but not a Zarr v3 group (no zarr.json)")
    try:
        return ZarrStore(p, mode, meta=meta)
    except ValueError as exc:  # a garbled zarr.json (json.JSONDecodeError) or metadata
        raise TransferSetError(f"{p} is not a readable Zarr group: its metadata is damaged "
                               f"({str(exc).splitlines()[0]}); restore the set from its "
                               "source, or make it again with `softlabels precompute`") from None


def _open_remote(remote: Remote, mode: Mode, *, backend: str | None,
                 meta: dict[str, Any] | None, cache: str | None) -> Store:
    if mode != "w" and not remote.exists():
        raise TransferSetError(f"no transfer set at {remote}: nothing is stored at that URL")
    if (backend or backend_of(remote.url)) == "hdf5":
        return HDF5Store(remote, mode)
    if mode != "w" and not remote.is_dir_like():
        raise TransferSetError(f"{remote} is one object, not a Zarr v3 group (no "
                               f"{remote}/zarr.json)")
    try:
        return ZarrStore(remote, mode, meta=meta, cache=cache)
    except FileNotFoundError:
        raise TransferSetError(f"{remote} is not a Zarr v3 group (no zarr.json at that URL)"
                               ) from None
    except ValueError as exc:
        remote.drop_cache()  # damaged in the local cache: fetched again next time
        raise TransferSetError(f"{remote} is not a readable Zarr group: its metadata is "
                               f"damaged ({str(exc).splitlines()[0]}); restore the set from its "
                               "source, or make it again with `softlabels precompute`") from None


from ._hdf5 import HDF5Store  # noqa: E402  (the HDF5 backend builds on the classes above)
