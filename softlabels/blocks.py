"""Stage two's checked read of a transfer set, one block at a time: every block a student
trains on passes `TransferSet.read_block` (readable, checksum, finite targets, labels in range)
and becomes the soft targets at the chosen temperature."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .errors import SoftlabelsError
from .format import schema as S
from .format.reader import TransferSet
from .tempering import tempered_softmax


def check_servable(ts: TransferSet, temperature: float) -> None:
    """Refuse a sparse set at a temperature it did not store (sparse targets cannot re-temper)."""
    if ts.sparse and ts.temperature_index(temperature) is None:
        raise SoftlabelsError(f"{ts.path} is sparse ({ts.sparse['kind']}) and stores targets at "
                              f"T={ts.temperatures} only, not T={temperature}; pass one of them")


def block_targets(ts: TransferSet, arrays: dict[str, np.ndarray],
                  temperature: float) -> list[np.ndarray]:
    """The soft targets at `temperature` of one block's arrays (from `read_checked`, where
    `probs` and `sample/indices` hold that temperature only): [probs (n, C) float32] for a
    dense set (stored when T was stored, else re-tempered from the logits in float32), or
    [classes (n, k) int64, weights (n, k) float32] for a sparse one."""
    k = ts.temperature_index(temperature)
    if ts.sparse:
        check_servable(ts, temperature)
        if ts.sparse["kind"] == "topk":
            z, lse = arrays[S.TOPK_LOGITS], arrays[S.TOPK_LOGSUMEXP][:, k:k + 1]
            return [arrays[S.TOPK_INDICES].astype(np.int64),
                    np.exp(z / temperature - lse).astype(np.float32, copy=False)]
        if ts.layout.hybrid:  # [classes, weights, log p_T]
            return ts.layout.hybrid.decode(arrays, temperature, k, ts.temperatures[0])
        idx = arrays[S.SAMPLE_INDICES].astype(np.int64)
        return [idx, np.full(idx.shape, 1 / max(idx.shape[1], 1), dtype=np.float32)]
    if k is not None:
        return [arrays[S.PROBS].astype(np.float32, copy=False)]
    return [tempered_softmax(torch.from_numpy(arrays[S.LOGITS]), temperature).numpy()]


def needed_arrays(ts: TransferSet, temperature: float) -> list[str]:
    """The arrays stage two serves from: labels, index, the targets (probs when T was stored,
    else logits; a sparse set's top-k or samples) and, in a view set, the view seeds."""
    extra = [S.VIEW_SEED] if ts.has(S.VIEW_SEED) else []
    if ts.layout.hybrid:
        return [S.LABELS, S.INDEX, *extra, *ts.layout.hybrid.names()]
    if ts.sparse:
        return [S.LABELS, S.INDEX, *extra, *((S.TOPK_INDICES, S.TOPK_LOGITS, S.TOPK_LOGSUMEXP)
                                             if ts.sparse["kind"] == "topk"
                                             else (S.SAMPLE_INDICES,))]
    stored = ts.temperature_index(temperature) is not None
    return [S.LABELS, S.INDEX, *extra, S.PROBS if stored else S.LOGITS]


def read_checked(ts: TransferSet, block: int, *, temperature: float,
                 checksum: bool = True) -> dict[str, np.ndarray]:
    """The arrays one block serves at `temperature` (`needed_arrays`; `probs` and
    `sample/indices` at that temperature only), read and checked by `ts.read_block`: readable,
    matching their checksums, finite targets, labels in range; `IntegrityError` names the
    block. checksum=False skips the checksums (the value checks remain), for sets already
    verified."""
    stored = ts.temperature_index(temperature) is not None
    return ts.read_block(block, needed_arrays(ts, temperature),
                         temperature=temperature if stored else None, checksum=checksum)


def load_checked(ts: TransferSet, temperature: float) -> dict[str, Any]:
    """Every row's labels, index, view seeds (or None) and targets at T, read block by block
    through `read_checked`: damage anywhere raises `IntegrityError` naming the block."""
    check_servable(ts, temperature)
    parts: dict[str, list[np.ndarray]] = {"labels": [], "index": [], "view_seed": [],
                                          "targets": []}
    for b in range(ts.num_blocks):
        arrays = read_checked(ts, b, temperature=temperature)
        parts["labels"].append(arrays[S.LABELS])
        parts["index"].append(arrays[S.INDEX])
        if S.VIEW_SEED in arrays:
            parts["view_seed"].append(arrays[S.VIEW_SEED])
        parts["targets"].append(block_targets(ts, arrays, temperature))
    cat = np.concatenate
    per_block = parts["targets"]
    return {"labels": cat(parts["labels"]), "index": cat(parts["index"]),
            "view_seed": cat(parts["view_seed"]) if parts["view_seed"] else None,
            "targets": [cat([t[j] for t in per_block]) for j in range(len(per_block[0]))]}


def empty(shape: tuple[int, ...], dtype: torch.dtype, *, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; in shared memory when `shared` (a DataLoader worker's window
    then crosses to the main process as a reference, not a copy)."""
    if not shared:  # numpy's allocation: about half the page-fault cost of torch.empty here
        raw = np.empty(int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        return torch.from_numpy(raw).view(dtype).reshape(shape)
    count = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(count * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def block_columns(ts: TransferSet, block: int, *, temperature: float, checksum: bool,
                  keep: np.ndarray | None) -> list[torch.Tensor]:
    """[index, labels, *targets] of one block's selected rows (`keep`, a mask over all rows,
    or every row), read through `read_checked`."""
    arrays = read_checked(ts, block, temperature=temperature, checksum=checksum)
    cols = [arrays[S.INDEX], arrays[S.LABELS], *block_targets(ts, arrays, temperature)]
    if keep is not None:
        start, stop = ts.block_range(block)
        cols = [c[keep[start:stop]] for c in cols]
    return [torch.from_numpy(c) for c in cols]


def read_ahead(groups: list[list[int]], read: Callable[[int], Any],
               build: Callable[[list[Any]], Any], *, concurrent: int = 1) -> Iterator[Any]:
    """`build([read(b) for b in group])` of each group of blocks, in order, run by a background
    thread one group ahead of the consumer: while one window is served, the next is read,
    checked, shuffled and gathered (zarr's I/O and codecs, numpy's and torch's copies, xxhash
    release the GIL), so the consumer only cuts batches and memory holds about two windows.
    `concurrent` > 1 reads that many blocks of a group at once (for an object store, where
    each read waits a round trip). A block's `IntegrityError` is raised where its window is
    due."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-read")
    reads = (ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix="softlabels-get")
             if concurrent > 1 else None)
    pending: deque[Future[Any]] = deque()

    def submit(i: int) -> None:
        if i < len(groups):
            got = (lambda: list(reads.map(read, groups[i]))) if reads else (
                lambda: [read(b) for b in groups[i]])
            pending.append(pool.submit(lambda: build(got())))
    try:
        submit(0)
        for i in range(len(groups)):
            got = pending.popleft().result()
            submit(i + 1)
            yield got
    finally:
        if not sys.is_finalizing():  # at exit the pools' modules are torn down: nothing to stop
            pool.shutdown(wait=True, cancel_futures=True)
            if reads:
                reads.shutdown(wait=True, cancel_futures=True)


def window_order(seed: list[int]) -> torch.Generator:
    """The generator of a stream's within-window shuffles, seeded by (seed, epoch, rank, worker)
    through numpy's SeedSequence: `torch.randperm` draws a window's permutation in less than
    half the time of numpy's `Generator.permutation` (measured: 0.42 against 0.99 ms for
    131,072 rows)."""
    state = np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def shuffled_window(blocks: list[list[torch.Tensor]], order: torch.Generator | None, *,
                    shared: list[bool] | None = None) -> list[torch.Tensor] | None:
    """The columns of several blocks (CPU tensors) as one tensor per column, rows in the order
    of a permutation drawn from `order` (None: as they come); None without rows. Column j is
    put in shared memory where `shared[j]`."""
    n = sum(len(c[0]) for c in blocks)
    if n == 0:
        return None
    dest = torch.randperm(n, generator=order).numpy() if order is not None else None
    window = []
    for j, first in enumerate(blocks[0]):
        out = empty((n, *first.shape[1:]), first.dtype, shared=bool(shared and shared[j]))
        view, at = _rows(out), 0
        for c in blocks:
            rows = len(c[j])
            if rows:  # a scatter of opaque rows: no concatenation of the blocks first
                view[slice(at, at + rows) if dest is None else dest[at:at + rows]] = _rows(c[j])
            at += rows
        window.append(out)
    return window


def _rows(t: torch.Tensor) -> np.ndarray:
    """A (n, ...) tensor's memory as n opaque numpy rows (any dtype, bfloat16 included): numpy
    moves them by row, about twice as fast as element by element for narrow rows (measured)."""
    t = t.contiguous()
    raw = t.reshape(len(t), -1).view(torch.uint8).numpy()
    return raw.view(np.dtype((np.void, raw.shape[1]))).reshape(len(t))


def rebatch(windows: Iterable[list[torch.Tensor]], size: int,
            ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches of `size` rows cut from consecutive windows: views of a window, except the one
    batch that joins a window's leftover rows to the next window's first (pinned when the
    windows are); then the tail."""
    carry: list[torch.Tensor] | None = None
    for cols in windows:
        n, at = len(cols[0]), 0
        if carry is not None:
            need = size - len(carry[0])
            if n < need:
                carry = _joined(carry, cols)
                continue
            yield tuple(_joined(carry, [c[:need] for c in cols]))
            carry, at = None, need
        full = at + (n - at) // size * size
        if full > at:  # one unbind per column: a third of the cost of slicing batch by batch
            yield from zip(*[c[at:full].view(-1, size, *c.shape[1:]).unbind(0) for c in cols])
        carry = [c[full:] for c in cols] if full < n else None
    if carry is not None:
        yield tuple(carry)


def _joined(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat([x, y]).pin_memory() if y.is_pinned() else torch.cat([x, y])
            for x, y in zip(a, b)]
