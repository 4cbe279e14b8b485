"""zarr's `LocalStore` reading only what a set holds: a fifo or a device in place of a chunk
or a `zarr.json`, a `zarr.json` past `MAX_LOCAL_METADATA_BYTES`, or a chunk file longer than
its array's chunks can be stored in (`zip_bounds.stored_limit`, the rule of zip members and
objects at URLs, learned from each array's `zarr.json` as zarr reads it), is refused with
`StoredFileError` before it is read (the reader reports it as a damaged block or array). zarr
itself would wait on a fifo for ever, read a device on and on, or read a file grown to
gigabytes of holes whole. Local Zarr sets and remote sets' local caches are read through it;
chunks that `chunk_files` reads itself pass the same checks there."""

from __future__ import annotations

import os
import stat
from typing import Any

from zarr.storage import LocalStore

from softlabels.format.chunk_files import StoredFileError
from softlabels.format.remote_reads import METADATA_NAMES, ReadBounds

# A local zarr.json may hold more than the 1 MiB of metadata objects at URLs and zip members
# (the class names of 100,000 classes take about 2 MiB) but no set's takes gigabytes.
MAX_LOCAL_METADATA_BYTES = 64 << 20


class LocalFiles(LocalStore):  # type: ignore[misc]
    """A `LocalStore` whose reads are checked (see the module's docstring)."""

    def __init__(self, root: Any, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.bounds = ReadBounds()

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        self.check(key)
        value = await super().get(key, prototype, byte_range)
        if value is not None and byte_range is None and key.endswith("zarr.json"):
            self.bounds.learn(key, value.to_bytes())
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self.check(key)
        return await super().get_partial_values(prototype, key_ranges)

    def check(self, key: str) -> None:
        """Raise unless the file at `key` is a regular file within its bound, or absent (a
        missing chunk is the fill value; a folder zarr answers as None)."""
        path = self.root / key
        try:
            found = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISDIR(found.st_mode):
            return
        if not stat.S_ISREG(found.st_mode):
            raise StoredFileError(f"{path} is not a regular file (a fifo or a device); "
                                  "restore the set from its source")
        if key.rsplit("/", 1)[-1] in METADATA_NAMES:
            if found.st_size > MAX_LOCAL_METADATA_BYTES:
                raise StoredFileError(f"{path} holds {found.st_size} bytes, more than metadata "
                                      f"ever takes ({MAX_LOCAL_METADATA_BYTES}); restore the "
                                      "set from its source")
            return
        limit = self.bounds.limit(key)
        if found.st_size > limit:
            raise StoredFileError(f"{path} holds {found.st_size} bytes, more than a chunk of "
                                  f"its array is stored in ({limit}); restore the set from its "
                                  "source")
