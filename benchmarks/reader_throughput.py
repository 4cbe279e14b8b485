"""Does stage two read at numpy's speed, checked, mixing the set, in bounded memory? (issue 22
items 2 and 3; earlier 12.1 and 11.3)

1. Throughput, at C = 10, 100, 1000 (dense) and top-10 of C = 1000, in rows/s (the median of
   interleaved rounds) and as a ratio to a numpy windowed memmap reader; beside it rows per
   second of this process's CPU time (all its threads; not the DataLoader's worker processes),
   which a loaded machine disturbs less than wall time, the ratio of the best rounds, and
   that of each variant's first epoch, run alone before the rounds, to numpy windowed's
   median (a stream's first epoch of its open set is the only one whose block values are
   checked; later epochs' bytes match the same checksums):
   - "numpy windowed": the served arrays (probs at T, labels, index; top-k: its three arrays)
     as .npy memmaps, read with the stream's own window semantics (the same windows of blocks,
     each window's rows permuted, top-k weights made with torch, inputs gathered, batches cut
     as views): the baseline of the goal (>= 0.8 on dense sets at batches 256 and 4,096),
   - "zarr served, unshuffled": zarr-python reading the served arrays block by block, in order
     (the earlier issues' baseline, for reference),
   - `SoftTargetBatches` iterated plainly: checked, checksum=False, and float16 targets,
   - `stream.loader(num_workers=2)` (unless --no-workers).
   Beside them the mix: how many of 64 equal slices of the set the rows of a 256-row batch come
   from (`epochs.mix`, median over an epoch; goal >= 50).
2. `--rss`: peak RSS of one streamed epoch over a set of several GB (the default window).
3. `--epoch-cost`: the cost of the block checks in an epoch of training (784-800-800-10 MLP,
   60,000 MNIST-shaped rows, batch 128): checked against checksum=False, interleaved.

    python benchmarks/reader_throughput.py [--zarrs] [--rounds 3] [--epochs 1] [--sets DIR]
        [--only 10 top10]
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
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from softlabels.compute.blocks import precompute
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.train.datasets import SoftTargetBatches
from softlabels.train.epochs import mix

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
    """(rows, bytes) read with zarr-python whole-chunk slices, block by block, in order (no
    shuffle); arrays whose rows lie on axis 1 at leading index `k` only (all when None)."""
    arrays = {n: group[n] for n in names}
    nbytes = 0
    for b in order:
        rows = slice(b * block_rows, min((b + 1) * block_rows, num_rows))
        for n, arr in arrays.items():
            sel = (slice(None) if k is None else k, rows) if S.row_axis(n) == 1 else rows
            nbytes += np.asarray(arr[sel]).nbytes
    return num_rows, nbytes


def numpy_arrays(path: Path, k: int) -> dict[str, np.ndarray]:
    """The served arrays of a set (labels, index, probs at T; top-k: its three arrays) as .npy
    files beside it, opened as memmaps: what a user who keeps numpy arrays would read."""
    folder = path.with_suffix(".npy")
    folder.mkdir(exist_ok=True)
    with open_transfer_set(path) as ts:
        names = ([S.LABELS, S.INDEX, S.TOPK_INDICES, S.TOPK_LOGITS, S.TOPK_LOGSUMEXP]
                 if ts.target.sparse else [S.LABELS, S.INDEX, S.PROBS])
        for name in names:
            file = folder / (name.replace("/", "_") + ".npy")
            if not file.exists():
                a = ts.read(name)
                np.save(file, a[k] if name == S.PROBS else a)
    return {n: np.load(folder / (n.replace("/", "_") + ".npy"), mmap_mode="r") for n in names}


def numpy_windowed(arrays: dict[str, np.ndarray], x: np.ndarray, windows: list[list[int]],
                   block_rows: int, num_rows: int, batch: int, seed: int = 0) -> Iterator:
    """A numpy windowed memmap reader with the stream's window semantics: the same windows of
    blocks, each window's rows copied out of the memmaps and permuted (`torch.randperm`, rows
    scattered as opaque rows), top-k weights exp(z / T - lse) made with torch, the inputs
    gathered in that order (numpy `take`), batches cut as views across windows."""
    names = list(arrays)
    for j, blocks in enumerate(windows):
        ranges = [(b * block_rows, min((b + 1) * block_rows, num_rows)) for b in blocks]
        n = sum(e - s for s, e in ranges)
        dest = torch.randperm(n, generator=torch.Generator().manual_seed(seed + j)).numpy()
        cols = {}
        for name in names:
            a = arrays[name]
            out = np.empty((n, *a.shape[1:]), a.dtype)
            rows_of = out.reshape(n, -1).view(np.dtype((np.void, out[:1].nbytes)))[:, 0]
            at = 0
            for s, e in ranges:
                part = np.ascontiguousarray(a[s:e]).reshape(e - s, -1)
                rows_of[dest[at:at + e - s]] = part.view(rows_of.dtype)[:, 0]
                at += e - s
            cols[name] = torch.from_numpy(out)
        if S.TOPK_LOGITS in cols:
            lse = cols[S.TOPK_LOGSUMEXP][:, -1:]
            targets = [cols[S.TOPK_INDICES].long(),
                       torch.exp(cols[S.TOPK_LOGITS].float() / T - lse)]
        else:
            targets = [cols[S.PROBS]]
        inputs = torch.from_numpy(np.take(x, cols[S.INDEX].numpy(), axis=0))
        yield [inputs, cols[S.LABELS], *targets]


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


def count_rows(batches: object) -> tuple[int, float]:
    """(rows, seconds to the first batch) of one pass over an iterable of batches."""
    t0, first, n = time.perf_counter(), 0.0, 0
    for batch in batches:
        if not n:
            first = time.perf_counter() - t0
        n += len(batch[1])
    return n, first


def batch_mix(stream: SoftTargetBatches, num_rows: int, batch: int) -> float:
    """The median over an epoch's full batches of `epochs.mix`: how many of 64 equal slices
    of the set the rows of a batch come from. The stream is read with a dataset whose
    example i is (i,) (row i of these sets is example i), so a batch's inputs name its rows."""
    numbered = TensorDataset(torch.arange(num_rows, dtype=torch.float64)[:, None])
    probe = SoftTargetBatches(numbered, stream.path, temperature=T, batch_size=batch,
                              check=False, window=stream.window, seed=stream.seed)
    got = [mix(b[0][:, 0].long().numpy(), num_rows) for b in probe if len(b[1]) == batch]
    return float(np.median(got))


def measure(data: str, path: Path, rows: int, rounds: int, batch: int, *,
            workers: bool = True, epochs: int = 1) -> dict[str, tuple[float, ...]]:
    """name -> (median rows/s, MB/s of the served arrays, seconds to the first batch, rows
    per CPU second, best rows/s, rows/s of the first epoch), the variants interleaved round by
    round, `epochs` epochs each a round, after each variant's first epoch alone; streams built
    beforehand (what an epoch costs, not start-up)."""
    import zarr

    from softlabels.sources.load import load_data

    with open_transfer_set(path) as ts:
        served = ([S.LABELS, S.INDEX, S.TOPK_INDICES, S.TOPK_LOGITS, S.TOPK_LOGSUMEXP]
                  if ts.target.sparse else [S.LABELS, S.INDEX, S.PROBS])
        block_rows, num_blocks, k = ts.block_rows, ts.num_blocks, ts.temperature_index(T)
    order = np.random.default_rng(1).permutation(num_blocks).tolist()
    group = zarr.open_group(str(path), mode="r")
    dataset = load_data(data)
    arrays = numpy_arrays(path, k)
    x = dataset.x.numpy()

    def stream(checksum: bool = True, **options: object) -> SoftTargetBatches:
        return SoftTargetBatches(dataset, path, temperature=T, batch_size=batch, check=False,
                                 checksum=checksum, **options)

    checked, unchecked = stream(), stream(False)
    half = stream(dtype=torch.float16)
    # zarrs' Rust thread pool does not survive fork (a forked worker hangs): spawn under zarrs,
    # the pipeline reaching the workers through ZARR_CODEC_PIPELINE__PATH.
    context = "spawn" if os.environ.get("ZARR_CODEC_PIPELINE__PATH") else None
    loader2 = stream().loader(num_workers=2, multiprocessing_context=context)
    windows = checked.windows(0, 0, 1)
    variants = {
        "numpy windowed": lambda: count_rows(rebatch(numpy_windowed(
            arrays, x, windows, block_rows, rows, batch), batch)),
        "zarr served, unshuffled": lambda: zarr_blocks(group, served, order, block_rows, rows, k),
        "stream, checked": lambda: count_rows(checked),
        "stream, checksum off": lambda: count_rows(unchecked),
        "stream, float16": lambda: count_rows(half),
        "loader 2 workers": lambda: count_rows(loader2),
    }
    if not workers:
        variants.pop("loader 2 workers")
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    once: dict[str, float] = {}  # each variant's first epoch, alone (a stream's first epoch
    nbytes = 0.0  # of its open set is the one whose block values are checked)
    for name, fn in variants.items():
        t0 = time.perf_counter()
        got, extra = fn()
        once[name] = got / (time.perf_counter() - t0)
    for _ in range(rounds):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(epochs):
                got, extra = fn()
                assert got == rows, (name, got, rows)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            rates.setdefault(name, []).append(rows * epochs / dt)
            cpu.setdefault(name, []).append(rows * epochs / max(dc, 1e-9))
            if name.startswith("zarr"):
                nbytes = extra / rows
            else:
                first[name] = min(first.get(name, np.inf), extra)
    return {name: (float(np.median(r)), float(np.median(r)) * nbytes / 1e6,
                   first.get(name, 0.0), float(np.median(cpu[name])), float(max(r)),
                   once[name]) for name, r in rates.items()}


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
                block_rows, num_blocks = ts.block_rows, ts.num_blocks
            kind = f"top-{topk} of C={classes}" if topk else f"C={classes}"
            for batch in args.batch:
                load = os.getloadavg()[0]
                found = measure(data, path, rows, args.rounds, batch,
                                workers=not args.no_workers, epochs=args.epochs)
                probe = SoftTargetBatches(data, path, temperature=T, batch_size=batch,
                                          check=False)
                mixed = batch_mix(probe, rows, 256)
                print(f"\n{kind}: {rows} rows, {num_blocks} blocks of {block_rows} rows, T={T} "
                      f"of 2 stored, batch {batch}, window {probe.window} blocks; mix (distinct "
                      f"64ths of the set in a 256-row batch, median): {mixed:.0f} of 64; "
                      f"load {load:.1f} -> {os.getloadavg()[0]:.1f}")
                base, _, _, base_cpu, base_best, _ = found["numpy windowed"]
                for name, (r, mbs, first, c, best, one) in found.items():
                    start = f"  first batch {first * 1e3:5.0f} ms" if first else ""
                    print(f"  {name:26s} {r:11,.0f} rows/s {mbs:7.1f} MB/s  / numpy windowed: "
                          f"{r / base:5.2f} (best rounds {best / base_best:5.2f}, first "
                          f"epoch {one / base:5.2f})  per CPU second {c:11,.0f} "
                          f"({c / base_cpu:5.2f}){start}")


def rss(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        folder = Path(args.sets) / f"rss-{args.rss_rows}" if args.sets else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)  # a made set is reused (--sets)
        data, path = make_set(folder, args.rss_rows, 1000)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"set: {args.rss_rows} rows x 1000 classes, {size / 2**30:.2f} GiB on disk "
              f"(made in {time.perf_counter() - t0:.0f}s)")
        code = (f"import resource, time\nfrom softlabels.train.datasets import SoftTargetBatches\n"
                f"s = SoftTargetBatches({data!r}, {str(path)!r}, temperature={T}, "
                f"batch_size={BATCH}, check=False)\n"
                "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "t0 = time.perf_counter(); n = sum(len(b[1]) for b in s)\n"
                "dt = time.perf_counter() - t0\n"
                "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "print(f'streamed {n} rows in {dt:.1f}s ({n / dt:,.0f} rows/s); peak RSS '\n"
                "      f'{peak / 2**10:.0f} MiB (before the epoch {before / 2**10:.0f} MiB)')\n")
        subprocess.run([sys.executable, "-c", code], check=True)


def epoch_cost(args: argparse.Namespace) -> None:
    from softlabels.teachers.models import build_model
    from softlabels.train.losses import kd_loss_from_probs

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
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs each variant runs per round (a small set's epoch takes "
                             "20-60 ms, which a loaded machine's scheduling disturbs)")
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
    parser.add_argument("--no-workers", action="store_true",
                        help="leave out the DataLoader variant (2 worker processes)")
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
