"""Every file softlabels writes goes through here: opened without following links.

`atomic_write(path)` opens the folder of `path` once (`O_DIRECTORY`), creates the temporary
`NAME.tmp` in it with `O_CREAT | O_EXCL | O_NOFOLLOW` (a link planted at the temporary is never
written through), fsyncs it, and renames it over `NAME` relative to the same folder descriptor
(`os.replace` replaces a link at `NAME` rather than following it; a link there is refused
first, so the user learns what they named). A stale regular temporary from a killed run is
removed; anything else at the temporary is refused. A full disk or any other OS error ends in
one line naming the path (`UnsafePathError` for links, `OutputWriteError` otherwise).

`own_folder(path)` is the chunk cache's check that a folder it writes into is a real directory
(not a link) owned by this user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from softlabels.errors import SoftlabelsError, UnsafePathError

__all__ = ["OutputWriteError", "atomic_write", "write_bytes", "write_text", "refuse_link",
           "own_folder", "save_figure"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class OutputWriteError(SoftlabelsError):
    """Writing an output failed (a full disk, a read-only folder); the message names the path."""


def refuse_link(path: str | os.PathLike[str], what: str = "output") -> None:
    """Refuse `path` when it is a symbolic link (dangling or not) or not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{what} {path} is a symbolic link; softlabels never writes "
                              "through a link: remove it or name the file it points to")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{what} {path} exists and is not a regular file; remove it or "
                              "choose another path")


def _failed(path: str | os.PathLike[str], exc: OSError) -> OutputWriteError:
    advice = ("free space on that disk or choose another path" if exc.errno == errno.ENOSPC
              else "check that the folder exists and is writable, or choose another path")
    return OutputWriteError(f"cannot write {path}: {exc.strerror or exc}; {advice}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, what: str = "output",
                 encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file object for `path`'s temporary (`NAME.tmp`), renamed over `path` on a clean exit
    (after fsync); nothing at `path` changes when the block raises. Never follows a link."""
    path = Path(path)
    tmp_name = path.name + ".tmp"
    refuse_link(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise _failed(path, exc) from None
    try:
        _clear_stale(dir_fd, path.parent / tmp_name, tmp_name, what)
        try:
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                         0o644, dir_fd=dir_fd)
        except FileExistsError:
            raise UnsafePathError(f"{what} {path.parent / tmp_name} appeared while writing "
                                  "(another writer, or a planted link); nothing was written") \
                from None
        except OSError as exc:
            raise _failed(path, exc) from None
        done = False
        try:
            with os.fdopen(fd, mode, encoding=encoding) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            refuse_link(path, what)
            os.replace(tmp_name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            done = True
        except OSError as exc:
            raise _failed(path, exc) from None
        finally:
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _clear_stale(dir_fd: int, shown: Path, name: str, what: str) -> None:
    """Remove a regular temporary left by a killed run; refuse a link or anything else."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UnsafePathError(f"{what} temporary {shown} is {kind}; softlabels never writes "
                              "through it: remove it and run again")
    os.unlink(name, dir_fd=dir_fd)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, what: str = "output") -> None:
    with atomic_write(path, "wb", what=what) as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str, *, what: str = "output") -> None:
    with atomic_write(path, "w", what=what, encoding="utf-8") as f:
        f.write(text)


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """`fig.savefig` into a file opened by `atomic_write` (format from the suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_write(path, "wb", what="plot") as f:
        fig.savefig(f, format=fmt, **kwargs)


def own_folder(path: str | os.PathLike[str], what: str = "cache folder") -> None:
    """Refuse a folder that is a link, not a directory, or owned by another user."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafePathError(f"{what} {path} is {kind}; softlabels writes only into folders "
                              "it made: remove it, or choose another cache directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UnsafePathError(f"{what} {path} belongs to user id {st.st_uid}, not this user "
                              f"({os.getuid()}); remove it, or choose another cache directory")
