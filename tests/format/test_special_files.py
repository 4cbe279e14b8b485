"""What no writer makes, where a command opens a set: a fifo or a device in place of the set
itself (`.h5`, `.zarr.zip`, a file named `.zarr`) or of its metadata, and a `zarr.json` or a
chunk grown to gigabytes of holes. Each is refused in one line, never waited on (opening a fifo
waits for a writer) nor read whole (zipfile held 4 GB of /dev/urandom)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
from click.testing import CliRunner
from waits import within

from conftest import CHUNK
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify


@pytest.mark.parametrize("name", ["set.h5", "set.zarr.zip", "set.zarr", "myset"])
@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "/dev/urandom"])
def test_a_set_path_that_is_a_fifo_or_a_device_is_one_line(tmp_path: Path, name: str,
                                                           what: str) -> None:
    path = tmp_path / name
    if what == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(what)
    for command in ("info", "verify"):
        result = within(20, lambda command=command: CliRunner().invoke(cli, [command, str(path)]))
        assert result.exit_code == 1, result.output
        assert "not a regular file or a folder" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("where", ["zarr.json", "probs/zarr.json", "sample_hash/c/1"])
def test_a_file_of_a_set_grown_to_gigabytes_is_refused_unread(npz_data: str, tmp_path: Path,
                                                              where: str) -> None:
    """A `zarr.json` or a chunk read through zarr (the sample hashes, read whole by `verify`
    and `train`) extended to 4 GiB of holes: refused before it is read."""
    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    os.truncate(path / where, 4 << 30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = CliRunner().invoke(cli, ["info", str(path)])
    if where.endswith("zarr.json"):
        assert result.exit_code == 1 and "more than metadata ever takes" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    else:  # info reads no chunk; verify names the block, a whole-column read (train) fails
        assert result.exit_code == 0, result.output
        report = verify(path)
        assert not report.ok and any("more than a chunk of its array" in c.detail
                                     for c in report.checks if not c.ok)
        with open_transfer_set(path) as ts, pytest.raises(SoftlabelsError,
                                                          match="more than a chunk"):
            ts.sample_hash()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 512 * 1024, f"the process grew by {grown // 1024} MiB"
