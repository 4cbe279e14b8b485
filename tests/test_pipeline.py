"""The MNIST pipeline in --quick mode, on the bundled real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from softlabels.cli import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_pipeline_writes_results_and_rerun_skips(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # DATA specs in the file are relative to the repository root
    out = tmp_path / "run"
    first = CliRunner().invoke(cli, ["run", "pipelines/mnist_hinton.toml", "--quick",
                                     "--out", str(out)])
    assert first.exit_code == 0, first.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["test_examples"] == 1000 and r["train_examples"] + r["validation_examples"] == 4000
    for key in ("teacher", "student_hard", "student_distilled"):
        assert set(r[key]) >= {"errors", "accuracy"}
        assert r[key]["errors"] == round((1 - r[key]["accuracy"]) * 1000)
    assert set(r["omit3"]) >= {"errors", "errors_on_3", "bias", "errors_adjusted",
                               "errors_on_3_adjusted"}
    assert r["omit3"]["bias"] in r["config"]["omit3"]["bias_grid"]
    assert set(r["subset_3pct"]["hard"]) >= {"accuracy"} and r["subset_3pct"]["rows"] > 0
    assert [row["temperature"] for row in r["temperature_sweep"]] == ["hard", 1.0, 4.0]
    for png in ("temperature_sweep.png", "errors.png", "soft_targets.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| 784-800-800-10, distilled |" in (out / "results.md").read_text()

    again = CliRunner().invoke(cli, ["run", "pipelines/mnist_hinton.toml", "--quick",
                                     "--out", str(out)])
    assert again.exit_code == 0, again.stderr
    assert "[run ]" not in again.stderr and again.stderr.count("[skip]") >= 10
    r2 = json.loads((out / "results.json").read_text())
    assert r2["student_distilled"] == r["student_distilled"] and r2["omit3"] == r["omit3"]


def test_bad_pipeline_files(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("recipe = [")
    (tmp_path / "unknown.toml").write_text('recipe = "nope"')
    for name, message in (("bad.toml", "not valid TOML"), ("unknown.toml", "unknown recipe"),
                          ("missing.toml", "no pipeline file")):
        result = CliRunner().invoke(cli, ["run", str(tmp_path / name)])
        assert result.exit_code == 1 and message in result.stderr
        assert "Traceback" not in result.stderr


def test_set_overrides_a_value() -> None:
    from softlabels.experiments.pipeline import load_pipeline, parse_override

    assert parse_override("temperature_sweep.epochs=100") == {
        "temperature_sweep": {"epochs": 100}}
    assert parse_override("data.train=mnist:x") == {"data": {"train": "mnist:x"}}
    cfg = load_pipeline(ROOT / "pipelines/mnist_hinton.toml",
                        overrides=["temperature_sweep.epochs=100", "seed=3"])
    assert cfg["temperature_sweep"]["epochs"] == 100 and cfg["seed"] == 3
    assert cfg["temperature_sweep"]["model"] == "mlp:784-30-30-10"  # the rest stays
    result = CliRunner().invoke(cli, ["run", str(ROOT / "pipelines/mnist_hinton.toml"),
                                      "--set", "nonsense"])
    assert result.exit_code == 1 and "TABLE.KEY=VALUE" in result.stderr
