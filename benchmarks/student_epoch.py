"""A convolutional student's epoch from stored soft targets against from hard labels.

The student (torchvision resnet18 by default) trains on N random images for a few epochs, once
from hard labels and once from a transfer set's soft targets at T = 4, interleaved ABBA so drift
hits both alike; prints the median epoch times and hard/soft (target: >= 0.95: stored targets are
nearly free for the student).

    python benchmarks/student_epoch.py --device cuda --size 224 --n 16384 --batch-size 256
    python benchmarks/student_epoch.py --n 512 --size 32 --epochs 2     # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from softlabels.compute.blocks import precompute
from softlabels.train.trainer import train_student


def epoch_seconds(data: TensorDataset, args: argparse.Namespace, **soft: object) -> list[float]:
    marks: list[float] = []

    def on(event: str, info: dict) -> None:
        if event == "epoch" or (event == "batch" and info["batch"] == 1 and not marks):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    train_student(data, f"{args.model}?num_classes=10", epochs=args.epochs,
                  batch_size=args.batch_size, device=args.device, callbacks=[on], **soft)
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="torchvision:resnet18")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(args.n, 3, args.size, args.size, generator=g),
                         torch.randint(0, 10, (args.n,), generator=g))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.zarr"
        # any 10-class teacher will do: the student's cost is what is measured
        precompute(data, ["mlp:" + str(3 * args.size * args.size) + "-10"], path,
                   temperatures=[1, 4], device=args.device, random_teacher=True)
        hard: list[float] = []
        soft: list[float] = []
        for order in ("hs", "sh"):
            for kind in order:
                if kind == "h":
                    hard += epoch_seconds(data, args)
                else:
                    soft += epoch_seconds(data, args, transfer_set=path, temperature=4.0)
    h, s = statistics.median(hard), statistics.median(soft)
    print(f"{args.model}, {args.n} images {args.size}x{args.size}, batch {args.batch_size}, "
          f"device {args.device}: epoch hard {h:.2f}s, soft {s:.2f}s (medians of {len(hard)})")
    print(f"ratio hard/soft epoch time: {h / s:.3f}")


if __name__ == "__main__":
    main()
