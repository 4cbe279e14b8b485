"""Stage one's writer alone: `TransferSetWriter.write_block` over every block of a set, no teacher
(issue 22, item 1: where precompute's write time goes).

    python benchmarks/block_writes.py --classes 100 --rows 200000 --rounds 3
    python benchmarks/block_writes.py --classes 1000 --rows 50000 --rounds 3
    python benchmarks/block_writes.py --classes 32000 --topk 16 --rows 1000000 --rounds 3

Random arrays of one block are made once (float16 logits, float32 probs at T = 1, 4; or top-k),
then every block of a fresh set is written with them; the clock covers the block writes and
`finish` only (laying the set out and removing the last round's set are not timed). Prints
rows/s and MB/s of stored bytes per round, and the same bytes written as one plain file per
array and block (open, write, rename: the floor for one file per chunk on this disk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.writer import TransferSetWriter


def block_arrays(layout: Layout, rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, (shape, dtype) in layout.arrays().items():
        shape = list(shape)
        shape[S.row_axis(name)] = rows
        dt = np.dtype(dtype)
        out[name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f"
                     else rng.integers(0, min(layout.num_classes, 1 << 30), shape).astype(dt))
    return out


def write_set(path: Path, layout: Layout, arrays: dict[str, np.ndarray]) -> float:
    shutil.rmtree(path, ignore_errors=True)
    with TransferSetWriter(path, layout, {"teacher": {}, "dataset": {}}) as writer:
        t0 = time.perf_counter()
        for block in writer.pending:
            a, b = layout.block_range(block)
            writer.write_block(block, arrays if b - a == layout.chunk_rows else
                               {n: v[(slice(None),) * S.row_axis(n) + (slice(0, b - a),)]
                                for n, v in arrays.items()})
        writer.finish()
        return time.perf_counter() - t0


def plain_files(folder: Path, layout: Layout, arrays: dict[str, np.ndarray]) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    t0 = time.perf_counter()
    for block in range(layout.num_blocks):
        for name, data in arrays.items():
            flat = name.replace("/", "_")
            tmp, dst = folder / f"{flat}.{block}.tmp", folder / f"{block}.{flat}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
            os.replace(tmp, dst)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--topk", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    layout = Layout(num_rows=args.rows, num_classes=args.classes, temperatures=(1.0, 4.0),
                    topk=args.topk)
    arrays = block_arrays(layout, layout.chunk_rows)
    nbytes = sum(v.nbytes for v in arrays.values()) * layout.num_blocks
    print(f"C={args.classes} topk={args.topk} rows={args.rows} chunk_rows={layout.chunk_rows} "
          f"blocks={layout.num_blocks} {nbytes / args.rows:.0f} B/row; load "
          f"{os.getloadavg()[0]:.2f}")
    res: dict[str, list[float]] = {"write_block": [], "plain files": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for r in range(args.rounds):
            res["write_block"].append(write_set(Path(tmp) / "set.zarr", layout, arrays))
            res["plain files"].append(plain_files(Path(tmp) / "plain", layout, arrays))
            print(f"round {r}: " + "; ".join(
                f"{k} {args.rows / v[-1] / 1e3:,.0f} k rows/s ({nbytes / v[-1] / 1e6:,.0f} MB/s)"
                for k, v in res.items()) + f"; load {os.getloadavg()[0]:.2f}")
    for k, v in res.items():
        m = statistics.median(v)
        print(f"median {k}: {args.rows / m / 1e3:,.0f} k rows/s, {nbytes / m / 1e6:,.0f} MB/s")


if __name__ == "__main__":
    main()
