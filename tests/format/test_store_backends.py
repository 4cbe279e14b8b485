"""The store contract, run against every backend: local Zarr, HDF5, a zip-packed Zarr, s3://
(a local S3 server), gs:// (the GCS emulator) and http:// (a local web server without listings).
Writable backends keep the whole contract; read-only ones (zip, http) serve what was written and
refuse every write in one TransferSetError."""

from __future__ import annotations

import logging
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from softlabels.errors import TransferSetError
from softlabels.format.backends import open_store

WRITABLE = ["zarr", "h5", "s3", "gs"]
READ_ONLY = ["zip", "http-zarr", "http-h5"]


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[str]:
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket="bkt")
    server.start()
    yield f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    server.stop()


@pytest.fixture
def location(request: pytest.FixtureRequest, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> str:
    """Where a writable backend's store lives: a path or a fresh URL."""
    kind = request.param
    if kind == "s3":
        pytest.importorskip("s3fs")
        return f"s3://{request.getfixturevalue('bucket')}/stores/s.zarr"
    if kind == "gs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", request.getfixturevalue("gcs_emulator"))
        return f"gs://bkt/stores/{uuid.uuid4().hex[:8]}.zarr"
    return str(tmp_path / f"s.{kind}")


def write_example(location: str) -> None:
    with open_store(location, "w") as store:
        store.create("logits", (10, 3), "float16", chunks=(4, 3))
        store.create("probs", (2, 10, 3), "float32", chunks=(1, 4, 3))
        store.create("topk/indices", (10, 2), "int32", chunks=(4, 2))
        store.write("logits", slice(0, 4), np.ones((4, 3)))
        store.write_many([("probs", (1, slice(4, 8)), np.full((4, 3), 0.5)),
                          ("topk/indices", slice(8, 10), np.full((2, 2), 7))])
        store.set_meta({"a": [1, 2], "b": "x"})


def check_example(store) -> None:  # type: ignore[no-untyped-def]
    assert store.get_meta() == {"a": [1, 2], "b": "x"}
    assert set(store.names(["logits", "probs", "topk/indices"])) == {
        "logits", "probs", "topk/indices"}
    assert store.info("probs") == ((2, 10, 3), np.dtype("float32"), (1, 4, 3))
    logits, probs, top = store.read_many([("logits", slice(None)), ("probs", (1, slice(None))),
                                          ("topk/indices", slice(None))])
    assert logits.dtype == np.float16
    assert (logits[:4] == 1).all() and np.isnan(logits[4:]).all()  # unwritten: NaN
    assert (probs[4:8] == 0.5).all() and np.isnan(probs[:4]).all()
    assert (top[:8] == 0).all() and (top[8:] == 7).all()  # integers fill with 0
    assert np.array_equal(store.read("logits", slice(2, 6)), logits[2:6], equal_nan=True)


def assert_refuses_writes(store) -> None:  # type: ignore[no-untyped-def]
    for write in (lambda: store.create("new", (3,), "int64", chunks=(3,)),
                  lambda: store.write("logits", slice(0, 1), np.zeros((1, 3))),
                  lambda: store.write_many([("logits", slice(0, 1), np.zeros((1, 3)))]),
                  lambda: store.set_meta({}),
                  lambda: store.erase_block("logits", 0, 4, 0)):
        with pytest.raises(TransferSetError, match="read-only"):
            write()


@pytest.mark.parametrize("location", WRITABLE, indirect=True)
def test_a_writable_backend_keeps_the_contract(location: str) -> None:
    write_example(location)
    with open_store(location, "r") as store:
        check_example(store)
        assert_refuses_writes(store)
    with open_store(location, "r+") as store:  # erase: the block reads as never written
        store.erase_block("probs", 1, 4, 1)
        store.erase_block("topk/indices", 2, 4, 0)
        assert store.links() == []
    with open_store(location, "r") as store:
        probs = store.read("probs")
        assert np.isnan(probs[1, 4:8]).all()
        assert (store.read("topk/indices") == 0).all()
        assert (store.read("logits")[:4] == 1).all()  # other arrays untouched


@pytest.mark.parametrize("kind", READ_ONLY)
def test_a_read_only_backend_serves_what_was_written(kind: str, tmp_path: Path,
                                                     web: tuple[str, Path]) -> None:
    base, root = web
    suffix = "h5" if kind == "http-h5" else "zarr"
    local = root / f"s.{suffix}"
    write_example(str(local))
    if kind == "zip":
        where = str(tmp_path / "s.zarr.zip")
        with zipfile.ZipFile(where, "w") as z:
            for f in local.rglob("*"):
                if f.is_file():
                    z.write(f, f.relative_to(local).as_posix())
    else:
        pytest.importorskip("aiohttp")
        where = f"{base}/s.{suffix}"
    with open_store(where, "r") as store:
        check_example(store)
        assert_refuses_writes(store)
    with pytest.raises(TransferSetError, match="read-only"):
        open_store(where, "r+")
