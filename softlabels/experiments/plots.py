"""Pictures and tables a person reads: the pipeline's results as PNG plots and markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = [r for r in results["temperature_sweep"] if r["temperature"] != "hard"]
    hard = next(r for r in results["temperature_sweep"] if r["temperature"] == "hard")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["temperature"] for r in rows], [r["errors"] for r in rows], "o-",
            label="distilled at T")
    ax.axhline(hard["errors"], color="grey", ls="--", label="hard labels")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel(f"test errors (of {results['test_examples']})")
    ax.set_title("784-30-30-10 student: errors by distillation temperature")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_errors(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    o = results["omit3"]
    bars = {"teacher": results["teacher"]["errors"],
            "800-800\nhard": results["student_hard"]["errors"],
            "800-800\ndistilled": results["student_distilled"]["errors"],
            "omit 3": o["errors"], f"omit 3\n+{o['bias']:g} bias": o["errors_adjusted"]}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(bars), list(bars.values()), color=["#555", "#c44", "#48c", "#aa6", "#6a6"])
    for i, v in enumerate(bars.values()):
        ax.text(i, v, str(v), ha="center", va="bottom")
    ax.set_ylabel(f"test errors (of {results['test_examples']})")
    ax.set_title("Test errors per configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(r: dict[str, Any]) -> str:
    p, o, s = r["paper"], r["omit3"], r["subset_3pct"]
    n = r["test_examples"]
    lines = [
        "# MNIST distillation (Hinton, Vinyals & Dean 2015, §3) at bundled-data scale", "",
        f"Training {r['train_examples']} images (+{r['validation_examples']} held out for the "
        f"omit-3 bias), test {n}. The paper used 60,000 / 10,000, so its counts are per 10,000.",
        "", f"| configuration | test errors here (of {n}) | accuracy here "
        "| paper (errors of 10,000) |", "|---|---|---|---|",
        f"| teacher ({r['teacher']['members']}-net ensemble) | {r['teacher']['errors']} | "
        f"{r['teacher']['accuracy']:.4f} | {p['teacher']} |",
        f"| 784-800-800-10, hard labels | {r['student_hard']['errors']} | "
        f"{r['student_hard']['accuracy']:.4f} | {p['student_hard']} |",
        f"| 784-800-800-10, distilled | {r['student_distilled']['errors']} | "
        f"{r['student_distilled']['accuracy']:.4f} | {p['student_distilled']} |",
        f"| omit 3 from transfer set | {o['errors']} ({o['errors_on_3']} on 3s) | | "
        f"{p['omit3_errors']} ({p['omit3_errors_on_3']} on 3s) |",
        f"| omit 3, class-3 bias +{o['bias']:g} (tuned on validation) | {o['errors_adjusted']} "
        f"({o['errors_on_3_adjusted']} on 3s) | | {p['omit3_errors_adjusted']} "
        f"({p['omit3_errors_on_3_adjusted']} on 3s, +{p['omit3_bias']}) |", "",
        f"## {s['fraction']:.0%} of the transfer set ({s['rows']} images)", "",
        "| targets | accuracy here | paper (speech, frame accuracy) |", "|---|---|---|",
        f"| hard labels | {s['hard']['accuracy']:.4f} | {p['speech_3pct_hard']}% |",
        f"| soft targets | {s['soft']['accuracy']:.4f} | {p['speech_3pct_soft']}% |",
        f"| (all data, hard) | {r['student_hard']['accuracy']:.4f} | {p['speech_all']}% |", "",
        "## Temperature sweep, 784-30-30-10", "", "| T | test errors | accuracy |",
        "|---|---|---|",
        *[f"| {row['temperature']} | {row['errors']} | {row['accuracy']:.4f} |"
          for row in r["temperature_sweep"]], "",
        f"Steps took {r['seconds_all_steps']} s in all on {r['machine']}.", "",
        "![errors](errors.png) ![sweep](temperature_sweep.png)", "",
        "![soft targets](soft_targets.png)", "",
    ]
    return "\n".join(lines)


def soft_target_examples(ts_path: Path, n: int = 4) -> dict[str, Any]:
    """A few rows' teacher probabilities at T = 1 and T = 20."""
    import numpy as np

    from ..format.reader import open_transfer_set

    with open_transfer_set(ts_path) as ts:
        rows = np.linspace(0, ts.num_rows - 1, n).astype(int)
        return {"labels": ts.labels()[rows].tolist(),
                "T1": ts.probs(1.0)[rows].tolist(), "T20": ts.probs(20.0)[rows].tolist()}


def hinton_report(results: dict[str, Any], out: Path, ts_path: Path) -> None:
    plot_sweep(results, out / "temperature_sweep.png")
    plot_errors(results, out / "errors.png")
    plot_soft_targets(soft_target_examples(ts_path), out / "soft_targets.png")
    (out / "results.md").write_text(results_markdown(results))
