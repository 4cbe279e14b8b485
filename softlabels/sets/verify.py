"""`verify`: is a transfer set whole, self-consistent, and true to its data and teacher?"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softlabels.compute.teacher_inputs import replay_inputs
from softlabels.compute.views import build_augment, replay
from softlabels.errors import IntegrityError, SoftlabelsError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.blockcheck import undone_blocks
from softlabels.format.integrity import VerifyReport, check_arrays, check_meta, check_values
from softlabels.format.reader import TransferSet
from softlabels.preprocessing import Preprocess, describe
from softlabels.progress import Progress
from softlabels.sources.arrays import example_hash, split_item
from softlabels.sources.images import model_inputs, stack_images
from softlabels.sources.load import load_data
from softlabels.teachers.ensemble import Teacher


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
        if example_hash(data, int(i)) != int(h):
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
                   device: str, trust_code: bool, max_teacher_bytes: int | None = None) -> None:
    meta = ts.meta
    teacher = Teacher(teachers, device=device, combine=meta["teacher"]["combine"],
                      trust_code=trust_code, max_bytes=max_teacher_bytes)
    report.add("teacher weights", *teacher.weights_match(meta["teacher"]))
    recorded = meta["teacher"].get("preprocess")
    if recorded:  # the data was replayed through it (replay_inputs); the live one should agree
        live = teacher.preprocess()
        same = live is not None and live == Preprocess.from_meta(recorded)
        report.add("teacher preprocessing", same, f"replayed from the metadata: "
                   f"{describe(recorded)}" + ("" if same else
                   f"; the live teacher's own is {describe(live.to_meta() if live else None)}"))
    rows = np.sort(np.random.default_rng(seed).choice(ts.num_rows, min(sample, ts.num_rows),
                                                      replace=False))
    index = ts.index()
    x = stack_images([split_item(data[int(index[r])])[0] for r in rows])
    if meta.get("views"):  # replay each sampled row's view from its seed
        transform = build_augment(meta["augment"], x[0], trust_code=trust_code,
                                  source=f"{ts.path} (its augment)")
        seeds = ts.read(S.VIEW_SEED)[rows]
        x = torch.stack([replay(transform, xi, int(s)) for xi, s in zip(x, seeds)])
    _, z_live, _ = teacher.soft_targets(x, [1.0])
    z_live = z_live.cpu().numpy()
    if not ts.sparse:  # compare at the precision the set stores
        z_live = z_live.astype(meta["dtype"]).astype(np.float32)
    if ts.sparse and ts.sparse["kind"] == "sample":
        report.add("teacher", True, "not recomputed: sampled classes are random draws")
        return
    if ts.layout.hybrid:  # the stored values and normalisers against the live logits
        hybrid = ts.layout.hybrid
        diff = hybrid.live_differences({n: ts.read(n)[rows] for n in hybrid.names()}, z_live,
                                       ts.temperatures)[:, None]
    else:
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
    trust_code: bool = False,
    max_teacher_bytes: int | None = None,
) -> VerifyReport:
    """Check status, arrays, values and fingerprint; with `data`, every sample hash; with
    `teachers` (and `data`), a seeded sample of `sample` rows recomputed by the live teacher.
    `trust_code` lets python: specs inside teacher checkpoints and the set's augment run;
    `max_teacher_bytes` bounds the teacher (default: the memory available)."""
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
        report.add("status", True, f"complete, format version {ts.format_version}")
        check_meta(ts, report)
        if not check_arrays(ts, report):
            return report
        try:
            done = ts.store.read(S.BLOCK_DONE)
            undone = undone_blocks(ts.layout, done)
        except Exception as exc:  # a damaged chunk fails in the codec, whatever the backend
            undone = f"{S.BLOCK_DONE!r} cannot be read ({type(exc).__name__})"
        report.add("blocks", not undone, undone or f"all {ts.num_blocks} blocks marked done")
        check_values(ts, report, progress)
        if ts.layout.num_sequences:  # one row per position of token sequences
            from softlabels.sets.sequence_verify import verify_sequences

            verify_sequences(ts, report, data=data, teachers=teachers, sample=sample, seed=seed,
                             tolerance=(default_tolerance(ts.meta) if tolerance is None
                                        else tolerance), device=device, progress=progress,
                             trust_code=trust_code, max_teacher_bytes=max_teacher_bytes)
            return report
        if data is not None:
            dataset = load_data(data) if isinstance(data, str) else data
            # as the teacher saw it: its recorded preprocessing, else raw images in [0, 1]
            dataset = model_inputs(replay_inputs(dataset, ts.meta["teacher"]))
            _check_data(ts, dataset, report, progress)
            if teachers:
                _check_teacher(ts, dataset, teachers, report, sample, seed, tolerance, device,
                               trust_code, max_teacher_bytes)
    return report
