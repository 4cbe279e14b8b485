"""Stage two reads a local Zarr set's chunks straight from their files: the same arrays as
zarr, for every row array and block; anything it does not read (a damaged or truncated chunk)
goes through zarr and is refused naming the block."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import CHUNK, N_ROWS
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.chunk_files import ChunkFiles
from softlabels.format.reader import open_transfer_set


@pytest.mark.parametrize("topk", [0, 2])
def test_chunk_files_read_what_zarr_reads(npz_data: str, tmp_path: Path, topk: int) -> None:
    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK, topk=topk,
               random_teacher=True)
    with open_transfer_set(path) as ts:
        assert ts.num_rows == N_ROWS and ts.num_rows % CHUNK  # a short last block
        names = ts.row_arrays()
        fast = {n: ChunkFiles.of(path / n) for n in names}
        assert all(f is not None for f in fast.values())  # this package's layout
        for block in range(ts.num_blocks):
            start, stop = ts.block_range(block)
            for n in names:
                for k in range(len(ts.temperatures)) if n in S.TEMPERATURE_AXIS else [None]:
                    sel = ts._block_selection(n, start, stop, k)
                    got, want = fast[n].read(sel), ts.store.read(n, sel)
                    assert got.dtype == want.dtype and got.flags.writeable
                    np.testing.assert_array_equal(got, want)
            scratch: dict[str, np.ndarray] = {}
            a = fast[S.LABELS].read((slice(start, stop),), scratch)
            np.testing.assert_array_equal(a, ts.store.read(S.LABELS, (slice(start, stop),)))
        # a selection across chunks is left to zarr
        assert fast[S.LABELS].read((slice(0, CHUNK + 1),)) is None


@pytest.mark.parametrize("damage", [lambda b: b[:-4], lambda b: b + b"\0" * 4, lambda b: b""],
                         ids=["truncated", "overlong", "empty"])
def test_a_chunk_of_the_wrong_length_is_refused_naming_its_block(
        npz_data: str, tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    chunk = path / S.PROBS / "c" / "1" / "2" / "0"
    chunk.write_bytes(damage(chunk.read_bytes()))
    with open_transfer_set(path) as ts:
        assert ChunkFiles.of(path / S.PROBS).read(ts._block_selection(
            S.PROBS, *ts.block_range(2), 1)) is None
        with pytest.raises(IntegrityError, match="block 2 "):
            ts.read_block(2, [S.PROBS], temperature=4.0)
        ts.read_block(1, [S.PROBS], temperature=4.0)  # its neighbours still read


@pytest.mark.parametrize("topk", [0, 2], ids=["uncompressed", "compressed"])
def test_a_chunk_grown_to_a_gigabyte_of_holes_is_refused_unread(
        npz_data: str, tmp_path: Path, topk: int) -> None:
    """A chunk file extended to 1 GiB (a sparse file: no disk used) is refused naming its block
    without being read: neither this module nor zarr after it reads the gigabyte."""
    import resource

    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               topk=topk, random_teacher=True)
    name = S.TOPK_INDICES if topk else S.PROBS
    with open_transfer_set(path) as ts:
        selection = ts._block_selection(name, *ts.block_range(2), 1 if not topk else None)
    files = ChunkFiles.of(path / name)
    assert files is not None and (files.codec is not None) == bool(topk)
    chunk = Path(files._path(files._locate(selection)[0]))
    os.truncate(chunk, 1 << 30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open_transfer_set(path) as ts:
        with pytest.raises(IntegrityError, match="block 2 .*more than a chunk of its array"):
            ts.read_blocks([2], [name], temperature=4.0)
        ts.read_blocks([1, 3], [name], temperature=4.0)  # its neighbours still read
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 256 * 1024, f"the process grew by {grown // 1024} MiB"
