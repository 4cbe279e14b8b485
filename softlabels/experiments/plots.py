"""Pictures and tables a person reads: the pipeline's results as PNG plots and markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softlabels.experiments.results_md import results_markdown
from softlabels.safe_write import save_figure, write_text


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _yerr(rows: list[dict[str, Any]], scale: float = 1.0) -> Any:
    """Asymmetric error bars (mean to each end of ci95); zero without an interval."""
    lo = [(r["mean"] - r["ci95"][0]) * scale if r["ci95"] else 0.0 for r in rows]
    hi = [(r["ci95"][1] - r["mean"]) * scale if r["ci95"] else 0.0 for r in rows]
    return [lo, hi]


def _seed_dots(ax: Any, xs: list[float], rows: list[dict[str, Any]], scale: float = 1.0) -> None:
    for x, r in zip(xs, rows, strict=True):
        ax.plot([x] * len(r["seeds"]), [v * scale for v in r["seeds"]], ".", color="k",
                alpha=0.35, ms=4)


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """Errors by temperature for the small net and the 800-800 net, 95% intervals as bars."""
    plt = _plt()
    panels = [("temperature_sweep", "784-30-30-10 (epochs chosen on held-out digits)"),
              ("student_sweep", "784-800-800-10 (fixed epochs)")]
    panels = [(k, t) for k, t in panels if len(results.get(k, [])) > 1]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        rows = [r for r in results[key] if r["temperature"] != "hard"]
        hard = next(r for r in results[key] if r["temperature"] == "hard")
        ts = [r["temperature"] for r in rows]
        ax.errorbar(ts, [r["mean"] for r in rows], yerr=_yerr(rows), fmt="o-", capsize=4,
                    label="distilled at T (mean, 95% interval)")
        _seed_dots(ax, ts, rows)
        ax.axhline(hard["mean"], color="grey", ls="--", label="hard labels")
        if hard["ci95"]:
            ax.axhspan(*hard["ci95"], color="grey", alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("temperature T")
        ax.set_ylabel(f"test errors (of {results['test_examples']})")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_errors(results: dict[str, Any], path: Path) -> None:
    """The main table as bars: mean errors, 95% intervals, one dot per seed."""
    plt = _plt()
    o = results["omit3"]
    rows = {"teacher": results["teacher"], "800-800\nhard": results["student_hard"],
            "800-800\ndistilled": results["student_distilled"], "omit 3": o,
            f"omit 3\n+{o['bias']:.2g} bias": o["intervals"]["errors_adjusted"]}
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(rows)))
    vals = list(rows.values())
    ax.bar(xs, [r["mean"] for r in vals], yerr=_yerr(vals), capsize=5,
           color=["#555", "#c44", "#48c", "#aa6", "#6a6"])
    _seed_dots(ax, [float(x) for x in xs], vals)
    ax.set_xticks(xs, list(rows))
    ax.set_ylabel(f"test errors (of {results['test_examples']})")
    ax.set_title(f"Test errors: mean over {len(vals[0]['seeds'])} seeds, 95% interval")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_subset_curve(results: dict[str, Any], path: Path) -> None:
    """Accuracy against the fraction of the transfer set, hard labels against soft targets."""
    plt = _plt()
    curve = results["subset_curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    fs = [c["fraction"] * 100 for c in curve]
    for kind, color, label in (("hard", "#c44", "hard labels"), ("soft", "#48c", "soft targets")):
        rows = [c[kind]["intervals"]["accuracy"] for c in curve]
        ax.errorbar(fs, [r["mean"] * 100 for r in rows], yerr=_yerr(rows, 100), fmt="o-",
                    capsize=4, color=color, label=label)
        _seed_dots(ax, fs, rows, 100)
    ax.set_xscale("log")
    ax.set_xlabel("% of the training digits used")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("784-800-800-10 from a fraction of the data (mean, 95% interval)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_soft_targets(examples: dict[str, Any], path: Path) -> None:
    plt = _plt()
    n = len(examples["labels"])
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 4.4), sharey="row")
    for j in range(n):
        for i, key in enumerate(("T1", "T20")):
            ax = axes[i][j]
            ax.bar(range(10), examples[key][j], color="#48c")
            ax.set_xticks(range(10))
            ax.set_title(f"label {examples['labels'][j]}, T={key[1:]}", fontsize=9)
    axes[0][0].set_ylabel("teacher probability")
    axes[1][0].set_ylabel("teacher probability")
    fig.suptitle("Soft targets: the teacher at T=1 against T=20")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def soft_target_examples(ts_path: Path, n: int = 4) -> dict[str, Any]:
    """A few rows' teacher probabilities at T = 1 and T = 20."""
    import numpy as np

    from softlabels.format.reader import open_transfer_set

    with open_transfer_set(ts_path) as ts:
        rows = np.linspace(0, ts.num_rows - 1, n).astype(int)
        return {"labels": ts.labels()[rows].tolist(),
                "T1": ts.probs(1.0)[rows].tolist(), "T20": ts.probs(20.0)[rows].tolist()}


def hinton_report(results: dict[str, Any], out: Path, ts_path: Path) -> None:
    plot_sweep(results, out / "temperature_sweep.png")
    plot_errors(results, out / "errors.png")
    plot_subset_curve(results, out / "subset_curve.png")
    plot_soft_targets(soft_target_examples(ts_path), out / "soft_targets.png")
    write_text(out / "results.md", results_markdown(results), what="results")
