"""`verify`: is a transfer set whole, self-consistent, and true to its data and teacher?

Written once for every kind of set: integrity (status, metadata, arrays, blocks, values), the
kind's own invariants, every row against the data, and a seeded sample of rows recomputed by the
live teacher. What differs between kinds of row is the set's `Alignment` (sets/alignment.py),
chosen once from `KINDS` by `Layout.kind`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from softlabels.errors import IntegrityError, SoftlabelsError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.blockcheck import undone_blocks
from softlabels.format.integrity import VerifyReport, check_arrays, check_meta, check_values
from softlabels.format.reader import TransferSet
from softlabels.preprocessing import Preprocess, describe
from softlabels.progress import Progress
from softlabels.sets.alignment import KINDS, Alignment
from softlabels.teachers.ensemble import Teacher


def default_tolerance(ts: TransferSet) -> float:
    """Largest |live - stored| / (1 + |stored|) accepted for recomputed logits."""
    if (ts.info.precision or "fp32") != "fp32":
        return 5e-2
    return 1e-2 if ts.layout.dtype == "float16" else 1e-3


def _sampled(ts: TransferSet, names: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The sorted `rows` of each array in `names`, read a block at a time."""
    blocks = rows // ts.layout.block_rows
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for b in np.unique(blocks):
        start, stop = ts.block_range(int(b))
        for name in names:
            parts[name].append(np.take(ts.read(name, start, stop), rows[blocks == b] - start,
                                       axis=S.row_axis(name)))
    return {name: np.concatenate(p, axis=S.row_axis(name)) for name, p in parts.items()}


def _differences(ts: TransferSet, rows: np.ndarray, live: np.ndarray) -> np.ndarray:
    """(n,) per sampled row, the largest |live - stored| / (1 + |stored|) of what the set's
    codec stores (`TargetKind.live_differences`)."""
    stored = _sampled(ts, ts.target.served(False), rows)
    return ts.target.live_differences(stored, live, ts.temperatures, ts.layout.dtype)


def _check_teacher(ts: TransferSet, kind: Alignment, dataset: Dataset,
                   teachers: Sequence[str | nn.Module], report: VerifyReport, sample: int,
                   seed: int, tolerance: float, device: str, trust_code: bool,
                   max_teacher_bytes: int | None) -> None:
    teacher = Teacher(teachers, device=device, combine=ts.info.teacher.combine,
                      trust_code=trust_code, max_bytes=max_teacher_bytes)
    report.add("teacher weights", *teacher.weights_match(ts.info.teacher))
    recorded = ts.info.teacher.preprocess
    if recorded:  # the data was replayed through it (replay_inputs); the live one should agree
        live = teacher.preprocess()
        same = live is not None and live == Preprocess.from_meta(recorded)
        report.add("teacher preprocessing", same, f"replayed from the metadata: "
                   f"{describe(recorded)}" + ("" if same else
                   f"; the live teacher's own is {describe(live.to_meta() if live else None)}"))
    if not ts.target.recomputable:
        report.add("teacher", True, "not recomputed: sampled classes are random draws")
        return
    rows = np.sort(np.random.default_rng(seed).choice(ts.num_rows, min(sample, ts.num_rows),
                                                      replace=False))
    diff = _differences(ts, rows, kind.live_logits(ts, dataset, teacher, rows,
                                                         trust_code))
    worst = float(diff.max()) if diff.size else 0.0
    # "at row": a sequence set's words locate it as (sequence, token)
    report.add("teacher", worst <= tolerance, f"{len(rows)} sampled {kind.noun} recomputed: "
               f"largest relative difference {worst:.2e} (tolerance {tolerance:.0e})"
               + ("" if worst <= tolerance else f", worst at row {int(rows[np.argmax(diff)])}"))


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
    trust_code: bool = False,
    max_teacher_bytes: int | None = None,
) -> VerifyReport:
    """Check status, arrays, values and fingerprint, and the invariants of the set's kind of
    row; with `data`, every row against it; with `teachers` (and `data`), a seeded sample of
    `sample` rows recomputed by the live teacher. `trust_code` lets python: specs inside
    teacher checkpoints and the set's augment run; `max_teacher_bytes` bounds the teacher
    (default: the memory available)."""
    if teachers and data is None:
        raise SoftlabelsError("--teacher needs --data: the teacher is run on the dataset's inputs")
    if sample <= 0:
        raise SoftlabelsError(f"--sample must be positive, got {sample}")
    report = VerifyReport(str(path))
    store = open_store(path, "r")
    try:
        ts = TransferSet(store, _check_arrays=False)  # check_arrays reports them below
    except IntegrityError as exc:  # complete, but its identity metadata was edited
        version = (store.get_meta() or {}).get("format_version")
        store.close()
        report.add("status", True, f"complete, format version {version}")
        report.add("metadata", False, str(exc))
        return report
    except TransferSetError as exc:
        store.close()
        report.add("status", False, str(exc))
        return report
    with ts:
        kind = KINDS[ts.layout.kind]  # the one choice between kinds of row
        try:
            if not _check_set(ts, kind, report, progress) or data is None:
                return report
            dataset = kind.open_data(ts, data, report)
            if dataset is not None and kind.check_data(ts, dataset, report, progress) \
                    and teachers:
                _check_teacher(ts, kind, dataset, teachers, report, sample, seed,
                               default_tolerance(ts) if tolerance is None else tolerance,
                               device, trust_code, max_teacher_bytes)
        finally:
            kind.word(ts, report)
    return report


def _check_set(ts: TransferSet, kind: Alignment, report: VerifyReport,
               progress: Progress | None) -> bool:
    """The set alone: status, metadata, arrays, blocks, values, then the kind's invariants;
    False when its arrays are not those its metadata implies (nothing more can be read)."""
    report.add("status", True, f"complete, format version {ts.format_version}")
    check_meta(ts, report)
    if not check_arrays(ts, report):
        return False
    try:
        done = ts.store.read(S.BLOCK_DONE)
        undone = undone_blocks(ts.layout, done)
    except Exception as exc:  # a damaged chunk fails in the codec, whatever the backend
        undone = f"{S.BLOCK_DONE!r} cannot be read ({type(exc).__name__})"
    report.add("blocks", not undone, undone or f"all {ts.num_blocks} blocks marked done")
    check_values(ts, report, progress)
    kind.check_set(ts, report)
    return True
