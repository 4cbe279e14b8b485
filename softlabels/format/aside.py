"""Writing beside an output: the paths a writer uses next to `OUT`, and what it may delete.

Every path here is derived from the output's name, and only a writer holding the output's lease
(see `lease`) creates or removes them:

- `OUT.creating`: a new set is laid out here (arrays, metadata) and renamed to `OUT`, so whatever
  sits at `OUT` always carries its metadata (a set, complete or being written).
- `OUT.partial`: `merge`, `convert` and `subset` write their whole output here and rename it to
  `OUT` once it is complete; a zip target is packed from it into `OUT.packing`, then renamed.
- `OUT.removing`: `--overwrite` first renames the old set here (atomic), then deletes it.

A rerun removes any of these left by a killed run. `--overwrite` removes only a transfer set or a
partial one, never an ordinary file, a directory that is not a set, or a symbolic link.

An object store has no rename: a set at a URL is written in place (see `writer`), and removing
one first marks it `writing`, then deletes its `block_done`, its other objects, and its root
`zarr.json` last, so a kill mid-delete leaves a set no reader accepts and a rerun lays out again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from softlabels.errors import TransferSetError, WriterBusyError
from softlabels.format import schema as S
from softlabels.format.backends import backend_of, open_store
from softlabels.format.location import Remote, is_url

log = logging.getLogger(__name__)

CREATING, PARTIAL, PACKING, REMOVING = ".creating", ".partial", ".packing", ".removing"
STAGING_SUFFIXES = (CREATING, PARTIAL, PACKING, REMOVING)


def beside(out: Path, suffix: str) -> Path:
    """The path `OUT{suffix}` next to `out`."""
    return out.with_name(out.name + suffix)


def _is_set(path: Path, backend: str) -> bool:
    """Whether `path` holds softlabels metadata (a transfer set, complete or not)."""
    if path.is_dir() and not (path / "zarr.json").is_file():
        return False
    try:
        with open_store(path, "r", backend=backend) as store:
            return isinstance(store.get_meta(), dict)
    except WriterBusyError:
        raise  # open in another writer: say so rather than "not a set"
    except Exception:  # unreadable: not something we can prove is ours
        return False


def remove_set(path: Path | str, *, backend: str | None = None,
               what: str = "--overwrite") -> None:
    """Delete the transfer set (or partial one) at `path`; refuse anything else.

    The set is first renamed aside (atomic), so a kill mid-delete never leaves a half-deleted
    set at `path`; the rename target is removed by the next run."""
    if is_url(path):
        _remove_remote(Remote(path), what)
        return
    path = Path(path)
    backend = backend or backend_of(path)
    if path.is_symlink():
        raise TransferSetError(f"refusing {what} on {path}: it is a symbolic link (to "
                               f"{os.readlink(path)}); name the set's real path, or remove the "
                               "link yourself")
    if not path.exists():
        return
    empty_dir = path.is_dir() and not any(path.iterdir())
    if not empty_dir and not _is_set(path, backend):
        kind = "a directory" if path.is_dir() else "a file"
        raise TransferSetError(f"refusing {what} on {path}: it is {kind} that is not a "
                               "softlabels transfer set; choose another --out, or remove it "
                               "yourself")
    gone = beside(path, REMOVING)
    _delete(gone)
    os.rename(path, gone)
    _delete(gone)


def _remove_remote(remote: Remote, what: str) -> None:
    """Delete the Zarr set at a URL: marked `writing`, `block_done` first, `zarr.json` last."""
    if not remote.exists():
        return
    try:
        with open_store(remote.url, "r") as store:
            meta = store.get_meta()
    except WriterBusyError:
        raise
    except Exception:
        meta = None
    if not isinstance(meta, dict):
        raise TransferSetError(f"refusing {what} on {remote}: it holds objects that are not a "
                               "softlabels transfer set; choose another --out, or remove them "
                               "yourself")
    if meta.get("status") != S.STATUS_WRITING:
        with open_store(remote.url, "r+") as store:
            store.set_meta({**meta, "status": S.STATUS_WRITING})
    keys = remote.listing()
    root = remote.child("zarr.json")
    done = remote.child(S.BLOCK_DONE) + "/"
    remote.remove([k for k in keys if k.startswith(done)])
    remote.remove([k for k in keys if k != root and not k.startswith(done)])
    remote.remove([root])


def _delete(path: Path) -> None:
    """Remove a path of ours (a staging path); never follows a link. A Zarr directory loses its
    root `zarr.json` last, so a kill mid-delete leaves something still recognisably a set."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        for child in path.iterdir():
            if child.name != "zarr.json":
                _delete(child)
        (path / "zarr.json").unlink(missing_ok=True)
        path.rmdir()


def _ours(path: Path, suffix: str) -> bool:
    """Whether `path` is what a softlabels writer leaves at `OUT{suffix}`."""
    if path.is_symlink() or (path.is_dir() and not any(path.iterdir())):
        return True  # a link is removed itself; an empty directory holds nothing
    if _is_set(path, backend_of(path)):
        return True
    if suffix == CREATING and path.is_dir():  # laid out before its metadata was written
        return (path / "zarr.json").is_file()
    if suffix == CREATING and path.is_file():
        return _head(path, 8) in (b"\x89HDF\r\n\x1a\n", b"")
    if suffix == PACKING and path.is_file():  # a zip being packed
        return _head(path, 4) in (b"PK\x03\x04", b"")
    return False


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def clear_staging(out: Path) -> None:
    """Remove what a killed writer of `out` left beside it (call holding the lease); refuse to
    touch anything at those names that a writer did not leave."""
    for suffix in STAGING_SUFFIXES:
        stale = beside(out, suffix)
        if not (stale.exists() or stale.is_symlink()):
            continue
        if not _ours(stale, suffix):
            raise TransferSetError(f"{stale} is in the way of writing {out}, and it is not "
                                   "something softlabels left (not a transfer set); move it")
        log.info("removing %s, left by a killed writer", stale)
        _delete(stale)


def publish(staged: Path, out: Path) -> None:
    """Rename a finished `staged` path to `out`, which must not exist (atomic on one
    filesystem: readers see nothing, or the whole output)."""
    if out.exists() or out.is_symlink():
        raise TransferSetError(f"{out} appeared while it was being written; nothing was "
                               f"replaced (the finished output is at {staged})")
    os.rename(staged, out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
