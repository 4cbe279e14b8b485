"""Sets read through zarr itself (sharded: not the chunk files' fast path) meet damage as the
fast path does: a fifo in place of a shard or of an array's zarr.json is refused naming what it
is, never waited on (zarr's own LocalStore would wait for a writer for ever), a shard grown to
a gigabyte is refused unread; and `verify` says what its value checks covered."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from waits import within

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.chunk_files import ChunkFiles
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify


@pytest.fixture
def sharded(npz_data: str, tmp_path: Path) -> Path:
    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               shard_rows=2 * CHUNK, random_teacher=True)
    assert ChunkFiles.of(path / S.PROBS) is None  # read through zarr
    return path


def test_a_fifo_in_place_of_a_shard_is_refused_naming_its_block(sharded: Path) -> None:
    shard = sharded / S.PROBS / "c" / "1" / "1" / "0"  # T = 4, rows 32-63: block 1
    shard.unlink()
    os.mkfifo(shard)
    with open_transfer_set(sharded) as ts:
        assert ts.block_range(1) == (2 * CHUNK, 4 * CHUNK)  # a block is a shard
        ts.read_blocks([0, 2], [S.PROBS], temperature=4.0)
        got = within(20, lambda: ts.read_blocks([1], [S.PROBS], temperature=4.0))
    assert isinstance(got, SoftlabelsError) and "block 1 " in str(got)
    assert "not a regular file" in str(got)
    report = within(60, lambda: verify(sharded))
    assert not report.ok
    assert "not a regular file" in {c.name: c for c in report.checks}["checksums"].detail


@pytest.mark.parametrize("where", [S.PROBS, "."], ids=["array", "group"])
def test_a_fifo_in_place_of_metadata_is_refused(sharded: Path, where: str) -> None:
    meta = sharded / where / "zarr.json"
    meta.unlink()
    os.mkfifo(meta)
    got = within(20, lambda: open_transfer_set(sharded))
    assert isinstance(got, SoftlabelsError) and "not a regular file" in str(got), got


def test_a_shard_grown_to_a_gigabyte_of_holes_is_refused_unread(sharded: Path) -> None:
    """A shard file extended to 1 GiB (sparse: no disk used) is refused naming its block, by
    its size against its array's shards (the bound of zip members and objects at URLs),
    before zarr reads any of it."""
    import resource

    os.truncate(sharded / S.PROBS / "c" / "1" / "1" / "0", 1 << 30)  # T = 4, block 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open_transfer_set(sharded) as ts:
        ts.read_blocks([0, 2], [S.PROBS], temperature=4.0)
        with pytest.raises(SoftlabelsError, match="block 1 .*more than a chunk of its array"):
            ts.read_blocks([1], [S.PROBS], temperature=4.0)
    assert not verify(sharded).ok
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 256 * 1024, f"the process grew by {grown // 1024} MiB"


def test_verify_says_which_blocks_its_value_checks_covered(sharded: Path) -> None:
    """With a block unreadable, the value checks that pass say they covered the readable
    blocks only: a pass over part of the set is not presented as a pass over all of it."""
    (sharded / S.PROBS / "c" / "1" / "1" / "0").unlink()
    os.mkfifo(sharded / S.PROBS / "c" / "1" / "1" / "0")
    with open_transfer_set(sharded) as ts:
        blocks, rows = ts.num_blocks, ts.num_rows
        unread = ts.block_range(1)[1] - ts.block_range(1)[0]
    checks = {c.name: c for c in within(60, lambda: verify(sharded)).checks}
    assert not checks["checksums"].ok and not checks["columns"].ok
    for name in ("targets", "finite", "temperatures"):
        assert checks[name].detail.endswith(f"in the {blocks - 1} readable blocks of {blocks}")
    assert f"over {rows - unread} of {rows} rows" in checks["probabilities"].detail


def test_verify_of_a_sparse_set_does_not_claim_row_sums(npz_data: str, tmp_path: Path) -> None:
    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK, topk=2,
               random_teacher=True)
    checks = {c.name: c for c in verify(path).checks}
    assert checks["probabilities"].ok
    assert checks["probabilities"].detail.startswith("no dense probabilities stored")
