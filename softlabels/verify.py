"""`verify`: is a transfer set whole, self-consistent, and true to its data and teacher?"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from . import schema as S
from .errors import SoftlabelsError, TransferSetError
from .precompute import Progress
from .specs import load_data, split_item
from .store import open_store
from .teacher import Teacher
from .transfer_set import TransferSet
from .views import build_augment, replay


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


def _check_arrays(ts: TransferSet, report: VerifyReport) -> bool:
    r, c, k = ts.num_rows, ts.num_classes, len(ts.temperatures)
    want = {S.LABELS: ((r,), "int64"), S.INDEX: ((r,), "int64"),
            S.SAMPLE_HASH: ((r,), "uint64")}
    sparse = ts.sparse or {}
    if sparse.get("kind") == "topk":
        want |= {S.TOPK_INDICES: ((r, sparse["k"]), "int32"),
                 S.TOPK_LOGITS: ((r, sparse["k"]), "float32"),
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


def _check_values(ts: TransferSet, report: VerifyReport, progress: Progress | None) -> None:
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


def _check_data(ts: TransferSet, data: Dataset, report: VerifyReport,
                progress: Progress | None) -> None:
    n = int(ts.meta["num_examples"])
    if len(data) != n:
        report.add("data", False, f"the dataset has {len(data)} examples, the set was made from "
                   f"{n}; pass the DATA it was made from")
        return
    hashes, index = ts.sample_hash(), ts.index()
    mismatches = 0
    first = -1
    for row, (i, h) in enumerate(zip(index, hashes)):
        if S.sample_hash(split_item(data[int(i)])[0].numpy()) != int(h):
            mismatches += 1
            first = row if first < 0 else first
        if progress and (row + 1) % 1024 == 0:
            progress(row + 1, len(index))
    report.add("data", mismatches == 0,
               f"all {len(index)} sample hashes match the dataset" if not mismatches else
               f"{mismatches} of {len(index)} rows do not match the dataset (first: row {first}, "
               f"dataset index {int(index[first])})")


def default_tolerance(meta: dict[str, Any]) -> float:
    """Largest |live - stored| / (1 + |stored|) accepted for recomputed logits."""
    if meta.get("precision", "fp32") != "fp32":
        return 5e-2
    return 1e-2 if meta.get("dtype") == "float16" else 1e-3


def _check_teacher(ts: TransferSet, data: Dataset, teachers: Sequence[str | nn.Module],
                   report: VerifyReport, sample: int, seed: int, tolerance: float | None,
                   device: str) -> None:
    meta = ts.meta
    teacher = Teacher(teachers, device=device, combine=meta["teacher"]["combine"])
    recorded = [m["sha256"] for m in meta["teacher"]["members"]]
    live = [m.sha256 for m in teacher.members]
    report.add("teacher weights", live == recorded, "weights match the recorded SHA-256"
               if live == recorded else "the live teacher's weights differ from the recorded ones")
    rows = np.sort(np.random.default_rng(seed).choice(ts.num_rows, min(sample, ts.num_rows),
                                                      replace=False))
    index = ts.index()
    x = torch.stack([split_item(data[int(index[r])])[0] for r in rows])
    if meta.get("views"):  # replay each sampled row's view from its seed
        transform = build_augment(meta["augment"], x[0])
        seeds = ts.read(S.VIEW_SEED)[rows]
        x = torch.stack([replay(transform, xi, int(s)) for xi, s in zip(x, seeds)])
    _, z_live, _ = teacher.soft_targets(x, [1.0])
    z_live = z_live.cpu().numpy()
    if not ts.sparse:  # compare at the precision the set stores
        z_live = z_live.astype(meta["dtype"]).astype(np.float32)
    if ts.sparse and ts.sparse["kind"] == "sample":
        report.add("teacher", True, "not recomputed: sampled classes are random draws")
        return
    if ts.sparse:  # top-k: compare the stored logits with the live ones at those classes
        classes = ts.read(S.TOPK_INDICES)[rows].astype(np.int64)
        z_live = np.take_along_axis(z_live, classes, axis=1)
        z_stored = ts.read(S.TOPK_LOGITS)[rows]
    else:
        z_stored = ts.logits()[rows]
    diff = np.abs(z_live - z_stored) / (1 + np.abs(z_stored))
    tol = default_tolerance(meta) if tolerance is None else tolerance
    worst = float(diff.max()) if diff.size else 0.0
    report.add("teacher", worst <= tol, f"{len(rows)} sampled rows recomputed: largest "
               f"relative difference {worst:.2e} (tolerance {tol:.0e})"
               + ("" if worst <= tol else f", worst at row {int(rows[np.argmax(diff.max(1))])}"))


def verify(
    path: str | os.PathLike[str],
    *,
    data: str | Dataset | None = None,
    teachers: Sequence[str | nn.Module] = (),
    sample: int = 64,
    seed: int = 0,
    tolerance: float | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> VerifyReport:
    """Check status, arrays, values and fingerprint; with `data`, every sample hash; with
    `teachers` (and `data`), a seeded sample of `sample` rows recomputed by the live teacher."""
    if teachers and data is None:
        raise SoftlabelsError("--teacher needs --data: the teacher is run on the dataset's inputs")
    if sample <= 0:
        raise SoftlabelsError(f"--sample must be positive, got {sample}")
    report = VerifyReport(str(path))
    store = open_store(path, "r")
    try:
        ts = TransferSet(store)
    except TransferSetError as exc:
        store.close()
        report.add("status", False, str(exc))
        return report
    with ts:
        report.add("status", True, f"complete, format version {S.FORMAT_VERSION}")
        if not _check_arrays(ts, report):
            return report
        done = ts.store.read(S.BLOCK_DONE)
        report.add("blocks", bool(done.all()), f"{int(done.sum())} of {len(done)} blocks done")
        _check_values(ts, report, progress)
        if data is not None:
            dataset = load_data(data) if isinstance(data, str) else data
            _check_data(ts, dataset, report, progress)
            if teachers:
                _check_teacher(ts, dataset, teachers, report, sample, seed, tolerance, device)
    return report
