"""The tiny_lm recipe's summary over seeds, verdicts, results.md and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softlabels.experiments.stats import INTERVAL, fmt, paired, summarize
from softlabels.safe_write import save_figure

# Hinton, Vinyals & Dean (2015): Table 1 (frame accuracy, speech) and Table 3 (3% of the data).
PAPER = {"baseline": 58.9, "ensemble_10": 61.1, "distilled": 60.8,
         "3pct_hard": 44.5, "3pct_soft": 57.0, "3pct_hard_train": 67.3,
         "3pct_soft_train": 65.4}

STUDENTS = ("student_hard", "student_distilled", "student_sampled", "subset_hard",
            "subset_soft")
METRICS = ("perplexity", "token_accuracy", "validation_perplexity",
           "validation_token_accuracy", "train_token_accuracy", "final_perplexity")

# (effect, paper, better, worse): `better` should have the lower perplexity
EFFECTS = [("distilled student beats the hard one (closer to the teacher)",
            "distilled 60.8% vs baseline 58.9% (ensemble 61.1%)", "student_distilled",
            "student_hard"),
           ("soft targets much better than hard on 3% of the data",
            "soft 57.0% vs hard 44.5% test (train 65.4% vs 67.3%)", "subset_soft",
            "subset_hard")]


def summarize_lm_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Each student row as the mean over seeds, with `intervals` (per metric), `per_seed`;
    plus `verdicts` from paired per-seed differences, on validation and held-out text."""
    out: dict[str, Any] = {}
    for key in STUDENTS:
        runs = [s[key] for s in per_seed]
        intervals = {m: summarize([r[m] for r in runs]) for m in METRICS if m in runs[0]}
        out[key] = {**{m: s["mean"] for m, s in intervals.items()},
                    "epochs_kept": [r["epoch"] for r in runs], "loss": runs[0]["loss"],
                    "curve": runs[0]["curve"], "intervals": intervals, "per_seed": runs}
    verdicts = []
    for effect, paper, better, worse in EFFECTS:
        row: dict[str, Any] = {"effect": effect, "paper": paper}
        for split, metric in (("validation", "validation_perplexity"),
                              ("held_out", "perplexity")):
            if metric not in per_seed[0][better]:
                continue
            d = paired([s[worse][metric] for s in per_seed],
                       [s[better][metric] for s in per_seed])
            row[split] = {"perplexity_difference": d, "verdict": _verdict(d)}
        verdicts.append(row)
    out["verdicts"] = verdicts
    out["interval"] = INTERVAL
    return out


def _verdict(d: dict[str, Any]) -> str:
    """`d` is worse - better perplexity: positive is the paper's side."""
    if d["ci95"] is None:
        return "paper's sign (one seed, no interval)" if d["mean"] > 0 else "not reproduced"
    if d["ci95"][0] > 0:
        return "reproduced"
    return "partly" if d["mean"] > 0 else "not reproduced"


ROWS = [("teacher", "teacher (hard next bytes, all text)", None),
        ("student_hard", "student, hard next bytes, all text", "baseline"),
        ("student_distilled", "student, distilled from top-k, all text", "distilled"),
        ("student_sampled", "student, distilled from sampled bytes, all text", None),
        ("subset_hard", "student, hard next bytes, 3% of the text", "3pct_hard"),
        ("subset_soft", "student, distilled from top-k, 3% of the text", "3pct_soft")]


def _cell(row: dict[str, Any], metric: str, scale: float = 1.0, digits: int = 2,
          unit: str = "") -> str:
    if metric not in row:
        return ""
    s = row.get("intervals", {}).get(metric)
    return fmt(s, digits, scale, unit) if s else f"{row[metric] * scale:.{digits}f}{unit}"


def results_md(r: dict[str, Any]) -> str:
    c, s = r["config"], r["config"]["student"]
    sub = {**s, **c["subset"]}
    lines = [
        "# tiny_lm: per-token distillation on CPython's standard-library source",
        "",
        f"Byte-level (256 classes); {r['train_positions']:,} training, "
        f"{r['validation_positions']:,} validation (chunks of the training text) and "
        f"{r['held_out_positions']:,} held-out (other files) next-byte positions; the 3% subset "
        f"holds {r['subset_positions']:,}. Teacher `{c['teacher']['model']}` "
        f"({c['teacher']['epochs']} epochs), student `{s['model']}` ({s['epochs']} epochs, "
        f"{sub['epochs']} on 3%); targets at T = {s['temperature']} (alpha {s['alpha']}; on "
        f"3%: T = {sub['temperature']}, alpha {sub['alpha']}), top-{c['transfer_set']['topk']} "
        f"with exact normalisers ({r['bytes_per_token']} bytes a token on disk) or "
        f"{c['transfer_set']['sample_k']} sampled bytes. Every model is kept at the evaluated "
        f"epoch with the lowest {r['selected_on']} perplexity; the held-out text chose nothing. "
        f"Seeds {r['seeds_run']} (students and subsets; the teacher is trained once).",
        "",
        f"Cells with several seeds read `mean [95% interval]`: {r['interval']}.",
        "",
        "| model | held-out perplexity | held-out byte accuracy | validation perplexity | "
        "train accuracy (3%) | paper (speech, frame acc.) |",
        "|---|---|---|---|---|---|",
    ]
    for key, name, paper in ROWS:
        m = r[key]
        ref = f"{r['paper'][paper]}%" if paper else ""
        if paper in ("3pct_hard", "3pct_soft"):
            ref += f" (train {r['paper'][paper + '_train']}%)"
        lines.append(f"| {name} | {_cell(m, 'perplexity')} | "
                     f"{_cell(m, 'token_accuracy', 100, unit='%')} | "
                     f"{_cell(m, 'validation_perplexity')} | "
                     f"{_cell(m, 'train_token_accuracy', 100, unit='%')} | {ref} |")
    lines += ["", "## Verdicts (paired per-seed perplexity differences, worse minus better)", "",
              "| effect | paper | validation | held-out |", "|---|---|---|---|"]
    for v in r["verdicts"]:
        cells = [f"{fmt(v[k]['perplexity_difference'], 3)}: {v[k]['verdict']}" if k in v else ""
                 for k in ("validation", "held_out")]
        lines.append(f"| {v['effect']} | {v['paper']} | {cells[0]} | {cells[1]} |")
    lines += ["", "The paper's speech model: baseline 58.9%, 10-model ensemble 61.1%, distilled "
              "single model 60.8% (Table 1); on 3% of the data, hard targets 44.5% and soft "
              "targets 57.0% test frame accuracy (Table 3; the hard one early-stopped).", "",
              "Epochs kept (first seed): " + ", ".join(
                  f"{k} {r[k]['epochs_kept'] if k != 'teacher' else r[k]['epoch']}"
                  for k, _, _ in ROWS), "",
              f"Run time: {r['seconds_all_steps']} s over all steps on {r['machine']}."]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _, _ in ROWS]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, label in ((axes[0], "perplexity", "held-out perplexity"),
                              (axes[1], "token_accuracy", "held-out token accuracy")):
        ax.bar(range(len(keys)), [r[k][metric] for k in keys],
               color=["#555", "#c44", "#48c", "#8ac", "#c88", "#48c"])
        ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=8)
        ax.set_title(label)
    for k in keys:
        curve = r[k].get("curve") or []
        if curve:
            axes[2].plot([p["epoch"] for p in curve], [p["validation_perplexity"] for p in curve],
                         label=k)
    axes[2].set_xlabel("epoch")
    axes[2].set_xscale("log")
    axes[2].set_title("validation perplexity (first seed)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "tiny_lm.png", dpi=100)
    plt.close(fig)
