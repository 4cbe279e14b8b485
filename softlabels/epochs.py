"""Who reads what, per epoch, in stage two's streaming: the block plan dealt to ranks and
DataLoader workers (`chunk_plan`), each worker's share of a rank's steps (`worker_quota`), and
`WindowLoader`, the DataLoader whose workers hand over whole windows rather than batches."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .blocks import rebatch

if TYPE_CHECKING:
    from .datasets import SoftTargetBatches


def rank_and_world() -> tuple[int, int]:
    """This process's torch.distributed rank and world size (0, 1 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def chunk_plan(num_rows: int, chunk_rows: int, *, epoch: int, seed: int, shuffle: bool = True,
               rank: int = 0, world_size: int = 1, worker: int = 0,
               num_workers: int = 1) -> list[int]:
    """The chunks (blocks) one (rank, worker) reads this epoch, in order.

    All chunks are shuffled with (seed, epoch) — the same order on every rank — then dealt
    round-robin to ranks, and each rank's share round-robin to its DataLoader workers, so every
    chunk is read exactly once per epoch across all of them.
    """
    chunks = np.arange(-(-num_rows // chunk_rows))
    if shuffle:
        chunks = np.random.default_rng([seed, epoch]).permutation(chunks)
    return chunks[rank::world_size][worker::num_workers].tolist()


class WindowLoader:
    """`SoftTargetBatches.loader()`: a DataLoader whose workers hand over whole shuffled windows
    (one hand-over per window, in shared memory, pinned once with `pin_memory`), cut here into
    batches that are views of them. Every rank takes `stream.steps_per_epoch()` steps; memory
    holds about workers x (prefetch_factor + 2) + 1 windows (each worker's queued windows, the
    one it builds and the one it reads ahead, and the one being cut here)."""

    def __init__(self, stream: SoftTargetBatches, *, num_workers: int, pin_memory: bool,
                 **dataloader_options: Any) -> None:
        self.stream = stream
        source = copy.copy(stream)  # shares the stream's epoch; yields whole windows
        source._windows_out = True
        self.windows = DataLoader(source, batch_size=None, num_workers=num_workers,
                                  pin_memory=pin_memory, **dataloader_options)

    def __len__(self) -> int:
        return self.stream.steps_per_epoch()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        batches = rebatch(self.windows, self.stream.batch_size)
        yield from (batches if self.stream._where()[1] == 1 else
                    itertools.islice(batches, len(self)))


def worker_quota(stream: SoftTargetBatches, rank: int, world: int, workers: int,
                  budget: int) -> list[int]:
    """How many of this rank's `budget` batches each worker of a plain DataLoader yields: it
    takes one batch from each worker in turn, so the first `budget` are a round-robin prefix."""
    have = [-(-stream._rows_in(stream._blocks(stream.epoch, rank, world, w, workers))
              // stream.batch_size) for w in range(workers)]
    quota = [0] * workers
    w = 0
    for _ in range(budget):
        while quota[w] >= have[w]:
            w = (w + 1) % workers
        quota[w] += 1
        w = (w + 1) % workers
    return quota
