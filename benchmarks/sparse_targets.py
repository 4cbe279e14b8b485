"""Sparse transfer sets: bytes per row at C = 1000, and student accuracy from sparse targets.

    python benchmarks/sparse_targets.py

1. Bytes per row on disk (all arrays, Zarr) for 2,048 rows of a 1000-class teacher at one
   temperature: dense float32, dense float16, top-10 and 10 sampled classes. Target: top-10 at
   least 20x smaller than dense float16.
2. On the bundled MNIST digits: a teacher trained here, then a 784-800-800-10 student distilled
   at T = 4 from dense targets, from the top-3 and from 3 sampled classes (and from hard labels).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from softlabels.compute.blocks import precompute
from softlabels.sets.evaluate import evaluate
from softlabels.sources.load import load_data
from softlabels.train.plans import materialize
from softlabels.train.trainer import train_student


def size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bytes_per_row(tmp: Path) -> None:
    n = 2048
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    variants = {"dense float32": dict(dtype="float32", probs_dtype="float32"),
                "dense float16": dict(dtype="float16", probs_dtype="float16"),
                "top-10": dict(topk=10), "10 sampled": dict(sample_k=10)}
    sizes = {}
    for name, kw in variants.items():
        out = tmp / f"{name.replace(' ', '_')}.zarr"
        precompute(data, ["mlp:64-1000"], out, temperatures=[1.0], device="cpu", **kw,
                   random_teacher=True)
        sizes[name] = size_on_disk(out) / n
    print(f"bytes per row on disk, C = 1000, one temperature, {n} rows (all arrays):")
    for name, b in sizes.items():
        print(f"  {name:14s} {b:9.1f}")
    print(f"ratio dense float16 / top-10: {sizes['dense float16'] / sizes['top-10']:.1f}x")


def mnist_students(tmp: Path) -> None:
    train, test = load_data("mnist:data?split=train"), load_data("mnist:data?split=test")
    x, y = materialize(train)
    mem = TensorDataset(x, y)
    teacher = tmp / "teacher.pt"
    train_student(mem, "mlp:784-1200-1200-10?dropout=0.3", out=teacher, epochs=10,
                  jitter_pixels=2, device="cpu")
    t_acc = evaluate(test, str(teacher), device="cpu")["accuracy"]
    sets = {"dense": {}, "top-3": dict(topk=3), "3 sampled": dict(sample_k=3),
            "30 sampled": dict(sample_k=30)}
    print(f"MNIST bundled: teacher test accuracy {t_acc:.4f}")
    hard = train_student(mem, "mlp:784-800-800-10", epochs=10, device="cpu", seed=1)
    hard_acc = evaluate(test, hard.model, device='cpu')['accuracy']
    print(f"  student from hard labels:   {hard_acc:.4f}")
    for name, kw in sets.items():
        out = tmp / f"{name.replace(' ', '_')}.zarr"
        precompute("mnist:data?split=train", [str(teacher)], out, temperatures=[1, 4],
                   device="cpu", **kw, random_teacher=True)
        t0 = time.perf_counter()
        r = train_student(mem, "mlp:784-800-800-10", transfer_set=out, temperature=4.0,
                          epochs=10, device="cpu", seed=1)
        acc = evaluate(test, r.model, device="cpu")["accuracy"]
        print(f"  student from {name:10s}   {acc:.4f}  ({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bytes_per_row(Path(tmp))
        mnist_students(Path(tmp))


if __name__ == "__main__":
    main()
