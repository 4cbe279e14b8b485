"""How a stream's window is read: a cached local set's blocks on two threads, each block
checked and scattered to its shuffled places before its thread reads again; the same window as
one thread builds; damage read by either thread refused by name, with nothing written after; a
set read from disk (chunk files out of the page cache) read by one thread that announces the
next blocks to the kernel."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from checksums import block_chunk, flip_byte

from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.train.blocks import needed_arrays
from softlabels.train.stream_pieces import BlockReaders, block_columns, build_window

ROWS, CHUNK, T = 300, 16, 4.0  # 19 blocks, the last one short


@pytest.fixture(params=["dense", "topk"])
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(ROWS, 3)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x, y=np.random.default_rng(1).integers(0, 4, ROWS))
    path = tmp_path / "set.zarr"
    precompute(f"npz:{tmp_path / 'x.npz'}", ["mlp:3-4"], path, temperatures=[1, T],
               chunk_rows=CHUNK, topk=2 if request.param == "topk" else 0,
               random_teacher=True)
    return path


def _threads_reading(ts: TransferSet, monkeypatch: pytest.MonkeyPatch) -> dict[int, str]:
    """block -> the name of the thread that read it, filled as `ts` reads blocks."""
    seen: dict[int, str] = {}
    read = ts.read_blocks

    def spy(blocks: list[int], *args: object, **kwargs: object) -> object:
        for b in blocks:
            seen[b] = threading.current_thread().name
        return read(blocks, *args, **kwargs)

    monkeypatch.setattr(ts, "read_blocks", spy)
    return seen


def _window(ts: TransferSet, blocks: list[int], threads: int) -> list[torch.Tensor]:
    sizes = [min(CHUNK, ROWS - b * CHUNK) for b in blocks]
    readers = BlockReaders(threads=threads)
    try:
        built = build_window(ts, blocks, sizes, temperature=T, checksum=True,
                             dtype=torch.float32, keep=None,
                             order=torch.Generator().manual_seed(3), readers=readers)
    finally:
        readers.close()
    assert built is not None
    return [c.clone() for c in built]


def test_two_threads_build_the_window_one_thread_builds(made: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [5, 0, 18, 3, 9, 12, 1, 7]  # the short last block among them
    with open_transfer_set(made) as ts:
        seen = _threads_reading(ts, monkeypatch)
        one = _window(ts, blocks, threads=1)
        assert set(seen.values()) == {threading.current_thread().name}
        seen.clear()
        two = _window(ts, blocks, threads=2)
        assert len(set(seen.values())) == 2, seen  # the second thread read some blocks
        per_block = [block_columns(ts, ts.read_block(b, needed_arrays(ts, T), temperature=T),
                                   temperature=T, dtype=torch.float32) for b in blocks]
    stored = [torch.cat(c) for c in zip(*per_block)]  # [index, labels, *targets], as decoded
    assert len(one) == len(two) == len(stored) == (4 if ts.target.sparse else 3)
    dest = torch.randperm(len(stored[0]), generator=torch.Generator().manual_seed(3))
    for a, b, c in zip(one, two, stored):
        assert torch.equal(a, b)
        want = torch.empty_like(c)
        want[dest] = c  # stored row i is served at dest[i]
        assert torch.equal(b, want)


def test_damage_read_by_either_thread_is_refused_by_name(made: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    blocks = list(range(10))
    with open_transfer_set(made) as ts:
        seen = _threads_reading(ts, monkeypatch)
        _window(ts, blocks, threads=2)
        by_thread: dict[str, int] = {}
        for b in blocks[1:]:
            by_thread.setdefault(seen[b], b)
    assert len(by_thread) == 2
    name = S.TOPK_LOGITS if ts.target.sparse else S.PROBS
    shape = (ROWS, 2) if ts.target.sparse else (2, ROWS, 4)
    for damaged in sorted(by_thread.values()):
        copy = made.with_name(f"copy{damaged}.zarr")
        shutil.copytree(made, copy)
        flip_byte(copy, name, block_chunk(name, shape, damaged, lead=1))
        with open_transfer_set(copy) as ts:
            placed: list[int] = []
            sizes = [min(CHUNK, ROWS - b * CHUNK) for b in blocks]
            readers = BlockReaders(threads=2)

            def fill(*args: object, real: object = readers.fill, placed: list[int] = placed,
                     **kwargs: object) -> None:
                place = kwargs["place"]

                def counted(at: int, arrays: dict) -> None:
                    placed.append(at)
                    place(at, arrays)  # type: ignore[operator]

                kwargs["place"] = counted
                real(*args, **kwargs)  # type: ignore[operator]

            monkeypatch.setattr(readers, "fill", fill)
            with pytest.raises(IntegrityError, match=f"block {damaged} "):
                build_window(ts, blocks, sizes, temperature=T, checksum=True,
                             dtype=torch.float32, keep=None, order=None, readers=readers)
            after = len(placed)
            time.sleep(0.2)
            assert len(placed) == after  # no thread places a block once the error is raised
            assert damaged not in [blocks[i] for i in placed]
            readers.close()


def test_a_set_read_from_disk_is_read_by_one_thread_that_reads_ahead(
        made: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks whose chunk files are out of the page cache (here: every read made to count a
    miss) switch the reader to one thread that announces the next blocks to the kernel; a
    cached set keeps two threads and announces nothing."""
    blocks = list(range(12))
    with open_transfer_set(made) as ts:
        real = ts.cache_misses
        missing = {"on": True}
        counted = {"reads": 0}

        def cache_misses() -> int | None:
            got = real()
            assert got is not None  # a local Zarr set: its chunk files are read directly
            counted["reads"] += 1
            return got + counted["reads"] if missing["on"] else got  # a miss every read

        hinted: list[int] = []
        monkeypatch.setattr(ts, "cache_misses", cache_misses)
        monkeypatch.setattr(ts, "will_read",
                            lambda bs, names, temperature=None: hinted.extend(bs))
        seen = _threads_reading(ts, monkeypatch)
        readers = BlockReaders(threads=2)
        sizes = [CHUNK] * len(blocks)
        try:
            # two blocks from disk: one thread from then on
            build_window(ts, blocks, sizes, temperature=T, checksum=True,
                         dtype=torch.float32, keep=None, order=None, readers=readers)
            assert readers.slow >= 2
            seen.clear()
            build_window(ts, blocks, sizes, temperature=T, checksum=True,
                         dtype=torch.float32, keep=None, order=None, readers=readers)
            assert set(seen.values()) == {threading.current_thread().name}
            assert set(hinted) >= set(blocks[1:])
            missing["on"], hinted[:] = False, []
            fast = BlockReaders(threads=2)  # a cached set: two threads, no hints
            seen.clear()
            build_window(ts, blocks, sizes, temperature=T, checksum=True,
                         dtype=torch.float32, keep=None, order=None, readers=fast)
            fast.close()
            assert fast.slow == 0 and not hinted and len(set(seen.values())) == 2
        finally:
            readers.close()


def test_a_chunk_out_of_the_page_cache_counts_a_miss(made: Path, tmp_path: Path) -> None:
    """`cache_misses` counts the chunk reads that found their file out of the page cache (a
    read that may not wait for the disk), whatever the file's size: a cached block counts
    none, the same block after its files are dropped from the cache counts them."""
    with open_transfer_set(made) as ts:
        names = needed_arrays(ts, T)
        ts.read_blocks([2], names, temperature=T)  # and its checksums and marker, once
        files = ts._files or {}
        if not any(f is not None and f._nowait for f in files.values()):
            pytest.skip("this file system cannot tell a cached page (no RWF_NOWAIT)")
        before = ts.cache_misses()
        ts.read_blocks([2], names, temperature=T)
        assert ts.cache_misses() == before  # in the page cache: just read
        k = ts.temperature_index(T)
        paths = [made.joinpath(*n.split("/"), "c", *map(str, (
            (k, 2, 0) if n in S.TEMPERATURE_AXIS and S.row_axis(n) == 1
            else (2,) + (0,) * (ts.read(n).ndim - 1)))) for n in names]
        for path in paths:  # dropped from the page cache (clean pages once synced)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        ts.read_blocks([2], names, temperature=T)
        assert ts.cache_misses() == before + len(paths)
    h5 = tmp_path / "set.h5"
    x = np.zeros((20, 3), np.float32)
    np.savez(tmp_path / "h.npz", x=x, y=np.zeros(20, np.int64))
    precompute(f"npz:{tmp_path / 'h.npz'}", ["mlp:3-4"], h5, temperatures=[1],
               chunk_rows=CHUNK, random_teacher=True)
    with open_transfer_set(h5) as ts:
        assert ts.cache_misses() is None  # not read from chunk files: one thread, no hints
