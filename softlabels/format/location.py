"""Where a transfer set lives when it is not a local path: a URL in an object store (`s3://`,
`gs://`) or on a web server (`https://`, `http://`, read-only).

A `Remote` is the one object the store, writer, lease and set operations use instead of a
`pathlib.Path` for such a set: it names the set, opens it as a Zarr store (zarr's
`FsspecStore`) or as a file object for h5py, and does the few whole-object operations the
writer needs (a conditional put for the lease, deleting objects, listing a prefix).

The fsspec backends are optional extras (`pip install 'softlabels[s3]'`, `[gcs]`, `[http]`);
a URL whose extra is missing is refused in one line naming it. Credentials and the endpoint
come from each library's standard configuration (for S3: `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `~/.aws/*`; for GCS:
`GOOGLE_APPLICATION_CREDENTIALS`, `gcloud` defaults, `STORAGE_EMULATOR_HOST`); softlabels adds
no variables of its own for them.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from softlabels.errors import SoftlabelsError, TransferSetError
from softlabels.format.remote_reads import bound_reads
from softlabels.redact import redact

log = logging.getLogger(__name__)

# scheme -> (fsspec protocol, module the extra installs, extra's name)
_SCHEMES = {"s3": ("s3", "s3fs", "s3"), "s3a": ("s3", "s3fs", "s3"),
            "gs": ("gcs", "gcsfs", "gcs"), "gcs": ("gcs", "gcsfs", "gcs"),
            "http": ("http", "aiohttp", "http"), "https": ("https", "aiohttp", "http")}
READ_ONLY_SCHEMES = ("http", "https")
CACHE_ENV = "SOFTLABELS_CACHE"  # a local directory: chunk cache for remote reads (train --cache)
TIMEOUT_ENV = "SOFTLABELS_TIMEOUT"  # seconds: the deadline of one request (`--timeout`)
DEFAULT_TIMEOUT_S = 60.0  # a server that has not answered a request in full by then has failed
PROBE_TIMEOUT_S = 5  # the connect probe's wait; past it, the store library decides
# where each library takes its endpoint from, for the "cannot reach" messages
_ENDPOINT_HINT = {"s3": "AWS_ENDPOINT_URL, ~/.aws", "gcs": "STORAGE_EMULATOR_HOST, gcloud"}


def timeout_s() -> float:
    """The deadline of one network request, in seconds: connecting, the first byte and the
    whole object together (`--timeout`, `SOFTLABELS_TIMEOUT`, default 60)."""
    given = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(given) if given else DEFAULT_TIMEOUT_S
    except ValueError:
        raise SoftlabelsError(f"{TIMEOUT_ENV}={given!r} is not a number of seconds; set it to "
                              "e.g. 60") from None
    if not value > 0:
        raise SoftlabelsError(f"{TIMEOUT_ENV}={given!r}: the network deadline must be a "
                              "positive number of seconds, e.g. 60")
    return value


def is_timeout(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is a network wait that ran past its deadline."""
    seen = 0
    while exc is not None and seen < 8:
        name = type(exc).__name__
        if isinstance(exc, TimeoutError) or "Timeout" in name:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@contextmanager
def deadline_errors(remote: Remote) -> Iterator[None]:
    """Turn a request that ran past its deadline, wherever it surfaces (aiohttp, botocore,
    fsspec, zarr), into one line naming the server and the wait."""
    try:
        yield
    except SoftlabelsError:
        raise
    except Exception as exc:
        if is_timeout(exc):
            raise TransferSetError(remote.no_answer(exc)) from None
        raise


S3FS_RETRIES = 2  # s3fs's own retry loop around botocore's (its default: 5)


def bound_retries(fs: Any) -> Any:
    """`fs` with s3fs's retry loop bounded (a class attribute, not an option it takes)."""
    if type(fs).__module__.startswith("s3fs") and getattr(fs, "retries", 0) > S3FS_RETRIES:
        fs.retries = S3FS_RETRIES
    return fs


def scheme_of(path: object) -> str | None:
    """The URL scheme of `path` ('s3', 'gs', 'https', ...), or None for a local path."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or "://" not in text:
        return None
    return text.split("://", 1)[0].lower()


def is_url(path: object) -> bool:
    """Whether `path` names a remote set (a URL with a scheme), not a local path."""
    return scheme_of(path) is not None


class Remote:
    """A set's location in an object store or on a web server, by its URL."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        url = os.fspath(url).rstrip("/")
        scheme = scheme_of(url)
        if scheme not in _SCHEMES:
            known = ", ".join(f"{s}://" for s in ("s3", "gs", "https", "http"))
            raise TransferSetError(f"{url}: unknown URL scheme {scheme}://; transfer sets are "
                                   f"read from {known} or a local path")
        self.url, self.scheme = url, scheme
        self.protocol, self.module, self.extra = _SCHEMES[scheme]
        self.read_only = scheme in READ_ONLY_SCHEMES
        self._fs: Any = None
        self.cache_folder: str | None = None  # the local chunk cache zarr_store reads through

    def __str__(self) -> str:
        """The URL as shown and recorded: credentials in it redacted (`redact`)."""
        return redact(self.url)

    def __repr__(self) -> str:
        return f"Remote({str(self)!r})"

    # --- the filesystem -----------------------------------------------------------------
    def _require(self) -> None:
        try:
            importlib.import_module(self.module)
        except ImportError:
            raise SoftlabelsError(
                f"{self}: {self.scheme}:// needs the optional package {self.module}; "
                f"install it with `pip install 'softlabels[{self.extra}]'`") from None

    @property
    def fs(self) -> Any:
        """The synchronous fsspec filesystem of this URL (created once, after `probe`)."""
        if self._fs is None:
            self._require()
            self.probe()
            import fsspec

            self._fs = bound_reads(bound_retries(fsspec.filesystem(self.protocol,
                                                                   **self._options())),
                                   timeout_s)
        return self._fs

    def endpoint(self) -> tuple[str, int] | None:
        """(host, port) this URL's requests go to, where the environment names it: the URL's
        own host for http(s), `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for s3,
        `STORAGE_EMULATOR_HOST` for gs; None when the library resolves it (AWS's regional
        endpoints, ~/.aws/config, Google's)."""
        if self.read_only:
            url = self.url
        elif self.protocol == "s3":
            url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        else:
            url = os.environ.get("STORAGE_EMULATOR_HOST")
        if not url:
            return None
        parts = urlsplit(url if "://" in url else f"http://{url}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        return (parts.hostname, port) if parts.hostname else None

    def probe(self) -> None:
        """Refuse at once an endpoint where nothing listens (the connection is refused), which
        the store libraries would otherwise retry for many seconds (botocore: about 12 s at an
        idle machine) before failing. Only a refusal is final: a timeout, a name that does not
        resolve yet or a slow network is left to the libraries' own retries."""
        where = self.endpoint()
        if where is None or (not self.read_only and _proxied(where[0])):
            return  # an object store's requests go through a proxy: a direct refusal says nothing
        try:
            socket.create_connection(where, timeout=PROBE_TIMEOUT_S).close()
        except ConnectionRefusedError:
            raise TransferSetError(
                f"cannot reach {self}: nothing answers at {where[0]}:{where[1]} (connection "
                f"refused); check the network and the endpoint "
                f"({_ENDPOINT_HINT.get(self.protocol, 'the URL')})") from None
        except OSError:
            pass  # not final: the libraries retry

    def _options(self) -> dict[str, Any]:
        """fsspec storage options. For s3, `max_concurrency=1`: s3fs asks an object's size (a
        HEAD) before each whole-object GET, to split objects past its 50 MiB block size into
        concurrent ranges; chunks are about 1 MiB, so a chunk then costs one round trip, not two
        (measured: 8 requests a block instead of 4, at 20 ms each). Every store gets the
        deadline `timeout_s()` (T): http(s) a session of our own (not a cached one shared
        across servers) whose every request, body included, ends within T, so a server sending
        a byte now and then fails too; s3 connects within min(T, 10) s, waits at most T / 2 for
        each read, and tries a request twice (botocore) twice (s3fs, `bound_retries`), about
        T in all (2T at most when connecting stalls too) where it retried for minutes; gcs
        ends each request within T."""
        t = timeout_s()
        if self.protocol == "s3":
            return {"max_concurrency": 1,
                    "config_kwargs": {"connect_timeout": min(t / 4, 10.0), "read_timeout": t / 4,
                                      "retries": {"total_max_attempts": 2}}}
        if not self.read_only:
            return {"requests_timeout": t}
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=t, sock_connect=t, sock_read=t)
        return {"skip_instance_cache": True, "client_kwargs": {"timeout": timeout}}

    def no_answer(self, exc: BaseException) -> str:
        """The one line for a request that ran past its deadline, naming the server."""
        where = self.endpoint()
        server = f"{where[0]}:{where[1]}" if where else f"the {self.scheme}:// endpoint"
        return (f"no answer from {server} for {self} within {timeout_s():g} s "
                f"({type(exc).__name__}); check the network and the endpoint, or allow "
                f"longer with --timeout SECONDS")

    @property
    def key(self) -> str:
        """The path the filesystem knows (`bucket/prefix/set.zarr`; the URL for http)."""
        return self.url if self.read_only else self.url.split("://", 1)[1]

    def child(self, name: str) -> str:
        return f"{self.key}/{name}"

    def sibling(self, suffix: str) -> Remote:
        """The URL `URL{suffix}` beside this one (the lease object `URL.lock`)."""
        self.require_prefix()
        return Remote(self.url + suffix)

    def require_prefix(self) -> None:
        """Refuse a URL naming a whole bucket (`s3://bucket`): a set is written under a prefix
        in it, and its lease object beside that prefix (`s3://bucket.lock` is another bucket)."""
        if not self.read_only and "/" not in self.key.strip("/"):
            raise TransferSetError(f"{self} names a whole bucket; name a set inside it, e.g. "
                                   f"{self}/NAME.zarr")

    # --- opening --------------------------------------------------------------------------
    def zarr_store(self, *, read_only: bool, cache: str | None = None) -> Any:
        """zarr's FsspecStore at this URL; with `cache` (a local directory), read through a
        bounded local cache (`chunk_cache`): a `LocalStore` under a folder named after the set's
        URL and root metadata, so a set replaced at the same URL never reads another set's
        cached objects (a complete set is never rewritten in place). LocalStore writes each
        cached object aside and renames it, so concurrent readers never see half an object."""
        self._require()
        from zarr.storage import FsspecStore

        remote = FsspecStore.from_url(self.url, storage_options=self._options() or None,
                                      read_only=read_only)
        bound_reads(bound_retries(remote.fs), timeout_s)  # sizes and whole-request deadlines
        if cache is None or not read_only:
            return remote
        from softlabels.format.chunk_cache import bounded_cache_store, prepare

        cache = os.path.abspath(cache)
        root = self.fs.cat_file(self.child("zarr.json"))
        try:
            self.cache_folder, room = prepare(cache, self.url, root)
        except OSError as exc:  # the cache is an aid: a read never fails for it
            log.warning("reading %s uncached: the cache at %s cannot be used (%s)", self.url,
                        cache, exc)
            return remote
        return bounded_cache_store(remote, cache, self.cache_folder, room)

    def drop_cache(self) -> None:
        """Remove this set's folder of the local chunk cache (what it holds may be damaged);
        its objects are fetched from the store again."""
        if self.cache_folder is not None:
            shutil.rmtree(self.cache_folder, ignore_errors=True)

    def open_file(self) -> Any:
        """A read-only file object of the whole object (for h5py)."""
        try:
            return self.fs.open(self.key, "rb")
        except FileNotFoundError:
            raise TransferSetError(f"no transfer set at {self}: there is no such object"
                                   ) from None

    # --- whole objects --------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether anything is stored at the URL: an object, or objects under it as a
        prefix. Over http only the set's root `zarr.json` or the file itself is probed."""
        fs = self.fs
        try:
            if self.read_only:
                return fs.exists(self.child("zarr.json")) or fs.isfile(self.key)
            fs.invalidate_cache(self.key)
            return bool(fs.exists(self.key))
        except Exception as exc:  # an endpoint that does not answer (botocore, aiohttp, ...)
            if is_timeout(exc):
                raise TransferSetError(self.no_answer(exc)) from None
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise TransferSetError(
                f"cannot reach {self} ({type(exc).__name__}: {first}); check the network "
                f"and the endpoint ({_ENDPOINT_HINT.get(self.protocol, 'the URL')})") from None

    def is_dir_like(self) -> bool:
        """Whether the URL is a prefix holding objects (a Zarr set), not one object."""
        if self.read_only:
            return self.fs.exists(self.child("zarr.json"))
        self.fs.invalidate_cache(self.key)
        return bool(self.fs.isdir(self.key))

    def put_new(self, key: str, data: bytes) -> None:
        """Put `data` at `key` only if no object is there (S3 `If-None-Match: *`, GCS
        `ifGenerationMatch=0`); FileExistsError otherwise."""
        self.fs.pipe_file(key, data, mode="create")

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(key, data)

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(key)

    def remove(self, keys: list[str]) -> None:
        """Delete objects; missing ones are ignored."""
        if keys:
            try:
                self.fs.rm(keys)
            except FileNotFoundError:
                pass

    def listing(self) -> list[str]:
        """Every object key under the URL as a prefix."""
        self.fs.invalidate_cache(self.key)
        return [k for k in self.fs.find(self.key) if k.startswith(self.key + "/")]

    def size(self) -> int | None:
        """Bytes stored under the URL, or None where it cannot be listed (http)."""
        if self.read_only:
            try:
                return None if self.is_dir_like() else int(self.fs.size(self.key))
            except (OSError, ValueError):
                return None
        if not self.is_dir_like():
            return int(self.fs.size(self.key))
        return int(sum(self.fs.du(self.key, total=False).values()))


def as_location(path: str | os.PathLike[str]) -> Any:
    """A `Remote` for a URL, else a `pathlib.Path`."""
    from pathlib import Path

    return Remote(path) if is_url(path) else Path(path)


def _proxied(host: str) -> bool:
    """Whether the environment sends requests to `host` through a proxy (HTTP(S)_PROXY, not
    bypassed by NO_PROXY), as botocore does."""
    import urllib.request

    proxies = urllib.request.getproxies()
    return bool(proxies.get("http") or proxies.get("https")) and not bool(
        urllib.request.proxy_bypass(host))


def cache_dir() -> str | None:
    """The chunk cache directory for remote reads, from `SOFTLABELS_CACHE` (None: no cache)."""
    return os.environ.get(CACHE_ENV) or None
