"""An ImageNet-shaped transfer set end to end: 1,281,167 rows x 1,000 classes.

The teacher is trivial (one linear layer over 8 features), so what is timed is the pipeline's own
cost: the data loader, hashing, tempering, the block writer and the storage; then the student
side's reading. Prints, for a dense set (float16 logits, float32 probabilities at one T) and a
top-10 set:

- stage one: rows/s of `precompute` end to end, and of the block writer alone (pre-made blocks
  handed to `TransferSetWriter.write_block`, no teacher);
- bytes on disk, and per row;
- stage two: rows/s of `StreamingSoftTargetDataset` (whole chunks, shuffled), and of zarr-python
  whole-chunk slices of the same arrays for reference.

    python benchmarks/imagenet_scale.py                     # the full 1.28 M rows (~11 GB on disk)
    python benchmarks/imagenet_scale.py --rows 128000       # a tenth, same shape per row
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.compute.blocks import precompute
from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.reader import open_transfer_set
from softlabels.format.writer import TransferSetWriter
from softlabels.train.datasets import StreamingSoftTargetDataset

CLASSES, FEATURES = 1000, 8


class Features(Dataset):
    """Deterministic 8-float inputs with labels, generated in memory (no disk reads)."""

    def __init__(self, rows: int) -> None:
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.normal(size=(rows, FEATURES)).astype(np.float32))
        self.y = torch.from_numpy(rng.integers(0, CLASSES, rows))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, CLASSES)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stage_one(data: Features, out: Path, **kind: int) -> float:
    t0 = time.perf_counter()
    precompute(data, [teacher()], out, temperatures=[1.0], batch_size=4096, **kind,
               random_teacher=True)
    return time.perf_counter() - t0


def writer_alone(rows: int, out: Path) -> float:
    """Rows/s of the block writer with pre-made blocks: no loader, teacher or hashing."""
    layout = Layout(num_rows=rows, num_classes=CLASSES, temperatures=(1.0,))
    rng = np.random.default_rng(1)
    z = rng.normal(size=(layout.block_rows, CLASSES)).astype(np.float16)
    p = torch.softmax(torch.from_numpy(z).float(), -1).numpy()[None]
    meta = {"num_examples": rows, "class_names": [], "teacher": {"members": [], "combine":
            "mean-logits"}, "dataset": {"spec": "benchmark", "length": rows}}
    t0 = time.perf_counter()
    with TransferSetWriter(out, layout, meta) as w:
        for b in w.pending:
            start, stop = layout.block_range(b)
            n = stop - start
            w.write_block(b, {S.LOGITS: z[:n], S.PROBS: p[:, :n],
                              S.LABELS: np.zeros(n, np.int64),
                              S.INDEX: np.arange(start, stop, dtype=np.int64),
                              S.SAMPLE_HASH: np.arange(start, stop, dtype=np.uint64)})
    return rows / (time.perf_counter() - t0)


def stage_two(data: Features, path: Path) -> tuple[float, float]:
    """(streamed rows/s, zarr whole-chunk rows/s) over one pass."""
    ds = StreamingSoftTargetDataset(data, path, temperature=1.0, seed=0)
    t0 = time.perf_counter()
    n = sum(1 for _ in ds)
    streamed = n / (time.perf_counter() - t0)
    import zarr

    group = zarr.open_group(str(path), mode="r")
    rows = int(group[S.LOGITS].chunks[0])
    t0 = time.perf_counter()
    for start in range(0, n, rows):
        group[S.LOGITS][start:start + rows]
        group[S.PROBS][0, start:start + rows]
        group[S.LABELS][start:start + rows]
    return streamed, n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_281_167)
    ap.add_argument("--dir", default=None, help="Where to write the sets (default: a temp dir).")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="imagenet_scale_"))
    data = Features(args.rows)
    print(f"{args.rows} rows x {CLASSES} classes, sets under {root}")
    w = writer_alone(args.rows, root / "writer.zarr")
    shutil.rmtree(root / "writer.zarr")
    print(f"writer alone (pre-made blocks): {w:,.0f} rows/s")
    for name, kind in (("dense fp16 logits + fp32 probs", {}), ("top-10", {"topk": 10})):
        out = root / f"{'topk' if kind else 'dense'}.zarr"
        seconds = stage_one(data, out, **kind)
        size = du(out)
        print(f"{name}: precompute {args.rows / seconds:,.0f} rows/s ({seconds:.1f} s); "
              f"{size / 2**20:,.0f} MiB on disk, {size / args.rows:.0f} bytes/row")
        if not kind:
            streamed, raw = stage_two(data, out)
            print(f"  stage two: streamed {streamed:,.0f} rows/s; zarr whole-chunk slices "
                  f"{raw:,.0f} rows/s (ratio {streamed / raw:.2f})")
        with open_transfer_set(out) as ts:
            assert ts.num_rows == args.rows
        shutil.rmtree(out)
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
