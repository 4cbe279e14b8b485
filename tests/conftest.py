from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# Sizes chosen so the row count is not a multiple of the chunk size.
N_ROWS, N_CLASSES, CHUNK = 103, 3, 16


def make_npz(path: Path, n: int = N_ROWS, classes: int = N_CLASSES, seed: int = 0,
             labels: bool = True) -> str:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 4, 4)).astype(np.float32)
    arrays = {"x": x}
    if labels:
        arrays["y"] = (rng.integers(0, classes, n))
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.fixture
def npz_data(tmp_path: Path) -> str:
    return make_npz(tmp_path / "data.npz")


@pytest.fixture(params=["zarr", "h5"])
def suffix(request: pytest.FixtureRequest) -> str:
    """Both backends run through the same tests."""
    return request.param


@pytest.fixture
def out_path(tmp_path: Path, suffix: str) -> Path:
    return tmp_path / f"set.{suffix}"
