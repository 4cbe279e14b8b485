"""Stage two's input: join a dataset with a transfer set by `index`, check they line up by
`sample_hash`, and serve (input, label, soft target at T) — in memory, or streamed as whole
batches from whole blocks, shuffled across windows of blocks that span the set, split across
distributed ranks, in an order DataLoader workers do not change, resumable mid-epoch. Every
block is read checked (`TransferSet.read_block`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from softlabels.compute.teacher_inputs import replay_inputs
from softlabels.compute.views import build_augment, replay
from softlabels.errors import MismatchError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.backends import backend_of
from softlabels.format.location import is_url
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.selection import select_rows
from softlabels.options import check_batch_size
from softlabels.sources.arrays import example_hash, split_item
from softlabels.sources.images import model_inputs
from softlabels.sources.load import load_data
from softlabels.tempering import check_temperature
from softlabels.train.blocks import check_servable, load_checked
from softlabels.train.epochs import WindowLoader, block_windows, rank_and_world, resume_point
from softlabels.train.stream_pieces import (
    BlockReaders,
    Columns,
    Span,
    WindowPool,
    background,
    build_window,
    cut,
    gather_inputs,
    piece_batches,
    pieces,
    window_generator,
)

CHECK_ALL_UP_TO = 200_000  # rows; past this a seeded sample of CHECK_SAMPLE rows is checked
CHECK_SAMPLE = 10_000
MAX_IN_MEMORY = 2 << 30  # bytes of targets held in memory before streaming is required
URL_READS = 8  # blocks a stream reads in one call from a URL
WINDOW_BLOCKS = 64  # blocks a stream shuffles across: a batch then spans most of the set
SERVED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _open(data: str | Dataset, transfer_set: str | os.PathLike[str] | TransferSet,
          ) -> tuple[Dataset, TransferSet]:
    ts = transfer_set if isinstance(transfer_set, TransferSet) else open_transfer_set(transfer_set)
    return model_inputs(load_data(data) if isinstance(data, str) else data), ts


def check_length(data: Dataset, ts: TransferSet) -> None:
    """Refuse a dataset longer or shorter than the one the set was made from."""
    made_from = ts.info.num_examples
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
    data = replay_inputs(data, ts.info.teacher.preprocess)  # hashed as the teacher saw it
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
                         | (index < 0) | (index >= ts.info.num_examples))
    if len(bad):
        ts.read_block(int(bad[0]) // ts.block_rows)  # raises IntegrityError naming the block
    return select_rows(labels, index=index, **select)


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
        self.temperature = check_temperature(temperature, at_most=math.inf)
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
        if self.ts.layout.views:
            self.view_seeds = loaded["view_seed"][self.rows]
            x0, _ = split_item(self.data[int(self.data_index[0])])
            self.transform = build_augment(self.ts.info.augment, x0, trust_code=trust_code,
                                           source=f"{self.ts.path} (its augment)")
        targets = [torch.from_numpy(t[self.rows]) for t in loaded["targets"]]
        # sparse: (classes, weights) per row, k of each; dense: (rows, C)
        self.targets = tuple(targets) if self.ts.target.sparse else targets[0]

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

class SoftTargetBatches(IterableDataset):
    """Whole batches (inputs, labels, *targets) streamed from whole checked blocks of a set.

    Targets are (B, C) probabilities at `temperature` in `dtype` (float32, or float16 to halve
    what crosses to the device; the model converts there), or (classes int64, weights) (B, k) of
    a sparse set. The order of an epoch is a function of (seed, epoch, rank, world_size) alone:
    blocks are shuffled and dealt to ranks, and each rank reads windows of `window` blocks that
    each span its whole share of the set (`epochs.block_windows`), their rows shuffled across
    the window, so a batch of 256 draws from most of the set (`epochs.mix`: about 60 of 64
    equal slices once the set has 64 blocks or more). Every block passes
    `TransferSet.read_blocks` (checksums over its bytes, `block_done`, finite targets, labels
    and indices in range) for the arrays it serves before use; `checksum=False` skips the
    checksums (the value checks remain, every epoch: without checksums nothing proves a block
    unchanged, whereas the checked stream checks a block's values once while the set is open).

    Memory: a background thread builds one window (its blocks read, checked, decoded and
    scattered to their shuffled places, by two threads for a cached local set) while the
    previous pieces are served, so at most two windows of the served arrays are held (a window
    is `window` to 2 x `window` - 1 blocks of labels, index and targets at T: at C = 1,000 in
    float32 a block of 512 rows serves 2 MiB, so 64 blocks hold 128 MiB; `window` and
    `dtype=torch.float16` lower it), plus up to four pieces' inputs (and the rows of a piece
    across two windows, copied; each at most PIECE_BYTES: queued, being cut, being built);
    never the set. A batch is
    a view of its window, so a batch the consumer keeps keeps its whole window alive. Memory
    no batch holds any more is lent to the next window or piece (`stream_pieces.WindowPool`),
    so it stays held between epochs.

    Workers: `loader(num_workers=W)` (pieces of whole batches, built by worker i % W and cut
    into batches in the main process, as views) or a plain `DataLoader(stream,
    batch_size=None, num_workers=W)` (batch b built by worker b % W) give the same batches in
    the same order as iterating the stream directly: DataLoader takes its workers' items round
    robin. Each worker reads and checks every window (and builds only its own pieces' inputs), so
    workers pay off where inputs cost more than the targets (decoded images), not for arrays.

    Resume: `state_dict()` gives (epoch, batches served, seed); `load_state_dict()` makes the
    next iteration serve that epoch's remaining batches, the same ones, bit for bit, without
    reading the windows already served. Across `world_size` ranks each rank serves
    `steps_per_epoch()` batches, the same number on every rank (the tail of a rank with more
    rows is dropped: at most about one block per rank per epoch, different rows every epoch).
    `rank`/`world_size` default to torch.distributed's.
    """

    def __init__(self, data: str | Dataset, transfer_set: str | os.PathLike[str] | TransferSet,
                 *, temperature: float, batch_size: int, rows: np.ndarray | None = None,
                 shuffle: bool = True, window: int = WINDOW_BLOCKS, seed: int = 0,
                 check: bool = True, checksum: bool = True, rank: int | None = None,
                 world_size: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        dataset, ts = _open(data, transfer_set)
        if ts.layout.views:
            raise SoftlabelsError(f"{ts.path} holds augmented views: streaming serves plain "
                                  "examples; use SoftTargetDataset")
        check_batch_size(batch_size)
        if dtype not in SERVED_DTYPES:
            raise SoftlabelsError(f"dtype must be one of torch.float32, torch.float16, "
                                  f"torch.bfloat16; got {dtype}")
        self.temperature = check_temperature(temperature, at_most=math.inf)
        check_servable(ts, self.temperature)
        self.data, self.path, self.batch_size = dataset, str(ts.path), int(batch_size)
        self.num_rows, self.block_rows, self.dtype = ts.num_rows, ts.block_rows, dtype
        self.keep = None
        if rows is not None:
            self.keep = np.zeros(ts.num_rows, dtype=bool)
            self.keep[np.asarray(rows)] = True
        if check:
            picked = np.flatnonzero(self.keep) if self.keep is not None else np.arange(ts.num_rows)
            check_alignment(dataset, ts, picked, seed=seed, check_all_up_to=CHECK_SAMPLE)
        self._num_blocks = ts.num_blocks
        self.piece_batches = piece_batches(dataset, ts, self.batch_size, dtype)
        if not isinstance(transfer_set, TransferSet):
            ts.close()
        self.shuffle, self.window, self.seed = shuffle, max(1, int(window)), int(seed)
        # shared memory: persistent DataLoader workers and `loader()`'s copy see them too
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._start = torch.zeros((), dtype=torch.int64).share_memory_()  # resumed at batch
        self._served = 0  # batches of the epoch handed out in this process (`state_dict`)
        self.checksum, self._rank, self._world = checksum, rank, world_size
        self._pieces_out = False  # True in `loader()`'s source: yield pieces, not batches
        self._open_set: tuple[int, TransferSet] | None = None  # (pid, set) kept across epochs
        self._pool = WindowPool()  # window memory lent again (plain iteration in this process)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Serve `epoch` from its first batch on the next iteration."""
        self._epoch.fill_(int(epoch))
        self._start.fill_(0)
        self._served = 0

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: its epoch, the batches of it served (counted where the
        stream, or `loader()`, is iterated in this process; a plain DataLoader's consumer counts
        its own) and the seed. Small and JSON-able."""
        return {"epoch": self.epoch, "batches": self._served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the next iteration serves the rest of that epoch."""
        epoch, batches = resume_point(state, seed=self.seed, steps=self.steps_per_epoch,
                                      what="stream")
        self.set_epoch(epoch)
        self._start.fill_(batches)
        self._served = batches

    def loader(self, *, num_workers: int = 0, pin_memory: bool = False,
               **dataloader_options: Any) -> WindowLoader:
        """Batches of this stream built by `num_workers` DataLoader workers that hand over
        pieces of whole batches (see the class), in the stream's own order; `pin_memory` pins
        each piece once, and its batches with it. Workers persist across epochs unless
        `persistent_workers=False`; other options go to the DataLoader too (e.g.
        `multiprocessing_context`)."""
        options = {"persistent_workers": num_workers > 0, **dataloader_options}
        return WindowLoader(self, num_workers=num_workers, pin_memory=pin_memory, **options)

    def __getstate__(self) -> dict[str, Any]:  # a worker opens its own handle and pool
        return {**self.__dict__, "_open_set": None, "_pool": WindowPool()}

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

    def windows(self, epoch: int, rank: int, world: int) -> list[list[int]]:
        """The windows of blocks `rank` reads in `epoch`, in order (`epochs.block_windows`)."""
        return block_windows(self._num_blocks, window=self.window, epoch=epoch, seed=self.seed,
                             shuffle=self.shuffle, rank=rank, world_size=world)

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches every rank serves in a whole `epoch` (default: the current one), whatever
        the DataLoader workers: the fewest any rank has, so all ranks step together."""
        epoch, (_, world) = (self.epoch if epoch is None else epoch), self._where()
        return min(-(-sum(self._rows_in(w) for w in self.windows(epoch, r, world))
                     // self.batch_size) for r in range(world))

    def __len__(self) -> int:
        """Batches the next iteration serves (the rest of the epoch after `load_state_dict`)."""
        return self.steps_per_epoch() - int(self._start)

    def _pieces(self, ts: TransferSet, span_of: Callable[[int], Span],
                shared: bool) -> Iterator[list[torch.Tensor]]:
        """This process's pieces of the epoch (`stream_pieces.pieces`), built on a thread."""
        rank, world = self._where()
        epoch = self.epoch
        windows = self.windows(epoch, rank, world)
        counts = [self._rows_in(w) for w in windows]
        span = span_of(sum(counts))

        readers = BlockReaders(threads=1 if shared else 2)  # a worker: one thread (W workers
        # read at once already)

        def build(j: int, blocks: list[int]) -> Columns | None:
            order = window_generator(self.seed, epoch, rank, j) if self.shuffle else None
            return build_window(ts, blocks, [self._rows_in([b]) for b in blocks],
                                temperature=self.temperature, checksum=self.checksum,
                                dtype=self.dtype, keep=self.keep, order=order,
                                readers=readers, pool=self._pool,
                                together=URL_READS if is_url(self.path) else 1)

        def make() -> Iterator[list[torch.Tensor]]:
            try:
                yield from pieces(windows, counts, span, build=build, shared=shared,
                                  pool=self._pool,
                                  gather=lambda index: gather_inputs(self.data, index,
                                                                     shared=shared))
            finally:
                readers.close()

        return background(make)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start, steps, size = int(self._start), self.steps_per_epoch(), self.batch_size
        if info is None:
            self._served = start
        # a plain DataLoader's worker hands over batches; otherwise pieces of whole batches
        per = self.piece_batches if (info is None or self._pieces_out) else 1

        def span_of(total: int) -> Span:
            return Span(first=start * size, stop=min(steps * size, total), piece=per * size,
                        mine=lambda i: i % workers == worker)

        with self._reading() as ts:
            made = self._pieces(ts, span_of, shared=info is not None)
            try:
                if self._pieces_out:  # `loader()` cuts the batches and counts them
                    yield from (tuple(p) for p in made)
                    return
                for piece in made:
                    for batch in cut(piece, size):
                        if info is None:
                            self._served += 1
                        yield batch
            finally:  # stop the read-ahead thread before the set is closed
                made.close()


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
            if ts.target.sparse:
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
