"""Metrics a user reads off `evaluate`: calibration (ECE) checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from softlabels.train.metrics import expected_calibration_error


def logits_with_confidence(p: float, n: int, predicted: int = 0) -> torch.Tensor:
    """n two-class rows whose softmax gives probability p to class `predicted`."""
    z = torch.zeros(n, 2)
    z[:, predicted] = math.log(p / (1 - p))
    return z


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy() -> None:
    # 10 rows at confidence 0.8 of which 7 are right (gap 0.1); 5 rows at 0.6, all right
    # (gap 0.4); 3 unlabelled rows that must not count.
    logits = torch.cat([logits_with_confidence(0.8, 10), logits_with_confidence(0.6, 5),
                        logits_with_confidence(0.9, 3)])
    labels = torch.tensor([0] * 7 + [1] * 3 + [0] * 5 + [-1] * 3)
    assert expected_calibration_error(logits, labels) == pytest.approx(
        10 / 15 * 0.1 + 5 / 15 * 0.4, abs=1e-6)


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    logits = logits_with_confidence(0.75, 8)
    labels = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1])  # 6 of 8 right at confidence 0.75
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-6)


def test_ece_of_a_confidently_wrong_model_is_its_confidence() -> None:
    logits = logits_with_confidence(0.99, 6, predicted=1)
    assert expected_calibration_error(logits, torch.zeros(6, dtype=torch.long)) == \
        pytest.approx(0.99, abs=1e-6)
