"""TransferSet.read_block: every block a consumer reads is checked, and damage names its block."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from checksums import as_version_1, block_chunk, flip_byte, forge_checksums

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set


@pytest.fixture
def made(npz_data: str, out_path: Path) -> Path:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    return out_path


def test_every_block_reads_back_checked(made: Path) -> None:
    with open_transfer_set(made) as ts:
        assert ts.num_blocks == 7  # 103 rows in blocks of 16
        blocks = [ts.read_block(b) for b in range(ts.num_blocks)]
        for name in ts.row_arrays():
            joined = np.concatenate([blk[name] for blk in blocks], axis=S.row_axis(name))
            np.testing.assert_array_equal(joined, ts.read(name))


def _edit(path: Path, name: str, selection: object, value: object) -> None:
    with open_store(path, "r+") as store:
        store.write(name, selection, value)


@pytest.mark.parametrize("name, selection, value, words", [
    (S.LOGITS, (slice(20, 21), slice(0, 1)), np.float16(0.125), "checksum"),
    (S.LABELS, slice(33, 34), np.int64(1), "checksum"),
])
def test_a_changed_value_names_its_block(made: Path, name: str, selection: object,
                                          value: object, words: str) -> None:
    _edit(made, name, selection, value)
    with open_transfer_set(made) as ts:
        ts.read_block(0)  # other blocks stay readable
        block = (selection[0] if isinstance(selection, tuple) else selection).start // 16
        with pytest.raises(IntegrityError, match=f"block {block} .*{words}"):
            ts.read_block(block)


def test_values_no_writer_stores_are_refused_even_with_a_matching_checksum(made: Path) -> None:
    with open_store(made, "r+") as store:
        labels = store.read(S.LABELS)
        labels[40] = 7  # out of range for 3 classes
        store.write(S.LABELS, slice(None), labels)
    forge_checksums(made, 2)
    with open_transfer_set(made) as ts:
        for kwargs in ({}, {"arrays": [S.LABELS]}, {"checksum": False}):
            with pytest.raises(IntegrityError, match="block 2 .*labels outside"):
                ts.read_block(2, **kwargs)


def test_report_refuses_a_damaged_set_naming_the_block(made: Path, tmp_path: Path) -> None:
    """`softlabels report` plots only checked blocks: damage is named, never drawn."""
    from click.testing import CliRunner

    from softlabels.cli import cli

    _edit(made, S.LABELS, slice(33, 34), np.int64(1))
    result = CliRunner().invoke(cli, ["report", str(made), "--out", str(tmp_path / "rep")])
    assert result.exit_code != 0
    assert "block 2 (rows 32-47)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- one checksum per block and row array (format version 2) -----------------------------------

KINDS = {"members-views": {"keep_members": True, "views": 2, "augment": "hflip"},
         "inputs": {"store_inputs": True}, "topk": {"topk": 2}, "sample": {"sample_k": 2}}


def _slots(path: Path) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """(array, leading index, shape) of every checksum slot of a set."""
    with open_transfer_set(path) as ts:
        shapes = {n: s for n, (s, _, _) in ts.arrays().items()}
        return [(n, j, shapes[n]) for n, j in ts.layout.checksum_slots()]


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_byte_in_any_array_is_caught_where_that_array_is_read(
        tmp_path: Path, npz_data: str, suffix: str, kind: str) -> None:
    from softlabels.sets.verify import verify

    source = tmp_path / f"source.{suffix}"
    precompute(npz_data, ["mlp:16-8-3", "mlp:16-5-3"], source, temperatures=[1, 4],
               chunk_rows=CHUNK, **KINDS[kind], random_teacher=True)
    slots = _slots(source)
    assert len({n for n, _, _ in slots}) >= 4
    for i, (name, lead, shape) in enumerate(slots):
        path = tmp_path / f"flip{i}.{suffix}"
        shutil.copy2(source, path) if suffix == "h5" else shutil.copytree(source, path)
        flip_byte(path, name, block_chunk(name, shape, 2, lead or 0))
        report = verify(path)
        failed = {c.name: c.detail for c in report.checks if not c.ok}
        assert "checksums" in failed and "block 2 (rows 32-47)" in failed["checksums"], failed
        with open_transfer_set(path) as ts:
            with pytest.raises(IntegrityError, match="block 2 "):
                ts.read_block(2)  # every array
            at = {} if lead is None or name == S.MEMBER_LOGITS else {
                "temperature": ts.temperatures[lead]}
            with pytest.raises(IntegrityError, match="block 2 "):
                ts.read_block(2, [name], **at)  # the damaged array alone
            others = [n for n in ts.row_arrays() if n != name]
            ts.read_block(2, others)  # a read that does not touch it is not refused
            if at:  # nor a read of another temperature of the same array
                other_t = ts.temperatures[1 - lead]
                ts.read_block(2, [name], temperature=other_t)
            ts.read_block(1)  # nor another block


def test_stage_two_serves_a_temperature_whose_sibling_is_damaged(tmp_path: Path,
                                                                  npz_data: str) -> None:
    """Probs at T=1 damaged: verify fails, a student at T=4 trains (it reads only T=4's probs,
    checked), a student at T=1 is refused naming the block."""
    from softlabels.sets.verify import verify
    from softlabels.train.datasets import SoftTargetBatches

    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    flip_byte(path, S.PROBS, (0, 2, 0))
    assert not verify(path).ok
    rows = sum(len(b[1]) for b in SoftTargetBatches(npz_data, path, temperature=4.0,
                                                     batch_size=8))
    assert rows == 103
    with pytest.raises(IntegrityError, match="block 2 .*'probs' at T=1"):
        list(SoftTargetBatches(npz_data, path, temperature=1.0, batch_size=8))


def test_read_block_reads_what_it_is_asked_for(made: Path) -> None:
    with open_transfer_set(made) as ts:
        whole = ts.read_block(3)
        part = ts.read_block(3, [S.LABELS, S.PROBS], temperature=4.0)
        assert sorted(part) == [S.LABELS, S.PROBS]
        np.testing.assert_array_equal(part[S.PROBS], whole[S.PROBS][1])  # T=4, no T axis
        np.testing.assert_array_equal(part[S.LABELS], whole[S.LABELS])
        with pytest.raises(TransferSetError, match="not T=2"):
            ts.read_block(3, [S.PROBS], temperature=2.0)
        with pytest.raises(TransferSetError, match="no row array 'nope'"):
            ts.read_block(3, ["nope"])


# --- sets written in format version 1 stay readable and verifiable ------------------------------

@pytest.mark.parametrize("checksums", [True, False], ids=["block_checksum", "none"])
def test_a_version_1_set_reads_and_verifies(made: Path, checksums: bool) -> None:
    from softlabels.sets.verify import verify
    from softlabels.train.datasets import SoftTargetBatches

    with open_transfer_set(made) as ts:
        want = {b: ts.read_block(b) for b in range(ts.num_blocks)}
    as_version_1(made, checksums=checksums)
    report = verify(made)
    assert report.ok, report.to_dict()
    detail = {c.name: c.detail for c in report.checks}
    assert "format version 1" in detail["status"]
    assert ("one per block" if checksums else "none recorded") in detail["checksums"]
    with open_transfer_set(made) as ts:
        assert ts.format_version == 1
        for b, arrays in want.items():
            got = ts.read_block(b)
            for name in arrays:
                np.testing.assert_array_equal(got[name], arrays[name])
            part = ts.read_block(b, [S.PROBS], temperature=1.0)
            assert list(part) == [S.PROBS]
            np.testing.assert_array_equal(part[S.PROBS], arrays[S.PROBS][0])
    data = f"npz:{made.parent / 'data.npz'}"
    assert sum(len(b[1]) for b in SoftTargetBatches(data, made, temperature=4.0,
                                                    batch_size=8)) == 103


def test_a_version_1_set_checks_every_array_on_a_checked_read(made: Path) -> None:
    """Its one checksum covers every row array: reading labels alone still reads and checks
    the logits, so damage there is refused (the set cannot tell which array changed)."""
    from softlabels.sets.verify import verify

    as_version_1(made)
    _edit(made, S.LOGITS, (slice(40, 41), slice(0, 1)), np.float16(0.125))
    assert not verify(made).ok
    with open_transfer_set(made) as ts:
        with pytest.raises(IntegrityError, match="block 2 .*checksum"):
            ts.read_block(2, [S.LABELS])
        assert len(ts.read_block(2, [S.LABELS], checksum=False)[S.LABELS]) == 16


def test_a_version_1_set_is_not_resumed_by_this_writer(tmp_path: Path, npz_data: str) -> None:
    from softlabels.errors import TransferSetError as Refused

    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    as_version_1(path)
    with open_store(path, "r+") as store:  # as if an older softlabels had been stopped
        store.set_meta({**store.get_meta(), "status": "writing"})
        store.write(S.BLOCK_DONE, slice(3, 4), np.zeros(1, np.uint8))
    with pytest.raises(Refused, match="format version 1.*--overwrite"):
        precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
                   random_teacher=True)
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               overwrite=True, random_teacher=True)
    with open_transfer_set(path) as ts:
        assert ts.format_version == 2 and verify_ok(path)


def verify_ok(path: Path) -> bool:
    from softlabels.sets.verify import verify

    return verify(path).ok


def test_convert_copies_a_version_1_set_into_version_2(made: Path, tmp_path: Path) -> None:
    from softlabels.format.operations import convert

    as_version_1(made)
    out = tmp_path / f"copy{made.suffix}"
    convert(made, out)
    assert verify_ok(out)
    with open_transfer_set(made) as old, open_transfer_set(out) as new:
        assert (old.format_version, new.format_version) == (1, 2)
        for name in old.row_arrays():
            np.testing.assert_array_equal(old.read(name), new.read(name))
        assert old.meta["digest"] == new.meta["digest"]  # the same identity


@pytest.mark.parametrize("name", [S.INDEX, S.SAMPLE_HASH])
def test_a_damaged_index_or_sample_hash_is_named_as_damage_not_as_other_data(
        made: Path, npz_data: str, name: str) -> None:
    """The alignment check reads `index` and `sample_hash` whole; when a damaged block of either
    makes a row disagree with the data, the user is told the set is damaged (and which block),
    not to pass other DATA."""
    from softlabels.sources.load import load_data
    from softlabels.train.datasets import SoftTargetBatches, check_alignment

    _edit(made, name, slice(40, 41), np.array([7], dtype=np.int64 if name == S.INDEX
                                                 else np.uint64))
    with open_transfer_set(made) as ts:
        with pytest.raises(IntegrityError, match="block 2 .*" + name):
            check_alignment(load_data(npz_data), ts, np.arange(ts.num_rows))
    with pytest.raises(IntegrityError, match="block 2 "):
        list(SoftTargetBatches(npz_data, made, temperature=1.0, batch_size=8))


@pytest.mark.parametrize("suffix", ["zarr"])
def test_a_block_read_into_the_callers_memory_is_checked_there(made: Path) -> None:
    """`read_blocks(into=...)` (stage two reads a window's blocks straight into the window):
    the arrays read are views of the memory given, equal to an ordinary read; an array whose
    chunk is not one whole block's size is read as before; and a flipped byte read that way is
    refused, naming its block: the bytes checked are the ones in the caller's memory."""
    with open_transfer_set(made) as ts:
        want = ts.read_block(2, [S.PROBS, S.LABELS], temperature=4.0)
        into = {S.PROBS: np.zeros(want[S.PROBS].size, want[S.PROBS].dtype),
                S.LABELS: np.zeros(want[S.LABELS].size, want[S.LABELS].dtype),
                S.INDEX: np.zeros(3, np.int64)}  # not a chunk's size: a buffer of its own
        got = ts.read_blocks([2], [S.PROBS, S.LABELS, S.INDEX], temperature=4.0, reuse=True,
                             into=into)[0]
        for name in (S.PROBS, S.LABELS):
            np.testing.assert_array_equal(got[name], want[name])
            assert np.shares_memory(got[name], into[name]), name
            np.testing.assert_array_equal(into[name].reshape(want[name].shape), want[name])
        assert not np.shares_memory(got[S.INDEX], into[S.INDEX])
        np.testing.assert_array_equal(got[S.INDEX], ts.read_block(2, [S.INDEX])[S.INDEX])
        with pytest.raises(ValueError, match="one block"):
            ts.read_blocks([2, 3], [S.PROBS], temperature=4.0, into=into)
    flip_byte(made, S.PROBS, block_chunk(S.PROBS, (2, 103, 3), 3, lead=1))
    with open_transfer_set(made) as ts, pytest.raises(IntegrityError, match="block 3 "):
        ts.read_blocks([3], [S.PROBS], temperature=4.0, reuse=True,
                       into={S.PROBS: np.zeros(CHUNK * 3, np.float32)})
