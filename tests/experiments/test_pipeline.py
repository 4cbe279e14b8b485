"""The MNIST pipeline in --quick mode, on the bundled real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT
from softlabels.cli import cli


def _is_row(row: dict, n_seeds: int) -> None:
    """A pooled row: every seed's value, their mean, sd and a 95% interval around the mean."""
    assert len(row["seeds"]) == n_seeds and len(row["per_seed"]) == n_seeds
    assert row["mean"] == pytest.approx(sum(row["seeds"]) / n_seeds, abs=1e-3)
    assert row[row["metric"]] == pytest.approx(row["mean"], abs=1e-3)  # today's key: the mean
    lo, hi = row["ci95"]
    assert lo <= row["mean"] <= hi and row["sd"] >= 0


@pytest.mark.slow
def test_quick_pipeline_writes_results_and_rerun_skips(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # DATA specs in the file are relative to the repository root
    out = tmp_path / "run"
    first = CliRunner().invoke(cli, ["run", "pipelines/mnist_hinton.toml", "--quick",
                                     "--seeds", "2", "--out", str(out)])
    assert first.exit_code == 0, first.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["test_examples"] == 1000 and r["train_examples"] + r["validation_examples"] == 4000
    assert r["seeds_run"] == [0, 1]
    for key in ("teacher", "student_hard", "student_distilled"):
        _is_row(r[key], 2)
        assert r[key]["metric"] == "errors"
        assert r[key]["errors"] == pytest.approx((1 - r[key]["accuracy"]) * 1000, abs=0.01)
        assert [s["errors"] for s in r[key]["per_seed"]] == r[key]["seeds"]
    o = r["omit3"]
    _is_row(o, 2)
    assert set(o) >= {"errors", "errors_on_3", "bias", "errors_adjusted", "errors_on_3_adjusted"}
    for s in o["per_seed"]:  # each seed's bias: the grid value with the fewest held-out errors
        by_bias = {float(b): e for b, e in s["validation_errors_by_bias"].items()}
        assert s["bias"] in r["config"]["omit3"]["bias_grid"]
        assert by_bias[s["bias"]] == min(by_bias.values())
    e = r["only_7_8"]
    _is_row(e, 2)
    assert e["metric"] == "error_rate" and 0 <= e["error_rate_adjusted"] <= 1
    for s in e["per_seed"]:
        assert s["error_rate"] == s["errors"] / 1000 and s["bias"] <= 0  # 7 and 8 lowered
        by_bias = {float(b): err for b, err in s["validation_errors_by_bias"].items()}
        assert by_bias[s["bias"]] == min(by_bias.values())
    assert [row["temperature"] for row in r["temperature_sweep"]] == ["hard", 1.0, 4.0]
    assert [row["temperature"] for row in r["student_sweep"]] == ["hard", 8.0, 20.0]
    assert r["student_sweep"][2]["seeds"] == r["student_distilled"]["seeds"]  # T = 20: reused
    max_epochs = r["config"]["temperature_sweep"]["max_epochs"]
    for row in r["temperature_sweep"]:
        _is_row(row, 2)
        for s in row["per_seed"]:  # early stopping on held-out digits, retrained exactly
            assert len(s["val_curve"]) == max_epochs and 1 <= s["epochs"] <= max_epochs
            assert s["val_curve"][s["epochs"] - 1] == min(s["val_curve"]) == s["val_errors"]
    fractions = r["config"]["subset"]["fractions"]
    assert [c["fraction"] for c in r["subset_curve"]] == fractions
    for c in r["subset_curve"]:
        assert set(c) >= {"fraction", "hard", "soft"} and 0 < c["rows"] <= r["train_examples"]
        for kind in ("hard", "soft"):
            _is_row(c[kind], 2)
            _is_row({**c[kind]["intervals"]["accuracy"], "metric": "mean", "per_seed": [0, 0]},
                    2)
        assert c["hard_minus_soft"]["seeds"] == [
            h - s for h, s in zip(c["hard"]["seeds"], c["soft"]["seeds"], strict=True)]
    assert r["subset_3pct"]["fraction"] == 0.03 and r["subset_3pct"]["rows"] > 0
    verdicts = {v["effect"]: v["verdict"] for v in r["verdicts"]}
    assert len(verdicts) == 6 and set(verdicts.values()) <= {
        "reproduced", "partly", "not reproduced", "not run"}
    for png in ("temperature_sweep.png", "errors.png", "soft_targets.png", "subset_curve.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "| 784-800-800-10, distilled |" in md and "## Verdicts" in md

    again = CliRunner().invoke(cli, ["run", "pipelines/mnist_hinton.toml", "--quick",
                                     "--out", str(out)])
    assert again.exit_code == 0, again.stderr
    assert "[run ]" not in again.stderr and again.stderr.count("[skip]") >= 10
    r2 = json.loads((out / "results.json").read_text())
    assert r2["student_distilled"] == r["student_distilled"] and r2["omit3"] == r["omit3"]


def test_t_interval_matches_the_tables() -> None:
    from softlabels.experiments.stats import paired, summarize, t_quantile_975

    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                  (29, 2.0452), (1000, 1.9623)):
        assert t_quantile_975(df) == pytest.approx(t, abs=1e-4)
    s = summarize([1, 2, 3])  # mean 2, sd 1: 2 ± 4.3027 / sqrt(3)
    assert s["seeds"] == [1, 2, 3] and s["mean"] == 2 and s["sd"] == 1
    assert s["ci95"] == pytest.approx([2 - 2.4841, 2 + 2.4841], abs=1e-4)
    one = summarize([7])
    assert one["mean"] == 7 and one["sd"] is None and one["ci95"] is None
    d = paired([53, 50, 55], [37, 40, 36])
    assert d["seeds"] == [16, 10, 19] and d["mean"] == 15
    with pytest.raises(ValueError):
        paired([1, 2], [1])


def test_pooled_rows_and_verdicts() -> None:
    from softlabels.experiments.hinton_summary import direction, pool

    row = pool([{"seed": 0, "errors": 40, "accuracy": 0.96, "per_class_errors": [1, 3]},
                {"seed": 1, "errors": 50, "accuracy": 0.95, "per_class_errors": [2, 4]}])
    assert row["errors"] == 45 and row["accuracy"] == 0.955
    assert row["per_class_errors"] == [1.5, 3.5] and row["seeds"] == [40, 50]
    assert row["intervals"]["accuracy"]["seeds"] == [0.96, 0.95] and "seed" not in row["intervals"]
    assert row["ci95"] == pytest.approx([45 - 12.7062 * 5, 45 + 12.7062 * 5], abs=1e-3)

    def diff(mean: float, lo: float, hi: float) -> dict:
        return {"mean": mean, "ci95": [lo, hi]}
    assert direction(diff(10, 2, 18)) == "reproduced"
    assert direction(diff(10, -2, 22)) == "partly"
    assert direction(diff(-1, -5, 3)) == "not reproduced"
    assert direction({"mean": 3, "ci95": None}) == "undecided (one seed)"


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

    assert parse_override("temperature_sweep.max_epochs=300") == {
        "temperature_sweep": {"max_epochs": 300}}
    assert parse_override("data.train=mnist:x") == {"data": {"train": "mnist:x"}}
    cfg = load_pipeline(ROOT / "pipelines/mnist_hinton.toml",
                        overrides=["temperature_sweep.max_epochs=300", "seed=3"])
    assert cfg["temperature_sweep"]["max_epochs"] == 300 and cfg["seed"] == 3
    assert cfg["temperature_sweep"]["model"] == "mlp:784-30-30-10"  # the rest stays
    result = CliRunner().invoke(cli, ["run", str(ROOT / "pipelines/mnist_hinton.toml"),
                                      "--set", "nonsense"])
    assert result.exit_code == 1 and "TABLE.KEY=VALUE" in result.stderr
    result = CliRunner().invoke(cli, ["run", str(ROOT / "pipelines/mnist_hinton.toml"),
                                      "--seeds", "0"])
    assert result.exit_code == 2 and "--seeds" in result.stderr


@pytest.mark.parametrize("override, named", [
    ("seeds=0", "seeds"), ("seeds=1.5", "seeds"), ("subset.fractions=[0.1, 0]", "subset.fractions"),
    ("subset.fractions=[]", "subset.fractions"), ("temperature_sweep.max_epochs=0", "max_epochs"),
    ("only_7_8.bias_grid={ start = 0, stop = 4, step = 0 }", "only_7_8.bias_grid"),
    ("omit3.bias_grid=3", "omit3.bias_grid")])
def test_bad_values_are_refused_before_training(tmp_path: Path, override: str,
                                                named: str) -> None:
    result = CliRunner().invoke(cli, ["run", str(ROOT / "pipelines/mnist_hinton.toml"),
                                      "--out", str(tmp_path / "o"), "--set", override])
    assert result.exit_code == 1 and named in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "steps.json").exists()  # nothing trained


def test_sweep_verdicts_follow_the_paired_intervals() -> None:
    from softlabels.experiments.hinton_summary import _big_net, _small_net, pool

    def sweep(errors: dict) -> list:
        return [pool([{"temperature": t, "errors": e} for e in per_seed])
                for t, per_seed in errors.items()]
    mid_wins = sweep({"hard": [90, 92, 88], 1.0: [80, 82, 79], 2.5: [60, 61, 59],
                      4.0: [62, 60, 61], 8.0: [75, 77, 74], 20.0: [79, 78, 80]})
    assert _small_net(mid_wins)["verdict"] == "reproduced"
    one_side = sweep({"hard": [90, 92, 88], 1.0: [80, 82, 79], 2.5: [60, 61, 59],
                      4.0: [62, 60, 61], 8.0: [60, 62, 58], 20.0: [59, 63, 61]})
    assert _small_net(one_side)["verdict"] == "partly"
    flat = sweep({"hard": [90, 92, 88], 1.0: [60, 55, 65], 2.5: [61, 60, 59],
                  4.0: [60, 61, 61], 8.0: [58, 62, 57], 20.0: [59, 57, 62]})
    assert _small_net(flat)["verdict"] == "not reproduced"
    assert _small_net(sweep({"hard": [1, 2], 8.0: [1, 2]}))["verdict"] == "not run"
    alike = sweep({"hard": [50, 52, 48], 8.0: [35, 37, 33], 20.0: [36, 35, 34]})
    assert _big_net(alike)["verdict"] == "reproduced"
    apart = sweep({"hard": [50, 52, 48], 8.0: [35, 37, 33], 20.0: [45, 46, 44]})
    assert _big_net(apart)["verdict"] == "not reproduced"
