"""Tensor math of distillation (Hinton, Vinyals & Dean, 2015): tempering and ensembles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from softlabels.errors import OptionError

# Past this, the KD loss is float32 rounding noise: KL shrinks as 1/T^2 toward eps32 (1.2e-7)
# while the T^2 factor grows, so at T = 1e6 the "loss" is pure rounding. The T -> inf limit is
# logit matching (losses.logit_matching_loss).
MAX_TEMPERATURE = 100.0


def check_temperature(value: Any, what: str = "temperature", *,
                      at_most: float = MAX_TEMPERATURE) -> float:
    """The one temperature check: a finite number in (0, at_most], as a float. Options (the
    edge) keep the default cap; the library's tempering, readers and losses, which take a raw
    T from Python callers, pass `at_most=math.inf` (any positive T tempers)."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not math.isfinite(t) or t <= 0:
        raise OptionError(f"{what} must be positive and finite, got {value!r}")
    if t > at_most:
        raise OptionError(f"{what} {t:g} is above {at_most:g}, where the KD loss is "
                          "float32 rounding noise; use a temperature in (0, 100] (logit "
                          "matching is the high-T limit)")
    return t


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 logits are upcast: tempering them in half precision underflows."""
    return x if x.dtype == torch.float64 else x.float()


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T in float32 (float64 stays); at T = 1 the logits themselves (z / 1 == z exactly:
    one pass over them less)."""
    z = at_least_float32(logits)
    return z if temperature == 1 else z / temperature


def tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """q_i = exp(z_i / T) / sum_j exp(z_j / T), in float32 (float64 stays), along the last axis."""
    return torch.softmax(tempered(logits, temperature), dim=-1)


def tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log q_i at temperature T, in float32 (float64 stays)."""
    return torch.log_softmax(tempered(logits, temperature), dim=-1)


def combine_logits(member_logits: torch.Tensor, combine: str) -> torch.Tensor:
    """Combine (M, B, C) member logits into (B, C) ensemble logits.

    mean-logits: the mean of the logits (a geometric mean of the probabilities).
    mean-probs: log of the mean of the T=1 probabilities; its softmax at T=1 is the exact
    member mean, and the exact mean at other T is stored separately (see `ensemble_probs`).
    A single member's logits are returned as they are under either rule.
    """
    z = member_logits.float()
    if z.shape[0] == 1:
        return z[0]  # one teacher: its own logits, under either rule
    if combine == "mean-logits":
        return z.mean(dim=0)
    log_p = torch.log_softmax(z, dim=-1)
    return torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(z.shape[0])))


def ensemble_probs(
    member_logits: torch.Tensor, temperatures: Sequence[float], combine: str
) -> torch.Tensor:
    """(K, B, C) probabilities of the ensemble at each temperature, in float32 (float64 member
    logits stay float64 under mean-probs).

    One member's are its own under either rule (no mean over one), and outside autograd each
    temperature's result is written into its slice of the (K, B, C) tensor (no stack of K
    copies): the same values, fewer passes over the teacher's output."""
    if member_logits.shape[0] == 1 or combine == "mean-logits":
        z = member_logits[0] if member_logits.shape[0] == 1 else member_logits.float().mean(0)
        z = z.float() if combine == "mean-logits" else z

        def at(t: float, out: torch.Tensor | None = None) -> torch.Tensor:
            return torch.softmax(tempered(z, t), dim=-1, out=out)
    else:
        def at(t: float, out: torch.Tensor | None = None) -> torch.Tensor:
            return torch.mean(tempered_softmax(member_logits, t), dim=0, out=out)
    if torch.is_grad_enabled() and member_logits.requires_grad:  # out= has no derivative
        return torch.stack([at(t) for t in temperatures])
    dtype = torch.float32 if combine == "mean-logits" else at_least_float32(member_logits).dtype
    out = member_logits.new_empty((len(temperatures), *member_logits.shape[1:]), dtype=dtype)
    for k, t in enumerate(temperatures):
        at(t, out[k])
    return out
