"""Storage backends behind one small interface: a Zarr v3 group (default) or an HDF5 file.

The store knows arrays, chunks and one JSON metadata object; it knows nothing of rows, teachers
or temperatures (that is `schema`, `writer` and `transfer_set`). The layout rules it enforces
come from DESIGN §3: NaN fill for floats, empty chunks written, one writer per chunk or shard.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import TransferSetError
from .schema import ATTR_KEY

Mode = Literal["r", "r+", "w"]
Selection = tuple[slice | int, ...] | slice


def _fill_value(dtype: np.dtype) -> Any:
    return np.nan if np.issubdtype(dtype, np.floating) else 0


class Store(ABC):
    """A container of named, chunked n-d arrays plus one JSON metadata object."""

    path: Path
    read_only: bool

    @abstractmethod
    def create(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        *,
        chunks: tuple[int, ...],
        shards: tuple[int, ...] | None = None,
        shuffle_compress: bool = False,
    ) -> None:
        """`shuffle_compress`: byte-shuffle then zstd (HDF5: shuffle then gzip), for floats
        that compress once their bytes are grouped (sorted top-k logits); else the default
        (floats raw, integers zstd)."""

    @abstractmethod
    def write(self, name: str, selection: Selection, data: np.ndarray) -> None: ...

    @abstractmethod
    def read(self, name: str, selection: Selection = slice(None)) -> np.ndarray: ...

    @abstractmethod
    def array(self, name: str) -> Any:
        """The backend's array object (zarr.Array, h5py.Dataset): sliceable, for dask."""

    @abstractmethod
    def names(self) -> list[str]:
        """Every array, nested ones as 'group/name'."""

    @abstractmethod
    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
        """(shape, dtype, chunks) of one array."""

    @abstractmethod
    def get_meta(self) -> dict[str, Any] | None: ...

    @abstractmethod
    def set_meta(self, meta: dict[str, Any]) -> None: ...

    def erase_block(self, name: str, block: int, block_rows: int, axis: int) -> None:
        """Remove the stored chunk(s)/shard of block `block` so a rewrite never reads a torn one."""

    def flush(self) -> None:
        """Make written data durable where the backend can."""

    def close(self) -> None:
        """Release file handles."""

    def has(self, name: str) -> bool:
        return name in self.names()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZarrStore(Store):
    """A Zarr v3 group in a directory (`*.zarr`), or read-only inside a zip (`*.zarr.zip`)."""

    def __init__(self, path: Path, mode: Mode) -> None:
        import zarr

        self.path, self.read_only = path, mode == "r"
        self._zip = str(path).endswith(".zip")
        if self._zip:
            if mode != "r":
                raise TransferSetError(
                    f"{path} is a zip-packed Zarr set, which is read-only; convert it to a "
                    "`.zarr` directory with `softlabels convert` to write to it"
                )
            store: Any = zarr.storage.ZipStore(str(path), mode="r")
        else:
            store = str(path)
        self._group = zarr.open_group(store=store, mode={"r": "r", "r+": "r+", "w": "w"}[mode])

    def create(self, name, shape, dtype, *, chunks, shards=None, shuffle_compress=False):
        from zarr.codecs import BloscCodec

        dt = np.dtype(dtype)
        default = None if dt.kind == "f" else "auto"
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
        )

    def write(self, name, selection, data):
        self._group[name][selection] = data

    def read(self, name, selection=slice(None)):
        return np.asarray(self._group[name][selection])

    def array(self, name):
        return self._group[name]

    def names(self):
        return sorted(path for path, _ in self._group.arrays()) + sorted(
            f"{g}/{a}" for g, sub in self._group.groups() for a, _ in sub.arrays()
        )

    def info(self, name):
        arr = self._group[name]
        return tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks)

    def get_meta(self):
        return self._group.attrs.asdict().get(ATTR_KEY)

    def set_meta(self, meta):
        self._group.attrs[ATTR_KEY] = json.loads(json.dumps(meta))

    def erase_block(self, name, block, block_rows, axis):
        # The stored key grid is the shard grid when sharded, else the chunk grid; this backend
        # always makes a block exactly one key along the row axis.
        arr = self._group[name]
        grid = arr.shards or arr.chunks
        ranges = [range(-(-s // g)) for s, g in zip(arr.shape, grid)]
        ranges[axis] = range(block, block + 1)
        for coords in np.ndindex(*[len(r) for r in ranges]):
            key = arr.metadata.encode_chunk_key(tuple(r[c] for r, c in zip(ranges, coords)))
            (self.path / name / key).unlink(missing_ok=True)

    def remove_partial_files(self) -> int:
        """Delete temporary files a killed writer left behind; returns how many."""
        count = 0
        for leftover in self.path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
            count += 1
        return count


class HDF5Store(Store):
    """One HDF5 file (`*.h5`, `*.hdf5`). Written by a single process (DESIGN §3)."""

    def __init__(self, path: Path, mode: Mode) -> None:
        import h5py

        self.path, self.read_only = path, mode == "r"
        try:
            self._file = h5py.File(path, {"r": "r", "r+": "r+", "w": "w"}[mode])
        except OSError as exc:
            raise TransferSetError(
                f"cannot open {path} as HDF5 ({exc}); if a write was killed, rerun the "
                "precompute command with --overwrite"
            ) from None

    def create(self, name, shape, dtype, *, chunks, shards=None, shuffle_compress=False):
        dt = np.dtype(dtype)
        # HDF5 refuses chunks larger than the array; zarr allows them.
        chunks = tuple(min(c, max(s, 1)) for c, s in zip(chunks, shape))
        extra = {"shuffle": True, "compression": "gzip"} if shuffle_compress else {}
        self._file.create_dataset(
            name, shape=shape, dtype=dt, chunks=chunks, fillvalue=_fill_value(dt), **extra
        )

    def write(self, name, selection, data):
        self._file[name][selection] = data

    def read(self, name, selection=slice(None)):
        return np.asarray(self._file[name][selection])

    def array(self, name):
        return self._file[name]

    def names(self):
        import h5py

        found: list[str] = []
        self._file.visititems(
            lambda n, obj: found.append(n) if isinstance(obj, h5py.Dataset) else None
        )
        return sorted(found, key=lambda n: (n.count("/"), n))

    def info(self, name):
        ds = self._file[name]
        return tuple(ds.shape), np.dtype(ds.dtype), tuple(ds.chunks or ds.shape)

    def get_meta(self):
        raw = self._file.attrs.get(ATTR_KEY)
        if raw is None:
            return None
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def set_meta(self, meta):
        self._file.attrs[ATTR_KEY] = json.dumps(meta)

    def flush(self):
        self._file.flush()

    def close(self):
        if self._file.id.valid:
            self._file.close()


def backend_of(path: str | os.PathLike[str]) -> str:
    """'hdf5' for *.h5/*.hdf5, 'zarr-zip' for *.zarr.zip, else 'zarr'."""
    name = str(path).rstrip("/").lower()
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    return "zarr-zip" if name.endswith(".zip") else "zarr"


def open_store(path: str | os.PathLike[str], mode: Mode = "r") -> Store:
    """Open or create a store; the backend follows the path's suffix."""
    p = Path(path)
    if mode != "w" and not p.exists():
        raise TransferSetError(f"no transfer set at {p}: the path does not exist")
    if backend_of(p) == "hdf5":
        return HDF5Store(p, mode)
    if mode != "w" and p.is_dir() and not (p / "zarr.json").exists():
        raise TransferSetError(f"{p} is a directory but not a Zarr v3 group (no zarr.json)")
    return ZarrStore(p, mode)
