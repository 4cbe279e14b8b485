"""The tiny language-model pipeline in --quick mode, on the bundled CPython source text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT
from softlabels.cli import cli
from softlabels.errors import SoftlabelsError
from softlabels.experiments.tiny_lm import split_text
from softlabels.sets.verify import verify


@pytest.mark.parametrize("pipeline", ["pipelines/tiny_lm.toml", "pipelines/tiny_lm_long.toml"])
def test_quick_tiny_lm_writes_results_and_rerun_skips(tmp_path: Path, pipeline: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # data paths in the file are relative to the repository root
    out = tmp_path / "run"
    first = CliRunner().invoke(cli, ["run", pipeline, "--quick",
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
    # `softlabels evaluate` on a checkpoint scores the held-out text as the job did
    for key in ("teacher", "student_distilled"):
        scored = CliRunner().invoke(cli, ["evaluate", "--data", f"tokens:{out / 'held_out.jsonl'}",
                                          "--model", str(out / f"{key}.pt"), "--json"])
        assert scored.exit_code == 0, scored.output
        mine = json.loads(scored.stdout)
        # results.json holds 4 decimals
        assert mine["perplexity"] == pytest.approx(r[key]["perplexity"], abs=6e-5)
        assert mine["token_accuracy"] == pytest.approx(r[key]["token_accuracy"], abs=6e-5)
    again = CliRunner().invoke(cli, ["run", pipeline, "--quick",
                                     "--out", str(out)])
    assert again.exit_code == 0 and "[run ]" not in again.output


def test_validation_split_is_whole_chunks_of_the_training_text() -> None:
    data = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes: 10 chunks of 1,000 and a tail
    train, val = split_text(data, {"chunk_bytes": 1000, "every": 4})
    assert val == data[3000:4000] + data[7000:8000]  # chunks 3 and 7
    assert train == data[:3000] + data[4000:7000] + data[8000:]
    assert split_text(data, None) == (data, b"")
    for bad in ({"chunk_bytes": 1000, "every": 1}, {"chunk_bytes": "1k", "every": 4},
                {"chunk_bytes": 5000, "every": 4}):  # the last: no whole validation chunk
        with pytest.raises(SoftlabelsError, match="validation"):
            split_text(data, bad)


def test_seeds_pair_students_and_subsets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["run", "pipelines/tiny_lm.toml", "--quick", "--seeds", "2",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert r["seeds_run"] == [0, 1] and (out / "seed1" / "subset_soft.pt").exists()
    hard = r["subset_hard"]
    assert len(hard["per_seed"]) == 2 and hard["perplexity"] == pytest.approx(
        sum(s["perplexity"] for s in hard["per_seed"]) / 2, abs=1e-3)
    assert hard["intervals"]["perplexity"]["ci95"] is not None  # two seeds give an interval
    assert all(v["held_out"]["perplexity_difference"]["ci95"] for v in r["verdicts"])
