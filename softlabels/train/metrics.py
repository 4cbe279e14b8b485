"""Metrics of a student: accuracy, errors, agreement with and KL to the teacher, calibration."""

from __future__ import annotations

import numpy as np
import torch

from softlabels.tempering import tempered_log_softmax


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor,
                    num_classes: int | None = None) -> dict[str, object]:
    """accuracy, errors, n and per-class error counts over rows with a known label."""
    known = labels >= 0
    pred = logits.argmax(dim=-1)[known]
    y = labels[known]
    wrong = pred != y
    c = num_classes or int(logits.shape[-1])
    per_class = torch.bincount(y[wrong], minlength=c)[:c]
    n = int(known.sum())
    return {"accuracy": float(1 - wrong.float().mean()) if n else float("nan"),
            "errors": int(wrong.sum()), "n": n, "per_class_errors": per_class.tolist()}


def teacher_agreement(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> float:
    """Fraction of rows where the student's top-1 equals the teacher's."""
    return float((student_logits.argmax(-1) == teacher_probs.argmax(-1)).float().mean())


def kl_to_teacher(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> float:
    """Mean over rows of KL(teacher || student) at T = 1, in nats."""
    p = teacher_probs.float()
    log_q = tempered_log_softmax(student_logits, 1.0)
    return float((torch.xlogy(p, p) - p * log_q).sum(-1).mean())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor,
                               bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over equal-width bins."""
    known = labels >= 0
    probs = torch.softmax(logits[known].float(), dim=-1)
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels[known]).float()
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += float(in_bin.float().mean()) * abs(float(conf[in_bin].mean())
                                                      - float(correct[in_bin].mean()))
    return ece
