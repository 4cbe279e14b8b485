"""The writer lease of a set in an object store (`s3://`, `gs://`): an object `URL.lock`.

Object stores have no POSIX locks, so the lease is an object beside the set, created with a
conditional put (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`): of two writers only one
creates it, and the other is refused with the holder's host, pid, command and start time. The
holder renews the lease (rewrites its expiry) every `RENEW_SECONDS` and deletes it when done.

What is weaker than a local lease, and how it is handled:

- A holder killed with SIGKILL cannot delete its lease, and nothing can tell from another
  machine that it is gone. Its lease is taken over when its process is seen to be gone (same
  host name, no such pid) or once it expired: `TTL_SECONDS` after its last renewal. The refusal
  message says when that is.
- A holder stalled for longer than the expiry (a suspended laptop) may find its lease taken
  over; it notices at its next renewal (`lost`) and refuses to mark the set complete.
- Renewal is a read then a write, not a conditional write: a takeover in that instant can be
  overwritten. Both writers then write the same blocks of the same run (the set's identity is
  checked on resume), so the set stays consistent, but the second writer is not refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from softlabels.errors import TransferSetError, WriterBusyError
from softlabels.format.location import Remote

log = logging.getLogger(__name__)

TTL_SECONDS = 120.0
RENEW_SECONDS = 30.0

# Leases this process holds, by URL: [owner RemoteLease, count] (nested acquires share one).
_HELD: dict[str, list[Any]] = {}
_GUARD = threading.Lock()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _describe(h: dict[str, Any]) -> str:
    try:
        return (f"pid {h['pid']} on {h['host']} since {h['started_at']} (`{h['command']}`; "
                f"its lease expires at {h['expires_at']} unless renewed)")
    except (KeyError, TypeError):
        return "another process (its lease object holds no details)"


def _why_stale(h: dict[str, Any]) -> str | None:
    """Why the lease `h` may be taken over, or None while it is held."""
    pid = h.get("pid")
    if h.get("host") == socket.gethostname() and isinstance(pid, int) \
            and not isinstance(pid, bool):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, OverflowError, ValueError):  # no such pid (or none can be)
            return f"pid {pid} on this host is gone"
        except PermissionError:
            pass  # another user's live process
    try:
        expires = datetime.fromisoformat(h["expires_at"])
    except (KeyError, TypeError, ValueError):
        return None
    if expires.tzinfo is None:  # written without a zone: read as UTC, as this writer writes
        expires = expires.replace(tzinfo=timezone.utc)
    return f"it expired at {h['expires_at']}" if _now() > expires else None


class RemoteLease:
    """Hold the lease object of a remote output; refuse with `WriterBusyError` while another
    writer holds it."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Remote(out)
        self.lock = self.out.sibling(".lock")
        self._token = uuid.uuid4().hex
        self._owner: RemoteLease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False
        self._started = _stamp(_now())

    @property
    def lost(self) -> bool:
        owner = self._owner or self
        return owner._lost

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "command": " ".join(sys.argv) or "python",
                           "started_at": self._started, "token": self._token,
                           "expires_at": _stamp(_now() + timedelta(seconds=TTL_SECONDS))
                           }).encode()

    def acquire(self) -> RemoteLease:
        if self.out.read_only:
            raise TransferSetError(f"cannot write {self.out}: {self.out.scheme}:// is "
                                   "read-only; write to a local path, s3:// or gs://")
        with _GUARD:
            held = _HELD.get(self.out.url)
            if held is not None:
                held[1] += 1
                self._owner = held[0]
                return self
            self._take()
            _HELD[self.out.url] = [self, 1]
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name=f"softlabels-lease {self.out.url}")
        self._thread.start()
        return self

    def _take(self) -> None:
        key = self.lock.key
        for _ in range(5):
            try:
                self.out.put_new(key, self._record())
                return
            except FileExistsError:
                pass
            try:
                found = json.loads(self.out.get(key))
            except FileNotFoundError:
                continue  # released in between: try again
            except ValueError:
                found = {}
            reason = _why_stale(found) if isinstance(found, dict) else None
            if reason is None:
                raise WriterBusyError(
                    f"{self.out} is being written by {_describe(found)}; wait for it to "
                    f"finish (a second writer is refused; nothing was changed). If that "
                    f"writer was killed on another machine, its lease {self.lock} lapses at "
                    "its expiry, or delete that object yourself")
            log.warning("took over the lease %s left by %s: %s", self.lock, _describe(found),
                        reason)
            self.out.remove([key])
        raise WriterBusyError(f"could not take the lease {self.lock}: it keeps being "
                              "replaced; is another writer starting and stopping on this output?")

    def _renew(self) -> None:
        key = self.lock.key
        while not self._stop.wait(RENEW_SECONDS):
            try:
                found = json.loads(self.out.get(key))
            except FileNotFoundError:
                found = {}
            except Exception as exc:  # a transient store error: try again next time
                log.warning("could not read the lease %s: %s", self.lock, exc)
                continue
            if not isinstance(found, dict) or found.get("token") != self._token:
                self._lost = True
                log.error("the lease %s was taken over by %s; this writer stops", self.lock,
                          _describe(found))
                return
            try:
                self.out.put(key, self._record())
            except Exception as exc:
                log.warning("could not renew the lease %s: %s", self.lock, exc)

    def release(self) -> None:
        with _GUARD:
            held = _HELD.get(self.out.url)
            owner = self._owner or self
            if held is None or held[0] is not owner:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[self.out.url]
        owner._stop.set()
        if owner._thread is not None:
            owner._thread.join()
        try:
            found = json.loads(self.out.get(self.lock.key))
            if isinstance(found, dict) and found.get("token") == owner._token:
                self.out.remove([self.lock.key])
        except (FileNotFoundError, ValueError):
            pass


def remote_holder(out: str | os.PathLike[str]) -> str | None:
    """Who holds the lease on the remote output `out`, in words, or None."""
    remote = Remote(out)
    with _GUARD:
        if remote.url in _HELD:
            return "this process"
    if remote.read_only:
        return None
    try:
        found = json.loads(remote.get(remote.sibling(".lock").key))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(found, dict) or _why_stale(found) is not None:
        return None
    return _describe(found)
