"""Whole chunks of a local Zarr v3 array written straight to their files, for stage one's block
writes: zarr-python hands every write to its event-loop thread and back (the main thread waited
~1.9 s of 4.9 s for it in precompute's profile, issue 22), while a chunk written whole needs no
read, no merge and no loop: encode it, write one file.

Each chunk is encoded by the array's own codecs (zarr's synchronous `_encode_sync` of each codec
in its pipeline, the same calls zarr's own writes make), so the file holds exactly the bytes
zarr would write (tests/format/test_chunk_writer.py compares them byte for byte and reads them back
with zarr and tensorstore). The file is written as zarr's LocalStore writes it, plus the rules of
`safe_write`: a temporary `KEY.<random>.partial` opened with `O_CREAT | O_EXCL | O_NOFOLLOW`
(a link planted there is never written through; a killed writer's leftover is removed by
`Store.discard_partial_files`), then `os.replace` onto the key (which replaces a link there
rather than following it). Like zarr, it does not fsync: a block's `block_done` marker is what
vouches for its data (format/writer.py).

Only whole chunks of an unsharded array with a regular grid, default keys and codecs that
encode synchronously take this path; anything else (a selection cutting a chunk, shards, other
codecs) returns False and the caller writes through zarr.
"""

from __future__ import annotations

import os
import secrets
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.safe_write import OutputWriteError

_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_CLOEXEC", 0))


class ChunkWriter:
    """Whole-chunk writes of one array of a local Zarr v3 group (a `zarr.Array`)."""

    def __init__(self, folder: Path, array: Any, codecs: list[Any], spec: Any) -> None:
        self.folder, self.shape = folder, tuple(array.shape)
        self.chunks = tuple(array.chunks)
        self.dtype = np.dtype(array.dtype)
        self._key = array.metadata.encode_chunk_key
        self._codecs, self._spec = codecs, spec
        self._fill = spec.fill_value
        # zarr's own rule (ArrayConfig.write_empty_chunks, False by default): a chunk that
        # holds only the fill value is not stored (its file removed), as zarr leaves it
        self._skip_empty = not getattr(array.async_array.config, "write_empty_chunks", True)
        self._folders: set[Path] = set()

    @classmethod
    def of(cls, folder: Path, array: Any) -> ChunkWriter | None:
        """The writer of `array` (stored in `folder`), or None where zarr must write it."""
        try:  # zarr's synchronous codec protocol (3.1.x); without it zarr writes everything
            from zarr.abc.codec import SupportsSyncCodec
            from zarr.core.buffer import default_buffer_prototype
            from zarr.core.chunk_grids import RegularChunkGrid
            from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
        except ImportError:
            return None
        try:
            meta = array.metadata
            pipeline = array.async_array.codec_pipeline
            codecs = [*pipeline.array_array_codecs, pipeline.array_bytes_codec,
                      *pipeline.bytes_bytes_codecs]
        except AttributeError:  # zarr v2 metadata, or a pipeline of another kind
            return None
        if (getattr(meta, "zarr_format", None) != 3 or array.shards is not None
                or not isinstance(meta.chunk_grid, RegularChunkGrid)
                or not isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)
                or meta.chunk_key_encoding.separator != "/"
                or getattr(meta, "storage_transformers", ())
                or not all(isinstance(c, SupportsSyncCodec) for c in codecs)
                or array.async_array.config.order != "C"):
            return None
        spec = meta.get_chunk_spec((0,) * len(array.shape), array.async_array.config,
                                   default_buffer_prototype())
        return cls(folder, array, codecs, spec)

    def write(self, selection: Any, data: np.ndarray) -> bool:
        """Write `data` at `selection` when it covers whole chunks (the last one along an axis
        may end at the array's edge, as zarr pads it with the fill value); False, writing
        nothing, when it does not."""
        ranges = self._chunk_ranges(selection)
        data = np.asarray(data)
        if ranges is None or data.shape != tuple(b - a for a, b in ranges):
            return False
        data = data.astype(self.dtype, copy=False)
        for coords in product(*(range(a // c, -(-b // c)) for (a, b), c in
                                zip(ranges, self.chunks))):
            part = tuple(slice(i * c - a, min((i + 1) * c, n) - a)
                         for i, c, (a, _), n in zip(coords, self.chunks, ranges, self.shape))
            chunk = data[part]
            if self._skip_empty and self._all_fill(chunk):  # edge chunks too: zarr pads first
                self._remove(self._key(coords))
            else:
                self._put(self._key(coords), self._encode(chunk))
        return True

    def _all_fill(self, chunk: np.ndarray) -> bool:
        """Whether every element is the fill value (NaN equal to NaN, as zarr compares)."""
        fill = np.asarray(self._fill, dtype=self.dtype)
        first = chunk.flat[0] if chunk.size else fill
        if not (first == fill or (first != first and fill != fill)):  # the common case: data
            return False
        if chunk.dtype.kind in "fc":
            return bool(np.array_equal(chunk, np.broadcast_to(fill, chunk.shape),
                                       equal_nan=True))
        return bool((chunk == fill).all())

    def _remove(self, key: str) -> None:
        """The chunk at `key` no longer stored (a link there is removed, never followed)."""
        try:
            os.unlink(self.folder / key)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _failed(self.folder / key, exc) from None

    def _chunk_ranges(self, selection: Any) -> list[tuple[int, int]] | None:
        """(start, stop) per axis when `selection` is step-1 slices on chunk boundaries."""
        sel = selection if isinstance(selection, tuple) else (selection,)
        if len(sel) > len(self.shape):
            return None
        sel = sel + (slice(None),) * (len(self.shape) - len(sel))
        ranges = []
        for s, n, c in zip(sel, self.shape, self.chunks):
            if not isinstance(s, slice) or s.step not in (None, 1):
                return None
            start, stop, _ = s.indices(n)
            if stop <= start or start % c or (stop % c and stop != n):
                return None
            ranges.append((start, stop))
        return ranges

    def _encode(self, block: np.ndarray) -> Any:
        """One chunk's stored bytes, through the array's codecs in order; an edge chunk padded
        with the fill value to the chunk's shape first, as zarr does."""
        from zarr.core.buffer import default_buffer_prototype

        if block.shape != self.chunks:
            full = np.full(self.chunks, self._fill, dtype=self.dtype)
            full[tuple(slice(0, n) for n in block.shape)] = block
            block = full
        spec = self._spec
        value: Any = default_buffer_prototype().nd_buffer.from_numpy_array(
            np.ascontiguousarray(block))
        for codec in self._codecs:
            value = codec._encode_sync(value, spec)
            spec = codec.resolve_metadata(spec)
        return value.as_numpy_array()

    def _put(self, key: str, data: np.ndarray) -> None:
        path = self.folder / key
        tmp = f"{path}.{secrets.token_hex(8)}.partial"
        try:
            if path.parent not in self._folders:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._folders.add(path.parent)
            fd = os.open(tmp, _FLAGS, 0o644)
        except OSError as exc:
            raise _failed(path, exc) from None
        try:
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _failed(path, exc) from None


def _failed(path: Path, exc: OSError) -> OutputWriteError:
    return OutputWriteError(f"cannot write chunk {path}: {exc.strerror or exc}; free space on "
                            "that disk or check that it is writable, then rerun the same "
                            "command to resume")
