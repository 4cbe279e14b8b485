"""Stage two against what users would pick instead (issue 22, item 6).

The same soft targets (probabilities at T = 4 and labels of one softlabels set) are written in
each peer's own format and read back in a training-like loop: shuffled batches of 256 rows,
each turned into float32 torch tensors. Interleaved rounds; each peer's rows/s and its ratio to
softlabels' `SoftTargetBatches` in the same round, medians.

Peers (each skipped, and said so, when its package is missing; `pip install softlabels[peers]`):
  numpy     a .npy memmap per array; a window of 4 blocks' rows shuffled, batches gathered
            from it (the same window semantics as softlabels' stream)
  parquet   pyarrow: one row group per block, row groups in shuffled order, a window of 4
            row groups shuffled (pyarrow)
  datasets  Hugging Face `datasets` (Arrow on disk, numpy format): a random permutation of
            the rows, 256 at a time by `ds[rows]`
  lance     `lance` (pylance): `take` of shuffled row ids, 256 at a time
Not yet here (the issue's other peers): mosaicml-streaming, litdata, webdataset.

    python benchmarks/peers.py --rows 200000 --classes 100 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from softlabels.compute.blocks import precompute
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.train.datasets import SoftTargetBatches

T, BATCH, WINDOW = 4.0, 256, 4
Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> batches


def make_set(folder: Path, rows: int, classes: int) -> tuple[str, Path]:
    x = np.random.default_rng(0).normal(size=(rows, 4)).astype(np.float32)
    np.savez(folder / "x.npz", x=x, y=np.random.default_rng(1).integers(0, classes, rows))
    out = folder / "set.zarr"
    precompute(f"npz:{folder / 'x.npz'}", [f"mlp:4-{classes}"], out, temperatures=[1, T],
               batch_size=8192, device="cpu")
    return f"npz:{folder / 'x.npz'}", out


def softlabels_batches(data: str, path: Path) -> Batches:
    stream = SoftTargetBatches(data, path, temperature=T, batch_size=BATCH, check=False)

    def epoch(e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream.set_epoch(e)
        for _, y, p in stream:
            yield p, y
    return epoch


def numpy_batches(folder: Path, probs: np.ndarray, labels: np.ndarray, block: int) -> Batches:
    np.save(folder / "probs.npy", probs)
    np.save(folder / "labels.npy", labels)
    p = np.load(folder / "probs.npy", mmap_mode="r")
    y = np.load(folder / "labels.npy", mmap_mode="r")
    blocks = -(-len(p) // block)

    def epoch(e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(e)
        order = rng.permutation(blocks)
        for w in range(0, blocks, WINDOW):
            rows = np.concatenate([np.arange(b * block, min((b + 1) * block, len(p)))
                                   for b in order[w:w + WINDOW]])
            rows = rows[rng.permutation(len(rows))]
            for i in range(0, len(rows), BATCH):
                r = np.sort(rows[i:i + BATCH])
                yield torch.from_numpy(p[r]), torch.from_numpy(y[r])
    return epoch


def parquet_batches(folder: Path, probs: np.ndarray, labels: np.ndarray, block: int) -> Batches:
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = probs.shape[1]
    table = pa.table({"probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), c),
                      "labels": pa.array(labels)})
    pq.write_table(table, folder / "t.parquet", row_group_size=block)
    f = pq.ParquetFile(folder / "t.parquet")

    def epoch(e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(e)
        order = rng.permutation(f.num_row_groups)
        for w in range(0, len(order), WINDOW):
            t = f.read_row_groups(order[w:w + WINDOW].tolist())
            p = t["probs"].combine_chunks().flatten().to_numpy().reshape(-1, c)
            y = t["labels"].to_numpy()
            perm = rng.permutation(len(y))
            for i in range(0, len(y), BATCH):
                r = perm[i:i + BATCH]
                yield torch.from_numpy(p[r]), torch.from_numpy(y[r])
    return epoch


def datasets_batches(folder: Path, probs: np.ndarray, labels: np.ndarray, block: int) -> Batches:
    import datasets

    ds = datasets.Dataset.from_dict({"probs": probs, "labels": labels})
    ds.save_to_disk(str(folder / "hf"))
    ds = datasets.load_from_disk(str(folder / "hf")).with_format("numpy")

    def epoch(e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = np.random.default_rng(e).permutation(len(ds))
        for i in range(0, len(perm), BATCH):
            b = ds[np.sort(perm[i:i + BATCH])]
            yield torch.from_numpy(b["probs"]), torch.from_numpy(b["labels"])
    return epoch


def lance_batches(folder: Path, probs: np.ndarray, labels: np.ndarray, block: int) -> Batches:
    import lance
    import pyarrow as pa

    c = probs.shape[1]
    table = pa.table({"probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), c),
                      "labels": pa.array(labels)})
    ds = lance.write_dataset(table, str(folder / "t.lance"))

    def epoch(e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = np.random.default_rng(e).permutation(ds.count_rows())
        for i in range(0, len(perm), BATCH):
            t = ds.take(np.sort(perm[i:i + BATCH]))
            yield (torch.from_numpy(t["probs"].combine_chunks().flatten().to_numpy()
                                    .reshape(-1, c)), torch.from_numpy(t["labels"].to_numpy()))
    return epoch


PEERS = {"numpy": numpy_batches, "parquet": parquet_batches, "datasets": datasets_batches,
         "lance": lance_batches}


def rate(batches: Batches, epoch: int) -> float:
    t0, n = time.perf_counter(), 0
    for p, y in batches(epoch):
        p.float()
        n += len(y)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=list(PEERS))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    print(f"{args.rows} rows, C = {args.classes}, batch {BATCH}, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data, path = make_set(folder, args.rows, args.classes)
        with open_transfer_set(path) as ts:
            probs, labels, block = ts.probs(T), ts.read(S.LABELS), ts.block_rows
        runs: dict[str, Batches] = {"softlabels": softlabels_batches(data, path)}
        for name in args.only:
            try:
                runs[name] = PEERS[name](folder, probs, labels, block)
            except ImportError as exc:
                print(f"{name}: skipped ({exc}); pip install softlabels[peers]")
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            for name, batches in (runs.items() if r % 2 == 0 else reversed(runs.items())):
                rates[name].append(rate(batches, r))
    base = rates["softlabels"]
    for name, got in rates.items():
        ratios = [g / b for g, b in zip(got, base)]
        print(f"{name:10s} rows/s {' '.join(f'{v:,.0f}' for v in got)} (median "
              f"{statistics.median(got):,.0f}); / softlabels {' '.join(f'{q:.2f}' for q in ratios)}"
              f" (median {statistics.median(ratios):.2f})")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
