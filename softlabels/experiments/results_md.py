"""The MNIST recipe's results.md: verdicts, the table beside the paper's, the curve, the sweeps."""

from __future__ import annotations

from typing import Any

from softlabels.experiments.stats import fmt


def _seeds(s: dict[str, Any], digits: int = 0, scale: float = 1.0) -> str:
    return ", ".join(f"{v * scale:.{digits}f}" for v in s["seeds"])


def _cell(s: dict[str, Any], digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    return f"{fmt(s, digits, scale, unit)} ({_seeds(s, 0 if scale == 1 else 1, scale)})"


def _epochs(row: dict[str, Any]) -> str:
    return ", ".join(str(r["epochs"]) for r in row["per_seed"])


def results_markdown(r: dict[str, Any]) -> str:
    p, o, e = r["paper"], r["omit3"], r["only_7_8"]
    n, k = r["test_examples"], len(r["seeds_run"])
    oi, ei = o["intervals"], e["intervals"]
    lines = [
        "# MNIST distillation (Hinton, Vinyals & Dean 2015, §3) at bundled-data scale", "",
        f"Training {r['train_examples']} images, {r['validation_examples']} training images held "
        f"out (they choose every tuned value: biases and early-stopping epochs; the test set "
        f"chooses nothing), test {n}. The paper used 60,000 / 10,000, so its counts are per "
        f"10,000. Every configuration was trained from {k} seed(s) ({r['seeds_run']}); a seed "
        "fixes the teacher ensemble, its transfer set and each student's initialisation and "
        "data order, so rows from one seed are paired.", "",
        f"Cells read `mean [95% interval] (each seed)`. {r['interval']}. The interval is the "
        "spread over training seeds on this one test set; the test set's own sampling noise "
        f"(binomial, about ±9 errors at 40 of {n}) is not in it.", "",
        "## Verdicts", "",
        "Rule: *reproduced* when the 95% interval of the paired per-seed difference lies on the "
        "paper's side of zero (for 'alike': contains zero); *partly* when the mean difference has "
        "the paper's sign but the interval includes zero (or, for the small-net sweep, only some "
        "temperatures differ); *not reproduced* otherwise.", "",
        "| effect | paper | here | evidence | verdict |", "|---|---|---|---|---|",
        *[f"| {v['effect']} | {v['paper']} | {v['here']} | {v['evidence']} | **{v['verdict']}** |"
          for v in r["verdicts"]], "",
        "## The table", "",
        f"| configuration | test errors here (of {n}) | paper (errors of 10,000) |",
        "|---|---|---|",
        f"| teacher ({r['teacher']['members']}-net ensemble) | {_cell(r['teacher'])} | "
        f"{p['teacher']} |",
        f"| 784-800-800-10, hard labels | {_cell(r['student_hard'])} | {p['student_hard']} |",
        f"| 784-800-800-10, distilled | {_cell(r['student_distilled'])} | "
        f"{p['student_distilled']} |",
        f"| omit 3 from transfer set | {_cell(o)}; on 3s {_cell(oi['errors_on_3'])} | "
        f"{p['omit3_errors']} ({p['omit3_errors_on_3']} on 3s) |",
        f"| omit 3, class-3 bias {fmt(oi['bias'], 2)} (per seed {_seeds(oi['bias'], 1)}) | "
        f"{_cell(oi['errors_adjusted'])}; on 3s {_cell(oi['errors_on_3_adjusted'])} | "
        f"{p['omit3_errors_adjusted']} ({p['omit3_errors_on_3_adjusted']} on 3s, "
        f"+{p['omit3_bias']}) |",
        f"| only 7s and 8s in transfer set: error rate | {_cell(e, 1, 100, '%')} | "
        f"{p['only_7_8_error_rate']:.1%} |",
        f"| only 7s and 8s, 7 and 8 biases {fmt(ei['bias'], 2)} (per seed "
        f"{_seeds(ei['bias'], 1)}) | {_cell(ei['error_rate_adjusted'], 1, 100, '%')} | "
        f"{p['only_7_8_error_rate_adjusted']:.1%} ({p['only_7_8_bias']}) |", "",
    ]
    curve = r["subset_curve"]
    if curve:
        lines += [
            "## Subset curve: the 784-800-800-10 student from a fraction of the training digits",
            "", "Each student trains up to min(max_epochs, ceil(student epochs / fraction)) "
            "epochs and keeps the epoch count with the fewest held-out errors (early stopping, "
            "as the paper's speech baseline).", "",
            "| fraction | digits | hard labels: accuracy | soft targets: accuracy | "
            "hard - soft errors (paired) | epochs kept, hard / soft |", "|---|---|---|---|---|---|",
            *[f"| {c['fraction']:.0%} | {c['rows']} | "
              f"{_cell(c['hard']['intervals']['accuracy'], 1, 100, '%')} | "
              f"{_cell(c['soft']['intervals']['accuracy'], 1, 100, '%')} | "
              f"{fmt(c['hard_minus_soft'])} | {_epochs(c['hard'])} / {_epochs(c['soft'])} |"
              for c in curve],
            f"| paper (speech, 3%) | | {p['speech_3pct_hard']}% | {p['speech_3pct_soft']}% "
            f"(all data {p['speech_all']}%) | | |", "",
            "![subset curve](subset_curve.png)", ""]
    lines += [
        "## Temperature sweep, 784-30-30-10 (epochs chosen on held-out digits)", "",
        "| T | test errors | epochs kept |", "|---|---|---|",
        *[f"| {row['temperature']} | {_cell(row)} | {_epochs(row)} |"
          for row in r["temperature_sweep"]], "",
    ]
    if len(r["student_sweep"]) > 1:
        lines += ["## Temperature sweep, 784-800-800-10 (the student's fixed epochs)", "",
                  "| T | test errors |", "|---|---|",
                  *[f"| {row['temperature']} | {_cell(row)} |" for row in r["student_sweep"]],
                  ""]
    lines += [
        f"Steps took {r['seconds_all_steps']} s in all on {r['machine']}.", "",
        "![errors](errors.png) ![sweep](temperature_sweep.png)", "",
        "![soft targets](soft_targets.png)", "",
    ]
    return "\n".join(lines)
