"""`verify --data` with data of the other kind names the kind (an example set verified against
token data said "the dataset has 23 examples, the set was made from 103", a wrong lead)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from token_data import write_tokens

from conftest import make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute


def test_an_example_set_verified_against_tokens_names_the_kind(tmp_path: Path) -> None:
    ts = tmp_path / "s.zarr"
    precompute(make_npz(tmp_path / "d.npz"), ["mlp:16-3"], ts, device="cpu",
               random_teacher=True)
    tokens = write_tokens(tmp_path / "t.jsonl")
    result = CliRunner().invoke(cli, ["verify", str(ts), "--data", tokens])
    assert result.exit_code == 1
    assert "not token sequences" in result.output, result.output
    assert "examples, the set was made from" not in result.output
