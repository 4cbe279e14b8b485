"""Seed-to-seed statistics: mean, standard deviation and a 95% Student-t interval.

The interval is `mean ± t(0.975, n - 1) · sd / √n` with `sd` the sample standard deviation
(n - 1 in the denominator): the spread of a configuration over training seeds on one fixed
test set. Paired comparisons (two configurations trained from the same seed, hence the same
teacher, split and data order) take the interval of the per-seed differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

INTERVAL = ("95% Student-t interval over seeds: mean ± t(0.975, n-1) · sd / sqrt(n), "
            "sd the sample standard deviation (n-1); paired differences use the same "
            "interval on per-seed differences")


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (a positive integer) degrees of freedom, exact.

    The closed form for integer degrees of freedom (Abramowitz & Stegun 26.7.3/26.7.4), with
    θ = atan(t / √df): a finite series in cos θ.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:  # odd: (2/π)(θ + sin θ (cos θ + (2/3) cos³θ + ...))
        term, total = c, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0  # even: sin θ (1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile_975(df: int) -> float:
    """The t with P(|T| < t) = 0.95: the multiplier of a 95% two-sided interval."""
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """`seeds` (the values), `mean`, `sd` and `ci95` (a [low, high] pair); with one value
    `sd` and `ci95` are None: one seed gives no interval."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = sum(vals) / n
    if n < 2:
        return {"seeds": vals, "mean": round(mean, 4), "sd": None, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"seeds": vals, "mean": round(mean, 4), "sd": round(sd, 4),
            "ci95": [round(mean - half, 4), round(mean + half, 4)]}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """`summarize` of the per-seed differences a - b (the same seeds, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} against {len(b)}")
    return summarize([x - y for x, y in zip(a, b, strict=True)])


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two summaries' 95% intervals overlap (None without intervals)."""
    if a["ci95"] is None or b["ci95"] is None:
        return None
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def fmt(s: dict[str, Any], digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    """'37.3 [31.1, 43.6]' (or '37.3' with one seed) for tables."""
    m = f"{s['mean'] * scale:.{digits}f}{unit}"
    if s["ci95"] is None:
        return m
    lo, hi = (v * scale for v in s["ci95"])
    return f"{m} [{lo:.{digits}f}, {hi:.{digits}f}]"
