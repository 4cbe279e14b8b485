"""Input files that no one writes as data: a fifo (opening it for reading waits for a writer)
or a link to a device (read without end) in place of an image, a logits `.npy`, a text
document or a file an input proof hashes. Each is refused in one line naming it, never waited
on; an image past its bound is refused by its size, unread."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from waits import within

from conftest import ROOT
from softlabels.cli import cli
from softlabels.errors import DataError
from softlabels.input_proof import file_digest
from softlabels.safe_read import read_input
from softlabels.sources.images import ImageFolderSource

SPECIALS = ["fifo", "/dev/zero"]


def special(path: Path, what: str) -> Path:
    if path.exists():
        path.unlink()
    if what == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(what)
    return path


@pytest.mark.parametrize("what", SPECIALS)
def test_an_image_that_is_a_fifo_or_a_device_is_refused_or_skipped(tmp_path: Path,
                                                                   what: str) -> None:
    folder = tmp_path / "images"
    shutil.copytree(ROOT / "data" / "images", folder)
    source = ImageFolderSource(folder)
    i = 1
    special(Path(source.samples[i][0]), what)
    got = within(20, lambda: source.read(i))
    assert isinstance(got, DataError) and "is not a regular file" in str(got)
    assert "--skip-bad-images" in str(got)  # the image advice still follows
    assert isinstance(source.read(0), bytes)


def test_an_image_past_its_bound_is_refused_unread(tmp_path: Path) -> None:
    image = tmp_path / "huge.png"
    image.write_bytes(b"")
    os.truncate(image, 4 << 30)  # holes: no disk used
    with pytest.raises(DataError, match="holds 4294967296 bytes, more than"):
        read_input(image, "image", limit=1 << 30)


@pytest.mark.parametrize("what", SPECIALS)
def test_import_of_a_logits_npy_that_is_a_fifo_or_a_device_is_one_line(
        tmp_path: Path, npz_data: str, what: str) -> None:
    logits = special(tmp_path / "logits.npy", what)
    result = within(30, lambda: CliRunner().invoke(cli, [
        "import", "--logits", str(logits), "--num-classes", "3", "--data", npz_data,
        "--teacher-name", "mine", "--out", str(tmp_path / "set.zarr")]))
    assert result.exit_code == 1 and "is not a regular file" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "set.zarr").exists()


@pytest.mark.parametrize("what", SPECIALS)
def test_a_text_document_or_a_hashed_input_that_is_a_fifo_is_refused(tmp_path: Path,
                                                                     what: str) -> None:
    from softlabels.sources.text import _read_text

    path = special(tmp_path / "doc.txt", what)
    for work in (lambda: _read_text(path), lambda: file_digest(path)):
        got = within(20, work)
        assert isinstance(got, DataError) and "is not a regular file" in str(got), got


def test_regular_files_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes(b"the cat")
    assert read_input(path, "text") == b"the cat" == read_input(path, "text", limit=7)
    with pytest.raises(DataError, match="holds 7 bytes, more than 6"):
        read_input(path, "text", limit=6)
    np.save(tmp_path / "a.npy", np.arange(3))
    assert file_digest(tmp_path / "a.npy").startswith("sha256:")


@pytest.mark.parametrize("damage", ["fifo", "empty arrow", "empty state", "huge state"])
def test_a_damaged_datasets_directory_is_one_line(tmp_path: Path, damage: str) -> None:
    """A `datasets` directory (save_to_disk) with a fifo for its Arrow file (load_from_disk
    waited on it), an empty Arrow file or state.json (pyarrow's and json's tracebacks), or a
    state.json grown to 4 GiB of holes (read whole): one line naming it."""
    datasets = pytest.importorskip("datasets")
    from softlabels.sources.saved_datasets import load_saved

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]]}).save_to_disk(str(folder))
    assert load_saved(folder)["input_ids"] == [[1, 2], [3]]
    arrow = next(folder.glob("*.arrow"))
    if damage == "fifo":
        special(arrow, "fifo")
    elif damage == "empty arrow":
        arrow.write_bytes(b"")
    elif damage == "empty state":
        (folder / "state.json").write_bytes(b"")
    else:
        os.truncate(folder / "state.json", 4 << 30)
    got = within(30, lambda: load_saved(folder))
    assert isinstance(got, DataError), got
    assert "\n" not in str(got) and str(folder) in str(got)


def test_a_lease_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path,
                                                             npz_data: str) -> None:
    os.mkfifo(tmp_path / "out.zarr.lock")
    result = within(30, lambda: CliRunner().invoke(cli, [
        "precompute", "--data", f"npz:{npz_data}", "--teacher", "mlp:16-8-3",
        "--random-teacher", "--out", str(tmp_path / "out.zarr")]))
    assert result.exit_code == 1 and "lease file" in result.output, result.output
    assert "not a regular file" in result.output


def test_a_json_lines_file_of_one_endless_line_is_refused_at_its_bound(tmp_path: Path) -> None:
    """A 4 GiB file of holes is one line: iterating over the file held all of it."""
    from softlabels.safe_read import MAX_LINE_BYTES, input_lines
    from softlabels.sources.token_files import read_jsonl

    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(path) == ([{"a": 1}, {"a": 2}], [1, 3])
    os.truncate(path, 4 << 30)
    with pytest.raises(DataError, match=f"line 4 holds more than {MAX_LINE_BYTES} bytes"):
        list(input_lines(path, "JSON lines file"))


def test_empty_arrays_and_index_files_are_one_line(tmp_path: Path, npz_data: str) -> None:
    """numpy's EOFError on an empty .npz/.npy was printed as 'aborted'; an empty index text
    file printed numpy's warning before the error."""
    (tmp_path / "d.npz").write_bytes(b"")
    (tmp_path / "l.npy").write_bytes(b"")
    (tmp_path / "idx.txt").write_bytes(b"")
    for args, said in [
            (["precompute", "--data", f"npz:{tmp_path / 'd.npz'}", "--teacher", "mlp:16-8-3",
              "--random-teacher", "--out", str(tmp_path / "a.zarr")], "not an .npz archive"),
            (["import", "--logits", str(tmp_path / "l.npy"), "--data", f"npz:{npz_data}",
              "--teacher-name", "T", "--out", str(tmp_path / "b.zarr")], "not a .npy array")]:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and said in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    from softlabels.format.selection import read_indices

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's warning would fail here
        assert read_indices(tmp_path / "idx.txt").size == 0
    os.truncate(tmp_path / "idx.txt", 4 << 30)
    with pytest.raises(Exception, match="save that many indices as a .npy array"):
        read_indices(tmp_path / "idx.txt")


def test_a_zip_claiming_a_huge_directory_is_refused_unread(tmp_path: Path) -> None:
    import struct

    path = tmp_path / "big.zarr.zip"
    size = (4 << 30) - 64
    with open(path, "wb") as f:  # holes, then an end record claiming a 4 GiB directory
        f.truncate(size)
        f.seek(size)
        f.write(struct.pack("<4s4H2LH", b"PK\005\006", 0, 0, 1, 1, size, 0, 0))
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code == 1 and "its zip directory claims" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["tokenizer", "sidecar"])
def test_a_description_file_that_is_a_fifo_is_refused_not_left_out(tmp_path: Path,
                                                                   where: str) -> None:
    """A fifo for tokenizer_config.json was left out of the tokenizer's record (and the
    tokenizer loaded without it); a fifo for an export's _softlabels.json made the export
    read as foreign Parquet."""
    folder = tmp_path / "dir"
    folder.mkdir()
    if where == "tokenizer":
        from softlabels.sources.tokenizers import tokenizer_files

        (folder / "tokenizer.json").write_text("{}")
        os.mkfifo(folder / "tokenizer_config.json")
        got = within(20, lambda: tokenizer_files(folder))
    else:
        from softlabels.sets.export import SIDECAR, read_export_info

        os.mkfifo(folder / SIDECAR)
        got = within(20, lambda: read_export_info(folder))
    assert isinstance(got, Exception) and "not a regular file" in str(got), got


def test_an_unreadable_checkpoint_never_advises_turning_weights_only_off(tmp_path: Path,
                                                                        npz_data: str) -> None:
    """torch's message for a file weights_only cannot load says re-running with
    weights_only=False "will likely succeed": advice to let the file run code, not passed on."""
    path = tmp_path / "r.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    result = CliRunner().invoke(cli, ["evaluate", "--data", f"npz:{npz_data}", "--model",
                                      str(path)])
    assert result.exit_code == 1 and "not a file torch.save wrote" in result.output
    assert "weights_only" not in result.output and "False" not in result.output


@pytest.mark.parametrize("spec", ["wds:{path}", "hfds:{path}?image=img"])
def test_an_image_shard_or_parquet_file_that_is_a_fifo_is_refused(tmp_path: Path,
                                                                  spec: str) -> None:
    """tarfile and pyarrow open what they are given; a fifo there waited (pyarrow's wait even
    past SIGTERM)."""
    from softlabels.sources.load import load_data

    path = special(tmp_path / ("s.tar" if spec.startswith("wds") else "s.parquet"), "fifo")
    got = within(20, lambda: load_data(spec.format(path=path)))
    assert isinstance(got, DataError) and "is not a regular file" in str(got), got


def test_a_weights_file_hashed_for_the_record_is_refused_if_a_fifo(tmp_path: Path) -> None:
    from softlabels.teachers.weights import file_sha256

    got = within(20, lambda: file_sha256(special(tmp_path / "w.pth", "fifo")))
    assert isinstance(got, DataError) and "is not a regular file" in str(got), got


def test_a_fifo_among_a_folders_parquet_files_is_refused(tmp_path: Path) -> None:
    from softlabels.sources.load import load_data

    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"img": [b"x"]}), tmp_path / "a.parquet")
    special(tmp_path / "b.parquet", "fifo")
    got = within(20, lambda: load_data(f"hfds:{tmp_path}?image=img"))
    assert isinstance(got, DataError) and "b.parquet is not a regular file" in str(got), got
