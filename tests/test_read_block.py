"""TransferSet.read_block: every block a consumer reads is checked, and damage names its block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import CHUNK
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format._store import open_store
from softlabels.format.reader import open_transfer_set
from softlabels.precompute import precompute


@pytest.fixture
def made(npz_data: str, out_path: Path) -> Path:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK)
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
        arrays = {n: store.read(n, (slice(32, 48),) if S.row_axis(n) == 0 else
                                (slice(None), slice(32, 48))) for n in store.names()
                  if n not in S.BOOKKEEPING}
        store.write(S.BLOCK_CHECKSUM, slice(2, 3),
                    np.array([S.block_checksum(arrays)], dtype=np.uint64))
    with open_transfer_set(made) as ts, pytest.raises(IntegrityError, match="labels outside"):
        ts.read_block(2)


def test_report_refuses_a_damaged_set_naming_the_block(made: Path, tmp_path: Path) -> None:
    """`softlabels report` plots only checked blocks: damage is named, never drawn."""
    from click.testing import CliRunner

    from softlabels.cli import cli

    _edit(made, S.LABELS, slice(33, 34), np.int64(1))
    result = CliRunner().invoke(cli, ["report", str(made), "--out", str(tmp_path / "rep")])
    assert result.exit_code != 0
    assert "block 2 (rows 32-47)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
