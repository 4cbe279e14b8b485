"""The HDF5 backend of the store interface (store.py): one file (`*.h5`, `*.hdf5`), read
locally or from a URL through an fsspec file object."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import TransferSetError, WriterBusyError
from softlabels.format.location import Remote
from softlabels.format.schema import ATTR_KEY
from softlabels.format.store import Mode, Store, block_selection, fill_value


class HDF5Store(Store):
    """One HDF5 file (`*.h5`, `*.hdf5`). Written by a single process: HDF5 has no safe
    parallel writer without MPI."""

    def __init__(self, path: Path | Remote, mode: Mode) -> None:
        import h5py

        self.read_only, self._handle = mode == "r", None
        self._remote = path if isinstance(path, Remote) else None
        self.path = path.url if isinstance(path, Remote) else path
        try:
            if self._remote is not None:  # h5py reads through an fsspec file object
                if mode != "r":
                    raise TransferSetError(
                        f"cannot write {self.path}: HDF5 sets at a URL are read-only (an "
                        "object store cannot rewrite part of a file); write a `.zarr` set there"
                        ", or write the `.h5` locally and upload it")
                self._handle = self._remote.open_file()
                self._file = h5py.File(self._handle, "r")
            else:
                self._file = h5py.File(path, {"r": "r", "r+": "r+", "w": "w"}[mode])
        except OSError as exc:
            if self._handle is not None:
                self._handle.close()
            from softlabels.format.lease import holder

            who = holder(self.path)  # the URL of a remote set, not its Remote
            if who is not None and who != "this process":
                raise WriterBusyError(f"{path} is being written by {who}; wait for it to "
                                      "finish") from None
            if "unable to lock file" in str(exc):  # HDF5's own lock: another process has it
                raise WriterBusyError(f"{path} is open for writing in another process (HDF5 "
                                      f"file lock: {str(exc).splitlines()[0]}); wait for it "
                                      "to finish") from None
            raise TransferSetError(
                f"cannot open {path} as HDF5 ({str(exc).splitlines()[0]}): it is not an HDF5 "
                "file or it is damaged; get a fresh copy, or rerun the command that wrote it"
            ) from None

    def _create(self, name, shape, dtype, *, chunks, shards=None, dims=None,
                shuffle_compress=False):
        dt = np.dtype(dtype)
        # HDF5 refuses chunks larger than the array; zarr allows them.
        chunks = tuple(min(c, max(s, 1)) for c, s in zip(chunks, shape))
        extra = {"shuffle": True, "compression": "gzip"} if shuffle_compress else {}
        ds = self._file.create_dataset(
            name, shape=shape, dtype=dt, chunks=chunks, fillvalue=fill_value(dt), **extra
        )
        for axis, label in enumerate(dims or ()):
            ds.dims[axis].label = label  # HDF5 dimension labels (h5dump: DIMENSION_LABELS)

    def _write(self, name, selection, data):
        self._file[name][selection] = data

    def read(self, name, selection=slice(None)):
        return np.asarray(self._file[name][selection])

    def array(self, name):
        return self._file[name]

    def names(self, expected=()):
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

    def _set_meta(self, meta):
        self._file.attrs[ATTR_KEY] = json.dumps(meta)

    def _erase_block(self, name, block, block_rows, axis):
        # HDF5 rewrites a chunk in place, so nothing can be torn; erasing writes the fill value,
        # which makes the block read exactly as one never written.
        ds = self._file[name]
        sel = block_selection(ds.shape, block, block_rows, axis)
        ds[sel] = fill_value(ds.dtype)

    def discard_partial_files(self) -> int:
        self._writable("clean up")
        return 0  # h5py writes in place: no temporary files to leave behind

    def links(self):
        import h5py

        if self._remote is not None:
            return []  # a read-only object: nothing is written through it
        found = [str(self.path)] if self.path.is_symlink() else []
        if self.path.stat().st_nlink > 1:
            found.append(f"{self.path} (a file with {self.path.stat().st_nlink} hard links)")

        def visit(name: str, link: Any) -> None:
            if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
                found.append(f"{self.path}:{name}")

        self._file.visititems_links(visit)
        return found

    def flush(self):
        self._file.flush()

    def close(self):
        if sys.is_finalizing():  # at exit h5py is torn down and closes its files itself
            return
        if self._file.id.valid:
            self._file.close()
        if self._handle is not None:
            self._handle.close()
