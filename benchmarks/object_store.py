"""Reading a transfer set from an object store, with and without the local chunk cache.

    python benchmarks/object_store.py [--rows 50000] [--classes 100] [--epochs 3]
    python benchmarks/object_store.py --latency-ms 20      # a bucket 20 ms away, simulated

Starts a local S3 server (moto's server mode, on 127.0.0.1), makes a set locally, copies it to
s3:// with `convert`, then times whole passes (every block through `TransferSet.read_block`, the
checked read that training streams) from: the local copy; s3:// uncached; s3:// through the
cache (`open_transfer_set(..., cache=DIR)`, what `train --cache DIR` uses), where the first
pass fills the cache and later passes read it. It prints rows/s and the number of GET requests
the S3 server answered in each pass: a cached pass after the first should need only the root
metadata. A local server has no network latency, so the uncached figures here are an upper
bound for a real bucket; the cached ones do not depend on the network. `--latency-ms` delays
every request the server answers by that much (requests still overlap: the server is
threaded), a stand-in for a bucket's first-byte latency. The last pass streams one epoch the way
`train` does (`SoftTargetBatches`, batch 256, its default window, 8 blocks per request batch)
from s3:// uncached.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softlabels.compute.blocks import precompute  # noqa: E402
from softlabels.format.operations import convert  # noqa: E402
from softlabels.format.reader import open_transfer_set  # noqa: E402


class _Requests(logging.Handler):
    """Counts the requests moto's server logs (one line per request)."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if '"GET ' in text or '"HEAD ' in text:
            self.gets += 1


def one_pass(url: str | Path, cache: str | None, counter: _Requests) -> tuple[float, int, int]:
    """(seconds, rows, GET/HEAD requests) of one checked pass over every block."""
    before = counter.gets
    t0 = time.perf_counter()
    rows = 0
    with open_transfer_set(url, cache=cache) as ts:
        for b in range(ts.num_blocks):
            ts.read_block(b)
            start, stop = ts.block_range(b)
            rows += stop - start
    return time.perf_counter() - t0, rows, counter.gets - before


class _Delayed:
    """A WSGI app that answers every request `seconds` late (a distant bucket)."""

    def __init__(self, app: object, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    def __call__(self, environ: dict, start_response: object) -> object:
        time.sleep(self.seconds)
        return self.app(environ, start_response)


def stream_pass(data: str, url: str, counter: _Requests) -> tuple[float, int, int]:
    """(seconds, rows, GET/HEAD requests) of one epoch streamed as `train` streams it."""
    from softlabels.train.datasets import SoftTargetBatches

    stream = SoftTargetBatches(data, url, temperature=4.0, batch_size=256, check=False)
    before = counter.gets
    t0 = time.perf_counter()
    rows = sum(len(batch[1]) for batch in stream)
    return time.perf_counter() - t0, rows, counter.gets - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="delay every request by this much (a distant bucket)")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    counter = _Requests()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False
    werkzeug.addHandler(counter)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    if args.latency_ms:  # wrap the app werkzeug serves
        server._server.app = _Delayed(server._server.app, args.latency_ms / 1e3)
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import fsspec

    fsspec.filesystem("s3").mkdir("bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            x = np.random.default_rng(0).normal(size=(args.rows, 4)).astype(np.float32)
            np.savez(folder / "x.npz", x=x)
            local = folder / "set.zarr"
            precompute(f"npz:{folder / 'x.npz'}", [f"mlp:4-{args.classes}"], local,
                       temperatures=[1, 4], batch_size=8192, chunk_rows=args.chunk_rows,
                       device="cpu", random_teacher=True)
            url = "s3://bench/set.zarr"
            t0 = time.perf_counter()
            convert(local, url)
            upload = time.perf_counter() - t0
            print(f"set: {args.rows} rows x {args.classes} classes, T = 1, 4, chunk rows "
                  f"{args.chunk_rows}; latency {args.latency_ms:g} ms a request; load "
                  f"{os.getloadavg()[0]:.2f}")
            print(f"convert local -> s3://: {upload:.2f} s ({args.rows / upload:,.0f} rows/s)")
            cache = str(folder / "cache")
            runs = [("local", local, None), ("s3 uncached", url, None)]
            runs += [(f"s3 cached, pass {e + 1}", url, cache) for e in range(args.epochs)]
            print(f"{'pass':24s} {'seconds':>8s} {'rows/s':>12s} {'GET+HEAD':>9s}")
            for name, where, c in runs:
                seconds, rows, gets = one_pass(where, c, counter)
                print(f"{name:24s} {seconds:8.2f} {rows / seconds:12,.0f} {gets:9d}")
            seconds, rows, gets = stream_pass(f"npz:{folder / 'x.npz'}", url, counter)
            print(f"{'s3 streamed (train)':24s} {seconds:8.2f} {rows / seconds:12,.0f} {gets:9d}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
