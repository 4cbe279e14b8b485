"""What every stage-one run shares, whatever its kind of rows: its options (an object, or its
fields by keyword), the provenance it records (library versions, a probe of its data) and its
result."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels._version import __version__
from softlabels.format import schema as S
from softlabels.options import PrecomputeOptions
from softlabels.sources.arrays import example_hash


@dataclass
class PrecomputeResult:
    path: Path
    num_rows: int
    rows_computed: int
    resumed: bool
    already_complete: bool
    seconds: float
    meta: dict[str, Any] = field(repr=False)


def dataset_probe(data: Dataset, n: int = 16) -> str:
    """A cheap identity of a dataset: the hashes of up to n evenly spaced examples."""
    picks = np.unique(np.linspace(0, len(data) - 1, num=min(n, len(data))).astype(int))
    hashes = np.array([example_hash(data, int(i)) for i in picks], dtype=np.uint64)
    return S.fingerprint(hashes)[:32]


def versions() -> dict[str, str]:
    import h5py
    import torchvision
    import zarr

    return {"softlabels": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "zarr": zarr.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def as_options(options: PrecomputeOptions | None, kwargs: dict[str, Any]) -> PrecomputeOptions:
    """The options object from an object or from its fields by keyword, not both."""
    if options is not None and kwargs:
        raise TypeError(f"pass a PrecomputeOptions or keyword options, not both "
                        f"(got {sorted(kwargs)})")
    return options if options is not None else PrecomputeOptions(**kwargs)
