"""Each option is checked by one function: every entry point that takes a temperature, an alpha
or a batch size refuses a bad one with the same class (OptionError) and the same message."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from softlabels.compute.blocks import precompute
from softlabels.errors import OptionError
from softlabels.format.reader import open_transfer_set
from softlabels.options import PrecomputeOptions, TrainOptions
from softlabels.tempering import check_temperature
from softlabels.train.datasets import SoftTargetBatches, SoftTargetDataset
from softlabels.train.losses import kd_loss, sparse_kd_loss


@pytest.fixture
def made(npz_data: str, out_path: Path) -> tuple[str, Path]:
    precompute(npz_data, ["mlp:16-3"], out_path, temperatures=[2], chunk_rows=16,
               random_teacher=True)
    return npz_data, out_path


@pytest.mark.parametrize("bad", [0, -1.5, math.nan, math.inf, "warm"])
def test_one_temperature_check_everywhere(made: tuple[str, Path], bad: object) -> None:
    data, path = made
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    message = f"must be positive and finite, got {bad!r}"  # after "temperature(s)"
    with open_transfer_set(path) as ts:
        entries = [lambda: TrainOptions(temperature=bad),
                   lambda: PrecomputeOptions(temperatures=(bad,), random_teacher=True),
                   lambda: ts.probs(bad),
                   lambda: SoftTargetDataset(data, ts, temperature=bad),
                   lambda: SoftTargetBatches(data, ts, temperature=bad, batch_size=4),
                   lambda: kd_loss(s, t, temperature=bad, labels=y),
                   lambda: sparse_kd_loss(s, y[:, None], torch.ones(2, 1), temperature=bad)]
        for entry in entries:
            with pytest.raises(OptionError) as info:
                entry()
            assert message in str(info.value), str(info.value)


def test_the_cap_is_the_options_and_the_math_tempers_any_positive_t() -> None:
    with pytest.raises(OptionError, match="temperature 150 is above 100"):
        TrainOptions(temperature=150)
    assert check_temperature(150, at_most=math.inf) == 150.0
    s = torch.randn(2, 3)
    assert torch.isfinite(kd_loss(s, s, temperature=150.0))


def test_one_alpha_and_batch_size_check(made: tuple[str, Path]) -> None:
    data, path = made
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    for entry in (lambda: TrainOptions(alpha=1.5),
                  lambda: kd_loss(s, t, temperature=2.0, labels=y, alpha=1.5)):
        with pytest.raises(OptionError, match=r"^alpha must lie in \[0, 1\], got 1.5$"):
            entry()
    for entry in (lambda: TrainOptions(batch_size=0),
                  lambda: PrecomputeOptions(batch_size=0, random_teacher=True),
                  lambda: SoftTargetBatches(data, path, temperature=2.0, batch_size=0)):
        with pytest.raises(OptionError, match="^batch size must be positive, got 0$"):
            entry()
