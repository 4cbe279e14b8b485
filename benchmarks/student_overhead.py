"""Are stored soft targets nearly free for the student?

1. Epoch time of a 784-800-800-10 MLP on 20k MNIST-sized inputs from hard labels against from
   stored soft targets (target: hard/soft >= 0.95).
2. The streaming reader's rows/s against the same targets read from an in-memory numpy array,
   both serving (input, label, target) items in shuffled order (target: >= 0.5).

    python benchmarks/student_overhead.py [--rows 20000 --epochs 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from softlabels.precompute import precompute
from softlabels.reader import StreamingSoftTargetDataset
from softlabels.trainer import train_student
from softlabels.transfer_set import open_transfer_set


def epoch_seconds(data: TensorDataset, epochs: int, **kwargs: object) -> list[float]:
    marks: list[float] = []

    def on(event: str, info: dict) -> None:
        if event == "epoch" or (event == "batch" and info["batch"] == 1 and not marks):
            marks.append(time.perf_counter())

    train_student(data, "mlp:784-800-800-10", epochs=epochs, batch_size=128, device="cpu",
                  callbacks=[on], **kwargs)
    return [b - a for a, b in zip(marks, marks[1:])]


def in_memory_rows_per_s(data: TensorDataset, targets: np.ndarray, labels: np.ndarray) -> float:
    order = np.random.default_rng(0).permutation(len(targets))
    t0 = time.perf_counter()
    for i in order:
        x, _ = data[int(i)]
        _ = (x, int(labels[i]), torch.from_numpy(targets[i]))
    return len(order) / (time.perf_counter() - t0)


def streaming_rows_per_s(data: TensorDataset, path: Path) -> float:
    ds = StreamingSoftTargetDataset(data, path, temperature=4.0, check=False)
    t0 = time.perf_counter()
    n = sum(1 for _ in ds)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--chunk-rows", type=int, default=4096)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(args.rows, 1, 28, 28, generator=g),
                         torch.randint(0, 10, (args.rows,), generator=g))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.zarr"
        precompute(data, ["mlp:784-100-10"], path, temperatures=[1, 4], device="cpu",
                   chunk_rows=args.chunk_rows)
        hard: list[float] = []
        soft: list[float] = []
        for order in ("hs", "sh", "hs", "sh"):  # interleaved ABBA: drift hits both alike
            for kind in order:
                if kind == "h":
                    hard += epoch_seconds(data, args.epochs)
                else:
                    soft += epoch_seconds(data, args.epochs, transfer_set=path,
                                          temperature=4.0)
        h, s = statistics.median(hard), statistics.median(soft)
        print(f"epoch, {args.rows} rows, 784-800-800-10, batch 128, {torch.get_num_threads()} "
              f"threads: hard labels {h:.2f}s, soft targets {s:.2f}s (medians of "
              f"{len(hard)})")
        print(f"ratio hard/soft epoch time: {h / s:.3f}")
        with open_transfer_set(path) as ts:
            targets, labels = ts.probs(4.0), ts.labels()
        mem = max(in_memory_rows_per_s(data, targets, labels) for _ in range(3))
        stream = max(streaming_rows_per_s(data, path) for _ in range(3))
        print(f"reader: in-memory numpy {mem:,.0f} rows/s, streaming by chunks "
              f"{stream:,.0f} rows/s (chunk {args.chunk_rows} rows)")
        print(f"ratio streaming/in-memory: {stream / mem:.3f}")


if __name__ == "__main__":
    main()
