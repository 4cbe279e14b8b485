"""Who reads what, per epoch, in stage two's streaming: each rank's windows of blocks
(`block_windows`, a function of seed, epoch, rank and world size), the mix metric of a shuffle
(`mix`), and `WindowLoader`, the DataLoader whose workers hand over pieces of whole batches in
the stream's own order."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from softlabels.errors import SoftlabelsError
from softlabels.train.stream_pieces import cut


def resume_point(state: Any, *, seed: int, steps: Callable[[int], int],
                 what: str) -> tuple[int, int]:
    """(epoch, batches served) from a loader's `state_dict()` ({"epoch", "batches", "seed"}),
    checked: integers, saved with `seed`, and no more batches than `steps(epoch)` (the batches
    of that epoch). `what` names the loader in the messages."""
    try:
        epoch, batches, saved = (int(state["epoch"]), int(state["batches"]),
                                 int(state["seed"]))
    except (KeyError, TypeError, ValueError):
        raise SoftlabelsError(f"a {what} state holds epoch, batches and seed (integers); "
                              f"got {state!r}") from None
    if saved != seed:
        raise SoftlabelsError(f"the {what} state comes from seed {saved}, this {what} uses "
                              f"{seed}; pass the same seed to resume")
    total = steps(epoch)
    if not 0 <= batches <= total:
        raise SoftlabelsError(f"the {what} state says {batches} batches of epoch {epoch} "
                              f"were served, but the epoch has {total}")
    return epoch, batches


def rank_and_world() -> tuple[int, int]:
    """This process's torch.distributed rank and world size (0, 1 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def block_windows(num_blocks: int, *, window: int, epoch: int, seed: int,
                  shuffle: bool = True, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The windows of blocks one rank reads this epoch, in order: a function of (seed, epoch,
    rank, world_size) only, never of DataLoader workers.

    All blocks are shuffled with (seed, epoch), the same on every rank, and dealt round-robin to
    ranks. A rank's n blocks, in set order, are cut into contiguous strata of
    d = max(1, n // window) blocks; each stratum is shuffled, window g takes the g-th block of
    every stratum, and the d windows are shuffled. So every window holds from `window` to
    2 x window - 1 blocks (all n when n < window), one from each stratum: it spans the whole
    of the rank's share of the set, and rows shuffled across it mix the set (`mix`). Without
    `shuffle`: `window` consecutive blocks at a time, in order.
    """
    blocks = np.arange(num_blocks)
    if shuffle:
        blocks = np.random.default_rng([seed, epoch]).permutation(blocks)
    mine = blocks[rank::world_size]
    if not shuffle:
        return [mine[i:i + window].tolist() for i in range(0, len(mine), window)]
    if not len(mine):
        return []
    rng = np.random.default_rng([seed, epoch, rank, world_size])
    mine, depth = np.sort(mine), max(1, len(mine) // window)  # depth: windows of this rank
    strata = [rng.permutation(mine[s:s + depth]) for s in range(0, len(mine), depth)]
    windows = [[int(st[g]) for st in strata if g < len(st)] for g in range(depth)]
    return [windows[g] for g in rng.permutation(depth)]


def mix(rows: np.ndarray, num_rows: int, slices: int = 64) -> int:
    """How many of `slices` equal slices of a set of `num_rows` rows the rows of one batch
    (their row numbers in the set) come from: the mix metric of a shuffle (a batch of 256 drawn
    uniformly from the whole set spans about 63 of 64)."""
    return len(np.unique(np.asarray(rows, dtype=np.int64) * slices // max(num_rows, 1)))


class WindowLoader:
    """`SoftTargetBatches.loader()`: a DataLoader whose workers hand over pieces of whole
    batches (piece i built by worker i % workers, one hand-over per piece, in shared memory,
    pinned once with `pin_memory`), cut here into batches that are views of them. The
    DataLoader takes its workers' items round robin, so the batches come in the stream's own
    order, whatever the number of workers; every rank takes `stream.steps_per_epoch()` steps.
    Memory holds the stream's two windows per worker and about workers x (prefetch_factor + 2)
    pieces."""

    def __init__(self, stream: IterableDataset, *, num_workers: int, pin_memory: bool,
                 **dataloader_options: Any) -> None:
        self.stream = stream
        source = copy.copy(stream)  # shares the stream's epoch and start; yields pieces
        source._pieces_out = True
        # The stream's order is its own (seed, epoch, rank): the DataLoader's worker seed is
        # drawn from a generator of its own, not torch's global one, which would advance the
        # training's random state differently with and without (persistent) workers.
        dataloader_options.setdefault("generator", torch.Generator().manual_seed(0))
        self.pieces = DataLoader(source, batch_size=None, num_workers=num_workers,
                                 pin_memory=pin_memory, **dataloader_options)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.stream._served = int(self.stream._start)
        for piece in self.pieces:
            for batch in cut(list(piece), self.stream.batch_size):
                self.stream._served += 1
                yield batch
