"""A damaged blosc-lz4 integer chunk read outside a block (a whole column: `index`, `labels`)
is one line naming the array, never zarr's traceback (a truncated `index` chunk ended
`verify` and `train` in "RuntimeError: error during blosc decompression")."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from token_data import TEACHER, write_tokens

from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format.reader import open_transfer_set


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[str, Path]:
    data = write_tokens(tmp_path / "t.jsonl")  # a sequence set: its index is read whole
    out = tmp_path / "s.zarr"
    precompute(data, [TEACHER], out, chunk_rows=32, device="cpu")
    chunk = out / "index" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:20])  # a torn write: the blosc frame cut short
    return data, out


def test_a_torn_index_chunk_is_named_on_reading(damaged: tuple[str, Path]) -> None:
    with pytest.raises(IntegrityError, match="index .*cannot be read.*fresh copy"):
        open_transfer_set(damaged[1]).index()


@pytest.mark.parametrize("command", ["verify", "train"])
def test_a_torn_index_chunk_is_one_line(damaged: tuple[str, Path], tmp_path: Path,
                                        command: str) -> None:
    data, ts = damaged
    args = ([str(ts)] if command == "verify" else
            ["--data", data, "--model", "gpt:11?dim=8&layers=1&heads=2&context=16",
             "--transfer-set", str(ts),
             "--out", str(tmp_path / "s.pt"), "--epochs", "1", "--device", "cpu"])
    result = CliRunner().invoke(cli, [command, *args])
    assert result.exit_code == 1
    assert "cannot be read" in result.output and "index" in result.output, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, RuntimeError), result.exception
