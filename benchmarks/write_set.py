"""write_set / `softlabels import --topk-indices` throughput: top-k rows from .npy arrays.

    PYTHONPATH=. python benchmarks/write_set.py --rows 1000000 --k 16 --classes 32000

Writes R top-k rows (k int32 indices, k float32 values, the log-sum-exp at 1 T) with sample
hashes of an npz DATA of R small examples (4 float32 each), and prints rows/s of the whole call
(checks, sorting, hashing, checksums, writing, finishing) beside `uptime`'s load. Rounds are
interleaved with a bare numpy baseline (np.save of the same arrays) in the same process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--classes", type=int, default=32_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=0, help="0: the default (~1 MiB)")
    args = ap.parse_args()
    from softlabels.sets.write_set import write_set

    rng = np.random.default_rng(0)
    r, k = args.rows, args.k
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        np.savez(d / "data.npz", x=rng.normal(size=(r, 4)).astype(np.float32))
        idx = np.argsort(rng.random((r, args.classes // 100)), 1)[:, :k].astype(np.int32) * 100
        val = -np.sort(rng.exponential(size=(r, k)).astype(np.float32), 1)
        lse = np.full((r, 1), 1.0, np.float32) + np.log(np.exp(val).sum(1, keepdims=True))
        np.save(d / "i.npy", idx), np.save(d / "v.npy", val), np.save(d / "l.npy", lse)
        arrays = {name: np.load(d / f"{name}.npy", mmap_mode="r") for name in "ivl"}
        rates, cpu_rates = [], []
        for n in range(args.rounds):
            c0, t0 = _cpu(), time.perf_counter()
            write_set(d / "set.zarr", data=f"npz:{d / 'data.npz'}", teacher_name="bench",
                      topk_indices=arrays["i"], topk_values=arrays["v"], logsumexp=arrays["l"],
                      num_classes=args.classes, chunk_rows=args.chunk_rows, overwrite=True)
            ours, cpu = time.perf_counter() - t0, _cpu() - c0
            t0 = time.perf_counter()
            for name in "ivl":
                np.save(d / f"copy-{name}.npy", np.asarray(arrays[name]))
            bare = time.perf_counter() - t0
            shutil.rmtree(d / "set.zarr")
            rates.append(r / ours / 1e6)
            cpu_rates.append(r / cpu / 1e6)
            print(f"round {n}: write_set {r / ours / 1e6:.2f} M rows/s ({ours:.2f} s; "
                  f"{r / cpu / 1e6:.2f} M rows per CPU second, both threads); "
                  f"np.save of the same arrays {r / bare / 1e6:.2f} M rows/s; "
                  f"load {os.getloadavg()[0]:.2f}")
    later = rates[1:] or rates
    print(f"write_set median {statistics.median(rates):.2f} M rows/s; after the first round "
          f"(which pays the first imports and the first reads of the arrays) "
          f"{statistics.median(later):.2f} M rows/s, "
          f"{statistics.median(cpu_rates[1:] or cpu_rates):.2f} M rows per CPU second")


def _cpu() -> float:
    """CPU seconds of this process, user and system, every thread."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


if __name__ == "__main__":
    main()
