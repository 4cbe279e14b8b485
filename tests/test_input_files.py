"""Input files that no one writes as data: a fifo (opening it for reading waits for a writer)
or a link to a device (read without end) in place of an image, a logits `.npy`, a text
document or a file an input proof hashes. Each is refused in one line naming it, never waited
on; an image past its bound is refused by its size, unread."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT
from softlabels.cli import cli
from softlabels.errors import DataError
from softlabels.input_proof import file_digest
from softlabels.safe_read import read_input
from softlabels.sources.images import ImageFolderSource

SPECIALS = ["fifo", "/dev/zero"]


def within(seconds: float, work: Callable[[], Any]) -> Any:
    """`work()`'s result or the exception it raised; fails the test if it is still waiting."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            done["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert "value" in done, "waiting on a fifo"
    return done["value"]


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
