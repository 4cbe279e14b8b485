"""Stage two's input: join a dataset with a transfer set by `index`, check they line up by
`sample_hash`, and serve (input, label, soft target at T) — in memory, or streamed as whole
batches from whole blocks with a block-aware shuffle split across DataLoader workers and
distributed ranks. Every block is read checked (`TransferSet.read_block`)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset, get_worker_info

from .blocks import (
    block_columns,
    check_servable,
    empty,
    load_checked,
    read_ahead,
    rebatch,
    window_order,
)
from .blocks import shuffled_window as shuffled
from .epochs import WindowLoader, chunk_plan, rank_and_world, worker_quota
from .errors import IntegrityError, MismatchError, SoftlabelsError
from .format import schema as S
from .format._store import backend_of
from .format.location import is_url
from .format.reader import TransferSet, open_transfer_set
from .format.selection import select_rows
from .images import model_inputs
from .specs import NpzDataset, example_hash, load_data, split_item
from .teacher_inputs import replay_inputs
from .views import build_augment, replay

CHECK_ALL_UP_TO = 200_000  # rows; past this a seeded sample of CHECK_SAMPLE rows is checked
CHECK_SAMPLE = 10_000
MAX_IN_MEMORY = 2 << 30  # bytes of targets held in memory before streaming is required
URL_READS = 8  # blocks a stream reads at once from a URL


def _open(data: str | Dataset, transfer_set: str | os.PathLike[str] | TransferSet,
          ) -> tuple[Dataset, TransferSet]:
    ts = transfer_set if isinstance(transfer_set, TransferSet) else open_transfer_set(transfer_set)
    return model_inputs(load_data(data) if isinstance(data, str) else data), ts


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
    data = replay_inputs(data, ts.meta.get("teacher") or {})  # hashed as the teacher saw it
    outside = rows[(index[rows] < 0) | (index[rows] >= len(data))]
    if len(outside):  # a value no writer stores: read_block names its block
        ts.read_block(int(outside[0]) // ts.layout.block_rows, [S.INDEX])
    for r in rows:
        if example_hash(data, int(index[r])) != int(hashes[r]):  # damage in the set is named first
            ts.read_block(int(r) // ts.layout.block_rows, [S.INDEX, S.SAMPLE_HASH])
            raise MismatchError(
                f"row {int(r)} of {ts.path} (dataset index {int(index[r])}) does not match the "
                "dataset's example: the data is permuted, edited or another dataset; pass the "
                "DATA the set was made from, or precompute a new set")
    return len(rows)

def selected_rows(ts: TransferSet, select: dict[str, Any]) -> np.ndarray:
    """The rows the subset options keep. Labels or dataset indices no writer stores (a damaged
    block) are refused, naming their block, before any selection reads them."""
    try:
        labels, index = ts.labels(), ts.index()
    except Exception:  # an unreadable chunk: read_block names its block
        for block in range(ts.num_blocks):
            ts.read_block(block)
        raise
    bad = np.flatnonzero((labels < -1) | (labels >= ts.num_classes)
                         | (index < 0) | (index >= int(ts.meta["num_examples"])))
    if len(bad):
        ts.read_block(int(bad[0]) // ts.block_rows)  # raises IntegrityError naming the block
    return select_rows(labels, index=index, **select)


def _check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature)
            and temperature > 0):
        raise SoftlabelsError(f"temperature must be a positive number, got {temperature}")
    return float(temperature)


class SoftTargetDataset(Dataset):
    """Items (input, label, soft target at `temperature`) for the selected `rows` of a set.

    The targets are read once into memory (float32), block by checked block (a damaged block
    raises `IntegrityError` naming it): stored probabilities when T was stored, else re-tempered
    from the logits. Use `SoftTargetBatches` for sets past memory.
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
                                  "use SoftTargetBatches")
        loaded = load_checked(self.ts, self.temperature)
        if check:
            check_alignment(self.data, self.ts, self.rows, seed=seed)
        self.data_index = torch.from_numpy(loaded["index"][self.rows])
        self.labels = torch.from_numpy(loaded["labels"][self.rows])
        # A view set: each row replays the exact augmented view the teacher labelled.
        self.view_seeds = self.transform = None
        if self.ts.meta.get("views"):
            self.view_seeds = loaded["view_seed"][self.rows]
            x0, _ = split_item(self.data[int(self.data_index[0])])
            self.transform = build_augment(self.ts.meta["augment"], x0, trust_code=trust_code,
                                           source=f"{self.ts.path} (its augment)")
        targets = [torch.from_numpy(t[self.rows]) for t in loaded["targets"]]
        # sparse: (classes, weights) per row, k of each; dense: (rows, C)
        self.targets = tuple(targets) if self.ts.sparse else targets[0]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        """(input, label, target at T); for a sparse set (input, label, classes, weights), and
        a hybrid set's log p_T last.
        In a view set the input is the row's replayed view."""
        x, _ = split_item(self.data[int(self.data_index[i])])
        if self.transform is not None:
            x = replay(self.transform, x, int(self.view_seeds[i]))
        if isinstance(self.targets, tuple):  # classes, weights (and a hybrid's log p)
            return (x, int(self.labels[i]), *(t[i] for t in self.targets))
        return x, int(self.labels[i]), self.targets[i]


# --- streaming ----------------------------------------------------------------------------------

def gather_inputs(data: Dataset, index: torch.Tensor, *, shared: bool = False) -> torch.Tensor:
    """The inputs of dataset examples `index` (int64), stacked (N, ...), in shared memory when
    `shared`: one gather for datasets holding a tensor (npz, TensorDataset), else
    `__getitems__` or one item at a time. An index outside the dataset is refused."""
    at = index.numpy()
    if len(at) and (int(at.min()) < 0 or int(at.max()) >= len(data)):
        raise IntegrityError(f"the transfer set indexes examples outside the dataset's "
                             f"{len(data)} (found {int(at.min())}..{int(at.max())}); "
                             "run `softlabels verify` on it and pass the DATA it was made from")
    source = (data.x if isinstance(data, NpzDataset) else
              data.tensors[0] if isinstance(data, TensorDataset) else None)
    if source is not None and source.device.type != "cpu":  # kept on an accelerator
        return source.index_select(0, index.to(source.device))
    if source is not None:
        out = empty((len(index), *source.shape[1:]), source.dtype, shared=shared)
        if source.dtype == torch.bfloat16:
            return torch.index_select(source, 0, index, out=out)
        # numpy's take, in range (checked above) so without its bounds-check buffer
        np.take(source.detach().numpy(), index.numpy(), axis=0, out=out.numpy(), mode="clip")
        return out
    many = getattr(data, "__getitems__", None)
    items = many(index.tolist()) if many else [data[i] for i in index.tolist()]
    first = split_item(items[0])[0] if items else torch.empty(0)
    out = empty((len(items), *first.shape), first.dtype, shared=shared)
    return torch.stack([split_item(item)[0] for item in items], out=out)


class SoftTargetBatches(IterableDataset):
    """Whole batches (inputs, labels, *targets) streamed from whole checked blocks of a set.

    Targets are (B, C) float32 probabilities at `temperature`, or (classes, weights) (B, k) of a
    sparse set. Per epoch (`set_epoch`) the block order is shuffled with (seed, epoch), blocks
    are dealt round-robin to ranks and then to DataLoader workers, and rows are shuffled within a
    window of `window` blocks (at least one batch's worth); a thread builds the next window (reads,
    checks, shuffles, gathers its inputs) while one is served, so memory holds about two
    windows, never the set, and the consumer only cuts batches. Every block passes
    `TransferSet.read_block` (checksums, finite targets, labels and indices in range) for the arrays
    it serves (labels, index, the targets at T) before use; `checksum=False` skips the checksums
    (the value checks remain) for sets already verified.

    With DataLoader workers use `loader(num_workers=W, pin_memory=...)`: each worker reads,
    checks and shuffles whole windows (inputs included) and hands each over once, in shared
    memory; the main process cuts batches from them as views, so a batch costs no hand-over.
    A plain `DataLoader(stream, batch_size=None, num_workers=W)` works too (pass the same
    `num_workers=W` here so `len()` is exact) and hands over every batch. Batches hold
    `batch_size` rows (per rank) but the last (through a plain DataLoader: the last of each
    worker). `rank`/`world_size` default to torch.distributed's. Across `world_size` ranks each
    rank's stream ends after `steps_per_epoch()` batches, the same number on every rank: the tail
    of a rank with more rows is dropped (at most about one block per rank per epoch; which rows
    differs every epoch, as the order is reshuffled).
    """

    def __init__(self, data: str | Dataset, transfer_set: str | os.PathLike[str] | TransferSet,
                 *, temperature: float, batch_size: int, rows: np.ndarray | None = None,
                 shuffle: bool = True, window: int = 4, seed: int = 0, check: bool = True,
                 checksum: bool = True, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0) -> None:
        dataset, ts = _open(data, transfer_set)
        if ts.meta.get("views"):
            raise SoftlabelsError(f"{ts.path} holds augmented views: streaming serves plain "
                                  "examples; use SoftTargetDataset")
        if batch_size <= 0:
            raise SoftlabelsError(f"batch_size must be positive, got {batch_size}")
        self.temperature = _check_temperature(temperature)
        check_servable(ts, self.temperature)
        self.data, self.path, self.batch_size = dataset, str(ts.path), int(batch_size)
        self.num_rows, self.block_rows = ts.num_rows, ts.block_rows
        self.keep = None
        if rows is not None:
            self.keep = np.zeros(ts.num_rows, dtype=bool)
            self.keep[np.asarray(rows)] = True
        if check:
            picked = np.flatnonzero(self.keep) if self.keep is not None else np.arange(ts.num_rows)
            check_alignment(dataset, ts, picked, seed=seed, check_all_up_to=CHECK_SAMPLE)
        if not isinstance(transfer_set, TransferSet):
            ts.close()
        self.shuffle, self.window, self.seed = shuffle, max(1, window), seed
        # the epoch in shared memory: persistent DataLoader workers see `set_epoch` too
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.checksum, self._rank, self._world = checksum, rank, world_size
        self.num_workers = num_workers  # the DataLoader's, so len() counts its batches
        self._windows_out = False  # True in `loader()`'s workers: yield whole windows
        self._open_set: tuple[int, TransferSet] | None = None  # (pid, set) kept across epochs

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def loader(self, *, num_workers: int = 0, pin_memory: bool = False,
               **dataloader_options: Any) -> WindowLoader:
        """Batches of this stream read by `num_workers` DataLoader workers that hand over whole
        windows (see the class); `pin_memory` pins each window once, and its batches with it.
        Workers persist across epochs unless `persistent_workers=False`; other options go to
        the DataLoader too (e.g. `multiprocessing_context`)."""
        options = {"persistent_workers": num_workers > 0, **dataloader_options}
        return WindowLoader(self, num_workers=num_workers, pin_memory=pin_memory, **options)

    def __getstate__(self) -> dict[str, Any]:  # a worker opens its own handle
        return {**self.__dict__, "_open_set": None}

    @contextmanager
    def _reading(self) -> Iterator[TransferSet]:
        """The set, open in this process. A Zarr set stays open across epochs (opening reads
        its metadata: about 15 ms, a tenth of an epoch of a small set); an HDF5 file is opened
        per epoch, so no file handle outlives an iteration."""
        if backend_of(self.path) == "hdf5":
            with open_transfer_set(self.path) as ts:
                yield ts
            return
        if self._open_set is None or self._open_set[0] != os.getpid():
            self._open_set = (os.getpid(), open_transfer_set(self.path))
        yield self._open_set[1]

    def _where(self) -> tuple[int, int]:
        rank, world = rank_and_world()
        return (rank if self._rank is None else self._rank,
                world if self._world is None else self._world)

    def _rows_in(self, blocks: list[int]) -> int:
        if self.keep is None:
            return sum(min(self.block_rows, self.num_rows - b * self.block_rows) for b in blocks)
        return sum(int(self.keep[b * self.block_rows:(b + 1) * self.block_rows].sum())
                   for b in blocks)

    def steps_per_epoch(self, epoch: int | None = None, *, num_workers: int = 0) -> int:
        """Batches every rank yields in `epoch` (default: the current one) when read through
        `num_workers` workers of a plain DataLoader (0: iterated directly, or through
        `loader()` with any number of workers): the fewest any rank has, so all ranks step
        together."""
        epoch, (_, world) = (self.epoch if epoch is None else epoch), self._where()
        workers = max(1, num_workers)
        return min(sum(-(-self._rows_in(self._blocks(epoch, r, world, w, workers))
                         // self.batch_size) for w in range(workers)) for r in range(world))

    def __len__(self) -> int:
        return self.steps_per_epoch(num_workers=self.num_workers)

    def _blocks(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[int]:
        return chunk_plan(self.num_rows, self.block_rows, epoch=epoch, seed=self.seed,
                          shuffle=self.shuffle, rank=rank, world_size=world, worker=worker,
                          num_workers=workers)

    def _windows(self, ts: TransferSet, blocks: list[int], order: torch.Generator,
                 shared: bool) -> Iterator[list[torch.Tensor]]:
        """[inputs, labels, *targets] of each window of blocks, selected rows only, shuffled
        (`blocks.shuffled_window`), the inputs then gathered in that order; batches are views of
        it. A background thread builds the next window meanwhile (`blocks.read_ahead`), so the
        consumer only cuts batches. A window holds at least one batch. In a DataLoader worker
        (`shared`) the window lives in shared memory, so it crosses to the main process as a
        reference."""
        def read(block: int) -> list[torch.Tensor]:
            return block_columns(ts, block, temperature=self.temperature,
                                 checksum=self.checksum, keep=self.keep)

        def build(parts: list[list[torch.Tensor]]) -> list[torch.Tensor] | None:
            cols = shuffled(parts, order if self.shuffle else None,
                            shared=[False] + [shared] * (len(parts[0]) - 1))
            if cols is None:
                return None
            index, *rest = cols
            return [gather_inputs(self.data, index, shared=shared), *rest]

        window = max(self.window, -(-self.batch_size // self.block_rows))
        groups = [blocks[i:i + window] for i in range(0, len(blocks), window)]
        # from a URL, read blocks at once to hide the store's latency (threads: at most 8)
        concurrent = min(window, URL_READS) if is_url(self.path) else 1
        yield from (cols for cols in read_ahead(groups, read, build, concurrent=concurrent)
                    if cols is not None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        rank, world = self._where()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        blocks = self._blocks(self.epoch, rank, world, worker, workers)
        rng = window_order([self.seed, self.epoch, rank, worker])
        if self._windows_out:  # `loader()` cuts the batches and counts the steps
            with self._reading() as ts:
                yield from (tuple(w) for w in self._windows(ts, blocks, rng, info is not None))
            return
        # Equal steps across ranks: each worker of this rank stops at its share of the budget.
        budget = self.steps_per_epoch(num_workers=workers if info else 0) if world > 1 else None
        quota = None if budget is None else worker_quota(self, rank, world, workers, budget)[
            worker]
        with self._reading() as ts:
            batches = rebatch(self._windows(ts, blocks, rng, shared=info is not None),
                              self.batch_size)
            try:
                yield from batches if quota is None else itertools.islice(batches, quota)
            finally:  # stop the read-ahead thread before the set is closed
                batches.close()


class StreamingSoftTargetDataset(IterableDataset):
    """Stream (input, label, soft target) items by whole checked chunks of the transfer set.

    The row-at-a-time face of `SoftTargetBatches` (same shuffle, splits and checks); prefer the
    batches, which skip a per-row Python step. Dense sets of plain examples only.
    """

    def __init__(self, data: str | Dataset, transfer_set: str | os.PathLike[str], *,
                 temperature: float, rows: np.ndarray | None = None, shuffle: bool = True,
                 window: int = 4, seed: int = 0, check: bool = True) -> None:
        dataset, ts = _open(data, transfer_set)
        try:
            if ts.sparse:
                raise SoftlabelsError(f"{ts.path} is sparse: StreamingSoftTargetDataset serves "
                                      "dense targets; use SoftTargetBatches")
            self.batches = SoftTargetBatches(dataset, ts, temperature=temperature,
                                             batch_size=ts.block_rows, rows=rows,
                                             shuffle=shuffle, window=window, seed=seed,
                                             check=check)
        finally:
            if not isinstance(transfer_set, TransferSet):
                ts.close()
        self.temperature = self.batches.temperature

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        keep = self.batches.keep
        total = int(keep.sum()) if keep is not None else self.batches.num_rows
        return -(-total // rank_and_world()[1])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        for x, labels, targets in self.batches:
            yield from zip(x.unbind(0), labels.tolist(), targets.unbind(0))
