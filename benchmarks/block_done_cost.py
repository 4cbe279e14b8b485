"""What checking `block_done` costs a reader: a complete set must mark every block done.

    python benchmarks/block_done_cost.py [--rows 160000] [--chunk-rows 64] [--repeats 5] [--s3]

Makes one set of many small blocks (rows / chunk-rows of them; a Zarr set stores `block_done`
as one object per block), an HDF5 copy, and with --s3 a copy on a local S3 server (moto,
127.0.0.1: no network latency). Times, interleaved, with the check and without:
- reading the whole `block_done` array when the set is opened (one object per block), the
  design first tried;
- what `TransferSet.read_block` does: the block's marker read on its first read, in the same
  round trip as its arrays, over a pass of every block reading `labels` only (the smallest
  read, so the marker's share is largest) and reading the targets stage two serves.
Prints the medians and the difference per block.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linear_set import linear_set  # noqa: E402

from softlabels.format import reader  # noqa: E402
from softlabels.format import schema as S  # noqa: E402
from softlabels.format.operations import convert  # noqa: E402


def timed_open(path: str | Path, check: bool) -> float:
    """Seconds to open the set, with or without reading all of `block_done`."""
    t0 = time.perf_counter()
    with reader.open_transfer_set(path) as ts:
        if check:
            ts.store.read(S.BLOCK_DONE)
    return time.perf_counter() - t0


def timed_pass(path: str | Path, check: bool, arrays: list[str]) -> float:
    """Seconds of one checked pass over every block (markers read on first read, or not)."""
    with reader.open_transfer_set(path) as ts:
        if not check:  # as if every marker had been read already
            ts._marked.update(range(ts.num_blocks))
        t0 = time.perf_counter()
        for b in range(ts.num_blocks):
            ts.read_block(b, arrays, temperature=1.0 if S.PROBS in arrays else None)
        return time.perf_counter() - t0


def s3_copy(local: Path) -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import fsspec

    fsspec.filesystem("s3").mkdir("bench")
    convert(local, "s3://bench/s.zarr")
    return "s3://bench/s.zarr"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=160_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--chunk-rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--s3", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        linear_set(d, args.rows, args.classes, temperatures=[1, 4], chunk_rows=args.chunk_rows,
                   batch_size=4096)
        convert(d / "s.zarr", d / "s.h5")
        paths: list[str | Path] = [d / "s.zarr", d / "s.h5"]
        if args.s3:
            paths.append(s3_copy(d / "s.zarr"))
        with reader.open_transfer_set(d / "s.zarr") as ts:
            blocks = ts.num_blocks
        print(f"{args.rows} rows x {args.classes} classes, {blocks} blocks of "
              f"{args.chunk_rows} rows")
        serves = [S.LABELS, S.INDEX, S.PROBS]
        for path in paths:
            name = str(path) if "://" in str(path) else Path(path).name
            cases = [("open, whole block_done", lambda c, p=path: timed_open(p, c)),
                     ("pass reading labels", lambda c, p=path: timed_pass(p, c, [S.LABELS])),
                     ("pass reading labels, index, probs at T=1",
                      lambda c, p=path: timed_pass(p, c, serves))]
            for what, run in cases:
                run(True)  # warm the page cache and imports
                on, off = [], []
                for _ in range(args.repeats):
                    off.append(run(False))
                    on.append(run(True))
                a, b = statistics.median(off), statistics.median(on)
                print(f"{name} {what}: {a * 1e3:.1f} ms without the check, {b * 1e3:.1f} ms "
                      f"with it (+{(b - a) * 1e3:.1f} ms, {(b - a) / blocks * 1e6:.1f} us per "
                      f"block, x{b / a:.3f})")


if __name__ == "__main__":
    main()
