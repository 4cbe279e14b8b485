"""Integrity checks a transfer set can answer by itself: arrays as declared, every block readable
and matching its checksum, finite values, probabilities that sum to one, index, labels and the
dataset fingerprint. `softlabels verify` adds the checks that need the data or the teacher."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..progress import Progress
from . import schema as S
from .reader import TransferSet


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    path: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks]}


def _blocks(ts: TransferSet) -> Iterator[tuple[int, int]]:
    for start in range(0, ts.num_rows, ts.block_rows):
        yield start, min(start + ts.block_rows, ts.num_rows)


def check_arrays(ts: TransferSet, report: VerifyReport) -> bool:
    r, c, k = ts.num_rows, ts.num_classes, len(ts.temperatures)
    want = {S.LABELS: ((r,), "int64"), S.INDEX: ((r,), "int64"),
            S.SAMPLE_HASH: ((r,), "uint64")}
    sparse = ts.sparse or {}
    if sparse.get("kind") == "topk":
        want |= {S.TOPK_INDICES: ((r, sparse["k"]), "int32"),
                 S.TOPK_LOGITS: ((r, sparse["k"]),
                                 (ts.meta.get("sequence") or {}).get("topk_dtype", "float32")),
                 S.TOPK_LOGSUMEXP: ((r, k), "float32")}
    elif sparse.get("kind") == "sample":
        want[S.SAMPLE_INDICES] = ((k, r, sparse["k"]), "int32")
    else:
        want |= {S.LOGITS: ((r, c), ts.meta["dtype"]),
                 S.PROBS: ((k, r, c), ts.meta["probs_dtype"])}
    have = ts.arrays()
    if S.MEMBER_LOGITS in have:
        m = len(ts.meta["teacher"]["members"])
        want[S.MEMBER_LOGITS] = ((m, r, c), ts.meta["dtype"])
    bad = [f"{n}: expected {s} {d}, found "
           + (f"{have[n][0]} {have[n][1]}" if n in have else "nothing")
           for n, (s, d) in want.items() if n not in have or (have[n][0], have[n][1]) != (s, d)]
    return report.add("arrays", not bad, "; ".join(bad) or f"{len(want)} arrays, shapes and "
                      "dtypes as declared")


def _read_block(ts: TransferSet, names: list[str], start: int, stop: int,
                ) -> dict[str, np.ndarray] | str:
    """Every row array's rows of one block, or why they cannot be read."""
    try:
        return {n: ts.read(n, start, stop) for n in names}
    except Exception as exc:  # a corrupted chunk fails in the codec, whatever the backend
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def check_values(ts: TransferSet, report: VerifyReport, progress: Progress | None) -> None:
    first_bad: dict[str, int] = {}
    worst_sum = 0.0
    names = [n for n in ts.store.names() if n not in S.BOOKKEEPING]
    checksums = ts.store.read(S.BLOCK_CHECKSUM) if ts.has(S.BLOCK_CHECKSUM) else None
    corrupt: list[str] = []
    unreadable = False
    for b, (start, stop) in enumerate(_blocks(ts)):
        arrays = _read_block(ts, names, start, stop)
        if isinstance(arrays, str):
            corrupt.append(f"block {b} (rows {start}-{stop - 1}) unreadable: {arrays}")
            unreadable = True
            continue
        if checksums is not None and S.block_checksum(arrays) != int(checksums[b]):
            corrupt.append(f"block {b} (rows {start}-{stop - 1}) does not match its checksum")
        for name in (S.LOGITS, S.PROBS, S.MEMBER_LOGITS):
            if name in first_bad or name not in arrays:
                continue
            block = arrays[name].astype(np.float32)
            finite = np.isfinite(block).reshape(-1, *block.shape[-2:]).all(axis=(0, 2))
            if not finite.all():
                first_bad[name] = start + int(np.argmin(finite))
            elif name == S.PROBS:
                worst_sum = max(worst_sum, float(np.abs(block.sum(-1) - 1).max()))
        if progress:
            progress(stop, ts.num_rows)
    if checksums is None:
        report.add("checksums", True, "none recorded (a set from before block checksums)")
    else:
        report.add("checksums", not corrupt, "; ".join(corrupt[:5])
                   + (f"; and {len(corrupt) - 5} more" if len(corrupt) > 5 else "")
                   or f"all {len(checksums)} blocks match their checksums")
    report.add("finite", not first_bad, "; ".join(f"{n} has NaN/inf at row {r}" for n, r in
                                                  first_bad.items()) or "no NaN or inf")
    tol = 1e-2 if ts.meta["probs_dtype"] == "float16" else 1e-4
    report.add("probabilities", worst_sum <= tol, f"rows sum to 1 within {worst_sum:.1e} "
               f"(tolerance {tol:.0e})")
    if unreadable:
        report.add("columns", False, "index, labels and fingerprint not checked: some blocks "
                   "cannot be read; get a fresh copy of the set")
        return
    index, labels = ts.index(), ts.labels()
    n = int(ts.meta["num_examples"])
    ok_index = bool(len(index) == 0 or (index.min() >= 0 and index.max() < n))
    first_out = int(np.argmax((index < 0) | (index >= n))) if len(index) else 0
    report.add("index", ok_index, f"dataset indices within [0, {n})" if ok_index else
               f"dataset indices outside [0, {n}): first at row {first_out}")
    report.add("labels", bool((labels >= -1).all()), "labels are class ids or -1")
    fp = S.fingerprint(ts.sample_hash())
    recorded = ts.meta.get("dataset", {}).get("fingerprint")
    report.add("fingerprint", fp == recorded, f"sample_hash fingerprint {fp[:16]}… "
               + ("matches the recorded one" if fp == recorded else f"!= recorded {recorded}"))
