"""One rank's epoch of a streamed set as a sequence of rows, cut into pieces of whole batches.

The rows are the rank's windows of blocks (`epochs.block_windows`) one after another, each
window's rows permuted by a generator of its own (seed, epoch, rank, window number), so any
stretch of the sequence can be rebuilt without the ones before it: a resumed epoch starts at
its first unserved batch, and a DataLoader worker builds only its own pieces (piece i goes to
worker i % workers, the order in which a DataLoader takes them). A window's blocks are read and
checked block by block (`TransferSet.read_blocks`: checksums over each block's bytes,
`block_done`, finite targets, labels and indices in range), by two threads where the set is
local and cached, and each block's rows are decoded with torch and placed at once where the
window serves them. A background thread builds the next pieces while the consumer cuts
batches.
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.reader import TransferSet
from softlabels.sources.arrays import NpzDataset, split_item
from softlabels.train.blocks import empty, needed_arrays, window_order

Columns = list[torch.Tensor]  # [index or inputs, labels, *targets]
PIECE_ROWS = 65_536  # rows of a piece a stream builds at once, at most
PIECE_BYTES = 32 << 20  # bytes of a piece (inputs, labels, targets) a stream builds at once
READ_AHEAD = 4  # blocks of a local set whose files the kernel reads ahead (`will_read`)


@dataclass(frozen=True)
class Span:
    """The rows one iteration serves: [first, stop) of the rank's row sequence, in pieces of
    `piece` rows (a multiple of the batch), piece i built where `mine(i)`."""

    first: int
    stop: int
    piece: int
    mine: Callable[[int], bool]

    def pieces_in(self, lo: int, hi: int) -> range:
        """The pieces that rows [lo, hi) of the sequence overlap."""
        lo, hi = max(lo, self.first), min(hi, self.stop)
        if lo >= hi:
            return range(0)
        return range((lo - self.first) // self.piece, (hi - 1 - self.first) // self.piece + 1)

    def rows_of(self, i: int) -> tuple[int, int]:
        start = self.first + i * self.piece
        return start, min(start + self.piece, self.stop)


def block_columns(ts: TransferSet, arrays: dict[str, np.ndarray], *, temperature: float,
                  dtype: torch.dtype) -> Columns:
    """[index, labels, *targets] of one checked block's (selected) rows, converted with torch:
    dense (n, C) probabilities at T (stored, or re-tempered from the logits in float32) in
    `dtype`; sparse (classes int64, weights in `dtype`), and a hybrid set's log p_T (float32)
    last (`TargetKind.decode`)."""
    return [torch.from_numpy(arrays[S.INDEX]), torch.from_numpy(arrays[S.LABELS]),
            *ts.target.decode(arrays, temperature, ts.temperature_index(temperature),
                              tuple(ts.temperatures), dtype)]


def build_window(ts: TransferSet, blocks: list[int], sizes: list[int], *, temperature: float,
                 checksum: bool, dtype: torch.dtype, keep: np.ndarray | None,
                 order: torch.Generator | None, readers: BlockReaders, together: int = 1,
                 pool: WindowPool | None = None) -> Columns | None:
    """A window's selected rows (`sizes[i]` of block i), [index, labels, *targets]
    (`block_columns`), in the order of a permutation drawn
    from `order` (stored row i is served at position `torch.randperm(n, generator=order)[i]`;
    None: in stored order); None without rows.

    Each block is read (`TransferSet.read_blocks`, checked on its own bytes) by `readers`
    (`BlockReaders.fill`: a cached local set's blocks on two threads) into that thread's
    reused buffers, decoded (`block_columns`) and at once scattered to its rows' places in the
    window by the same thread (`index_copy_`, which releases the GIL, so one thread's decoding
    and scatter run beside the other's reads); the bytes placed are the bytes checked, since
    the buffers are the reading thread's own. Unshuffled, an array served as stored is read
    straight into its rows of the window where its block is one whole chunk file. Measured
    per window (`benchmarks/window_copies.py`): at C = 1,000 (30,000 rows, 120 MB) scattering
    from each block took 13-27 ms (2 or 1 torch threads), against 10-18 ms for the same copy in
    order and 11-12 ms for gathering the rows from a window kept in stored order after it
    was read; the scatter runs beside the other thread's reads, the gather could not. One
    block per call is also the fastest through zarr on local disk (a gather of a whole
    49-block window took 3-4x as long as 49 one-block calls); `together` > 1 reads that many
    per call (a URL). `pool` lends the window's memory (`WindowPool`).
    """
    n = sum(sizes)
    if n == 0:
        return None
    stored = ts.temperature_index(temperature) is not None
    names = needed_arrays(ts, temperature)
    window: Columns = []
    direct: dict[str, int] = {}  # unshuffled: arrays served as stored, name -> their column
    starts = np.cumsum([0, *sizes])
    dest = None if order is None else torch.randperm(n, generator=order)

    def into(i: int) -> dict[str, np.ndarray] | None:
        """Where block i's arrays served as stored may be read: their rows of an unshuffled
        window (read and checked there, no copy after)."""
        if not direct or keep is not None:
            return None
        a, b = int(starts[i]), int(starts[i + 1])
        return {name: window[j][a:b].numpy().reshape(-1) for name, j in direct.items()}

    def place(i: int, arrays: dict[str, np.ndarray]) -> None:
        """Block i's selected rows, decoded, to their places in the window (unless read
        there), before its read buffers are read into again."""
        if keep is not None:
            start, stop = ts.block_range(blocks[i])
            arrays = {name: a[keep[start:stop]] for name, a in arrays.items()}
        cols = block_columns(ts, arrays, temperature=temperature, dtype=dtype)
        if not window:  # the first block, placed before any other block is read
            window.extend(pool.take((n, *c.shape[1:]), c.dtype) if pool is not None
                          else empty((n, *c.shape[1:]), c.dtype, shared=False) for c in cols)
            if dest is None:
                direct.update({name: j for name, a in arrays.items()
                               for j, c in enumerate(cols)
                               if c.data_ptr() == a.ctypes.data and c.nbytes == a.nbytes
                               and c.dtype != torch.bfloat16 and a.flags.c_contiguous})
        a0, b0 = int(starts[i]), int(starts[i + 1])
        if b0 == a0:  # no row of this block selected
            return
        for out, c in zip(window, cols):
            if dest is not None:
                out.index_copy_(0, dest[a0:b0], c)
            elif out[a0:b0].data_ptr() != c.data_ptr():
                out[a0:b0].copy_(c)

    readers.fill(ts, blocks, names, together, checksum, temperature if stored else None,
                 into=into, place=place)
    return window


class WindowPool:
    """Memory for windows and pieces, lent again once nothing holds it: a fresh window costs
    more in page faults than the copy that fills it (measured: 56-167 ms against 22-26 ms for
    120 MB). A buffer is lent only when no tensor but the pool's own refers to its storage
    (torch's storage use count), so a batch a consumer keeps is never overwritten; without that
    count (another torch) nothing is reused. Holds at most `limit` buffers (the columns of two
    windows and four pieces), each lent to a column of at least half its size."""

    def __init__(self, limit: int = 32) -> None:
        self.limit, self.kept = limit, []  # type: ignore[var-annotated]
        self.lock = threading.Lock()  # two streams' producers may share a pool

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised (shape) tensor of `dtype`, in a buffer nothing else holds."""
        with self.lock:  # the view made before another thread may look at the buffer
            return self._take(shape, dtype)

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        fits = [b for b in self.kept if nbytes <= len(b) <= 2 * nbytes + 4096 and _unshared(b)]
        if fits:  # the smallest that fits, so a narrow column never holds a wide one's buffer
            return min(fits, key=len)[:nbytes].view(dtype).reshape(shape)
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)  # a base tensor, no view
        if _unshared(buffer):  # the count works here: keep it for later windows
            free = [b for b in self.kept if _unshared(b)]
            if len(self.kept) >= self.limit and free:
                smallest = min(free, key=len)  # by identity: == on tensors compares values
                self.kept = [b for b in self.kept if b is not smallest]
            if len(self.kept) < self.limit:
                self.kept.append(buffer)
        return buffer[:nbytes].view(dtype).reshape(shape)


def _unshared(buffer: torch.Tensor) -> bool:
    """Nothing but `buffer` itself refers to its storage (2: it and the storage object made
    to ask)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count is not None and count(buffer.untyped_storage()._cdata) == 2


class BlockReaders:
    """Where a window's blocks are read (`TransferSet.read_blocks`, each block checked on its
    own bytes, into the reading thread's reused buffers: `reuse`, or straight into the window)
    and placed (`fill`).

    A local set whose files the page cache holds is read by two threads, the window's blocks
    dealt to them in turn, each block placed by the thread that read it before that thread
    reads again: the reads (a copy out of the page cache) and the checksums release the GIL,
    and two threads filled a shuffled window of a C = 1,000 set's 59 blocks (120 MB) in 40-55
    ms against 60-103 ms for one, of a C = 100 set's 49 blocks (83 MB) in 45-50 against 58-81
    ms (`benchmarks/window_copies.py --set`, two runs at load 1-2). Inside a DataLoader
    worker, and once two blocks in a row found chunk files out of the page cache
    (`TransferSet.cache_misses`: a read that may not wait for the disk, not a rate, which
    small or compressed chunks made look slow), one thread reads, and announces the next
    `READ_AHEAD` blocks' files to the kernel (`TransferSet.will_read`) for the rest of the
    epoch, so the disk reads ahead while it works; a cached set is spared the hints' cost
    (measured: 5 ms an epoch at C = 100 and 1,000, and at top-10). Where the file system
    cannot tell (tmpfs, other systems than Linux), two threads read and nothing is
    announced. With two damaged blocks in a window, either may be the one named. From a URL
    (`together` > 1 blocks per call, each call waiting a round trip) two threads take the calls
    in turn, so the next call waits while this one is placed; a thread is given its next call
    only once the blocks it read last have been placed (double buffering)."""

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads  # reading a cached local set
        self.pools: list[ThreadPoolExecutor] = []  # made for the first read that needs them
        self.slow = 0  # local blocks in a row read (partly) from disk

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=not sys.is_finalizing(), cancel_futures=True)

    def _pool(self, i: int) -> ThreadPoolExecutor:
        while len(self.pools) <= i:
            self.pools.append(ThreadPoolExecutor(1, thread_name_prefix="softlabels-block"))
        return self.pools[i]

    def fill(self, ts: TransferSet, blocks: list[int], names: list[str], together: int,
             checksum: bool, temperature: float | None,
             into: Callable[[int], dict[str, np.ndarray] | None],
             place: Callable[[int, dict[str, np.ndarray]], None]) -> None:
        """Read each block's checked arrays and `place(i, arrays)` them, block 0 first, each
        before its reading thread reads again (`arrays` may be views of that thread's reused
        buffers). `into(i)`: memory block i's arrays may be read straight into, asked for
        just before it is read (one block per call; `TransferSet.read_blocks`). Returns once
        every block is placed; the first error raised, once no thread reads any more."""
        local = together == 1 and ts.cache_misses() is not None
        if not local or self.threads < 2 or self.slow >= 2 or len(blocks) < 3:
            for i, arrays in enumerate(self._read(ts, blocks, names, together, checksum,
                                                  temperature, into)):
                place(i, arrays)
            return
        stop = threading.Event()

        def run(mine: range) -> None:
            try:
                for i in mine:
                    if stop.is_set():
                        return
                    place(i, self._read_one(ts, blocks[i], names, checksum, temperature,
                                            into(i)))
            except BaseException:
                stop.set()
                raise

        run(range(1))  # block 0 first: the window is made from its arrays
        helper = self._pool(0).submit(run, range(2, len(blocks), 2))
        try:
            run(range(1, len(blocks), 2))
        finally:  # nothing may still write the window once this returns
            helper.exception()
        helper.result()

    def _read_one(self, ts: TransferSet, block: int, names: list[str], checksum: bool,
                  temperature: float | None, into: dict[str, np.ndarray] | None,
                  ) -> dict[str, np.ndarray]:
        """One local block, read and checked; whether it came from disk counted (`slow`)."""
        before = ts.cache_misses()
        got = ts.read_blocks([block], names, temperature=temperature, checksum=checksum,
                             reuse=True, into=into)
        after = ts.cache_misses()
        if self.slow < 2 and before is not None and after is not None:  # two blocks in a row
            # with misses: the rest of the epoch is read as from disk
            self.slow = self.slow + 1 if after > before else 0
        return got[0]

    def _read(self, ts: TransferSet, blocks: list[int], names: list[str], together: int,
              checksum: bool, temperature: float | None,
              into: Callable[[int], dict[str, np.ndarray] | None],
              ) -> Iterator[dict[str, np.ndarray]]:
        """Each block's checked arrays, valid until the next is asked for: a local set's read
        by the calling thread (`into(i)`: memory block i's arrays may be read straight into),
        or `together` blocks per call by two threads in turn (from a URL, where each call
        waits a round trip)."""
        if together == 1:
            hinted = 0  # blocks[:hinted] were announced to the kernel (`will_read`)
            for i, block in enumerate(blocks):
                if self.slow >= 2 and hinted < min(i + 1 + READ_AHEAD, len(blocks)):
                    ahead = blocks[max(hinted, i + 1):i + 1 + READ_AHEAD]
                    ts.will_read(ahead, names, temperature=temperature)
                    hinted = i + 1 + READ_AHEAD
                yield self._read_one(ts, block, names, checksum, temperature, into(i))
            return
        groups = [blocks[i:i + together] for i in range(0, len(blocks), together)]

        def job(group: list[int]) -> list[dict[str, np.ndarray]]:
            return ts.read_blocks(group, names, temperature=temperature, checksum=checksum)

        due = deque(self._pool(i % 2).submit(job, groups[i]) for i in range(min(2, len(groups))))
        try:
            for i in range(len(groups)):
                yield from due.popleft().result()
                if i + 2 < len(groups):  # that thread's blocks are placed
                    due.append(self._pool(i % 2).submit(job, groups[i + 2]))
        finally:
            for future in due:  # a window left early: nothing may still write the buffers
                future.cancel()
                if not future.cancelled():
                    future.exception()


def pieces(windows: list[list[int]], counts: list[int], span: Span, *,
           build: Callable[[int, list[int]], Columns | None],
           gather: Callable[[torch.Tensor], Any], shared: bool,
           pool: WindowPool | None = None) -> Iterator[Columns]:
    """[inputs, labels, *targets] of each of this worker's pieces of `span`, in order.

    Window j (its `counts[j]` rows) is built (`build(j, blocks)`: read, checked, decoded,
    shuffled) only when one of this worker's pieces overlaps it. A piece is a view of its
    window, or, for a piece across two windows or one built in a worker (`shared`: it crosses
    to the main process), copied into memory of its own (shared, else lent by `pool`);
    `gather` turns its `index` column into the inputs.
    """
    parts: dict[int, list[tuple[Columns, int, int]]] = {}
    at = 0
    for j, (blocks, n) in enumerate(zip(windows, counts)):
        lo, hi, at = at, at + n, at + n
        own = [i for i in span.pieces_in(lo, hi) if span.mine(i)]
        if not own:
            continue
        built = build(j, blocks)
        for i in own:
            start, stop = span.rows_of(i)
            parts.setdefault(i, []).append((built, max(start, lo) - lo, min(stop, hi) - lo))
            if stop <= hi:
                index, *rest = _joined(parts.pop(i), shared, pool)
                yield [gather(index), *rest]
    if span.stop > at:  # a window shorter than planned cannot happen: the counts are the plan's
        raise RuntimeError(f"the plan has {at} rows, fewer than the {span.stop} served")


def _joined(parts: list[tuple[Columns, int, int]], shared: bool,
            pool: WindowPool | None) -> Columns:
    """One piece's columns: positions [a, b) of each part's window, one after another (views
    of a lone window's rows unless `shared`)."""
    first = parts[0][0]
    if len(parts) == 1 and not shared:
        _, a, b = parts[0]
        return [c[a:b] for c in first]
    n = sum(b - a for _, a, b in parts)
    out = []
    for j, col in enumerate(first):
        shape = (n, *col.shape[1:])
        dest = (empty(shape, col.dtype, shared=True) if shared and j > 0  # index: for inputs
                else pool.take(shape, col.dtype) if pool is not None
                else empty(shape, col.dtype, shared=False))
        torch.cat([window[j][a:b] for window, a, b in parts], out=dest)
        out.append(dest)
    return out


def cut(piece: Columns, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches of `size` rows of a piece (views: one unbind per column), then its tail."""
    n = len(piece[0])
    full = n // size * size
    if full:
        yield from zip(*[c[:full].view(-1, size, *c.shape[1:]).unbind(0) for c in piece])
    if full < n:
        yield tuple(c[full:] for c in piece)


_RUNNING: dict[threading.Thread, threading.Event] = {}  # producers alive, stopped at exit


@atexit.register
def _stop_producers() -> None:
    """A stream left open at exit: stop its producer before the interpreter tears down what
    the thread runs in (an HDF5 read cut short at exit aborts the process)."""
    for thread, stop in list(_RUNNING.items()):
        stop.set()
        thread.join(timeout=10)


def background(make: Callable[[], Iterator[Any]], depth: int = 2) -> Iterator[Any]:
    """The items of `make()`, produced by a thread at most `depth` items ahead of the consumer
    (zarr's I/O and codecs, numpy's and torch's copies and xxhash release the GIL). An error
    of the producer is raised where its item is due; closing the iterator stops the thread."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in make():
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc))

    thread = threading.Thread(target=run, name="softlabels-read", daemon=True)
    _RUNNING[thread] = stop
    # atexit runs the last registered first: registered again now, the producers are stopped
    # before the exit handlers of libraries imported since this module (h5py's, which
    # unregisters the type converters a read still in flight uses: the process crashed)
    atexit.unregister(_stop_producers)
    atexit.register(_stop_producers)
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        try:
            if not sys.is_finalizing():
                thread.join()
            _RUNNING.pop(thread, None)
        except AttributeError:  # closed at teardown, once this module's globals (sys,
            pass  # _RUNNING) are None: the producer was told to stop, nothing to wait for


def window_generator(seed: int, epoch: int, rank: int, window: int) -> torch.Generator:
    """The permutation of one window's rows: a function of (seed, epoch, rank, window number)
    alone, so no window's order depends on which windows were read before it."""
    return window_order([seed, epoch, rank, window])


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


def piece_batches(data: Dataset, ts: TransferSet, batch_size: int, dtype: torch.dtype) -> int:
    """Batches per piece: up to PIECE_ROWS rows whose inputs (the first example's size), labels
    and targets take at most PIECE_BYTES, and at least one batch."""
    x, _ = split_item(data[0]) if len(data) else (torch.zeros(1), 0)
    row_bytes = x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
    row_bytes += 8 + ts.target.served_bytes(ts.num_classes, dtype.itemsize)
    return max(1, min(PIECE_ROWS, PIECE_BYTES // row_bytes) // batch_size)
