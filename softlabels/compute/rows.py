"""What differs between kinds of row in stage one: the strategy the one block loop
(blocks.py) takes from its table `KINDS`, keyed by the DATA's kind (`sources.tokens.data_kind`)
or a set's (`Layout.kind`).

One implementation per kind: `examples.ExampleRows` (one row per example, or per view of it)
and `positions.PositionRows` (one row per position of token sequences). The loop walks the
pending blocks as `units`, cuts each into `batches`, runs the teacher's `forward` pass and
`targets` (what is stored of its outputs, on its device), copies those to the host and hands
them to the unit's `assembler`, which writes whole blocks (on the writer thread where there is
one; a CPU teacher's `targets` run there too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softlabels.format.layout import Layout
from softlabels.format.writer import BlockWriter, TransferSetWriter
from softlabels.options import PrecomputeOptions
from softlabels.teachers.ensemble import Teacher

Prepared = tuple[Dataset, Teacher, Layout, dict[str, Any]]  # rows, teacher, layout, metadata


@dataclass(frozen=True)
class Unit:
    """Blocks computed together: `window`, the consecutive blocks whose rows are batched
    together (the same on every run, so a resumed run computes bit for bit what an
    uninterrupted one would), and `blocks`, those of them still to write."""

    blocks: list[int]
    window: list[int]


@dataclass
class Batch:
    """One batch of a unit, as its kind cut it: `inputs` what the teacher reads (on the host or
    its device), `rows` what the assembler places its targets by, `count` the rows of pending
    blocks it completes (for progress)."""

    inputs: Any
    rows: tuple[Any, ...]
    count: int


@dataclass(frozen=True)
class Feed:
    """How batches are fetched: `batch_size` (examples, or sequences), DataLoader workers,
    where images are decoded, and whether to pin host memory (a GPU teacher)."""

    batch_size: int
    num_workers: int = 0
    decode_device: str = "cpu"
    pin_memory: bool = False


class Assembler(Protocol):
    """The host side of one unit: places each batch's targets and the rows' own columns
    (labels, index, sample hashes, ...) into whole blocks and writes them."""

    def add(self, batch: Batch, host: dict[str, torch.Tensor]) -> None:
        """One batch with its targets copied to the host (`RowKind.targets`)."""

    def finish(self) -> None:
        """After the unit's last batch: write what is still held."""


class RowKind(Protocol):
    """Stage one's strategy for one kind of row."""

    unit: str  # what a row is, for progress bars: "row", "token"

    def prepare(self, data: str | Dataset, teachers: Sequence[str | nn.Module],
                opts: PrecomputeOptions) -> Prepared:
        """Load data and teacher, check them against each other, and lay out the set with
        the metadata this kind records: all but the writing."""

    def open_writer(self, out: str | Path, dataset: Dataset, layout: Layout,
                    meta: dict[str, Any], *, overwrite: bool) -> TransferSetWriter:
        """The writer that creates or resumes the set, checking resumed rows by their hashes."""

    def units(self, layout: Layout, pending: Sequence[int], *, split: bool) -> list[Unit]:
        """The pending blocks as units of work, in order; `split`: as small as the kind
        allows (one Dask task each)."""

    def batches(self, dataset: Dataset, layout: Layout, unit: Unit,
                feed: Feed) -> Iterable[Batch]:
        """The unit's rows cut into the teacher's batches, the same on every run."""

    def forward(self, teacher: Teacher, batch: Batch) -> torch.Tensor:
        """The teacher's forward pass over one batch: its members' logits on its device."""

    def targets(self, teacher: Teacher, layout: Layout, batch: Batch,
                member_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the assembler needs of one batch's `forward`, computed on the teacher's device
        (tempering, storage dtypes, top-k, ...) so that only what is stored crosses to the
        host."""

    def assembler(self, writer: TransferSetWriter | BlockWriter, dataset: Dataset,
                  unit: Unit) -> Assembler:
        """The host side of `unit` (made before its first batch)."""


def rows_of(layout: Layout, blocks: Sequence[int]) -> np.ndarray:
    """The row numbers of `blocks`, concatenated in order."""
    return np.concatenate([np.arange(*layout.block_range(b)) for b in blocks]
                          or [np.empty(0, np.int64)]).astype(np.int64)


def as_stored(layout: Layout, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A codec's encoded arrays (`TargetKind.encode`) in their storage dtypes, converted where
    they were computed (torch's float32 -> float16 rounds as numpy's does)."""
    arrays = layout.arrays()
    return {name: t.to(getattr(torch, arrays[name][1])) for name, t in encoded.items()}
