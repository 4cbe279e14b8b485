"""The local chunk cache of remote sets (`train --cache DIR`, `SOFTLABELS_CACHE`), bounded.

Layout: `DIR/<url key>/<set key>/` holds one set's objects as a Zarr `LocalStore`, where the url
key hashes the set's URL and the set key its root `zarr.json` (a set replaced at the same URL
gets a new folder, so it is never served another set's objects).

When a set is opened through the cache:
- the folders of sets that replaced it or that it replaced at the same URL are removed;
- whole folders of other sets are removed, least recently opened first, until the cache holds
  at most its bound (`SOFTLABELS_CACHE_MAX_BYTES`, `train --cache-max-bytes`; by default half
  of the free disk space at DIR, counting what the cache holds as free, and at most 64 GiB);
- this process then adds objects while the cache is under its bound, and past it reads
  uncached. It does not evict objects of the set it reads: epochs read a set in a cycle, where
  evicting the least recently used object evicts the next one needed; caching what fits keeps
  that share of every epoch local.
Several processes reading through one cache (DataLoader workers, ranks) each re-measure the
cache after adding `REMEASURE_BYTES`, so together they overshoot by at most that much each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from softlabels.errors import SoftlabelsError, UnsafePathError
from softlabels.safe_write import own_folder

log = logging.getLogger(__name__)

MAX_BYTES_ENV = "SOFTLABELS_CACHE_MAX_BYTES"
DEFAULT_CAP = 64 << 30  # the default bound never exceeds this...
DEFAULT_FREE_SHARE = 0.5  # ...nor this share of the free disk (plus what the cache holds)
REMEASURE_BYTES = 64 << 20
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'500000', '512M', '20G', '1.5T' (binary units, case-insensitive, optional 'iB'/'B')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise SoftlabelsError(f"a cache size must be a number of bytes such as 500000, 512M or "
                              f"20G; got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under `path` (0 when it is gone, even midway)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def max_bytes(cache: str, held: int | None = None) -> int:
    """The cache's bound: `SOFTLABELS_CACHE_MAX_BYTES` when set, else half of the free disk
    space at `cache` plus what the cache holds (`held`, measured when not given), at most
    `DEFAULT_CAP`."""
    given = os.environ.get(MAX_BYTES_ENV)
    if given:
        return parse_bytes(given)
    held = cache_bytes(cache) if held is None else held
    return min(DEFAULT_CAP, int((shutil.disk_usage(cache).free + held) * DEFAULT_FREE_SHARE))


def _ours(folder: Path, digits: int) -> bool:
    """Whether `folder` is named as the cache names its folders (`digits` hex digits), so a
    cache directory shared with other files (`--cache ~/.cache`) never has those removed."""
    return (bool(re.fullmatch(f"[0-9a-f]{{{digits}}}", folder.name)) and folder.is_dir()
            and not folder.is_symlink())


def set_folders(cache: str) -> list[Path]:
    """Every set's folder in the cache: `<url key>/<set key>` (16 hex digits each), and a
    folder of the older flat layout (24 hex digits, a set's root `zarr.json` directly inside).
    Nothing else in the directory is the cache's."""
    found = []
    for top in Path(cache).iterdir() if os.path.isdir(cache) else []:
        if _ours(top, 24) and (top / "zarr.json").exists():
            found.append(top)
        elif _ours(top, 16):
            try:  # another process may be evicting it meanwhile
                found += [d for d in top.iterdir() if _ours(d, 16)]
            except OSError:
                pass
    return found


def cache_bytes(cache: str) -> int:
    """Bytes held by the cache's own folders (`set_folders`), not by other files there."""
    return sum(folder_bytes(f) for f in set_folders(cache))


def prepare(cache: str, url: str, root: bytes) -> tuple[str, int]:
    """The folder caching the set at `url` whose root `zarr.json` is `root`, and the bytes this
    process may add to the cache: other versions of the set at `url` removed, then other sets
    least recently opened first until the cache is within its bound."""
    os.makedirs(cache, exist_ok=True)
    url_folder = Path(cache) / hashlib.sha256(url.encode()).hexdigest()[:16]
    folder = url_folder / hashlib.sha256(root).hexdigest()[:16]
    own_folder(url_folder)  # names are predictable from the URL: never a planted link
    own_folder(folder)
    if url_folder.is_dir():
        for old in url_folder.iterdir():  # the set at this URL was replaced: never read again
            if old != folder:
                log.info("removing the cache of a replaced set at %s (%s)", url, old)
                shutil.rmtree(old, ignore_errors=True)
    for attempt in range(3):  # another process may evict the new folder meanwhile
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.utime(folder)  # opened now: the last to be evicted
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    used = cache_bytes(cache)
    bound = max_bytes(cache, used)
    while used > bound:
        freed = evict_oldest(cache, keep=folder)
        if not freed:
            break
        used -= freed
    return str(folder), bound - used


def evict_oldest(cache: str, *, keep: Path | str) -> int:
    """Remove the least recently opened set folder other than `keep`; the bytes it held (0
    when there is none)."""
    others = [f for f in set_folders(cache) if f != Path(keep)]
    if not others:
        return 0
    oldest = min(others, key=_last_opened)
    size = folder_bytes(oldest)
    log.info("evicting the cache folder %s (%d bytes) to keep %s within its bound", oldest,
             size, cache)
    shutil.rmtree(oldest, ignore_errors=True)
    try:  # another process may be filling or evicting it meanwhile: then it stays
        if oldest.parent != Path(cache) and not any(oldest.parent.iterdir()):
            oldest.parent.rmdir()
    except OSError:
        pass
    return size


def _last_opened(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return 0.0


def bounded_cache_store(remote: Any, cache: str, folder: str, room: int) -> Any:
    """A Zarr store reading `remote` through a `LocalStore` at `folder`, adding objects while
    the cache at `cache` has room (`room` bytes at opening; re-measured as it fills), and
    evicting other sets' folders, least recently opened first, to make room."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest
    from zarr.storage import WrapperStore

    from softlabels.format.local_files import LocalFiles

    local = LocalFiles(folder)

    class BoundedCache(WrapperStore):  # type: ignore[misc,type-arg]
        """Whole objects cached on local disk while there is room; a byte range is cut from
        the whole object, cached or just fetched (a shard is read whole once)."""

        def __init__(self) -> None:
            super().__init__(remote)
            self.room, self.added, self.full = room, 0, room <= 0
            self.warned = False

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            value = await local.get(key, prototype, byte_range)
            if value is not None:
                return value
            if byte_range is not None and self.full:  # nothing more is cached: a range will do
                return await remote.get(key, prototype, byte_range)
            whole = await remote.get(key, prototype)
            # reserved before the await: the reads of one block run concurrently
            if whole is not None and _own_path(key) and self._reserve(len(whole)):
                try:
                    await local.set(key, whole)
                except OSError as exc:  # a full or read-only disk, a folder evicted meanwhile:
                    (log.info if self.warned else log.warning)(  # read on, said once
                        "not caching %s in %s (%s)", key, folder, exc)
                    self.full = self.warned = True
            elif whole is not None:
                self.full = True
            return whole if whole is None or byte_range is None else _cut(whole, byte_range)

        def _reserve(self, size: int) -> bool:
            """Count `size` more bytes as added, if the cache has room for them."""
            if self.added >= REMEASURE_BYTES:  # other processes may have filled or emptied it
                held = cache_bytes(cache)
                self.room, self.added = max_bytes(cache, held) - held, 0
            while self.added + size > self.room:
                freed = evict_oldest(cache, keep=folder)  # another set's folder, if any
                if not freed:
                    return False
                self.room += freed
            self.added += size
            return True

    def _own_path(key: str) -> bool:
        """Whether every folder from `folder` down to `key`'s is a real directory of ours (a
        link planted inside the set's folder would send the object elsewhere); said once."""
        here = Path(folder)
        try:
            for part in [""] + key.split("/")[:-1]:
                here = here / part if part else here
                own_folder(here)
        except UnsafePathError as exc:
            log.warning("not caching %s: %s", key, exc)
            return False
        return True

    def _cut(whole: Any, byte_range: Any) -> Any:
        n = len(whole)
        if isinstance(byte_range, RangeByteRequest):
            return whole[byte_range.start:min(byte_range.end, n)]
        if isinstance(byte_range, OffsetByteRequest):
            return whole[byte_range.offset:]
        return whole[max(0, n - byte_range.suffix):]  # SuffixByteRequest

    return BoundedCache()
