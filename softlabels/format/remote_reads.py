"""Bounded reading at a URL: every object read from a web server or an object store has a size
bound, checked before its body is held, and every request a whole-request deadline.

- Size: a metadata object (`zarr.json`, a lease `*.lock`) may hold at most
  `MAX_METADATA_BYTES` (1 MiB); a chunk or shard of an array at most twice its chunk (shard)
  shape times its item size plus `SLACK_BYTES`, learned from the array's own `zarr.json` as it
  is read (the bounds of zip members, `zip_bounds`); an object of an array not yet described,
  `MAX_OBJECT_BYTES`. Over http the body is streamed and cut at the bound (a server sending an
  endless `zarr.json` grew memory without end until the deadline); S3 answers are refused on
  their declared length before the body is read.
- Time: over http aiohttp's total timeout ends each request (connect, first byte, body) within
  T = `--timeout`; on S3 and GCS each call of the store library is awaited for at most T, and
  each whole read for at most T, where botocore's read timeout restarted at each byte.

`bound_reads(fs)` installs both on an fsspec filesystem instance (once; instances are shared)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from softlabels.errors import TransferSetError
from softlabels.format.zip_bounds import MAX_METADATA_BYTES, chunk_limit
from softlabels.redact import redact

MAX_OBJECT_BYTES = 1 << 30
METADATA_NAMES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
_READ_BLOCK = 1 << 16


class ReadBounds:
    """The most bytes each object may hold, by its path (see the module's docstring)."""

    def __init__(self) -> None:
        self.chunk_limits: dict[str, int] = {}  # an array's path + '/' -> bytes per object

    def limit(self, path: str, start: int | None = None, end: int | None = None) -> int:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name in METADATA_NAMES or name.endswith(".lock"):
            bound = MAX_METADATA_BYTES
        else:
            owner = max((p for p in self.chunk_limits if path.startswith(p)), key=len,
                        default=None)
            bound = self.chunk_limits[owner] if owner is not None else MAX_OBJECT_BYTES
        if start is not None and start < 0:  # the last -start bytes
            return min(bound, -start)
        if end is not None and end >= 0 and (start or 0) >= 0:
            return min(bound, max(end - (start or 0), 0))
        return bound

    def learn(self, path: str, data: bytes) -> None:
        """Note the object bound of the array whose `zarr.json` was just read."""
        limit = chunk_limit(data) if path.endswith("zarr.json") else None
        if limit is not None:
            self.chunk_limits[path[:-len("zarr.json")]] = limit


def too_large(path: str, limit: int, declared: int | None = None) -> TransferSetError:
    said = f"declared {declared} bytes" if declared is not None else "sent more bytes"
    what = ("metadata ever takes" if limit == MAX_METADATA_BYTES else
            "an object of this set can hold")
    return TransferSetError(
        f"{redact(path)}: the server {said}, more than {what} ({limit} bytes); it was cut "
        "there and nothing was kept. The URL does not serve a set softlabels wrote (or the "
        "server is broken): check the URL")


def bound_reads(fs: Any, timeout_s: Callable[[], float]) -> Any:
    """`fs` with its whole-object reads size-bounded and its requests under the deadline
    `timeout_s()` (seconds, read at each request)."""
    if getattr(fs, "_softlabels_bounds", None) is not None:
        return fs
    from fsspec.asyn import sync_wrapper

    bounds = ReadBounds()
    fs._softlabels_bounds = bounds
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("http", "https"):
        cat = functools.partial(_http_cat, fs, bounds)
    else:
        cat = functools.partial(_deadline_cat, fs._cat_file, bounds, timeout_s)
        _deadline_calls(fs, bounds, timeout_s)
    fs._cat_file = cat
    fs.cat_file = sync_wrapper(cat, obj=fs)
    return fs


async def _http_cat(fs: Any, bounds: ReadBounds, url: str, start: int | None = None,
                    end: int | None = None, **kwargs: Any) -> bytes:
    """fsspec's HTTPFileSystem._cat_file, with the body streamed and cut at its bound."""
    limit = bounds.limit(url, start, end)
    kw = fs.kwargs.copy()
    kw.update(kwargs)
    if start is not None or end is not None:
        if start == end:
            return b""
        headers = kw.pop("headers", {}).copy()
        headers["Range"] = await fs._process_limits(url, start, end)
        kw["headers"] = headers
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), **kw) as r:
        fs._raise_not_found_for_status(r, url)
        if r.content_length is not None and r.content_length > limit:
            raise too_large(url, limit, r.content_length)
        out = bytearray()
        async for block in r.content.iter_chunked(_READ_BLOCK):
            out += block
            if len(out) > limit:
                raise too_large(url, limit)
    data = bytes(out)
    bounds.learn(url, data)
    return data


async def _deadline_cat(cat: Any, bounds: ReadBounds, timeout_s: Any, path: str,
                        start: int | None = None, end: int | None = None, **kwargs: Any
                        ) -> bytes:
    """An object store's _cat_file within the deadline, its size checked (S3 also checks the
    declared length before the body is read: `_deadline_calls`)."""
    data = await asyncio.wait_for(cat(path, start=start, end=end, **kwargs), timeout_s())
    limit = bounds.limit(path, start, end)
    if len(data) > limit:
        raise too_large(path, limit)
    bounds.learn(path, data)
    return data


def _deadline_calls(fs: Any, bounds: ReadBounds, timeout_s: Any) -> None:
    """Each call of s3fs (`_call_s3`) or gcsfs (`_call`) within the deadline; an S3 object
    whose declared length is past its bound is refused before its body is read."""
    if hasattr(fs, "_call_s3"):
        call_s3 = fs._call_s3

        async def bounded_call_s3(method: Any, *args: Any, **kwargs: Any) -> Any:
            resp = await asyncio.wait_for(call_s3(method, *args, **kwargs), timeout_s())
            if method == "get_object" and isinstance(resp, dict):
                path = f"{kwargs.get('Bucket')}/{kwargs.get('Key')}"
                limit = bounds.limit(path)
                declared = resp.get("ContentLength")
                if isinstance(declared, int) and declared > limit:
                    resp["Body"].close()
                    raise too_large(f"s3://{path}", limit, declared)
            return resp

        fs._call_s3 = bounded_call_s3
    elif hasattr(fs, "_call"):
        call = fs._call

        async def bounded_call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.wait_for(call(*args, **kwargs), timeout_s())

        fs._call = bounded_call
