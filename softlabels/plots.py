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

    from .transfer_set import open_transfer_set

    with open_transfer_set(ts_path) as ts:
        rows = np.linspace(0, ts.num_rows - 1, n).astype(int)
        return {"labels": ts.labels()[rows].tolist(),
                "T1": ts.probs(1.0)[rows].tolist(), "T20": ts.probs(20.0)[rows].tolist()}


def hinton_report(results: dict[str, Any], out: Path, ts_path: Path) -> None:
    plot_sweep(results, out / "temperature_sweep.png")
    plot_errors(results, out / "errors.png")
    plot_soft_targets(soft_target_examples(ts_path), out / "soft_targets.png")
    (out / "results.md").write_text(results_markdown(results))


# --- a transfer set, before another team uses it ----------------------------------------------


def _set_statistics(ts: Any, bins: int = 40) -> dict[str, Any]:
    """One pass over whole blocks: per-T histograms of confidence and entropy, mean probability
    by true label (C x C per T), and top-1 accuracy on labelled rows."""
    import numpy as np

    k, c = len(ts.temperatures), ts.num_classes
    conf_hist = np.zeros((k, bins), np.int64)
    ent_hist = np.zeros((k, bins), np.int64)
    by_label = np.zeros((k, c, c))
    counts = np.zeros(c, np.int64)
    correct = labelled = 0
    ent_max = float(np.log(c))
    for start in range(0, ts.num_rows, ts.block_rows):
        stop = min(start + ts.block_rows, ts.num_rows)
        labels = ts.read("labels", start, stop)
        known = labels >= 0
        counts += np.bincount(labels[known], minlength=c)[:c]
        pred = ts.probs(ts.temperatures[0], start, stop).argmax(1)  # dense or sparse
        correct += int((pred[known] == labels[known]).sum())
        labelled += int(known.sum())
        for i, t in enumerate(ts.temperatures):
            p = ts.probs(t, start, stop)
            conf_hist[i] += np.histogram(p.max(1), bins=bins, range=(0, 1))[0]
            ent = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
            ent_hist[i] += np.histogram(ent, bins=bins, range=(0, ent_max))[0]
            np.add.at(by_label[i], labels[known], p[known])
    by_label /= np.maximum(counts, 1)[None, :, None]
    return {"conf_hist": conf_hist, "ent_hist": ent_hist, "by_label": by_label, "bins": bins,
            "ent_max": ent_max, "accuracy": correct / labelled if labelled else None,
            "labelled": labelled}


def _histograms(ts: Any, st: dict[str, Any], path: Path) -> None:
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    edges_c = np.linspace(0, 1, st["bins"] + 1)
    edges_e = np.linspace(0, st["ent_max"], st["bins"] + 1)
    for i, t in enumerate(ts.temperatures):
        axes[0].stairs(st["conf_hist"][i], edges_c, label=f"T={t:g}")
        axes[1].stairs(st["ent_hist"][i], edges_e, label=f"T={t:g}")
    axes[0].set(xlabel="teacher confidence (largest probability)", ylabel="rows",
                title="Confidence per temperature")
    axes[1].set(xlabel="entropy of the soft target (nats)", ylabel="rows",
                title="Entropy per temperature")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _heatmaps(ts: Any, st: dict[str, Any], path: Path) -> None:
    plt = _plt()
    k = len(ts.temperatures)
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.6), squeeze=False)
    for i, t in enumerate(ts.temperatures):
        ax = axes[0][i]
        image = ax.imshow(st["by_label"][i], cmap="viridis", vmin=0)
        ax.set(title=f"T={t:g}", xlabel="class of the probability", ylabel="true label")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("Mean teacher probability by true label")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def transfer_set_report(path: str | Path, out: str | Path) -> dict[str, Any]:
    """PNG plots and a markdown summary a team reads before using someone else's set."""
    from .transfer_set import open_transfer_set

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open_transfer_set(path) as ts:
        st = _set_statistics(ts)
        _histograms(ts, st, out / "confidence_entropy.png")
        _heatmaps(ts, st, out / "class_mass.png")
        summary = ts.summary()
    (out / "summary.md").write_text(_summary_markdown(summary, st))
    return {"accuracy": st["accuracy"], "labelled_rows": st["labelled"], "out": str(out)}


def _summary_markdown(s: dict[str, Any], st: dict[str, Any]) -> str:
    teacher, data = s["teacher"], s["dataset"]
    prov = s.get("provenance") or {}
    acc = (f"{st['accuracy']:.4f} on {st['labelled']} labelled rows"
           if st["accuracy"] is not None else "no labelled rows")
    lines = [
        f"# Transfer set `{s['path']}`", "",
        f"- format version {s['format_version']}, status {s['status']}, {s['backend']}, "
        f"{s['bytes'] / 2**20:.2f} MiB",
        f"- {s['num_rows']} rows of {s['num_examples']} examples, {s['num_classes']} classes, "
        f"temperatures {s['temperatures']}", f"- teacher top-1 accuracy: {acc}",
        f"- made {s.get('created_at')} on {s.get('device')} at {s.get('precision')}; "
        + ", ".join(f"{k} {v}" for k, v in (s.get("versions") or {}).items()), "",
        f"## Teacher ({teacher['combine']})", "", "| member | weights sha256 |", "|---|---|",
        *[f"| `{m.get('source', m['spec'])}` (`{m['spec']}`) | `{m['sha256']}` |"
          for m in teacher["members"]], "",
        "## Data", "", f"- spec `{data.get('spec')}`, {data.get('length')} examples",
        f"- fingerprint `{data.get('fingerprint')}`", "",
    ]
    if prov:
        lines += ["## Provenance", ""]
        for key, src in prov.items():
            for item in src if isinstance(src, list) else [src]:
                lines.append(f"- {key.replace('_', ' ')} `{item['path']}` (fingerprint "
                             f"`{item['fingerprint'][:16]}…`)")
        lines.append("")
    lines += ["## Plots", "", "![confidence and entropy](confidence_entropy.png)", "",
              "![class mass](class_mass.png)", ""]
    return "\n".join(lines)
