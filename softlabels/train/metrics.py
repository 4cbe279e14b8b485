"""Metrics of a student: accuracy, errors, agreement with and KL to the teacher, calibration;
for a sequence student, perplexity and token accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softlabels.errors import SoftlabelsError
from softlabels.teachers.ensemble import resolve_device
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


@torch.no_grad()
def evaluate_sequence_model(model: nn.Module, batches: Iterable[Any], *,
                            device: str = "auto") -> dict[str, float]:
    """Perplexity (exp of the mean next-token cross-entropy, nats) and token accuracy over the
    masked-in positions that have a hard target, over padded batches of whole sequences
    (`padded.SequenceBatches`)."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    nll, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(dev)
        z = model(batch.tokens)
        keep = (batch.mask & (batch.labels >= 0)).reshape(-1)
        z, y = z.reshape(-1, z.shape[-1])[keep].float(), batch.labels.reshape(-1)[keep]
        nll += float(F.cross_entropy(z, y, reduction="sum"))
        correct += int((z.argmax(-1) == y).sum())
        count += len(y)
    if count == 0:
        raise SoftlabelsError("no position with a next token (hard target) that the mask "
                              "keeps: there is nothing to evaluate; pass sequences of 2 or "
                              "more tokens, or a mask that keeps some")
    ce = nll / count  # past ~709 nats exp overflows: a perplexity beyond any float is inf
    return {"perplexity": math.exp(ce) if ce < 709 else math.inf, "cross_entropy": ce,
            "token_accuracy": correct / count, "positions": count}
