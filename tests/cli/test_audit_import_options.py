"""`import --parquet/--vllm` with options that only the array import reads: refused in one
line, nothing written (`import --parquet EXPORT --data OTHER` wrote a complete set, exit 0,
whose rows came from another dataset than the one named: --data was silently ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from softlabels.cli import cli


@pytest.mark.parametrize("source", ["--parquet", "--vllm"])
@pytest.mark.parametrize("extra", [["--data", "npz:x.npz"], ["--labels", "y.npy"],
                                   ["--index", "i.npy"], ["--num-classes", "3"]])
def test_array_options_beside_parquet_or_vllm_are_refused(tmp_path: Path, source: str,
                                                          extra: list[str]) -> None:
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(cli, ["import", source, str(tmp_path / "in"), "--out", str(out),
                                      "--topk", "2", "--vocab-size", "5", "--teacher-name", "t",
                                      *extra])
    assert result.exit_code == 2, result.output
    assert f"{extra[0]} apply to arrays" in result.output and source in result.output
    assert not out.exists() and not Path(f"{out}.lock").exists()
