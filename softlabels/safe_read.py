"""Input files opened without waiting or reading without end.

`open_input(path, what)` opens a file a command reads (an image, a logits `.npy`, a text
document, a dataset's JSON description) with `O_NONBLOCK`, so a fifo in its place is opened
rather than waited on for a writer, and refuses anything but a regular file (a fifo, a device
such as a link to `/dev/zero`, a socket) in one line naming it. `read_input(path, what,
limit=...)` reads one whole, refusing one longer than `limit` bytes by its size before a byte
is read (a description grown to gigabytes of holes was read whole). Transfer sets have their
own rules (`format.local_files`, `format.chunk_files`, `format.zip_bounds`)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

from softlabels.errors import DataError

__all__ = ["open_input", "read_input", "input_lines", "MAX_DESCRIPTION_BYTES",
           "MAX_LINE_BYTES"]

# a JSON description of a dataset (`state.json`, `dataset_info.json`, a sidecar): pages of text
MAX_DESCRIPTION_BYTES = 64 << 20
# one line of a JSON-lines file: one document, one conversation, one model response
MAX_LINE_BYTES = 256 << 20

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_input(path: str | os.PathLike[str], what: str) -> BinaryIO:
    """`path` opened for reading in binary mode, once it is known to be a regular file; a
    missing or unreadable one raises DataError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{what} {path} is not a regular file (a fifo, a device, or a "
                            "link to one); give the path of the file itself")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def input_lines(path: str | os.PathLike[str], what: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, the line's bytes) of the regular file `path`; a line past
    `MAX_LINE_BYTES` is refused when its bound is reached (a file of 4 GiB of holes is one
    line, which iterating over the file held whole)."""
    with open_input(path, what) as f:
        n = 0
        while line := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(line) > MAX_LINE_BYTES:
                raise DataError(f"{what} {path} line {n} holds more than {MAX_LINE_BYTES} "
                                "bytes; it is not JSON lines: check the path")
            yield n, line


def read_input(path: str | os.PathLike[str], what: str, *, limit: int | None = None) -> bytes:
    """The bytes of the regular file `path`; one past `limit` bytes is refused unread."""
    with open_input(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise DataError(f"{what} {path} holds {size} bytes, more than {limit}; it is not "
                            "what its name says: check the path")
        data = f.read(limit + 1 if limit is not None else -1)
    if limit is not None and len(data) > limit:  # it grew while being read
        raise DataError(f"{what} {path} holds more than {limit} bytes; it is not what its "
                        "name says: check the path")
    return data
