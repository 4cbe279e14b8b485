"""What does a resume's proof cost? (issue 11 item 5)

Before a resumed set is finished, every row an earlier run wrote is proven to come from the
current data: each of those examples is loaded and hashed again and compared with its stored
sample hash. This script times, in one process:

  full    precompute of N examples from scratch
  proof   the proof alone over the rows of all blocks but the last (the worst case: a run
          killed just before its last block)
  resume  that resume end to end (proof + the last block)

and prints proof/full: the share of a full precompute that a worst-case proof adds.

    python benchmarks/resume_proof.py                       # MLP teacher on 1x28x28 inputs
    python benchmarks/resume_proof.py --model torchvision:resnet18?num_classes=10 --size 64 \
        --channels 3 --n 2048
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from softlabels.compute.blocks import precompute
from softlabels.compute.examples import row_hashes
from softlabels.format import schema as S
from softlabels.format.backends import open_store


def interrupt_last_block(path: Path) -> int:
    with open_store(path, "r+") as store:
        done = store.read(S.BLOCK_DONE)
        done[-1] = 0
        store.write(S.BLOCK_DONE, slice(None), done)
        store.set_meta({**store.get_meta(), "status": S.STATUS_WRITING})
        return int(done.sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp:784-1200-1200-10")
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.n, args.channels, args.size, args.size)
    data = TensorDataset(x, torch.randint(0, 10, (args.n,)))
    opts = dict(temperatures=[1, 4], chunk_rows=args.chunk_rows, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.zarr"
        for r in range(args.repeats):
            t0 = time.perf_counter()
            precompute(data, [args.model], out, overwrite=True, **opts, random_teacher=True)
            full = time.perf_counter() - t0
            blocks = interrupt_last_block(out)
            rows = blocks * args.chunk_rows
            hashes = row_hashes(data)
            t0 = time.perf_counter()
            for b in range(blocks):
                hashes(b * args.chunk_rows, (b + 1) * args.chunk_rows)
            proof = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = precompute(data, [args.model], out, **opts, random_teacher=True)
            resume = time.perf_counter() - t0
            assert result.resumed
            print(f"round {r}: full {full:.2f}s  proof {proof:.3f}s over {rows} rows "
                  f"({proof / rows * 1e6:.1f} us/row)  resume {resume:.2f}s  "
                  f"proof/full {proof / full:.3f}", flush=True)
    print(f"{args.model}, {args.n} x {args.channels}x{args.size}x{args.size}, "
          f"torch threads {torch.get_num_threads()}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
