"""Bounded reading of zip-packed sets (`.zarr.zip`): every member's inflated size is checked
against what its array can hold before anything is decompressed (a 1.1 MB member inflating to
1 GiB took 3.7 GB of memory). Metadata members (`zarr.json`) may inflate to at most
`MAX_METADATA_BYTES`; a chunk or shard member to at most its array's chunk (or shard) shape
times its item size, twice over plus `SLACK_BYTES` for codec and shard-index overhead."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np

from softlabels.errors import IntegrityError

MAX_METADATA_BYTES = 1 << 20
SLACK_BYTES = 64 << 10
MAX_DIRECTORY_BYTES = 256 << 20  # about 3 million members: 50 times an ImageNet set's


def chunk_limit(zarr_json: bytes) -> int | None:
    """The most bytes one stored chunk (or shard) of the array that `zarr_json` describes may
    hold: twice its chunk shape times its item size, plus `SLACK_BYTES`; None when it is not a
    readable array (opening it says so). The one rule for zip members and objects at URLs."""
    try:
        doc = json.loads(zarr_json)
        if doc.get("node_type") != "array":
            return None
        shape = doc["chunk_grid"]["configuration"]["chunk_shape"]
        itemsize = np.dtype(doc["data_type"]).itemsize
        return stored_limit(math.prod(int(s) for s in shape) * itemsize)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def stored_limit(nbytes: int) -> int:
    """The most bytes a stored chunk (or shard) of `nbytes` decoded bytes may take: twice
    them plus `SLACK_BYTES` (codec headers, a shard's index; compressors' worst cases add
    well under 1%)."""
    return 2 * nbytes + SLACK_BYTES


def _chunk_limits(z: zipfile.ZipFile, metadata: list[zipfile.ZipInfo]) -> dict[str, int]:
    """Array folder prefix ('logits/') -> the most bytes one of its chunk members may inflate
    to, from each array's own `zarr.json`."""
    limits = {}
    for info in metadata:
        limit = chunk_limit(z.read(info))
        if limit is not None:
            limits[info.filename[:-len("zarr.json")]] = limit
    return limits


def open_zip(path: str | Path) -> zipfile.ZipFile:
    """The zip file at `path`, its central directory (the member list zipfile reads whole)
    first checked against `MAX_DIRECTORY_BYTES` (a 4 GiB file of holes claiming a 4 GiB
    directory was read to 4.9 GB); a damaged one refused in one line."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # noqa: SLF001 - the end record zipfile itself reads
        if end and end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES:  # noqa: SLF001
            raise IntegrityError(f"{path}: its zip directory claims {end[zipfile._ECD_SIZE]} "
                                 f"bytes, more than any set's takes ({MAX_DIRECTORY_BYTES}); "
                                 "the file is damaged or not a set: get a fresh copy")
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise IntegrityError(f"{path} is a damaged zip file ({exc}); get a fresh copy") from None


def check_zip_members(path: str | Path) -> None:
    """Refuse a zip-packed set with a member that would inflate past its bound."""
    with open_zip(path) as z:
        infos = z.infolist()
        metadata = [i for i in infos if i.filename.rsplit("/", 1)[-1] == "zarr.json"]
        for info in metadata:
            if info.file_size > MAX_METADATA_BYTES:
                raise IntegrityError(
                    f"{path}: the member {info.filename} inflates to {info.file_size} bytes, "
                    f"more than metadata ever takes ({MAX_METADATA_BYTES}); the file is not a "
                    "set softlabels wrote: get a fresh copy")
        limits = _chunk_limits(z, metadata)
        for info in infos:
            owner = max((p for p in limits if info.filename.startswith(p)), key=len, default=None)
            if owner is not None and info.file_size > limits[owner] and info not in metadata:
                raise IntegrityError(
                    f"{path}: the member {info.filename} inflates to {info.file_size} bytes, "
                    f"more than a chunk of {owner.rstrip('/')!r} can hold ({limits[owner]}); "
                    "the file was edited or is not a set: get a fresh copy")
