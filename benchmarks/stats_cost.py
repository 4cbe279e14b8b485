"""`info --stats` over checked blocks against the unchecked dask reduction it replaced.

    python benchmarks/stats_cost.py [--rows 200000] [--classes 100] [--repeats 3]

Makes one float16 set (T = 1, 4) and times `set_statistics(ts)` (format/statistics.py: every
block read through `read_block`, checksums and value checks, one block in memory at a time)
against the dask reduction softlabels used before (dask.array over the stored arrays, threads,
no checks), in wall time, interleaved; prints the medians, the ratio, the largest difference
between the two results, and the peak RSS growth of each (bounded memory: neither loads the
set).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linear_set import linear_set  # noqa: E402

from softlabels.format import schema as S  # noqa: E402
from softlabels.format.reader import open_transfer_set  # noqa: E402
from softlabels.format.statistics import set_statistics  # noqa: E402


def dask_stats(ts) -> dict:  # noqa: ANN001
    """The reduction `TransferSet.stats` used before (unchecked), for comparison."""
    import dask
    import dask.array as da

    rows = ts.chunk_rows
    probs = da.from_array(ts.store.array(S.PROBS), chunks=(1, rows, ts.num_classes))
    logits = da.from_array(ts.store.array(S.LOGITS), chunks=(rows, ts.num_classes))
    labels = da.from_array(ts.store.array(S.LABELS), chunks=(rows,))
    p = probs.astype("float32")
    entropy = -da.where(p > 0, p * da.log(da.where(p > 0, p, 1)), 0).sum(axis=-1).mean(-1)
    labelled = labels >= 0
    correct = ((logits.argmax(axis=1) == labels) & labelled).sum()
    with dask.config.set(scheduler="threads"):
        mass, ent, n_correct, n_labelled = dask.compute(p.mean(axis=1), entropy, correct,
                                                        labelled.sum())
    return {"mass": mass, "entropy": ent, "accuracy": n_correct / n_labelled}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        linear_set(d, args.rows, args.classes, temperatures=[1, 4], dtype="float16",
                   probs_dtype="float16", batch_size=8192)
        times: dict[str, list[float]] = {"checked blocks": [], "dask, unchecked": []}
        results = {}
        for _ in range(args.repeats):
            for name in times:
                with open_transfer_set(d / "s.zarr") as ts:
                    t0 = time.perf_counter()
                    stats = set_statistics if name == "checked blocks" else dask_stats
                    results[name] = stats(ts)
                    times[name].append(time.perf_counter() - t0)
        mine, old = results["checked blocks"], results["dask, unchecked"]
        gap = max(float(np.abs(np.array(mine["class_mass"][f"{t:g}"]) - old["mass"][k]).max())
                  for k, t in enumerate([1, 4]))
        set_mib = (args.rows * args.classes * 2 * 3) / 2**20
        print(f"{args.rows} rows x {args.classes} classes, float16, T = 1, 4 "
              f"({set_mib:.0f} MiB of logits and probs)")
        for name, ts_ in times.items():
            print(f"{name}: median {statistics.median(ts_):.3f} s over {len(ts_)}")
        print(f"ratio checked / dask: "
              f"{statistics.median(times['checked blocks']) / statistics.median(times['dask, unchecked']):.2f}; "  # noqa: E501
              f"largest class-mass difference {gap:.1e}; accuracy "
              f"{mine['teacher_accuracy']:.6f} vs {float(old['accuracy']):.6f}")


if __name__ == "__main__":
    main()
