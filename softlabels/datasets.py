"""Stage two's input: join a dataset with a transfer set by `index`, check they line up by
`sample_hash`, and serve (input, label, soft target at T) — in memory, or streamed by whole
chunks with a chunk-aware shuffle split across DataLoader workers and distributed ranks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .errors import MismatchError, SoftlabelsError
from .format import schema as S
from .format.reader import TransferSet, open_transfer_set
from .specs import load_data, split_item
from .views import build_augment, replay

CHECK_ALL_UP_TO = 200_000  # rows; past this a seeded sample of CHECK_SAMPLE rows is checked
CHECK_SAMPLE = 10_000
MAX_IN_MEMORY = 2 << 30  # bytes of targets held in memory before streaming is required


def _open(data: str | Dataset, transfer_set: str | os.PathLike[str] | TransferSet,
          ) -> tuple[Dataset, TransferSet]:
    ts = transfer_set if isinstance(transfer_set, TransferSet) else open_transfer_set(transfer_set)
    return (load_data(data) if isinstance(data, str) else data), ts


def check_length(data: Dataset, ts: TransferSet) -> None:
    """Refuse a dataset longer or shorter than the one the set was made from."""
    made_from = int(ts.meta["num_examples"])
    if len(data) != made_from:
        how = "longer" if len(data) > made_from else "shorter"
        raise MismatchError(f"the dataset has {len(data)} examples but {ts.path} was made from "
                            f"{made_from} (the dataset is {how}); pass the DATA it was made from")


def check_alignment(data: Dataset, ts: TransferSet, rows: np.ndarray, *, seed: int = 0,
                    check_all_up_to: int = CHECK_ALL_UP_TO) -> int:
    """Refuse a dataset that is not the one the set was made from; returns rows checked.

    Every row in `rows` is hashed when there are at most `check_all_up_to`, else a seeded
    sample of CHECK_SAMPLE. The first mismatching row is named.
    """
    check_length(data, ts)
    if len(rows) > check_all_up_to:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, CHECK_SAMPLE, replace=False))
    index, hashes = ts.index(), ts.sample_hash()
    for r in rows:
        x, _ = split_item(data[int(index[r])])
        if S.sample_hash(x.numpy()) != int(hashes[r]):
            raise MismatchError(
                f"row {int(r)} of {ts.path} (dataset index {int(index[r])}) does not match the "
                "dataset's example: the data is permuted, edited or another dataset; pass the "
                "DATA the set was made from, or precompute a new set")
    return len(rows)


def _check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature)
            and temperature > 0):
        raise SoftlabelsError(f"temperature must be a positive number, got {temperature}")
    return float(temperature)


class SoftTargetDataset(Dataset):
    """Items (input, label, soft target at `temperature`) for the selected `rows` of a set.

    The targets are read once into memory (float32): stored probabilities when T was stored,
    else re-tempered from the logits. Use `StreamingSoftTargetDataset` for sets past memory.
    """

    def __init__(self, data: str | Dataset, transfer_set: str | os.PathLike[str] | TransferSet,
                 *, temperature: float, rows: np.ndarray | None = None, check: bool = True,
                 seed: int = 0, max_memory: int = MAX_IN_MEMORY,
                 trust_code: bool = False) -> None:
        self.data, self.ts = _open(data, transfer_set)
        self.temperature = _check_temperature(temperature)
        self.rows = np.arange(self.ts.num_rows) if rows is None else np.asarray(rows)
        need = self.ts.num_rows * self.ts.num_classes * 4
        if need > max_memory:
            raise SoftlabelsError(f"the targets need {need / 2**30:.1f} GiB, over max_memory; "
                                  "use StreamingSoftTargetDataset")
        if check:
            check_alignment(self.data, self.ts, self.rows, seed=seed)
        self.data_index = torch.from_numpy(self.ts.index()[self.rows])
        self.labels = torch.from_numpy(self.ts.labels()[self.rows])
        # A view set: each row replays the exact augmented view the teacher labelled.
        self.view_seeds = self.transform = None
        if self.ts.meta.get("views"):
            self.view_seeds = self.ts.read(S.VIEW_SEED)[self.rows]
            x0, _ = split_item(self.data[int(self.data_index[0])])
            self.transform = build_augment(self.ts.meta["augment"], x0, trust_code=trust_code,
                                           source=f"{self.ts.path} (its augment)")
        if self.ts.sparse:  # (classes, weights) per row, k of each
            classes, weights = self.ts.sparse_targets(self.temperature)
            self.targets = (torch.from_numpy(classes[self.rows]),
                            torch.from_numpy(weights[self.rows]))
        else:
            self.targets = torch.from_numpy(self.ts.probs(self.temperature)[self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        """(input, label, target at T); for a sparse set (input, label, classes, weights).
        In a view set the input is the row's replayed view."""
        x, _ = split_item(self.data[int(self.data_index[i])])
        if self.transform is not None:
            x = replay(self.transform, x, int(self.view_seeds[i]))
        if isinstance(self.targets, tuple):
            return x, int(self.labels[i]), self.targets[0][i], self.targets[1][i]
        return x, int(self.labels[i]), self.targets[i]


def rank_and_world() -> tuple[int, int]:
    """This process's torch.distributed rank and world size (0, 1 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def chunk_plan(num_rows: int, chunk_rows: int, *, epoch: int, seed: int, shuffle: bool = True,
               rank: int = 0, world_size: int = 1, worker: int = 0,
               num_workers: int = 1) -> list[int]:
    """The chunks one (rank, worker) reads this epoch, in order.

    All chunks are shuffled with (seed, epoch) — the same order on every rank — then dealt
    round-robin to ranks, and each rank's share round-robin to its DataLoader workers, so every
    chunk is read exactly once per epoch across all of them.
    """
    chunks = np.arange(-(-num_rows // chunk_rows))
    if shuffle:
        chunks = np.random.default_rng([seed, epoch]).permutation(chunks)
    return chunks[rank::world_size][worker::num_workers].tolist()


class StreamingSoftTargetDataset(IterableDataset):
    """Stream (input, label, soft target) by whole chunks of the transfer set.

    Per epoch (`set_epoch`): chunk order shuffled, chunks split across ranks and workers
    without overlap, samples shuffled within a window of `window` chunks. Never reads single
    rows from the store. Ranks may get unequal row counts when chunks do not divide evenly.
    """

    def __init__(self, data: str | Dataset, transfer_set: str | os.PathLike[str], *,
                 temperature: float, rows: np.ndarray | None = None, shuffle: bool = True,
                 window: int = 4, seed: int = 0, check: bool = True) -> None:
        dataset, ts = _open(data, transfer_set)
        if ts.sparse or ts.meta.get("views"):
            raise SoftlabelsError(f"{ts.path} is sparse or holds views: streaming serves dense "
                                  "targets of plain examples; use SoftTargetDataset")
        self.data, self.path = dataset, str(ts.path)
        self.temperature = _check_temperature(temperature)
        self.num_rows, self.chunk_rows = ts.num_rows, ts.chunk_rows
        self.keep = None
        if rows is not None:
            self.keep = np.zeros(ts.num_rows, dtype=bool)
            self.keep[np.asarray(rows)] = True
        if check:
            picked = np.flatnonzero(self.keep) if self.keep is not None else np.arange(ts.num_rows)
            check_alignment(dataset, ts, picked, seed=seed, check_all_up_to=CHECK_SAMPLE)
        # Labels and dataset indices are 16 bytes a row: held in memory; targets stream.
        self.labels, self.index = ts.labels(), ts.index()
        ts.close()
        self.shuffle, self.window, self.seed, self.epoch = shuffle, max(1, window), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        total = int(self.keep.sum()) if self.keep is not None else self.num_rows
        return -(-total // rank_and_world()[1])

    def _plan(self) -> list[int]:
        rank, world = rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return chunk_plan(self.num_rows, self.chunk_rows, epoch=self.epoch, seed=self.seed,
                          shuffle=self.shuffle, rank=rank, world_size=world, worker=worker,
                          num_workers=workers)

    def _read_window(self, ts: TransferSet, chunks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, targets) of a window of whole chunks, the unselected rows dropped."""
        rows, probs = [], []
        for c in chunks:
            start, stop = c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.num_rows)
            sel = slice(None) if self.keep is None else self.keep[start:stop]
            rows.append(np.arange(start, stop)[sel])
            probs.append(ts.probs(self.temperature, start, stop)[sel])
        return np.concatenate(rows), np.concatenate(probs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        plan = self._plan()
        rng = np.random.default_rng([self.seed, self.epoch, *plan[:1]])
        with open_transfer_set(self.path) as ts:
            for w in range(0, len(plan), self.window):
                rows, probs = self._read_window(ts, plan[w:w + self.window])
                order = rng.permutation(len(rows)) if self.shuffle else np.arange(len(rows))
                # Per-window conversions, so the per-row loop is plain Python indexing.
                targets = torch.from_numpy(probs[order]).unbind(0)
                index = self.index[rows[order]].tolist()
                labels = self.labels[rows[order]].tolist()
                for i, label, target in zip(index, labels, targets):
                    item = self.data[i]
                    yield (item[0] if isinstance(item, (tuple, list)) else item), label, target
