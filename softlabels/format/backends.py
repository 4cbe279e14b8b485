"""Which backend holds a set, and opening it: `open_store(path or URL)` returns the `Store`
(store.py) of a local Zarr directory, a zip-packed Zarr, an HDF5 file, or a set at a URL."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from softlabels.errors import TransferSetError
from softlabels.format._hdf5 import HDF5Store
from softlabels.format._zarr import ZarrStore
from softlabels.format.location import Remote, deadline_errors, is_url
from softlabels.format.store import Mode, Store
from softlabels.format.zip_bounds import open_zip


def backend_of(path: str | os.PathLike[str]) -> str:
    """'hdf5' for *.h5/*.hdf5, 'zarr-zip' for *.zarr.zip, else 'zarr'. A writer's path beside
    an output (`OUT.partial`, `OUT.creating`, ...; see `aside`) has its output's backend."""
    name = str(path).rstrip("/").lower()
    for staging in (".creating", ".partial", ".packing", ".removing"):
        name = name.removesuffix(staging)
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    return "zarr-zip" if name.endswith(".zip") else "zarr"


def open_store(path: str | os.PathLike[str], mode: Mode = "r", *,
               backend: str | None = None, meta: dict[str, Any] | None = None,
               cache: str | None = None) -> Store:
    """Open or create a store; the backend follows the path's suffix unless `backend` names
    it (a staging path such as `OUT.h5.partial` is written as its final name's backend).

    `path` may be a URL (`s3://`, `gs://`, `https://`; see `location`). `meta`: the metadata
    a new Zarr group ("w") is created with. `cache`: a local directory caching a remote set's
    chunks (mode "r")."""
    if is_url(path):
        remote = Remote(path)
        with deadline_errors(remote):  # a server past its deadline: one line naming it
            return _open_remote(remote, mode, backend=backend, meta=meta, cache=cache)
    p = Path(path)
    if mode != "w" and not p.exists():
        raise TransferSetError(f"no transfer set at {p}: the path does not exist")
    if p.exists() and not p.is_dir() and not p.is_file():  # opening a fifo waits for a
        # writer; a device reads on and on (zipfile held 4 GB of /dev/urandom)
        raise TransferSetError(f"{p} is not a regular file or a folder (a fifo or a device), "
                               f"so not a transfer set; {_WHAT_A_SET_IS}")
    if mode == "r":  # a reader: say what the path is (writers have their own refusals)
        refuse_what_is_not_a_set(p, backend or backend_of(p))
    if (backend or backend_of(p)) == "hdf5":
        return HDF5Store(p, mode)
    if mode != "w" and p.is_dir() and not (p / "zarr.json").exists():
        raise TransferSetError(f"{p} is a directory but not a Zarr v3 group (no zarr.json)")
    try:
        return ZarrStore(p, mode, meta=meta)
    except ValueError as exc:  # a garbled zarr.json (json.JSONDecodeError) or metadata
        raise TransferSetError(f"{p} is not a readable Zarr group: its metadata is damaged "
                               f"({str(exc).splitlines()[0]}); restore the set from its "
                               "source, or make it again with `softlabels precompute`") from None


_WHAT_A_SET_IS = ("a transfer set is a DIR.zarr folder, a FILE.zarr.zip or a FILE.h5; give the "
                  "path of one, or make one with `softlabels precompute`")


def refuse_what_is_not_a_set(p: Path, backend: str) -> None:
    """Say what `p` is when it cannot be a transfer set of `backend` (a random file, an empty
    folder, a zip or HDF5 file of something else), rather than "its metadata is damaged"."""
    if backend == "hdf5":
        if p.is_file() and not _is_hdf5(p):
            raise TransferSetError(f"{p} is not an HDF5 file (no HDF5 signature), so not a "
                                   f"transfer set (or one damaged from its first byte); "
                                   f"{_WHAT_A_SET_IS}")
        return
    if p.is_dir():
        if not (p / "zarr.json").exists():
            what = "an empty folder" if not any(p.iterdir()) else "a folder without zarr.json"
            raise TransferSetError(f"{p} is {what}, not a transfer set; {_WHAT_A_SET_IS}")
        return
    if backend == "zarr-zip":
        if not zipfile.is_zipfile(p):
            raise TransferSetError(f"{p} is not a zip file, so not a zip-packed transfer set; "
                                   f"{_WHAT_A_SET_IS}")
        with open_zip(p) as z:
            if "zarr.json" not in z.namelist():
                raise TransferSetError(f"{p} is a zip file without zarr.json at its root, not "
                                       f"a transfer set; {_WHAT_A_SET_IS}")
        return
    kind = "a zip file" if zipfile.is_zipfile(p) else "an HDF5 file" if _is_hdf5(p) else "a file"
    raise TransferSetError(f"{p} is {kind}, not a transfer set; {_WHAT_A_SET_IS}")


def _is_hdf5(p: Path) -> bool:
    """Whether `p` starts with the HDF5 signature at one of the offsets HDF5 allows."""
    try:
        with open(p, "rb") as f:
            for offset in (0, 512, 1024, 2048, 4096):
                f.seek(offset)
                if f.read(8) == b"\x89HDF\r\n\x1a\n":
                    return True
    except OSError:
        return False
    return False


def _open_remote(remote: Remote, mode: Mode, *, backend: str | None,
                 meta: dict[str, Any] | None, cache: str | None) -> Store:
    if mode != "w" and not remote.exists():
        raise TransferSetError(f"no transfer set at {remote}: nothing is stored at that URL")
    if (backend or backend_of(remote.url)) == "hdf5":
        return HDF5Store(remote, mode)
    if mode != "w" and not remote.is_dir_like():
        raise TransferSetError(f"{remote} is one object, not a Zarr v3 group (no "
                               f"{remote}/zarr.json)")
    try:
        return ZarrStore(remote, mode, meta=meta, cache=cache)
    except FileNotFoundError:
        raise TransferSetError(f"{remote} is not a Zarr v3 group (no zarr.json at that URL)"
                               ) from None
    except ValueError as exc:
        remote.drop_cache()  # damaged in the local cache: fetched again next time
        raise TransferSetError(f"{remote} is not a readable Zarr group: its metadata is "
                               f"damaged ({str(exc).splitlines()[0]}); restore the set from its "
                               "source, or make it again with `softlabels precompute`") from None
