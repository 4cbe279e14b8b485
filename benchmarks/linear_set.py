"""The synthetic set several benchmarks measure: `rows` random 8-feature inputs with random
labels of `classes` classes, precomputed by a seeded one-layer teacher (so the pipeline's own
cost shows, not a model's). Imported by the scripts beside it (run from the repository root as
`python benchmarks/NAME.py`, which puts this folder on the path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softlabels.compute.blocks import precompute


def linear_set(folder: Path, rows: int, classes: int, **options: Any) -> tuple[str, Path]:
    """(DATA spec, set path) of a set made in `folder`; `options` go to `precompute`."""
    rng = np.random.default_rng(0)
    np.savez(folder / "x.npz", x=rng.normal(size=(rows, 8)).astype(np.float32),
             y=rng.integers(0, classes, rows))
    torch.manual_seed(0)
    precompute(f"npz:{folder}/x.npz", [nn.Linear(8, classes)], folder / "s.zarr", **options,
               random_teacher=True)
    return f"npz:{folder}/x.npz", folder / "s.zarr"
