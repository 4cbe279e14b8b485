"""KD losses against an independent reference, in value and gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softlabels.errors import SoftlabelsError
from softlabels.train.losses import kd_loss, logit_matching_loss


def reference_kd(s: np.ndarray, t: np.ndarray, T: float, y: np.ndarray | None,
                 alpha: float) -> float:
    """Written from the formula with plain numpy/math, row by row."""
    total = 0.0
    for si, ti in zip(s, t):
        p = [math.exp(v / T) for v in ti]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / T) for v in si]
        q = [v / sum(q) for v in q]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    soft = T * T * total / len(s)
    if y is None:
        return soft
    ce = 0.0
    for si, yi in zip(s, y):
        ce += -(si[yi] - math.log(sum(math.exp(v) for v in si)))
    return alpha * soft + (1 - alpha) * ce / len(s)


@pytest.mark.parametrize("T", [1.0, 2.5, 4.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_kd_loss_matches_reference_value_and_gradient(T: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(int(T * 10 + alpha * 100))
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    s.requires_grad_(True)
    loss = kd_loss(s, t, temperature=T, labels=y, alpha=alpha)
    want = reference_kd(s.detach().numpy(), t.numpy(), T, y.numpy(), alpha)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    # Gradient of the same formula: alpha*T*(q_T - p_T)/B + (1-alpha)*(q_1 - onehot)/B
    p, q = torch.softmax(t / T, -1), torch.softmax(s.detach() / T, -1)
    onehot = torch.nn.functional.one_hot(y, 5).double()
    grad = (alpha * T * (q - p) + (1 - alpha) * (torch.softmax(s.detach(), -1) - onehot)) / 6
    np.testing.assert_allclose(s.grad.numpy(), grad.numpy(), rtol=1e-4, atol=1e-6)


def test_soft_term_alone_and_zero_at_teacher() -> None:
    t = torch.randn(4, 7)
    assert float(kd_loss(t.clone(), t, temperature=3.0)) == pytest.approx(0.0, abs=1e-5)
    s = torch.randn(4, 7)
    want = reference_kd(s.numpy().astype(float), t.numpy().astype(float), 3.0, None, 1.0)
    assert float(kd_loss(s, t, temperature=3.0)) == pytest.approx(want, rel=1e-4)


def test_unknown_labels_take_soft_term_only() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([-1, -1, -1, -1])
    assert float(kd_loss(s, t, temperature=2.0, labels=y, alpha=0.7)) == pytest.approx(
        0.7 * float(kd_loss(s, t, temperature=2.0)), rel=1e-6)


def test_logit_matching_is_zero_mean_mse() -> None:
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    want = 0.5 * (((s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))) ** 2).mean()
    assert float(logit_matching_loss(s, t)) == pytest.approx(float(want), rel=1e-6)
    assert float(logit_matching_loss(t + 5.0, t)) == pytest.approx(0.0, abs=1e-6)


def test_high_temperature_limit_approaches_logit_matching() -> None:
    """Hinton et al. §2.1: at high T, T^2 * KL ~ (1/(2C)) * sum (z - v)^2 for zero-mean logits."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(8, 10, generator=g, dtype=torch.float64) for _ in range(2))
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    kd = float(kd_loss(s, t, temperature=1000.0))
    lm = float(logit_matching_loss(s, t))  # 0.5 * mean over classes => divide by C already
    assert kd == pytest.approx(lm, rel=1e-3)
    s5, t5 = 5 * s, 5 * t  # far from the limit at T = 1: not logit matching
    assert float(kd_loss(s5, t5, temperature=1.0)) != pytest.approx(
        float(logit_matching_loss(s5, t5)), rel=0.2)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=-1.0),
                                    dict(temperature=2.0, alpha=1.5)])
def test_bad_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(SoftlabelsError):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), labels=torch.tensor([0, 1]), **kwargs)
