"""The storage contract: both backends behave the same behind one interface."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from softlabels.errors import TransferSetError
from softlabels.format.backends import backend_of, open_store


def test_round_trip_and_fill(out_path: Path) -> None:
    with open_store(out_path, "w") as store:
        store.create("logits", (10, 3), "float16", chunks=(4, 3))
        store.create("probs", (2, 10, 3), "float32", chunks=(1, 4, 3))
        store.create("topk/indices", (10, 2), "int32", chunks=(4, 2))
        store.write("logits", slice(0, 4), np.ones((4, 3)))
        store.write("probs", (1, slice(4, 8)), np.full((4, 3), 0.5))
        store.set_meta({"a": [1, 2], "b": "x"})
    with open_store(out_path, "r") as store:
        assert store.get_meta() == {"a": [1, 2], "b": "x"}
        assert set(store.names()) == {"logits", "probs", "topk/indices"}
        shape, dtype, chunks = store.info("probs")
        assert (shape, dtype, chunks) == ((2, 10, 3), np.dtype("float32"), (1, 4, 3))
        logits = store.read("logits")
        assert (logits[:4] == 1).all() and np.isnan(logits[4:]).all()  # unwritten = NaN
        probs = store.read("probs", (1, slice(None)))
        assert (probs[4:8] == 0.5).all() and np.isnan(probs[:4]).all()
        assert (store.read("topk/indices") == 0).all()  # integer fill is 0


def test_all_zero_block_is_stored_not_skipped(out_path: Path) -> None:
    with open_store(out_path, "w") as store:
        store.create("x", (8, 2), "float32", chunks=(4, 2))
        store.write("x", slice(0, 4), np.zeros((4, 2)))
    with open_store(out_path, "r") as store:
        x = store.read("x")
    assert (x[:4] == 0).all() and np.isnan(x[4:]).all()


def test_missing_path_and_non_set(tmp_path: Path) -> None:
    with pytest.raises(TransferSetError, match="does not exist"):
        open_store(tmp_path / "nope.zarr", "r")
    (tmp_path / "plain").mkdir()
    with pytest.raises(TransferSetError, match="empty folder, not a transfer set"):
        open_store(tmp_path / "plain", "r")
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(TransferSetError, match="not an HDF5 file .*not a transfer set"):
        open_store(tmp_path / "bad.h5", "r")


def test_erase_block_removes_only_that_block(out_path: Path) -> None:
    """Both backends: an erased block reads exactly as one never written (fill values)."""
    with open_store(out_path, "w") as store:
        store.create("probs", (2, 10, 3), "float32", chunks=(1, 4, 3))
        store.create("labels", (10,), "int64", chunks=(4,))
        store.write("probs", slice(None), np.ones((2, 10, 3)))
        store.write("labels", slice(None), np.arange(1, 11))
        store.erase_block("probs", 1, 4, axis=1)
        store.erase_block("labels", 2, 4, axis=0)  # the short last block
        store.erase_block("labels", 0, 4, axis=0)
        probs, labels = store.read("probs"), store.read("labels")
    assert np.isnan(probs[:, 4:8]).all()
    assert (probs[:, :4] == 1).all() and (probs[:, 8:] == 1).all()
    assert labels.tolist() == [0, 0, 0, 0, 5, 6, 7, 8, 0, 0]


def test_read_only_store_refuses_every_write(out_path: Path) -> None:
    with open_store(out_path, "w") as store:
        store.create("x", (5,), "int64", chunks=(2,))
        store.set_meta({"k": 1})
    with open_store(out_path, "r") as store:
        assert store.read_only
        for attempt in (lambda: store.write("x", slice(0, 1), np.ones(1)),
                        lambda: store.create("y", (2,), "int64", chunks=(1,)),
                        lambda: store.set_meta({"k": 2}),
                        lambda: store.erase_block("x", 0, 2, axis=0),
                        store.discard_partial_files):
            with pytest.raises(TransferSetError, match="opened read-only"):
                attempt()
    with open_store(out_path, "r") as store:
        assert store.get_meta() == {"k": 1} and store.read("x").tolist() == [0] * 5


def test_partial_files_are_discarded(out_path: Path) -> None:
    with open_store(out_path, "w") as store:
        store.create("x", (5,), "int64", chunks=(2,))
    if out_path.is_dir():  # what zarr's LocalStore leaves when killed mid-rename
        (out_path / "x" / "c").mkdir(exist_ok=True)
        (out_path / "x" / "c" / "0.partial").write_bytes(b"torn")
    with open_store(out_path, "r+") as store:
        assert store.discard_partial_files() == (1 if out_path.is_dir() else 0)
        assert store.discard_partial_files() == 0
    assert not list(out_path.parent.rglob("*.partial"))


def test_links_out_of_the_store_are_listed(out_path: Path, tmp_path: Path) -> None:
    with open_store(out_path, "w") as store:
        store.create("x", (5,), "int64", chunks=(2,))
        store.write("x", slice(None), np.arange(5))
    with open_store(out_path, "r+") as store:
        assert store.links() == []
    outside = tmp_path / "outside"
    outside.mkdir()
    if out_path.is_dir():
        (out_path / "x" / "c" / "0").rename(outside / "0")
        (out_path / "x" / "c" / "0").symlink_to(outside / "0")
    else:
        import h5py

        with h5py.File(out_path, "a") as f:
            f["elsewhere"] = h5py.ExternalLink(str(outside / "other.h5"), "/x")
    with open_store(out_path, "r+") as store:
        assert len(store.links()) == 1


def test_zip_store_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    with open_store(path, "w") as store:
        store.create("x", (5,), "int64", chunks=(2,))
        store.write("x", slice(None), np.arange(5))
        store.set_meta({"k": 1})
    zpath = tmp_path / "s.zarr.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in path.rglob("*"):
            if f.is_file():
                z.write(f, f.relative_to(path).as_posix())
    assert backend_of(zpath) == "zarr-zip"
    with open_store(zpath, "r") as store:
        assert store.get_meta() == {"k": 1}
        assert store.read("x").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TransferSetError, match="read-only"):
        open_store(zpath, "r+")


def test_an_arrays_garbled_metadata_is_one_line(tmp_path: Path) -> None:
    """A damaged `zarr.json` of one array (not the root's) is a TransferSetError saying what to
    do, not a JSONDecodeError traceback."""
    path = tmp_path / "s.zarr"
    with open_store(path, "w") as store:
        store.create("x", (5, 2), np.float32, chunks=(2, 2))
    (path / "x" / "zarr.json").write_text("{garbage")
    with open_store(path, "r") as store, pytest.raises(TransferSetError,
                                                       match="metadata .*damaged"):
        store.names()
