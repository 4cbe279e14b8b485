"""One writer at a time: a lease on an output path, held while a command writes it.

The lease is a file next to the output (`OUT.lock`) holding a POSIX record lock (`fcntl.lockf`,
F_SETLK). The kernel drops the lock when its holder exits, however it exits (SIGKILL included),
and a forked child (a DataLoader worker) does not inherit it, so a lease left by a killed process
is taken over by the next writer at once, without any manual step. The file's content only names
the holder (host, pid, command, start time) for the message a refused writer gets; the file is
removed when the lease is released.

POSIX locks work on local filesystems and over NFS (v4, or v3 with its lock daemon). Where a
filesystem does not support them, writing is refused with a message;
`SOFTLABELS_USE_FILE_LOCKING=FALSE` (as HDF5's `HDF5_USE_FILE_LOCKING`) writes without a lease,
and then the user keeps to one writer.

An output in an object store (`s3://`, `gs://`) has no POSIX locks: its lease is an object
`URL.lock` created with a conditional put and renewed while held (see `remote_lease`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from softlabels.errors import TransferSetError, WriterBusyError
from softlabels.format.location import is_url

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD_ELSEWHERE = (errno.EACCES, errno.EAGAIN)

# Leases this process holds, by lock path: [fd, count]. A POSIX lock belongs to the process and
# is dropped when it closes *any* descriptor of the file, so the process never opens its own
# lease file twice: a second acquire (precompute checks early, its writer acquires) nests here.
_HELD: dict[str, list[int]] = {}
_GUARD = threading.Lock()


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lease file of local output `out`: `OUT.lock` beside it."""
    p = Path(os.path.abspath(out))
    return p.with_name(p.name + LOCK_SUFFIX)


def _locking_enabled() -> bool:
    return os.environ.get("SOFTLABELS_USE_FILE_LOCKING", "TRUE").upper() not in ("FALSE", "0",
                                                                                 "NO")


def _describe(raw: str) -> str:
    try:
        h = json.loads(raw)
        return (f"pid {h['pid']} on {h['host']} since {h['started_at']} "
                f"(`{h['command']}`)")
    except (ValueError, KeyError, TypeError):
        return "another process (its details are not written yet)"


def _open_lease(path: str | os.PathLike[str], flags: int) -> int:
    """The lease file opened with `flags`, never through a link nor waiting (a fifo in its place
    would wait for a writer); anything but a regular file is refused naming it."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)
        return fd
    os.close(fd)
    raise TransferSetError(f"the lease file {path} is not a regular file (a fifo or a device); "
                           "remove it and run the command again")


def holder(out: str | os.PathLike[str]) -> str | None:
    """Who holds the lease on `out` now, in words, or None when nobody does."""
    if is_url(out):
        from softlabels.format.remote_lease import remote_holder

        return remote_holder(out)
    path = lock_path(out)
    with _GUARD:
        if str(path) in _HELD:
            return "this process"
        try:
            fd = _open_lease(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _HELD_ELSEWHERE:
                return _describe(os.pread(fd, 4096, 0).decode(errors="replace"))
            return None
        finally:
            os.close(fd)  # also drops the shared lock just taken
        return None


def refuse_if_busy(out: str | os.PathLike[str]) -> None:
    """Refuse early, before expensive work, when another process holds `out`'s lease (the
    writer still takes the lease itself; this only saves loading a teacher to be refused)."""
    who = holder(out)
    if who is not None and who != "this process":
        raise WriterBusyError(f"{out} is being written by {who}; wait for it to finish (a "
                              "second writer is refused; nothing was changed)")


class WriterLease:
    """A context manager holding the lease on `out`; refuses with `WriterBusyError` (naming the
    holder) while another process holds it."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self._remote: Any = None
        if is_url(out):  # an object store: a lease object (see `remote_lease`)
            from softlabels.format.remote_lease import RemoteLease

            self._remote = RemoteLease(out)
        self.out = Path(out) if self._remote is None else out
        self.path = lock_path(out) if self._remote is None else self._remote.lock.url
        self._held = False

    @property
    def lost(self) -> bool:
        """Whether this lease was taken over by another writer while held (object stores
        only: a holder that stopped renewing it past its expiry)."""
        return self._remote is not None and self._remote.lost

    def acquire(self) -> WriterLease:
        if self._remote is not None:
            self._remote.acquire()
            return self
        if not _locking_enabled():
            return self
        key = str(self.path)
        with _GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                self._held = True
                return self
            fd = self._lock()
            if fd is None:  # a read-only filesystem: a complete set may still be checked
                return self
            _HELD[key] = [fd, 1]
            self._held = True
        return self

    def _lock(self) -> int | None:
        """Open, lock and claim the lease file; retried if it was replaced meanwhile."""
        for _ in range(100):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = _open_lease(self.path, os.O_RDWR | os.O_CREAT)
            except OSError as exc:
                if exc.errno == errno.EROFS:  # nobody can write there: nothing to exclude
                    return None
                if exc.errno == errno.EACCES and self._remove_stale():
                    continue  # another user's lease, left by a process that is gone
                raise TransferSetError(
                    f"cannot write {self.out}: {exc.strerror} ({exc.filename}); choose an "
                    "--out in a writable directory") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _HELD_ELSEWHERE:
                    who = _describe(os.pread(fd, 4096, 0).decode(errors="replace"))
                    os.close(fd)
                    raise WriterBusyError(
                        f"{self.out} is being written by {who}; wait for it to finish (a "
                        "second writer is refused; nothing was changed)") from None
                os.close(fd)
                if exc.errno in _UNSUPPORTED:
                    raise WriterBusyError(
                        f"the filesystem of {self.out} does not support file locks ({exc}); "
                        "set SOFTLABELS_USE_FILE_LOCKING=FALSE to write without a lease, and "
                        "run one writer at a time yourself") from None
                raise
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file as we opened it: retry
                os.close(fd)
                continue
            previous = os.pread(fd, 4096, 0).decode(errors="replace")
            if previous.strip():
                log.info("took over the lease of %s left by %s (that process is gone)",
                         self.out, _describe(previous))
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "command": " ".join(sys.argv) or "python",
                  "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            return fd
        raise WriterBusyError(f"could not take the lease {self.path}: it keeps being replaced; "
                              "is another writer starting and stopping on this output?")

    def _remove_stale(self) -> bool:
        """The lease file exists and this user cannot write it (another user's): refuse naming
        the holder while one holds it; else its holder is gone, and the file is removed (under
        a shared lock, so no writer takes it meanwhile) for a fresh one. False when it cannot be
        removed (a sticky directory such as /tmp keeps other users' files)."""
        try:
            fd = _open_lease(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _HELD_ELSEWHERE:
                    who = _describe(os.pread(fd, 4096, 0).decode(errors="replace"))
                    raise WriterBusyError(
                        f"{self.out} is being written by {who}; wait for it to finish (a "
                        "second writer is refused; nothing was changed)") from None
                return False
            previous = os.pread(fd, 4096, 0).decode(errors="replace")
            try:
                if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            except PermissionError:
                raise WriterBusyError(
                    f"{self.out} has the lease file {self.path} of another user, left by "
                    f"{_describe(previous)} (that process is gone), and this user cannot remove "
                    "it from its directory; remove it, or ask its owner to") from None
            log.info("removed the stale lease of %s left by %s (another user's; that process "
                     "is gone)", self.out, _describe(previous))
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._remote is not None:
            self._remote.release()
            return
        if not self._held:
            return
        self._held = False
        key = str(self.path)
        with _GUARD:
            entry = _HELD.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[key]
            # Unlink while still locked: a waiter that opened the old file sees it replaced.
            self.path.unlink(missing_ok=True)
            os.close(entry[0])

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
