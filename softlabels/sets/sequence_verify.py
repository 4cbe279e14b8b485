"""`verify` for sequence sets: the set-only sequence checks, every sequence against the token
data, and sampled positions recomputed by the live teacher."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from softlabels.compute.positions import pad
from softlabels.format import schema as S
from softlabels.format.integrity import VerifyReport
from softlabels.format.reader import TransferSet
from softlabels.format.sequence import SEQ_TOKENS, check_sequences, read_offsets, row_sequences
from softlabels.progress import Progress
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import Teacher
from softlabels.tempering import combine_logits


def verify_sequences(ts: TransferSet, report: VerifyReport, *,
                     data: str | TokenSequences | None, teachers: Sequence[str | nn.Module],
                     sample: int, seed: int, tolerance: float, device: str,
                     progress: Progress | None = None, trust_code: bool = False) -> None:
    """Sequence checks of `verify`: offsets and positions, then against the token DATA and
    the live teacher when given (`trust_code` as for `verify`). The report's words are then
    those of a sequence set (`speak_of_positions`)."""
    try:
        check_sequences(ts, report)
        if data is None:
            return
        dataset = load_data(data) if isinstance(data, str) else data
        if not isinstance(dataset, TokenSequences):
            report.add("data", False, "a sequence set is checked against token sequences; "
                       "pass the tokens:PATH DATA it was made from")
            return
        if not _check_data(ts, dataset, report, progress) or not teachers:
            return
        _check_teacher(ts, dataset, teachers, report, sample, seed, tolerance, device,
                       trust_code)
    finally:
        speak_of_positions(ts, report)


_WORDS = [  # the set-wide checks' words for rows, as a sequence set's reader says them
    (re.compile(r"\brows sum to 1\b"), "every position's probabilities sum to 1"),
    (re.compile(r"\beach row array's\b"), "each per-position array's"),
    (re.compile(r"\(rows (\d+)-(\d+)\)"), r"(positions \1-\2)"),
    (re.compile(r"\bdataset indices\b"), "sequence indices"),
]
_AT_ROW = re.compile(r"\bat row (\d+)")


def speak_of_positions(ts: TransferSet, report: VerifyReport) -> None:
    """Reword the set-wide checks' details for a sequence set, whose rows are token positions:
    "rows" become positions, and a row named "at row R" is also located as (sequence s,
    token t) where the offsets are readable."""
    try:
        offsets = read_offsets(ts)
    except Exception:  # damaged offsets are the sequences check's to report
        offsets = None

    def at(match: re.Match[str]) -> str:
        row = int(match.group(1))
        if offsets is None or not 0 <= row < offsets[-1]:
            return f"at position {row}"
        s = int(np.searchsorted(offsets, row, side="right")) - 1
        return f"at position {row} (sequence {s}, token {row - int(offsets[s])})"

    for i, check in enumerate(report.checks):
        detail = check.detail
        for pattern, words in _WORDS:
            detail = pattern.sub(words, detail)
        if check.name != "sequences":  # whose own words name rows and positions apart
            detail = _AT_ROW.sub(at, detail)
        report.checks[i] = dataclasses.replace(check, detail=detail)


def _check_data(ts: TransferSet, dataset: TokenSequences, report: VerifyReport,
                progress: Progress | None) -> bool:
    n = int(ts.meta["num_examples"])
    if len(dataset) != n:
        return report.add("data", False, f"the data has {len(dataset)} sequences, the set was "
                          f"made from {n}; pass the DATA it was made from")
    offsets = read_offsets(ts)
    starts = offsets[:-1]
    index, hashes = ts.index()[starts], ts.sample_hash()[starts]
    tokens = ts.read(SEQ_TOKENS)
    bad = []
    for s, (i, h) in enumerate(zip(index, hashes)):
        x = dataset[int(i)].numpy()
        if S.sample_hash(x) != int(h) or not np.array_equal(x, tokens[offsets[s]:offsets[s + 1]]):
            bad.append(s)
        if progress and (s + 1) % 1024 == 0:
            progress(s + 1, len(index))
    return report.add("data", not bad, f"all {len(index)} sequences match the data" if not bad
                      else f"{len(bad)} of {len(index)} sequences differ from the data (first: "
                      f"sequence {bad[0]}, dataset index {int(index[bad[0]])})")


def _check_teacher(ts: TransferSet, dataset: TokenSequences,
                   teachers: Sequence[str | nn.Module], report: VerifyReport, sample: int,
                   seed: int, tolerance: float, device: str, trust_code: bool) -> None:
    meta = ts.meta
    teacher = Teacher(teachers, device=device, combine=meta["teacher"]["combine"],
                      trust_code=trust_code)
    report.add("teacher weights", *teacher.weights_match(meta["teacher"]))
    if ts.sparse and ts.sparse["kind"] == "sample":
        report.add("teacher", True, "not recomputed: sampled classes are random draws")
        return
    offsets = read_offsets(ts)
    rows = np.sort(np.random.default_rng(seed).choice(ts.num_rows, min(sample, ts.num_rows),
                                                      replace=False))
    seq_of, index = row_sequences(offsets)[rows], ts.index()
    worst, worst_row = 0.0, -1
    for s in np.unique(seq_of):
        mine = rows[seq_of == s]
        ids = pad([dataset[int(index[offsets[s]])]])
        with torch.inference_mode():
            z = combine_logits(teacher.member_logits(ids), meta["teacher"]["combine"])[0]
        live = z.cpu().numpy()[mine - offsets[s]]  # (n, C)
        for row, diff in zip(mine, _differences(ts, mine, live, meta)):
            if diff > worst:
                worst, worst_row = diff, int(row)
    # "at row": speak_of_positions locates it as (sequence, token)
    report.add("teacher", worst <= tolerance, f"{len(rows)} sampled positions recomputed: "
               f"largest relative difference {worst:.2e} (tolerance {tolerance:.0e})"
               + ("" if worst <= tolerance else f", worst at row {worst_row}"))


def _differences(ts: TransferSet, rows: np.ndarray, live: np.ndarray, meta: dict) -> np.ndarray:
    """Per sampled row, the largest |live - stored| / (1 + |stored|)."""
    if not ts.sparse:
        stored = np.stack([ts.read(S.LOGITS, int(r), int(r) + 1)[0] for r in rows])
        live = live.astype(meta["dtype"]).astype(np.float32)
        return (np.abs(live - stored) / (1 + np.abs(stored))).max(1)
    if ts.layout.hybrid:
        hybrid = ts.layout.hybrid
        return np.array([hybrid.live_differences(
            {n: ts.read(n, int(r), int(r) + 1) for n in hybrid.names()}, z[None],
            ts.temperatures)[0] for r, z in zip(rows, live)])
    out = []
    temps = np.array(ts.temperatures, dtype=np.float32)
    for r, z in zip(rows, live):
        classes = ts.read(S.TOPK_INDICES, int(r), int(r) + 1)[0].astype(np.int64)
        stored = ts.read(S.TOPK_LOGITS, int(r), int(r) + 1)[0].astype(np.float32)
        lse = ts.read(S.TOPK_LOGSUMEXP, int(r), int(r) + 1)[0]
        top = z.max()  # both sides shifted by the row's largest logit
        live_lse = np.array([np.logaddexp.reduce(z / t) for t in temps]) - top / temps
        a = np.concatenate([z[classes] - top, live_lse])
        b = np.concatenate([stored, lse])
        out.append(float((np.abs(a - b) / (1 + np.abs(b))).max()))
    return np.array(out)
