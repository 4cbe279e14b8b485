"""What verify's tempering check (stored probs against the stored logits at each recorded T)
adds to `softlabels verify`, which reads every block anyway.

    python benchmarks/verify_cost.py --rows 100000 --classes 100 --repeats 5

Writes one float16 set (T = 1, 4, 20) of a linear teacher, then times `verify` with the check
and with it switched off, interleaved, and prints each round and the ratio of the medians, in
wall time and in this process's CPU time (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from linear_set import linear_set

from softlabels.format import integrity
from softlabels.sets.verify import verify


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        linear_set(d, args.rows, args.classes, temperatures=[1, 4, 20], batch_size=4096)
        check = integrity.TemperingCheck.add
        times: dict[str, list[float]] = {"with": [], "without": []}
        cpu: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.repeats):
            for variant in times:
                integrity.TemperingCheck.add = (check if variant == "with"  # type: ignore
                                                else lambda self, start, arrays: None)
                t0, c0 = time.perf_counter(), time.process_time()
                assert verify(d / "s.zarr").ok
                times[variant].append(time.perf_counter() - t0)
                cpu[variant].append(time.process_time() - c0)
        integrity.TemperingCheck.add = check  # type: ignore
    print(f"rows={args.rows} classes={args.classes} T=1,4,20")
    for name, series in (("wall", times), ("cpu", cpu)):
        for v, ts in series.items():
            print(f"  {name} {v} the check: " + " ".join(f"{t:.3f}" for t in ts) + " s")
        w, wo = (statistics.median(series[v]) for v in ("with", "without"))
        print(f"  {name}: ratio of medians (with / without): {w / wo:.3f}")


if __name__ == "__main__":
    main()
