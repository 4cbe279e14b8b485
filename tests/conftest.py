from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

# tests/ (the helper modules: helpers, faultpoints, ...) and the repository root, for a test at
# any depth of the tree: what a child process needs on its PYTHONPATH, where data/ and docs/ are
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def _no_leftover_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """`softlabels --timeout S` sets SOFTLABELS_TIMEOUT for the process (its workers inherit
    it); a test invoking the CLI in-process must not leave it to the tests after it."""
    monkeypatch.delenv("SOFTLABELS_TIMEOUT", raising=False)


# Sizes chosen so the row count is not a multiple of the chunk size.
N_ROWS, N_CLASSES, CHUNK = 103, 3, 16


def make_npz(path: Path, n: int = N_ROWS, classes: int = N_CLASSES, seed: int = 0,
             labels: bool = True) -> str:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 4, 4)).astype(np.float32)
    arrays = {"x": x}
    if labels:
        arrays["y"] = (rng.integers(0, classes, n))
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.fixture
def npz_data(tmp_path: Path) -> str:
    return make_npz(tmp_path / "data.npz")


@pytest.fixture(params=["zarr", "h5"])
def suffix(request: pytest.FixtureRequest) -> str:
    """Both backends run through the same tests."""
    return request.param


@pytest.fixture
def out_path(tmp_path: Path, suffix: str) -> Path:
    return tmp_path / f"set.{suffix}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One local S3 server for the session: s3fs caches its filesystem objects, so a server
    per module would leave a later module talking to a stopped one."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the local S3 server; credentials and endpoint through the standard
    AWS variables, as any s3fs user sets them."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import fsspec
    import s3fs

    # fsspec caches filesystems by their arguments, not by the environment: one made while
    # AWS_ENDPOINT_URL named another server (a test's hostile one) would be handed out again
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"b{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return name


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder) of a local web server with byte ranges and no directory listings
    (a bucket's web endpoint), serving the folder."""
    from hostile_servers import RangeHandler

    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
