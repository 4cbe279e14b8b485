"""Messages from the last audit (issue 23 item 9): a file that is not a transfer set says what
it is; a rerun of a finished `export` says "already complete"; an export into a missing folder
names the folder; `write_set` refuses to resume onto other arrays."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CHUNK, N_ROWS
from softlabels.cli import cli
from softlabels.errors import MismatchError, OptionError
from softlabels.format.reader import open_transfer_set
from softlabels.sets.write_set import write_set

WHAT_A_SET_IS = "a transfer set is a DIR.zarr folder, a FILE.zarr.zip or a FILE.h5"


def _not_a_set(path: Path, what: str) -> None:
    result = CliRunner().invoke(cli, ["info", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert what in lines[0] and WHAT_A_SET_IS in lines[0], lines[0]
    assert "metadata is damaged" not in lines[0], lines[0]  # what it said before


def test_things_that_are_not_sets_are_named(tmp_path: Path) -> None:
    rand = np.random.default_rng(0).bytes(5000)
    for name in ("rand.bin", "rand.zarr"):
        (tmp_path / name).write_bytes(rand)
        _not_a_set(tmp_path / name, f"{tmp_path / name} is a file, not a transfer set")
    (tmp_path / "rand.h5").write_bytes(rand)
    _not_a_set(tmp_path / "rand.h5", "is not an HDF5 file (no HDF5 signature)")
    for name in ("empty", "empty.zarr"):
        (tmp_path / name).mkdir()
        _not_a_set(tmp_path / name, "is an empty folder, not a transfer set")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    _not_a_set(tmp_path / "other", "is a folder without zarr.json, not a transfer set")
    for name in ("other.zip", "other.zarr.zip"):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("notes.txt", "hi")
        _not_a_set(tmp_path / name, "is a zip file without zarr.json at its root")
    (tmp_path / "fake.zarr.zip").write_bytes(rand)
    _not_a_set(tmp_path / "fake.zarr.zip", "is not a zip file")


@pytest.fixture(scope="module")
def sequence_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pyarrow")
    from token_data import TEACHER, write_tokens

    from softlabels.compute.blocks import precompute

    d = tmp_path_factory.mktemp("seq")
    spec = write_tokens(d / "t.jsonl", masks=True) + "?field=input_ids&mask=loss_mask"
    precompute(spec, [TEACHER], d / "topk.zarr", topk=4, temperatures=[1, 2], chunk_rows=16)
    return d / "topk.zarr"


def test_a_rerun_of_a_finished_export_is_already_complete(sequence_set: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "x"
    args = ["export", str(sequence_set), "--to", "parquet", str(out)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    files = sorted(p.name for p in out.iterdir())
    again = CliRunner().invoke(cli, args)  # before: "x exists and is not an empty directory"
    assert again.exit_code == 0, again.output
    assert again.output.strip() == f"{out} is already complete ({_positions(sequence_set)} " \
                                   "positions); nothing to do"
    assert sorted(p.name for p in out.iterdir()) == files
    other = CliRunner().invoke(cli, [*args, "--temperature", "2"])  # another export: refused
    assert other.exit_code == 1 and "not an empty directory" in other.output


def _positions(path: Path) -> int:
    with open_transfer_set(path) as ts:
        return ts.num_rows


def test_an_export_into_a_missing_folder_names_it(sequence_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "x"
    result = CliRunner().invoke(cli, ["export", str(sequence_set), "--to", "parquet", str(out)])
    # before: "cannot use .../missing/x.exporting: No such file or directory; check the path
    # and its permissions"
    assert result.exit_code == 1, result.output
    assert f"the folder {tmp_path / 'missing'} does not exist" in result.output
    assert "permissions" not in result.output and not (tmp_path / "missing").exists()


class Stop(Exception):
    pass


def test_write_set_refuses_to_resume_onto_other_arrays(tmp_path: Path, npz_data: str) -> None:
    rng = np.random.default_rng(1)
    a, b = (rng.normal(size=(N_ROWS, 5)).astype(np.float32) for _ in range(2))
    out = tmp_path / "w.zarr"

    def stop_after_one(done: int, total: int) -> None:
        assert total > 1
        raise Stop  # a kill after the first block

    with pytest.raises(Stop):
        write_set(out, logits=a, data=npz_data, teacher_name="t", chunk_rows=CHUNK,
                  progress=stop_after_one)
    # before: resumed, a set whose first block came from `a` and the rest from `b`
    with pytest.raises(MismatchError, match="begun from other arrays"):
        write_set(out, logits=b, data=npz_data, teacher_name="t", chunk_rows=CHUNK)
    meta = write_set(out, logits=a, data=npz_data, teacher_name="t", chunk_rows=CHUNK)
    assert meta["provenance"]["imported_from"]["digest"]
    with open_transfer_set(out) as ts:
        np.testing.assert_array_equal(ts.logits(), a)
    with pytest.raises(MismatchError):  # a finished set is not called complete for `b` either
        write_set(out, logits=b, data=npz_data, teacher_name="t", chunk_rows=CHUNK)
    write_set(out, logits=b, data=npz_data, teacher_name="t", chunk_rows=CHUNK, overwrite=True)
    with open_transfer_set(out) as ts:
        np.testing.assert_array_equal(ts.logits(), b)
    with pytest.raises(OptionError):
        write_set(out, logits=b, data=npz_data, teacher_name="t", num_classes=9)
