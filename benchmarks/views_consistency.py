"""Consistent teaching on the bundled MNIST digits: a student trained with random augmentation
from (a) one fixed soft target per image against (b) stored per-view targets.

    python benchmarks/views_consistency.py [--teacher runs/mnist_hinton/teacher0.pt]

(a) targets of the un-augmented images, the student's inputs shifted at random by up to 2
    pixels each epoch (`train --jitter 2`): the student sees crops the teacher never labelled.
(b) `precompute --views 8 --augment random-crop:2`: the student trains on one stored view per
    image per epoch, replayed exactly, with the teacher's target for that view.
(c) for reference, fixed targets without augmentation.
Students: 784-800-800-10, T = 4, alpha 0.9, same epochs and seed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from softlabels.compute.blocks import precompute
from softlabels.sets.evaluate import evaluate
from softlabels.train.trainer import train_student

TRAIN, TEST = "mnist:data?split=train", "mnist:data?split=test"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/mnist_hinton/teacher0.pt")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--views", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher
        if not Path(teacher).exists():
            teacher = str(Path(tmp) / "teacher.pt")
            train_student(TRAIN, "mlp:784-1200-1200-10?dropout=0.3", out=teacher, epochs=15,
                          jitter_pixels=2, device="cpu")
        print(f"teacher {teacher}: test accuracy "
              f"{evaluate(TEST, teacher, device='cpu')['accuracy']:.4f}")
        fixed, views = Path(tmp) / "fixed.zarr", Path(tmp) / "views.zarr"
        precompute(TRAIN, [teacher], fixed, temperatures=[4], device="cpu", random_teacher=True)
        t0 = time.perf_counter()
        precompute(TRAIN, [teacher], views, temperatures=[4], views=args.views,
                   augment="random-crop:2", device="cpu", random_teacher=True)
        print(f"precompute of {args.views} views per image: {time.perf_counter() - t0:.0f} s")
        common = dict(temperature=4.0, epochs=args.epochs, seed=3, device="cpu")
        runs = {"(a) fixed targets, jitter 2": dict(transfer_set=fixed, jitter_pixels=2),
                "(b) stored views": dict(transfer_set=views),
                "(c) fixed targets, no augmentation": dict(transfer_set=fixed)}
        for name, kw in runs.items():
            t0 = time.perf_counter()
            r = train_student(TRAIN, "mlp:784-800-800-10", **common, **kw)
            acc = evaluate(TEST, r.model, device="cpu")["accuracy"]
            print(f"{name:36s} test accuracy {acc:.4f}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
