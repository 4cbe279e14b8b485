"""Stage one on a local Dask cluster: throughput with 1 and 2 single-threaded workers, against
one process with 2 torch threads, on this machine.

    python benchmarks/dask_scaling.py [--n 4096 --model resnet18 --size 32]

Throughput is steady-state: rows after the first finished block over the time to the last, so
cluster start-up (process spawn, torch import, teacher load) is reported apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from softlabels.compute.blocks import precompute
from softlabels.compute.cluster import precompute_on_cluster


class Clock:
    """A progress callback recording (time, rows done)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.marks.append((time.perf_counter(), done))

    def steady(self) -> tuple[float, float]:
        """(rows/s after the first progress past zero, seconds before it)."""
        moving = [(t, d) for t, d in self.marks if d > 0]
        (t1, d1), (t2, d2) = moving[0], moving[-1]
        return (d2 - d1) / (t2 - t1), t1 - self.t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--chunk-rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "x.npz"
        np.savez(npz, x=rng.random((args.n, 3, args.size, args.size), dtype=np.float32),
                 y=rng.integers(0, 10, args.n))
        common = dict(temperatures=[1, 4], chunk_rows=args.chunk_rows,
                      batch_size=args.batch_size, device="cpu")
        teacher = [f"torchvision:{args.model}?num_classes=10"]
        results = {}
        torch.set_num_threads(2)
        clock = Clock()
        precompute(f"npz:{npz}", teacher, Path(tmp) / "single.zarr", progress=clock, **common,
                   random_teacher=True)
        results["1 process, 2 threads"] = clock.steady()
        for workers in (1, 2):
            clock = Clock()
            precompute_on_cluster(f"npz:{npz}", teacher, Path(tmp) / f"w{workers}.zarr",
                                  workers=workers, progress=clock, **common, random_teacher=True)
            results[f"{workers} dask worker(s), 1 thread each"] = clock.steady()
    print(f"{args.model} {args.size}x{args.size}, {args.n} rows, blocks of {args.chunk_rows}, "
          f"batch {args.batch_size}, on {torch.get_num_threads()}-thread torch")
    for name, (rate, startup) in results.items():
        print(f"{name:32s} {rate:8.1f} rows/s   (start-up {startup:.1f}s)")
    one, two = results["1 dask worker(s), 1 thread each"][0], results[
        "2 dask worker(s), 1 thread each"][0]
    single = results["1 process, 2 threads"][0]
    print(f"ratio 2 workers / 1 worker: {two / one:.2f}")
    print(f"ratio 2 workers / single process with 2 threads: {two / single:.2f}")


if __name__ == "__main__":
    main()
