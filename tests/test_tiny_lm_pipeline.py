"""The tiny language-model pipeline in --quick mode, on the bundled CPython source text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from softlabels.cli import cli
from softlabels.verify import verify

ROOT = Path(__file__).resolve().parents[1]


def test_quick_tiny_lm_writes_results_and_rerun_skips(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # data paths in the file are relative to the repository root
    out = tmp_path / "run"
    first = CliRunner().invoke(cli, ["run", "pipelines/tiny_lm.toml", "--quick",
                                     "--out", str(out)])
    assert first.exit_code == 0, first.output
    r = json.loads((out / "results.json").read_text())
    for key in ("teacher", "student_hard", "student_distilled", "subset_hard", "subset_soft"):
        assert 1 < r[key]["perplexity"] < 256 * 4 and 0 <= r[key]["token_accuracy"] <= 1
    # 12,000 bytes less the validation split (every 5th 1,024-byte chunk: chunks 4 and 9);
    # a validation sequence of 64 bytes has 63 next-byte positions
    assert r["train_positions"] == 12000 - 2 * 1024
    assert r["validation_positions"] == 2 * 1024 - 2 * 1024 // 64
    assert 0 < r["bytes_per_token"] < 200
    for key in ("student_hard", "subset_hard", "subset_soft"):  # kept at a validated epoch
        row = r[key]["per_seed"][0]
        assert row["validation_perplexity"] == min(p["validation_perplexity"]
                                                   for p in row["curve"])
    assert 0 <= r["subset_hard"]["train_token_accuracy"] <= 1
    assert {v["effect"] for v in r["verdicts"]} >= {
        "soft targets much better than hard on 3% of the data"}
    assert r["subset_positions"] < r["train_positions"] * 0.2
    assert (out / "tiny_lm.png").read_bytes()[:4] == b"\x89PNG"
    assert "| student, distilled from top-k, 3% of the text |" in (out / "results.md").read_text()
    assert verify(out / "subset.zarr", data=f"tokens:{out / 'train.jsonl'}",
                  teachers=[str(out / "teacher.pt")]).ok
    again = CliRunner().invoke(cli, ["run", "pipelines/tiny_lm.toml", "--quick",
                                     "--out", str(out)])
    assert again.exit_code == 0 and "[run ]" not in again.output
