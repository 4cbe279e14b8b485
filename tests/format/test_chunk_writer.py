"""Stage one writes whole chunks of a local Zarr set straight to their files: the same bytes as
zarr's own writes, byte for byte, read back by zarr and tensorstore; anything else (part of a
chunk, shards) goes through zarr; no link is written through."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from softlabels.compute.blocks import precompute
from softlabels.format.backends import open_store
from softlabels.format.chunk_writer import ChunkWriter
from softlabels.format.store import Store

# (name, shape, dtype, chunks, shuffle_compress): the kinds of array a set holds; row counts
# are not multiples of the chunk, so the last chunk along rows is padded at the array's edge
ARRAYS = [
    ("logits", (37, 5), "float16", (8, 5), False),
    ("probs", (2, 37, 5), "float32", (2, 8, 5), False),
    ("labels", (37,), "int64", (8,), False),  # integers: zstd by default
    ("topk/logits", (37, 3), "float32", (8, 3), True),  # blosc shuffle + zstd
    ("block_done", (5,), "uint8", (1,), False),
    ("checksum", (5, 4), "uint64", (1, 4), False),
]


def _data(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)


def _make(path: Path) -> Store:
    store = open_store(path, "w")
    for name, shape, dtype, chunks, shuffled in ARRAYS:
        store.create(name, shape, dtype, chunks=chunks, shuffle_compress=shuffled)
    return store


def _blocks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Whole-chunk selections along the first axis, as the writer makes them per block."""
    axis = 1 if len(shape) == 3 else 0
    sels = []
    for start in range(0, shape[axis], chunks[axis]):
        sel = [slice(None)] * len(shape)
        sel[axis] = slice(start, min(start + chunks[axis], shape[axis]))
        sels.append(tuple(sel))
    return sels


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("c/**/*"))
            if p.is_file()}


def test_whole_chunks_are_the_bytes_zarr_writes(tmp_path: Path) -> None:
    ours, theirs = _make(tmp_path / "ours.zarr"), _make(tmp_path / "zarr.zarr")
    want = {}
    for i, (name, shape, dtype, chunks, _) in enumerate(ARRAYS):
        want[name] = data = _data(shape, dtype, i)
        writes = [(name, sel, data[sel]) for sel in _blocks(shape, chunks)]
        ours.write_many(writes)
        assert ours._chunk_writers[name] is not None  # the direct path was taken
        for _, sel, part in writes:
            theirs.array(name)[sel] = part  # zarr's own write
    for name, *_ in ARRAYS:
        got, ref = _files(tmp_path / "ours.zarr" / name), _files(tmp_path / "zarr.zarr" / name)
        assert got and got == ref, name
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))
    ours.close(), theirs.close()
    import tensorstore as ts  # reads them too

    reread = open_store(tmp_path / "ours.zarr", "r")
    for name, *_ in ARRAYS:
        np.testing.assert_array_equal(reread.read(name), want[name])
        spec = {"driver": "zarr3", "kvstore": {"driver": "file",
                                               "path": str(tmp_path / "ours.zarr" / name)}}
        np.testing.assert_array_equal(ts.open(spec).result().read().result(), want[name])


def test_chunks_of_only_the_fill_value_are_not_stored_as_zarr_leaves_them(
        tmp_path: Path) -> None:
    """zarr stores no chunk that holds only the fill value (and removes one that was there):
    `block_done` laid out as zeros, a block erased to its fill, an all-fill edge chunk. The
    files left are zarr's, so `block_done/c` holds a file only for a block marked done."""
    ours, theirs = _make(tmp_path / "ours.zarr"), _make(tmp_path / "zarr.zarr")
    for store, direct in ((ours, True), (theirs, False)):
        def put(name: str, sel: tuple[slice, ...], part: np.ndarray,
                store: Store = store, direct: bool = direct) -> None:
            if direct:
                store.write_many([(name, sel, part)])
            else:
                store.array(name)[sel] = part  # zarr's own write
        put("block_done", (slice(0, 5),), np.zeros(5, np.uint8))  # as a set is laid out
        put("block_done", (slice(2, 3),), np.ones(1, np.uint8))  # block 2 done
        logits = _data((37, 5), "float16", 0)
        put("logits", (slice(0, 37),), logits)
        fill = np.full((8, 5), np.nan, np.float16)
        put("logits", (slice(8, 16),), fill)  # a block erased to the fill value
        put("logits", (slice(32, 37),), fill[:5])  # the edge chunk too
    for name in ("block_done", "logits"):
        got, ref = _files(tmp_path / "ours.zarr" / name), _files(tmp_path / "zarr.zarr" / name)
        assert got == ref, name
    assert list(_files(tmp_path / "ours.zarr" / "block_done")) == ["c/2"]
    assert "c/1/0" not in _files(tmp_path / "ours.zarr" / "logits")
    assert "c/4/0" not in _files(tmp_path / "ours.zarr" / "logits")


def test_part_of_a_chunk_goes_through_zarr(tmp_path: Path) -> None:
    store = _make(tmp_path / "s.zarr")
    writer = ChunkWriter.of(tmp_path / "s.zarr" / "logits", store.array("logits"))
    data = _data((37, 5), "float16", 0)
    assert not writer.write((slice(3, 8),), data[3:8])  # starts inside a chunk
    assert not writer.write((slice(0, 8), slice(0, 2)), data[:8, :2])  # cuts the class axis
    assert not writer.write((slice(0, 8),), data[:4])  # a shape that does not fit
    assert not list((tmp_path / "s.zarr" / "logits").rglob("c/*"))  # nothing written
    store.write("logits", (slice(3, 8),), data[3:8])  # zarr writes it
    store.write("logits", (slice(8, 37),), data[8:])  # several whole chunks, edge included
    got = store.read("logits")
    np.testing.assert_array_equal(got[3:], data[3:])
    assert np.isnan(got[:3]).all()


def test_sharded_arrays_are_left_to_zarr(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.zarr", "w")
    store.create("x", (32, 4), "float32", chunks=(8, 4), shards=(16, 4))
    assert ChunkWriter.of(tmp_path / "s.zarr" / "x", store.array("x")) is None
    data = _data((32, 4), "float32", 1)
    store.write("x", (slice(0, 16),), data[:16])
    np.testing.assert_array_equal(store.read("x", (slice(0, 16),)), data[:16])


def test_a_link_at_a_chunk_is_replaced_not_followed(tmp_path: Path) -> None:
    store = _make(tmp_path / "s.zarr")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    store.write("logits", (slice(0, 8),), _data((8, 5), "float16", 2))  # makes c/
    key = tmp_path / "s.zarr" / "logits" / "c" / "1" / "0"
    key.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, key)
    store.write("logits", (slice(8, 16),), _data((8, 5), "float16", 3))
    assert victim.read_bytes() == b"keep" and not key.is_symlink()


@pytest.mark.parametrize("topk", [0, 2])
def test_precompute_sets_match_zarrs_writes(npz_data: str, tmp_path: Path, topk: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole set written by stage one holds the same chunk files as through zarr alone."""
    def run(out: Path) -> dict[str, bytes]:
        precompute(npz_data, ["mlp:16-8-3"], out, temperatures=[1, 4], chunk_rows=16, topk=topk,
                   random_teacher=True)
        return {k: v for k, v in _files(out).items() if "lease" not in k}

    ours = run(tmp_path / "ours.zarr")
    monkeypatch.setattr(ChunkWriter, "write", lambda self, sel, data: False)
    assert ours == run(tmp_path / "zarr.zarr")


def test_integer_chunks_are_blosc_frames_read_straight_or_left_to_zarr(tmp_path: Path) -> None:
    """Integer arrays are stored byte-shuffled + lz4 (blosc); stage two's chunk-file reads
    decode them, and leave a frame whose header does not match its file to zarr."""
    from softlabels.format.chunk_files import ChunkFiles

    store = _make(tmp_path / "s.zarr")
    labels = _data((37,), "int64", 5)
    store.write("labels", (slice(0, 37),), labels)
    (codec,) = store.array("labels").compressors
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "lz4"
    files = ChunkFiles.of(tmp_path / "s.zarr" / "labels")
    np.testing.assert_array_equal(files.read((slice(8, 16),)), labels[8:16])
    chunk = tmp_path / "s.zarr" / "labels" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:-3])  # torn: cbytes in the header no longer match
    assert files.read((slice(8, 16),)) is None
    np.testing.assert_array_equal(files.read((slice(0, 8),)), labels[:8])
