"""Stage one's input: the rows of a batch fetched whole, as the one block loop's DataLoader
serves them (`blocks.run_blocks`, for the `examples` kind).

A source whose data is an array may offer `get_batch(rows) -> (x (B, ...), y (B,) int64)`,
the items `rows` at once (NpzDataset does; a TensorDataset of inputs and integer labels is
indexed the same way); any other dataset is fetched item by item and stacked by `collate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from softlabels.sources.arrays import batch_of, split_item
from softlabels.sources.images import stack_images


def collate(items: Sequence[Any], *, encoded: bool = False) -> tuple[Any, ...]:
    """Stack (input, label) items; a dataset without labels gets -1. Hashed items
    (input, label, hash) and view rows (input, label, hash, seed) keep their hashes and seeds
    as uint64 numpy arrays. `encoded` inputs (image bytes) stay a list, decoded later."""
    if isinstance(items[0], tuple) and len(items[0]) in (3, 4):
        xs, ys, hashes, *seeds = zip(*items)
        return (list(xs) if encoded else stack_images(xs), torch.tensor(ys),
                np.array(hashes, dtype=np.uint64),
                *([np.array(seeds[0], dtype=np.uint64)] if seeds else []))
    pairs = [split_item(item) for item in items]
    return stack_images([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


class RowBatches(Dataset):
    """Item i: the i-th batch of `rows`, fetched whole. Where the data is an array (a source
    with `get_batch(rows) -> (x (B, ...), y (B,) int64)`, or a TensorDataset of inputs and
    1-D labels) one indexing operation per array; else item by item, stacked by `collate`."""

    def __init__(self, dataset: Dataset, rows: np.ndarray, batches: list[list[int]], *,
                 encoded: bool = False) -> None:
        self.dataset, self.rows, self.encoded = dataset, rows, encoded
        self.batches = [(b[0], b[-1] + 1) for b in batches]  # block_batches: consecutive
        self.how = ("get_batch" if callable(getattr(dataset, "get_batch", None)) else
                    "tensors" if _tensor_pairs(dataset) else "items")

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        a, b = self.batches[i]
        rows = self.rows[a:b]
        if self.how == "get_batch":
            return tuple(self.dataset.get_batch(rows))
        if self.how == "tensors":
            return _tensor_batch(self.dataset, rows)
        return collate([self.dataset[int(r)] for r in rows], encoded=self.encoded)


def _tensor_pairs(dataset: Dataset) -> bool:
    """A TensorDataset of inputs, or of inputs and one integer label per row (float labels
    go item by item, where each is checked to be a whole number)."""
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) not in (1, 2):
        return False
    y = dataset.tensors[-1]
    return len(dataset.tensors) == 1 or (y.dim() == 1 and not y.is_floating_point()
                                         and not y.is_complex())


def _tensor_batch(dataset: TensorDataset, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What `collate` makes of rows' items, in one indexing operation per tensor."""
    x = batch_of(dataset.tensors[0], rows)
    if len(dataset.tensors) == 1:
        return x, torch.full((len(rows),), -1, dtype=torch.int64)
    return x, batch_of(dataset.tensors[1], rows).long()


def as_is(batch: Any) -> Any:
    """The DataLoader's collate for items that are whole batches already."""
    return batch
