"""Stage two from a sequence set: in memory (`SequenceBatches`) against streamed
(`StreamingSequenceBatches`): tokens/s of one epoch of batches and peak memory held.

    python benchmarks/sequence_stream.py [--tokens 200000] [--vocab 8192] [--topk 32]

A synthetic teacher (benchmarks/sequence_storage.py's, flat) over sequences of 64..1024 tokens
writes a top-k sequence set (float16, T = 1, 2); then one epoch is iterated each way (batches
of 8 whole sequences, T = 2) and the peak of Python-traced memory (numpy and torch CPU buffers
report to tracemalloc) is measured during it. The streamed peak should stay near a window of
blocks, whatever the set's size; the in-memory one grows with the set.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from sequence_storage import SyntheticLM

from softlabels.compute.blocks import precompute
from softlabels.format.reader import open_transfer_set
from softlabels.sources.tokens import TokenSequences
from softlabels.train.padded import SequenceBatches, StreamingSequenceBatches


def data(tokens: int, vocab: int) -> TokenSequences:
    rng = np.random.default_rng(0)
    seqs, n = [], 0
    while n < tokens:
        length = int(min(rng.integers(64, 1025), tokens - n))
        seqs.append(rng.integers(0, vocab, length).tolist())
        n += length
    return TokenSequences(seqs)


def epoch(make: object) -> tuple[float, float, int]:
    """(tokens/s, peak traced MiB, tokens) of building `make()` and one epoch over it."""
    tracemalloc.start()
    t0 = time.perf_counter()
    batches = make()
    n = 0
    for batch in batches:
        n += int(batch.mask.sum())
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    if hasattr(batches, "close"):
        batches.close()
    return n / dt, peak, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--window", type=int, default=16, help="blocks per streamed window")
    ap.add_argument("--repeat", type=int, default=3,
                    help="epochs timed each way, alternating; the best is reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lm.zarr"
        t0 = time.perf_counter()
        precompute(data(args.tokens, args.vocab), [SyntheticLM(args.vocab, False)],
                   path, topk=args.topk, temperatures=[1, 2], dtype="float16",
                   batch_size=8, random_teacher=True)
        with open_transfer_set(path) as ts:
            print(f"set: {ts.num_rows} tokens, {ts.layout.num_sequences} sequences, "
                  f"{ts.num_blocks} blocks of {ts.block_rows} rows, top-{args.topk} of "
                  f"{args.vocab} (precomputed in {time.perf_counter() - t0:.0f}s)")
        ways = {"in memory": lambda: SequenceBatches(path, temperature=2.0, batch_size=8),
                "streamed": lambda: StreamingSequenceBatches(path, temperature=2.0,
                                                             batch_size=8,
                                                             window_blocks=args.window)}
        runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in ways}
        for _ in range(args.repeat):  # alternating, so a change in load hits both
            for name, make in ways.items():
                runs[name].append(epoch(make))
        for name, got in runs.items():
            rate, peak, n = max(got)
            print(f"{name:9s}: {rate:,.0f} tokens/s over one epoch ({n} tokens, load "
                  f"included; best of {len(got)}), peak traced memory {peak:.1f} MiB")


if __name__ == "__main__":
    main()
