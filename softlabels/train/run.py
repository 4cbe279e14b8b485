"""One training run's inputs (`Run`), resolved once at stage two's entry (`train_student`)
and passed down whole: to the kind that cuts its rows (batches.py) and the plans of its
epochs (plans.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.format.reader import TransferSet
from softlabels.options import TrainOptions


@dataclass
class Run:
    """One training run's inputs, resolved once at the entry (`train_student`) and read by the
    kind that cuts its rows."""

    data: str | Dataset
    name: str  # the DATA spec, or the dataset's type
    opts: TrainOptions
    ts: TransferSet | None
    temperature: float | None  # checked; None without a set
    indices: str | os.PathLike[str] | np.ndarray | None
    val_data: str | Dataset | None
    stream: bool | None
    dev: torch.device
    gen: torch.Generator
    rank: int = 0
    world: int = 1
