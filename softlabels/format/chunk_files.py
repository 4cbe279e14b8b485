"""Whole chunks of a local Zarr v3 set read straight from their files, for stage two's
checked block reads: zarr-python spends about 0.7 ms of CPU per chunk on its asynchronous
machinery (measured: 100 ms to read the 147 chunks of a 200,000 x 100 set's served arrays,
which a numpy memmap copies in 18 ms), while a chunk laid out as this package writes it (a
regular grid, default keys, no shards, the `bytes` codec, optionally zstd or blosc) is one
file read and at most one decompression.

Only what this package writes takes this path; anything else (shards, other codecs, a selection
not inside one chunk) returns None and the caller reads through zarr. What is read here passes
the same checks as any other read (checksums over each block's bytes, finite values), so a
misread cannot be served silently.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.format.zip_bounds import stored_limit

MAX_CHUNK_BYTES = 1 << 30  # a chunk past this is left to zarr (ours aim near 1 MiB)
_TYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
          "uint16", "uint32", "uint64", "bool"}


class StoredFileError(OSError):
    """A file of a set that no writer makes: a fifo, a device or a socket, or a chunk longer
    than any encoding of its array's chunk."""


class ChunkFiles:
    """The chunk files of one array of a local Zarr v3 group: `read(selection)` of a selection
    inside a single chunk (integers and slices), or None where zarr must read it."""

    def __init__(self, folder: Path, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: np.dtype, fill: Any, codec: str | None) -> None:
        self.folder, self.shape, self.chunks = folder, shape, chunks
        self.dtype, self.fill, self.codec = dtype, fill, codec
        self.count = int(np.prod(chunks))  # a chunk's values
        # chunk reads that found their file's last page out of the page cache (`_probe`): a
        # read from disk, whatever the file's size or the decoding cost
        self.misses = 0
        self._nowait = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")
        self._byte = bytearray(1)  # the probe's byte, never used
        self._keys = os.path.join(folder, "c")  # a chunk's file: this + "/i/j/..." (`_path`)

    @classmethod
    def of(cls, folder: Path) -> ChunkFiles | None:
        """The array in `folder` when its layout is one this module reads, else None."""
        try:
            meta = json.loads((folder / "zarr.json").read_text())
            grid, keys = meta["chunk_grid"], meta["chunk_key_encoding"]
            codecs = [c["name"] for c in meta["codecs"]]
            if (meta.get("zarr_format") != 3 or meta.get("node_type") != "array"
                    or grid["name"] != "regular" or keys["name"] != "default"
                    or keys.get("configuration", {}).get("separator", "/") != "/"
                    or meta.get("storage_transformers") or meta["data_type"] not in _TYPES
                    or codecs not in (["bytes"], ["bytes", "zstd"], ["bytes", "blosc"])
                    or meta["codecs"][0].get("configuration", {}).get("endian",
                                                                      "little") != "little"):
                return None
            shape = tuple(int(s) for s in meta["shape"])
            chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
            dtype = np.dtype(meta["data_type"])
            fill = meta["fill_value"]
            fill = float(fill) if isinstance(fill, str) else fill  # "NaN", "Infinity"
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if (len(shape) != len(chunks) or min(chunks, default=1) <= 0
                or any(c > max(n, 1) for c, n in zip(chunks, shape))
                or int(np.prod(chunks)) * dtype.itemsize > MAX_CHUNK_BYTES):
            return None  # sizes no writer of ours makes: checked before any allocation
        return cls(folder, shape, chunks, dtype, fill, codec=codecs[1] if len(codecs) == 2
                   else None)

    def read(self, selection: Any, scratch: dict[str, np.ndarray] | None = None,
             ) -> np.ndarray | None:
        """The selection (a tuple of ints and step-1 slices, or one slice) when it lies inside
        one chunk; None otherwise. With `scratch` (a dict this call may keep a buffer in), the
        chunk is read into a buffer reused by later calls given the same dict, and the result
        may be a view of it, valid until then: fresh memory for every chunk costs more in
        page faults than the read itself (measured: 88-165 ms against 12-28 ms for 80 MB)."""
        found = self._locate(selection)
        if found is None:
            return None
        chunk = self._chunk(found[0], scratch)
        return None if chunk is None else np.ascontiguousarray(chunk[found[1]])

    def advise(self, selection: Any) -> None:
        """Tell the kernel that the chunk file holding `selection` will be read soon
        (POSIX_FADV_WILLNEED): it starts reading what is not cached in the background, so a
        reader working through blocks in one thread overlaps the disk with its work on the
        blocks before. Nothing where the file is missing, is not a regular file (a fifo, which
        opening for reading would wait on) or is a link, or the selection is not in one
        chunk."""
        found = self._locate(selection) if hasattr(os, "posix_fadvise") else None
        if found is None:
            return
        try:
            fd = os.open(self._path(found[0]),
                         os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _locate(self, selection: Any) -> tuple[list[int], tuple[Any, ...]] | None:
        """(chunk coordinates, the selection within that chunk), or None when the selection
        (a tuple of ints and step-1 slices, or one slice) is not inside one chunk."""
        sel = selection if isinstance(selection, tuple) else (selection,)
        if len(sel) > len(self.shape):
            return None
        sel = sel + (slice(None),) * (len(self.shape) - len(sel))
        coords, inner = [], []
        for s, n, c in zip(sel, self.shape, self.chunks):
            if isinstance(s, (int, np.integer)):
                if not 0 <= s < n:
                    return None
                coords.append(int(s) // c)
                inner.append(int(s) % c)
                continue
            if not isinstance(s, slice) or s.step not in (None, 1):
                return None
            start, stop, _ = s.indices(n)
            if stop <= start or start // c != (stop - 1) // c:
                return None
            coords.append(start // c)
            inner.append(slice(start % c, start % c + stop - start))
        return coords, tuple(inner)

    def _path(self, coords: list[int]) -> str:
        """The file of the chunk at `coords` (default keys, "/" separated)."""
        return self._keys + "".join(f"/{c}" for c in coords)

    def _chunk(self, coords: list[int], scratch: dict[str, np.ndarray] | None,
               ) -> np.ndarray | None:
        """One chunk, decoded into a writable array (one copy out of the page cache): a fresh
        one, or the buffer kept in `scratch`."""
        path = self._path(coords)
        out = scratch.get("buffer") if scratch is not None else None
        if out is None or out.dtype != self.dtype or out.size != self.count:
            out = np.empty(self.count, dtype=self.dtype)
            if scratch is not None:
                scratch["buffer"] = out
        try:  # O_NONBLOCK: a fifo in a chunk's place is opened, not waited on
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:  # an unwritten chunk reads as the fill value, as in zarr
            return np.full(self.chunks, self.fill, dtype=self.dtype)
        except OSError:
            return None
        try:
            found = os.fstat(fd)
            regular = stat.S_ISREG(found.st_mode)
            # longer than any encoding of the chunk: not read (a file grown to gigabytes of
            # holes would be read whole, by this module and again by zarr)
            overlong = regular and found.st_size > stored_limit(out.nbytes)
            if regular and not overlong:
                self._probe(fd, found.st_size)
            if regular and not overlong and self.codec is None:  # a truncated chunk (by its
                # size, or by what one read returns if it changes meanwhile) is left to zarr
                whole = found.st_size == out.nbytes and os.readv(fd, [out]) == out.nbytes
            elif regular and not overlong:
                raw = _read_all(fd, found.st_size)
        except OSError:
            return None
        finally:
            os.close(fd)
        if not regular:  # zarr would wait on a fifo, or read a device on and on
            raise StoredFileError(f"chunk {path} is not a regular file (a fifo or a device)")
        if overlong:
            raise StoredFileError(f"chunk {path} holds {found.st_size} bytes, more than a "
                                  f"chunk of its array is stored in "
                                  f"({stored_limit(out.nbytes)})")
        if self.codec is None:
            return out.reshape(self.chunks) if whole else None
        from numcodecs import Blosc, Zstd

        try:  # a blosc frame records its own compressor, shuffle, type size and length
            # blosc's 16-byte header: version, versionlz, flags, typesize, then uint32 LE
            # nbytes (decoded), blocksize, cbytes (the frame): a frame of another length is
            # left to zarr
            if self.codec == "blosc" and (len(raw) < 16 or _u32(raw, 4) != out.nbytes
                                          or _u32(raw, 12) != len(raw)):
                return None
            (Zstd() if self.codec == "zstd" else Blosc()).decode(raw, out=out)
        except Exception:  # a damaged chunk: zarr reads it again and names the failure
            return None
        return out.reshape(self.chunks)

    def _probe(self, fd: int, size: int) -> None:
        """Count a miss (`misses`) when the chunk file's last page is not in the page cache:
        a read of its last byte that may not wait for the disk (RWF_NOWAIT, Linux) finds it
        absent. Chunk files are read whole, front to back, so the last page cached means the
        file was. Where the flag is not supported (tmpfs, other systems) nothing is counted."""
        if not self._nowait or size <= 0:
            return
        try:
            os.preadv(fd, [self._byte], size - 1, os.RWF_NOWAIT)
        except BlockingIOError:
            self.misses += 1
        except OSError:  # EOPNOTSUPP (tmpfs) or EINVAL: this file system cannot tell
            self._nowait = False


def _read_all(fd: int, size: int) -> bytes:
    """The file's bytes from its start (`size` as fstat found it; more if it grew)."""
    parts, got = [], 0
    while chunk := os.read(fd, max(size - got, 1 << 16)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _u32(raw: bytes, at: int) -> int:
    return int.from_bytes(raw[at:at + 4], "little")
