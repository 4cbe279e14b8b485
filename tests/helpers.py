"""Small factories the tests name through `python:helpers:NAME` specs."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class Slow(nn.Module):
    """A linear teacher that sleeps per batch, so a test can kill a run midway."""

    def __init__(self, n_in: int = 16, n_out: int = 3, delay: float = 0.02) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(n_in, n_out)
        self.delay, self.calls = delay, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        self.calls += 1
        gate = os.environ.get("SOFTLABELS_TEST_GATE")
        # after the first call (precompute's probe of the class count), a test can hold the run
        # at its first batch, for as long as the gate file exists
        while self.calls > 1 and gate and os.path.exists(gate):
            time.sleep(0.01)
        return self.lin(x.flatten(1))


def slow(delay: float = 0.02) -> nn.Module:
    return Slow(delay=float(os.environ.get("SOFTLABELS_TEST_DELAY", delay)))


class NaNAfter(nn.Module):
    """Outputs NaN for inputs whose first value is above a threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x.flatten(1))
        return torch.where(x.flatten(1)[:, :1] > 1.5, torch.nan, z)


def nan_teacher() -> nn.Module:
    return NaNAfter()


def four_classes() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))


def nondeterministic():
    """A transform whose randomness does not come from torch's generator."""
    import random

    return lambda x: x + random.random()


def shift_right():
    """A deterministic (and trivially seed-independent) transform."""
    return lambda x: torch.roll(x, 1, dims=-1)


def huge_logits() -> nn.Module:
    """Logits of order 1e6: past float16's largest value (65504)."""
    lin = nn.Linear(16, 3)
    with torch.no_grad():
        lin.weight.fill_(1e5)
    return nn.Sequential(nn.Flatten(), lin)


def seeded_nan_teacher() -> nn.Module:
    """`nan_teacher` with the same weights in every process (a cluster's workers)."""
    torch.manual_seed(0)
    return NaNAfter()


class TinyLM(nn.Module):
    """A causal sequence model: (B, L) token ids -> (B, L, V) logits (embedding, causal
    running mean of the embeddings, linear head). Sleeps per batch when asked, so a test can
    kill a run midway."""

    def __init__(self, vocab: int = 11, dim: int = 8, delay: float = 0.0, seed: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(2 * dim, vocab)
        self.delay = delay

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        e = self.emb(ids)
        n = torch.arange(1, ids.shape[1] + 1, device=ids.device)[None, :, None]
        return self.head(torch.cat([e, e.cumsum(1) / n], -1))


def tiny_lm(vocab: int = 11, seed: int = 3) -> nn.Module:
    return TinyLM(vocab, delay=float(os.environ.get("SOFTLABELS_TEST_DELAY", 0)), seed=seed)


def lm_with_head(classes: int = 7) -> nn.Module:
    """A TinyLM over 11 token ids with `classes` outputs per token (not the vocabulary)."""
    model = TinyLM(11)
    model.head = nn.Linear(16, classes)
    return model
