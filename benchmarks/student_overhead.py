"""Are stored soft targets nearly free for the student?

1. Epoch time of a 784-800-800-10 MLP on 20k MNIST-sized inputs from hard labels against from
   stored soft targets (target: hard/soft >= 0.95).
   Also the same loop alone (the same tensors in memory, no data pipeline), which isolates the
   cost of the KD loss from the run-to-run noise of whole training runs.
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

from softlabels.compute.blocks import precompute
from softlabels.format.reader import open_transfer_set
from softlabels.train.datasets import StreamingSoftTargetDataset
from softlabels.train.trainer import train_student


def epoch_seconds(data: TensorDataset, epochs: int, **kwargs: object) -> list[float]:
    marks: list[float] = []

    def on(event: str, info: dict) -> None:
        if event == "epoch" or (event == "batch" and info["batch"] == 1 and not marks):
            marks.append(time.perf_counter())

    train_student(data, "mlp:784-800-800-10", epochs=epochs, batch_size=128, device="cpu",
                  callbacks=[on], **kwargs)
    return [b - a for a, b in zip(marks, marks[1:])]


def loop_seconds(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, soft: bool) -> float:
    """One epoch of the bare training loop over in-memory tensors."""
    import torch.nn.functional as F

    from softlabels.teachers.models import build_model
    from softlabels.train.losses import kd_loss_from_probs

    torch.manual_seed(0)
    net = build_model("mlp:784-800-800-10")
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    for i in range(0, len(x), 128):
        b = order[i:i + 128]
        logits = net(x[b])
        loss = (kd_loss_from_probs(logits, p[b], temperature=4.0, labels=y[b], alpha=0.9)
                if soft else F.cross_entropy(logits, y[b]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
    return time.perf_counter() - t0


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
                   chunk_rows=args.chunk_rows, random_teacher=True)
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
        x, y = data.tensors
        p4 = torch.from_numpy(open_transfer_set(path).probs(4.0))
        loop_h: list[float] = []
        loop_s: list[float] = []
        for _ in range(5):  # interleaved ABBA
            loop_h.append(loop_seconds(x, y, p4, False))
            loop_s += [loop_seconds(x, y, p4, True), loop_seconds(x, y, p4, True)]
            loop_h.append(loop_seconds(x, y, p4, False))
        lh, ls = statistics.median(loop_h), statistics.median(loop_s)
        print(f"training loop alone: hard {lh:.2f}s, soft {ls:.2f}s (medians of 10); "
              f"ratio {lh / ls:.3f}")
        with open_transfer_set(path) as ts:
            targets, labels = ts.probs(4.0), ts.labels()
        mem = max(in_memory_rows_per_s(data, targets, labels) for _ in range(3))
        stream = max(streaming_rows_per_s(data, path) for _ in range(3))
        print(f"reader: in-memory numpy {mem:,.0f} rows/s, streaming by chunks "
              f"{stream:,.0f} rows/s (chunk {args.chunk_rows} rows)")
        print(f"ratio streaming/in-memory: {stream / mem:.3f}")


if __name__ == "__main__":
    main()
