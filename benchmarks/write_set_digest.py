"""Digest of every file of sets written by write_set, to compare two versions byte for byte.

    PYTHONPATH=/path/to/version python benchmarks/write_set_digest.py DIR > version.txt

Writes 10 sets into DIR (emptied first; use the same DIR for both versions: the data's path is
recorded in the metadata): top-k already largest first, unsorted with int64 ids, log-probs,
dense with a sparse index, and a permuted index, each over a float32 (16-byte rows) and a
float16 (6-byte rows) DATA; prints one line per file with its sha256 (the metadata's
created_at / completed_at times removed). Two versions wrote the same sets if the outputs are
equal.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from softlabels.sets.write_set import write_set

TIMES = re.compile(rb'"(created_at|completed_at)":\s*"[^"]*"')


def main() -> None:
    d = Path(sys.argv[1])
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    r, c, k = 20_000, 500, 8
    np.savez(d / "data.npz", x=rng.normal(size=(r, 4)).astype(np.float32),
             y=rng.integers(0, c, r))
    np.savez(d / "data3.npz", x=rng.normal(size=(r, 3)).astype(np.float16),
             y=rng.integers(0, c, r))
    z = torch.from_numpy(rng.normal(size=(r, c)).astype(np.float32) * 3)
    top = torch.topk(z, k)
    lse = torch.stack([torch.logsumexp(z / t, 1) for t in (1, 2)], 1).numpy()
    perm = np.argsort(rng.random((r, k)), 1)
    idx, val = top.indices.numpy(), top.values.numpy()
    topk = {"logsumexp": lse, "num_classes": c, "temperatures": [1, 2]}
    runs = {
        "topk": dict(topk_indices=idx, topk_values=val, chunk_rows=1024, **topk),
        "unsorted": dict(topk_indices=np.take_along_axis(idx, perm, 1).astype(np.int64),
                         topk_values=np.take_along_axis(val, perm, 1), **topk),
        "logprobs": dict(topk_indices=idx, num_classes=c,
                         topk_values=torch.log_softmax(z, 1).gather(1, top.indices).numpy()),
        "dense": dict(logits=z.numpy()[:2000], index=np.arange(2000) * 3, temperatures=[1, 4]),
        "index": dict(topk_indices=idx, topk_values=val, index=rng.permutation(r), **topk),
    }
    for name, kwargs in runs.items():
        for data in ("data", "data3"):
            out = d / f"{name}-{data}.zarr"
            write_set(out, data=f"npz:{d / (data + '.npz')}", teacher_name="m", **kwargs)
            for f in sorted(p for p in out.rglob("*") if p.is_file()):
                body = f.read_bytes()
                if f.suffix == ".json":
                    body = TIMES.sub(b"", body)
                print(name, data, f.relative_to(out), hashlib.sha256(body).hexdigest()[:16])


if __name__ == "__main__":
    main()
