"""What it costs to shuffle a stream's window, by the copy that does it (issue 22, item 2).

A window of `rows` rows of C float32 targets (the C = 100 set of reader_throughput.py: 200,000
rows, blocks of 4,096) is filled block by block and served in a random order. This times, per
window (best of `--repeat`; one torch thread unless `--threads`):
  scatter      each block's rows written to their shuffled places (numpy, opaque rows: holds
               the GIL; numpy windowed's own step);
  scatter torch the same with `index_copy_` (releases the GIL: the stream's, in each reading
               thread);
  in order     each block copied to its place in stored order (an unshuffled stream);
  gather 256   the shuffled rows gathered batch by batch (numpy take of opaque rows);
  gather piece the shuffled rows gathered per 65,536-row piece (torch.index_select) from a
               window kept in stored order.
With `--set PATH` (a local Zarr set), it also times filling one window of all the set's blocks
as the stream does (`stream_pieces.build_window`: each block read, checked and decoded, then
scattered to its shuffled places, or read straight into an unshuffled window), by one reading
thread and by two (`BlockReaders(threads=...)`), the set's files in the page cache (read once
before).

    python benchmarks/window_copies.py [--classes 100] [--rows 200000] [--block 4096] [--threads 0]
    python benchmarks/window_copies.py --set SET.zarr [--temperature 4]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch


def best(step: Callable[[], object], repeat: int) -> float:
    """The fastest of `repeat` runs of step(), in ms (after one warm-up)."""
    step()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--piece", type=int, default=65_536)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads; 0: torch's default")
    p.add_argument("--set", help="a local Zarr set: also time filling a window of its blocks")
    p.add_argument("--temperature", type=float, default=4.0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, c, block = args.rows, args.classes, args.block
    row = np.dtype((np.void, c * 4))
    source = np.random.default_rng(0).random((block, c), dtype=np.float32)
    window = np.zeros((n, c), np.float32)
    rows_of = window.view(row).reshape(n)
    dest = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()
    served = np.empty(n, np.int64)
    served[dest] = np.arange(n)
    starts = range(0, n, block)

    def scatter() -> None:
        for a in starts:
            b = min(a + block, n)
            rows_of[dest[a:b]] = source[:b - a].view(row).reshape(b - a)

    tsource, tdest = torch.from_numpy(source), torch.from_numpy(dest)

    def scatter_torch() -> None:
        for a in starts:
            b = min(a + block, n)
            torch.from_numpy(window).index_copy_(0, tdest[a:b], tsource[:b - a])

    def in_order() -> None:
        for a in starts:
            b = min(a + block, n)
            window[a:b] = source[:b - a]

    def gather_batches() -> None:
        for a in range(0, n, 256):
            np.take(rows_of, served[a:a + 256])

    tw, out = torch.from_numpy(window), torch.empty(args.piece, c)

    def gather_pieces() -> None:
        for a in range(0, n, args.piece):
            idx = torch.from_numpy(served[a:a + args.piece])
            torch.index_select(tw, 0, idx, out=out[:len(idx)])

    mb = n * c * 4 / 1e6
    print(f"window: {n:,} rows x {c} float32 ({mb:,.0f} MB), blocks of {block:,}; best of "
          f"{args.repeat}, {torch.get_num_threads()} torch thread(s)")
    for name, step in (("scatter", scatter), ("scatter torch", scatter_torch),
                       ("in order", in_order),
                       ("gather 256", gather_batches), ("gather piece", gather_pieces)):
        ms = best(step, args.repeat)
        print(f"  {name:<13} {ms:7.1f} ms  ({mb / ms:5.2f} GB/s)")
    if args.set:
        fill_window(args.set, args.temperature, args.repeat)


def fill_window(path: str, temperature: float, repeat: int) -> None:
    """Time `build_window` over every block of the set at `path`, by one and two threads."""
    from softlabels.format.reader import open_transfer_set
    from softlabels.train.stream_pieces import BlockReaders, WindowPool, build_window

    with open_transfer_set(path) as ts:
        blocks = list(range(ts.num_blocks))
        sizes = [ts.block_range(b)[1] - ts.block_range(b)[0] for b in blocks]
        pool = WindowPool()
        windows = []
        print(f"  fill a window of the {len(blocks)} blocks of {path}:")
        for shuffled in (True, False):
            for threads in (1, 2):
                readers = BlockReaders(threads=threads)

                def fill(readers: BlockReaders = readers, shuffled: bool = shuffled) -> None:
                    order = torch.Generator().manual_seed(0) if shuffled else None
                    built = build_window(ts, blocks, sizes, temperature=temperature,
                                         checksum=True, dtype=torch.float32, keep=None,
                                         order=order, readers=readers, pool=pool)
                    assert built is not None
                    windows.append(sum(c.nbytes for c in built))

                ms = best(fill, repeat)
                readers.close()
                mb = windows[-1] / 1e6
                print(f"    {'shuffled' if shuffled else 'in order'}, {threads} reading "
                      f"thread(s): {ms:7.1f} ms  ({mb:,.0f} MB, {mb / ms:5.2f} GB/s)")


if __name__ == "__main__":
    main()
