"""`precompute` and `verify` on a sequence set speak of positions, sequences and tokens (as
`info` does), not of rows; a row that verify names is also located as (sequence, token)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from token_data import TEACHER, write_tokens

from softlabels.cli import cli
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set
from softlabels.format.sequence import read_offsets

ROWS = re.compile(r"\brows?\b")


@pytest.fixture
def made(tmp_path: Path, suffix: str) -> tuple[str, Path, str]:
    """Token data (23 sequences, 195 positions), a dense set of it by the CLI, its output."""
    tokens = write_tokens(tmp_path / "t.jsonl")
    out = tmp_path / f"s{suffix}"
    result = CliRunner().invoke(cli, ["precompute", "--data", tokens, "--teacher", TEACHER,
                                      "--out", str(out), "--chunk-rows", "16",
                                      "--temperatures", "1,2", "--dtype", "float32",
                                      "--random-teacher"])
    assert result.exit_code == 0, result.output
    return tokens, out, result.stdout


def located(path: Path, row: int) -> str:
    with open_transfer_set(path) as ts:
        offsets = read_offsets(ts)
    s = int(np.searchsorted(offsets, row, side="right")) - 1
    return f"position {row} (sequence {s}, token {row - offsets[s]})"


def test_precompute_says_positions_of_sequences(made: tuple[str, Path, str]) -> None:
    tokens, out, said = made
    assert f"wrote {out}: 195 positions of 23 sequences x 11 classes at T=1,2" in said
    assert "(195 positions computed in" in said and not ROWS.search(said)
    again = CliRunner().invoke(cli, ["precompute", "--data", tokens, "--teacher", TEACHER,
                                     "--out", str(out), "--chunk-rows", "16",
                                     "--temperatures", "1,2", "--dtype", "float32",
                                     "--random-teacher"])
    assert f"{out} is already complete (195 positions of 23 sequences)" in again.stdout


def test_verify_of_a_good_sequence_set_names_no_rows(made: tuple[str, Path, str]) -> None:
    tokens, out, _ = made
    result = CliRunner().invoke(cli, ["verify", str(out), "--data", tokens,
                                      "--teacher", TEACHER])
    assert result.exit_code == 0, result.output
    assert not ROWS.search(result.stdout), result.stdout
    assert "every position's probabilities sum to 1" in result.stdout
    assert "sequence indices within [0, 23)" in result.stdout
    assert "64 sampled positions recomputed" in result.stdout


def test_verify_locates_damage_by_sequence_and_token(made: tuple[str, Path, str]) -> None:
    tokens, out, _ = made
    with open_store(out, "r+") as store:  # a NaN at row 40, in block 2 (rows 32-47)
        z = store.read(S.LOGITS, slice(40, 41))
        z[0, 3] = np.nan
        store.write(S.LOGITS, slice(40, 41), z)
    result = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    assert result.exit_code == 1
    assert "block 2 (positions 32-47) does not match its checksum" in result.stdout
    assert f"logits has NaN/inf at {located(out, 40)}" in result.stdout
    assert not ROWS.search(result.stdout), result.stdout


def test_verify_names_the_worst_recomputed_position(made: tuple[str, Path, str]) -> None:
    tokens, out, _ = made
    result = CliRunner().invoke(cli, ["verify", str(out), "--data", tokens, "--teacher",
                                      TEACHER + "?seed=4", "--tolerance", "1e-3"])
    assert result.exit_code == 1
    line = next(x for x in result.stdout.splitlines() if x.startswith("FAIL teacher:"))
    row = int(re.search(r"worst at position (\d+)", line).group(1))
    assert line.endswith(f"worst at {located(out, row)}")
