"""The store interface: a container of named, chunked n-d arrays plus one JSON metadata object,
and the contract every backend keeps (private modules: _zarr.py for Zarr directories, zip files
and URLs, _hdf5.py for HDF5 files; backends.py opens the one a path or URL names)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from softlabels.errors import TransferSetError

Mode = Literal["r", "r+", "w"]


Selection = tuple[slice | int, ...] | slice


def fill_value(dtype: np.dtype) -> Any:
    return np.nan if np.issubdtype(dtype, np.floating) else 0


class Store(ABC):
    """A container of named, chunked n-d arrays plus one JSON metadata object.

    The contract every backend keeps (tests/format/test_store_backends.py runs it against each:
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


def block_selection(shape: tuple[int, ...], block: int, block_rows: int,
                     axis: int) -> tuple[slice, ...]:
    sel = [slice(None)] * len(shape)
    sel[axis] = slice(block * block_rows, min((block + 1) * block_rows, shape[axis]))
    return tuple(sel)
