"""Does stage two read at storage speed, checked, in bounded memory? (issues 12.1 and 11.3)

1. Throughput, at C = 10, 100, 1000 (dense) and top-10 of C = 1000: rows/s and MB/s of
   - zarr-python reading whole chunks of the same arrays, one array and block at a time: the
     served arrays (probs at T, labels, index; top-k: its three arrays, labels, index), and
     for reference every row array of a block (what a checked read of a version 1 set needs),
   - zarr-python's reads plus the least a window shuffle adds ("zarr served, shuffled"),
   - `SoftTargetBatches` iterated plainly (checked, with checksum=False, and checked without
     the shuffle: blocks in order, rows in order), through
     `stream.loader(num_workers=W)` (workers hand over whole windows) with 1 and 2 workers, and
     through a plain `DataLoader(stream, batch_size=None, num_workers=2)` (hands over every
     batch); blocks in shuffled order everywhere.
   Goal: plain >= 0.8 and DataLoader >= 0.5 of zarr-python's rows/s on the served arrays.
2. `--rss`: peak RSS of one streamed epoch over a set of several GB (window of 4 blocks).
3. `--epoch-cost`: the cost of the block checks in an epoch of training (784-800-800-10 MLP,
   60,000 MNIST-shaped rows, batch 128): checked against checksum=False, interleaved.

    python benchmarks/reader_throughput.py [--zarrs] [--rounds 3] [--sets DIR] [--only 10 top10]
    python benchmarks/reader_throughput.py --rss --rss-rows 600000
    python benchmarks/reader_throughput.py --epoch-cost
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from softlabels.datasets import SoftTargetBatches
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.precompute import precompute

BATCH = 256
T = 4.0


def make_set(folder: Path, rows: int, classes: int, *, topk: int = 0, width: int = 4) -> tuple:
    x = np.random.default_rng(0).normal(size=(rows, width)).astype(np.float32)
    np.savez(folder / "x.npz", x=x)
    out = folder / f"c{classes}{'-top' + str(topk) if topk else ''}.zarr"
    precompute(f"npz:{folder / 'x.npz'}", [f"mlp:{width}-{classes}"], out, temperatures=[1, T],
               batch_size=8192, topk=topk, device="cpu", random_teacher=True)
    return f"npz:{folder / 'x.npz'}", out


def zarr_blocks(group: object, names: list[str], order: list[int], block_rows: int,
                num_rows: int, k: int | None = None) -> tuple[int, int]:
    """(rows, bytes) read with zarr-python whole-chunk slices, block by block; arrays whose
    rows lie on axis 1 at leading index `k` only (all when None)."""
    arrays = {n: group[n] for n in names}
    nbytes = 0
    for b in order:
        rows = slice(b * block_rows, min((b + 1) * block_rows, num_rows))
        for n, arr in arrays.items():
            sel = (slice(None) if k is None else k, rows) if S.row_axis(n) == 1 else rows
            nbytes += np.asarray(arr[sel]).nbytes
    return num_rows, nbytes


def zarr_shuffled(group: object, names: list[str], order: list[int], block_rows: int,
                  num_rows: int, k: int | None, window: int) -> tuple[int, int]:
    """`zarr_blocks`, plus what any reader that shuffles within a window of `window` blocks
    must add: a permutation of each window's rows (`torch.randperm`, the fastest found) and
    every array put in that order, moved as opaque rows (numpy void: the fastest scatter found,
    about 2x element-wise at 40-byte rows; what the stream does)."""
    arrays = {n: group[n] for n in names}
    nbytes = 0
    for w in range(0, len(order), window):
        ranges = [slice(b * block_rows, min((b + 1) * block_rows, num_rows))
                  for b in order[w:w + window]]
        n = sum(r.stop - r.start for r in ranges)
        dest = torch.randperm(n).numpy()
        for name, arr in arrays.items():
            at, out = 0, None
            for rows in ranges:
                sel = (slice(None) if k is None else k, rows) if S.row_axis(name) == 1 else rows
                part = np.asarray(arr[sel])
                if out is None:
                    out = np.empty((n, *part.shape[1:]), part.dtype)
                    rows_of = out.reshape(n, -1).view(np.dtype((np.void, out[:1].nbytes)))[:, 0]
                flat = np.ascontiguousarray(part).reshape(len(part), -1)
                rows_of[dest[at:at + len(part)]] = flat.view(rows_of.dtype)[:, 0]
                at += len(part)
                nbytes += part.nbytes
    return num_rows, nbytes


def count_rows(batches: object) -> tuple[int, float]:
    """(rows, seconds to the first batch) of one pass over an iterable of batches."""
    t0, first, n = time.perf_counter(), 0.0, 0
    for batch in batches:
        if not n:
            first = time.perf_counter() - t0
        n += len(batch[1])
    return n, first


def measure(data: str, path: Path, rows: int, rounds: int,
            batch: int) -> dict[str, tuple[float, float, float]]:
    """name -> (best rows/s, MB/s of the arrays it reads, seconds to the first batch), the
    variants interleaved; streams built beforehand (what an epoch costs, not start-up)."""
    import zarr

    from softlabels.specs import load_data

    with open_transfer_set(path) as ts:
        every = ts.row_arrays()
        served = ([S.LABELS, S.INDEX, S.TOPK_INDICES, S.TOPK_LOGITS, S.TOPK_LOGSUMEXP]
                  if ts.sparse else [S.LABELS, S.INDEX, S.PROBS])
        block_rows, num_blocks, k = ts.block_rows, ts.num_blocks, ts.temperature_index(T)
    order = np.random.default_rng(1).permutation(num_blocks).tolist()
    group = zarr.open_group(str(path), mode="r")
    dataset = load_data(data)

    def stream(checksum: bool, workers: int = 0, shuffle: bool = True) -> SoftTargetBatches:
        return SoftTargetBatches(dataset, path, temperature=T, batch_size=batch, check=False,
                                 checksum=checksum, num_workers=workers, shuffle=shuffle)

    checked, unchecked, in_order = stream(True), stream(False), stream(True, shuffle=False)
    # zarrs' Rust thread pool does not survive fork (a forked worker hangs): spawn under zarrs,
    # the pipeline reaching the workers through ZARR_CODEC_PIPELINE__PATH.
    context = "spawn" if os.environ.get("ZARR_CODEC_PIPELINE__PATH") else None
    loader1 = stream(True).loader(num_workers=1, multiprocessing_context=context)
    loader2 = stream(True).loader(num_workers=2, multiprocessing_context=context)
    plain2 = DataLoader(stream(True, 2), batch_size=None, num_workers=2,
                        multiprocessing_context=context)
    window = max(4, -(-batch // block_rows))  # the stream's window, in blocks
    variants = {
        "zarr, every row array": lambda: zarr_blocks(group, every, order, block_rows, rows),
        "zarr, served arrays": lambda: zarr_blocks(group, served, order, block_rows, rows, k),
        "zarr served, shuffled": lambda: zarr_shuffled(group, served, order, block_rows, rows,
                                                       k, window),
        "stream, checked": lambda: count_rows(checked),
        "stream, checksum off": lambda: count_rows(unchecked),
        "stream, unshuffled": lambda: count_rows(in_order),
        "loader 1 worker, checked": lambda: count_rows(loader1),
        "loader 2 workers, checked": lambda: count_rows(loader2),
        "plain DataLoader 2 workers": lambda: count_rows(plain2),
    }
    best: dict[str, float] = {}
    first: dict[str, float] = {}
    row_bytes: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            got, extra = fn()
            dt = time.perf_counter() - t0
            assert got == rows, (name, got, rows)
            best[name] = max(best.get(name, 0.0), rows / dt)
            if name.startswith("zarr"):
                row_bytes[name] = extra / rows
            else:
                first[name] = min(first.get(name, np.inf), extra)
    every_b, served_b = row_bytes["zarr, every row array"], row_bytes["zarr, served arrays"]
    return {name: (r, r * (every_b if "every" in name else served_b) / 1e6,
                   first.get(name, 0.0)) for name, r in best.items()}


def throughput(args: argparse.Namespace) -> None:
    cases = [(10, 0, 1_000_000), (100, 0, 200_000), (1000, 0, 30_000), (1000, 10, 400_000)]
    cases = [c for c in cases if not args.only or (f"top{c[1]}" if c[1] else str(c[0]))
             in args.only]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for classes, topk, rows in cases:
            folder = Path(args.sets or tmp) / f"{classes}-{topk}"
            folder.mkdir(parents=True, exist_ok=True)  # a made set is reused (--sets)
            data, path = make_set(folder, rows, classes, topk=topk)
            with open_transfer_set(path) as ts:
                block_rows = ts.block_rows
            kind = f"top-{topk} of C={classes}" if topk else f"C={classes}"
            for batch in args.batch:
                found = measure(data, path, rows, args.rounds, batch)
                print(f"\n{kind}: {rows} rows, blocks of {block_rows} rows, T={T} of 2 stored, "
                      f"batch {batch}")
                base_all = found["zarr, every row array"][0]
                base_served = found["zarr, served arrays"][0]
                base_shuffled = found["zarr served, shuffled"][0]
                for name, (r, mbs, first) in found.items():
                    start = f"  first batch {first * 1e3:5.0f} ms" if first else ""
                    print(f"  {name:28s} {r:11,.0f} rows/s {mbs:8.1f} MB/s   / zarr served: "
                          f"{r / base_served:5.2f}   / shuffled: {r / base_shuffled:5.2f}   "
                          f"/ every: {r / base_all:5.2f}{start}")


def rss(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        data, path = make_set(Path(tmp), args.rss_rows, 1000)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"set: {args.rss_rows} rows x 1000 classes, {size / 2**30:.2f} GiB on disk "
              f"(made in {time.perf_counter() - t0:.0f}s)")
        code = (f"import resource, time\nfrom softlabels.datasets import SoftTargetBatches\n"
                f"s = SoftTargetBatches({data!r}, {str(path)!r}, temperature={T}, "
                f"batch_size={BATCH}, check=False, window=4)\n"
                "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "t0 = time.perf_counter(); n = sum(len(b[1]) for b in s)\n"
                "dt = time.perf_counter() - t0\n"
                "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "print(f'streamed {n} rows in {dt:.1f}s ({n / dt:,.0f} rows/s); peak RSS '\n"
                "      f'{peak / 2**10:.0f} MiB (before the epoch {before / 2**10:.0f} MiB)')\n")
        subprocess.run([sys.executable, "-c", code], check=True)


def epoch_cost(args: argparse.Namespace) -> None:
    from softlabels.losses import kd_loss_from_probs
    from softlabels.specs import build_model

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rows = 60_000
        x = np.random.default_rng(0).random((rows, 1, 28, 28), dtype=np.float32)
        np.savez(Path(tmp) / "x.npz", x=x)
        data, path = f"npz:{Path(tmp) / 'x.npz'}", Path(tmp) / "mnist.zarr"
        precompute(data, ["mlp:784-10"], path, temperatures=[1, T], batch_size=4096,
                   device="cpu", random_teacher=True)

        def epoch(checksum: bool) -> tuple[float, float]:
            torch.manual_seed(0)
            net = build_model("mlp:784-800-800-10")
            opt = torch.optim.Adam(net.parameters(), 1e-3)
            stream = SoftTargetBatches(data, path, temperature=T, batch_size=128, check=False,
                                       checksum=checksum)
            t0 = time.perf_counter()
            for xb, yb, pb in stream:
                loss = kd_loss_from_probs(net(xb), pb, temperature=T, labels=yb, alpha=0.9)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return time.perf_counter() - t0, 0.0

        def reads(checksum: bool) -> float:
            t0 = time.perf_counter()
            count_rows(SoftTargetBatches(data, path, temperature=T, batch_size=128, check=False,
                                         checksum=checksum))
            return time.perf_counter() - t0

        on, off, read_on, read_off = [], [], [], []
        for _ in range(args.rounds):
            on.append(epoch(True)[0])
            off.append(epoch(False)[0])
            read_on.append(reads(True))
            read_off.append(reads(False))
        med = np.median
        print(f"epoch, checked: {' '.join(f'{t:.2f}' for t in on)} s (median {med(on):.2f})")
        print(f"epoch, checksum off: {' '.join(f'{t:.2f}' for t in off)} s "
              f"(median {med(off):.2f})")
        print(f"reading alone, checked {med(read_on):.3f} s, checksum off {med(read_off):.3f} s")
        print(f"check cost: {(med(read_on) - med(read_off)) / med(on):.2%} of a checked epoch "
              f"(from the reads alone); whole-epoch difference "
              f"{(med(on) - med(off)) / med(on):+.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[BATCH],
                        help="batch sizes to measure (rows per batch)")
    parser.add_argument("--zarrs", action="store_true",
                        help="read through the zarrs codec pipeline (pip install zarrs)")
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--rss-rows", type=int, default=600_000)
    parser.add_argument("--epoch-cost", action="store_true")
    parser.add_argument("--tmp", default=None, help="folder for the temporary sets")
    parser.add_argument("--sets", default=None,
                        help="folder to make the throughput sets in once and reuse")
    parser.add_argument("--only", nargs="+", default=None,
                        help="throughput cases to run: 10 100 1000 top10")
    args = parser.parse_args()
    if args.zarrs:
        import zarr

        os.environ["ZARR_CODEC_PIPELINE__PATH"] = "zarrs.ZarrsCodecPipeline"
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, "
          f"zarrs {'on' if args.zarrs else 'off'}")
    if args.rss:
        rss(args)
    elif args.epoch_cost:
        epoch_cost(args)
    else:
        throughput(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak RSS of this process {peak:.0f} MiB")


if __name__ == "__main__":
    main()
