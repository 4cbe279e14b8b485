"""A set marked complete must have every block marked done in `block_done`: a deleted or altered
marker is refused by every reader in one line naming the block, verify fails it, and rerunning
the precompute command that made the set rewrites that block."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CHUNK
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify

BLOCK = 3  # rows 48-63 of 103


def made_set(data: str, path: Path) -> Path:
    precompute(data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    return path


@pytest.fixture
def made(npz_data: str, out_path: Path) -> Path:
    return made_set(npz_data, out_path)


def undo_block(path: Path, how: str) -> None:
    """The block's marker deleted (its Zarr chunk gone: it reads as the fill value 0) or set
    to 0, as a hand edit or a damaged store would leave it."""
    if how == "deleted":
        (path / S.BLOCK_DONE / "c" / str(BLOCK)).unlink()
        return
    with open_store(path, "r+") as store:
        store.write(S.BLOCK_DONE, slice(BLOCK, BLOCK + 1), np.zeros(1, np.uint8))


def hows(suffix: str) -> list[str]:
    return ["deleted", "zeroed"] if suffix == "zarr" else ["zeroed"]


def test_a_block_not_marked_done_is_refused_on_its_first_read_naming_it(
        made: Path, suffix: str) -> None:
    for how in hows(suffix):
        undo_block(made, how)
        with open_transfer_set(made) as ts:
            ts.read_block(BLOCK - 1)  # the other blocks stay readable
            for arrays in (None, [S.LABELS]):  # whatever is read of it
                with pytest.raises(IntegrityError, match=rf"block {BLOCK} \(rows 48-63\).*"
                                   r"block_done.*softlabels precompute.*softlabels verify"
                                   ) as err:
                    ts.read_block(BLOCK, arrays)
                assert "\n" not in str(err.value)
        report = verify(made)  # verify still reports, as a failed check
        assert not report.ok
        assert [c for c in report.checks if c.name == "blocks" and not c.ok
                and f"block {BLOCK} (rows 48-63)" in c.detail], report.to_dict()
        with open_store(made, "r+") as store:  # put the marker back: the block reads again
            store.write(S.BLOCK_DONE, slice(BLOCK, BLOCK + 1), np.ones(1, np.uint8))
        with open_transfer_set(made) as ts:
            assert len(ts.read_block(BLOCK)[S.LABELS]) == CHUNK
        assert verify(made).ok


def test_every_command_refuses_it_in_one_line(npz_data: str, made: Path,
                                               tmp_path: Path) -> None:
    other = made_set(npz_data, tmp_path / "other" / f"b{made.suffix}")
    undo_block(made, hows(made.suffix[1:])[0])
    outs = tmp_path / "outs"
    outs.mkdir()
    commands = [
        ["info", made, "--stats"],
        ["train", "--data", npz_data, "--model", "mlp:16-8-3", "--transfer-set", made,
         "--epochs", "1", "--out", outs / "s.pt"],
        ["train", "--data", npz_data, "--model", "mlp:16-8-3", "--transfer-set", made,
         "--epochs", "1", "--stream", "--out", outs / "s.pt"],
        ["report", made, "--out", outs / "report"],
        ["convert", made, "--out", outs / "c.zarr"],
        ["subset", made, "--fraction", "0.5", "--out", outs / "s.zarr"],
        ["merge", other, made, "--out", outs / "m.zarr"],
    ]
    for args in commands:
        r = CliRunner().invoke(cli, [str(a) for a in args])
        text = r.stdout + r.stderr
        assert r.exit_code == 1 and text.count("\n") == 1, (args, text)
        assert f"block {BLOCK} (rows 48-63)" in text and "Traceback" not in text, text
        assert list(outs.iterdir()) == [], (args, list(outs.iterdir()))


def test_rerunning_precompute_rewrites_the_block(npz_data: str, made: Path,
                                                 tmp_path: Path, suffix: str) -> None:
    reference = tmp_path / "ref" / made.name
    shutil.copytree(made, reference) if made.is_dir() else (
        reference.parent.mkdir(), shutil.copy2(made, reference))
    for how in hows(suffix):
        undo_block(made, how)
        result = precompute(npz_data, ["mlp:16-8-3"], made, temperatures=[1, 4],
                            chunk_rows=CHUNK, random_teacher=True)
        assert not result.already_complete and result.rows_computed == 16
        assert verify(made).ok
        with open_transfer_set(made) as ts, open_transfer_set(reference) as ref:
            assert ts.meta["digest"] == ref.meta["digest"]
            for name in [*ts.row_arrays(), S.ARRAY_CHECKSUM, S.BLOCK_DONE]:
                np.testing.assert_array_equal(ts.store.read(name), ref.store.read(name), name)
