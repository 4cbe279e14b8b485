"""How a set's rows line up with their data and their teacher, for each kind of row.

`verify` is written once (sets/verify.py); what differs between the kinds of row
(`Layout.kind`, format.layout.ROW_KINDS) is an `Alignment`, chosen once from `KINDS`:

- **examples**: row r is example `index[r]` of the data, as the teacher saw it (its recorded
  preprocessing replayed, and the row's augmented view replayed from its seed); its sample
  hash is that example's. The teacher is re-run on the sampled rows' inputs in one batch.
- **sequences**: rows are the positions of token sequences laid end to end (`seq/offsets`);
  every sequence is compared with the data's tokens, the teacher is re-run once per sampled
  sequence, and top-k values are compared as a sequence set stores them (shifted by the row's
  largest logit, with the log-sum-exps). Findings speak of positions, located as (sequence,
  token).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.compute.positions import pad
from softlabels.compute.teacher_inputs import replay_inputs
from softlabels.compute.views import build_augment, replay
from softlabels.format import schema as S
from softlabels.format.integrity import VerifyReport
from softlabels.format.reader import TransferSet
from softlabels.format.sequence import SEQ_TOKENS, check_sequences, read_offsets, row_sequences
from softlabels.progress import Progress
from softlabels.sources.arrays import example_hash, split_item
from softlabels.sources.images import model_inputs, stack_images
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import Teacher
from softlabels.tempering import combine_logits


class Alignment(Protocol):
    """What `verify` does differently for one kind of row."""

    noun: str  # what the set's rows are called in the findings: "rows" or "positions"

    def check_set(self, ts: TransferSet, report: VerifyReport) -> None:
        """The kind's own set-only invariants."""

    def open_data(self, ts: TransferSet, data: str | Dataset,
                  report: VerifyReport) -> Dataset | None:
        """The DATA as the set's rows were made from it, or None (reported) when it is not
        data of this kind."""

    def check_data(self, ts: TransferSet, dataset: Dataset, report: VerifyReport,
                   progress: Progress | None) -> bool:
        """Every row against the data (reported); whether the rows can be located in it (the
        teacher is re-run only then)."""

    def live_logits(self, ts: TransferSet, dataset: Dataset, teacher: Teacher,
                    rows: np.ndarray, trust_code: bool) -> np.ndarray:
        """(n, C) float32: the live teacher's combined logits for the sorted `rows`."""

    def word(self, ts: TransferSet, report: VerifyReport) -> None:
        """Put the report's findings in this kind's words."""


class Examples:
    """One row per example."""

    noun = "rows"

    def check_set(self, ts: TransferSet, report: VerifyReport) -> None:
        pass  # an example set's invariants are every set's (format.integrity)

    def open_data(self, ts: TransferSet, data: str | Dataset,
                  report: VerifyReport) -> Dataset | None:
        dataset = load_data(data) if isinstance(data, str) else data
        if isinstance(dataset, TokenSequences):  # not "has 200 examples, made from 300"
            report.add("data", False, "an example set is checked against the DATA of its "
                       "examples, not token sequences; pass the DATA it was made from")
            return None
        # as the teacher saw it: its recorded preprocessing, else raw images in [0, 1]
        return model_inputs(replay_inputs(dataset, ts.info.teacher.preprocess))

    def check_data(self, ts: TransferSet, dataset: Dataset, report: VerifyReport,
                   progress: Progress | None) -> bool:
        n = ts.info.num_examples
        if len(dataset) != n:
            return report.add("data", False, f"the dataset has {len(dataset)} examples, the set "
                              f"was made from {n}; pass the DATA it was made from")
        hashes, index = ts.sample_hash(), ts.index()
        mismatches = 0
        first = -1
        for row, (i, h) in enumerate(zip(index, hashes)):
            if example_hash(dataset, int(i)) != int(h):
                mismatches += 1
                first = row if first < 0 else first
            if progress and (row + 1) % 1024 == 0:
                progress(row + 1, len(index))
        report.add("data", mismatches == 0,
                   f"all {len(index)} sample hashes match the dataset" if not mismatches else
                   f"{mismatches} of {len(index)} rows do not match the dataset (first: row "
                   f"{first}, dataset index {int(index[first])})")
        return True  # an example that differs is still the one its row names

    def live_logits(self, ts: TransferSet, dataset: Dataset, teacher: Teacher,
                    rows: np.ndarray, trust_code: bool) -> np.ndarray:
        index = ts.index()
        x = stack_images([split_item(dataset[int(index[r])])[0] for r in rows])
        if ts.layout.views:  # replay each sampled row's view from its seed
            transform = build_augment(ts.info.augment, x[0], trust_code=trust_code,
                                      source=f"{ts.path} (its augment)")
            seeds = ts.read(S.VIEW_SEED)[rows]
            x = torch.stack([replay(transform, xi, int(s)) for xi, s in zip(x, seeds)])
        _, z, _ = teacher.soft_targets(x, [1.0])
        return z.cpu().numpy()

    def word(self, ts: TransferSet, report: VerifyReport) -> None:
        pass  # the checks speak of rows already


class Sequences:
    """One row per position of token sequences."""

    noun = "positions"

    def check_set(self, ts: TransferSet, report: VerifyReport) -> None:
        check_sequences(ts, report)  # offsets, positions, one index per sequence, labels

    def open_data(self, ts: TransferSet, data: str | Dataset,
                  report: VerifyReport) -> Dataset | None:
        dataset = load_data(data) if isinstance(data, str) else data
        if isinstance(dataset, TokenSequences):
            return dataset
        report.add("data", False, "a sequence set is checked against token sequences; pass "
                   "the tokens:PATH DATA it was made from")
        return None

    def check_data(self, ts: TransferSet, dataset: Dataset, report: VerifyReport,
                   progress: Progress | None) -> bool:
        n = ts.info.num_examples
        if len(dataset) != n:
            return report.add("data", False, f"the data has {len(dataset)} sequences, the set "
                              f"was made from {n}; pass the DATA it was made from")
        offsets = read_offsets(ts)
        starts = offsets[:-1]
        index, hashes = ts.index()[starts], ts.sample_hash()[starts]
        tokens = ts.read(SEQ_TOKENS)
        bad = []
        for s, (i, h) in enumerate(zip(index, hashes)):
            x = dataset[int(i)].numpy()
            if S.sample_hash(x) != int(h) or not np.array_equal(
                    x, tokens[offsets[s]:offsets[s + 1]]):
                bad.append(s)
            if progress and (s + 1) % 1024 == 0:
                progress(s + 1, len(index))
        return report.add("data", not bad, f"all {len(index)} sequences match the data" if not
                          bad else f"{len(bad)} of {len(index)} sequences differ from the data "
                          f"(first: sequence {bad[0]}, dataset index {int(index[bad[0]])})")

    def live_logits(self, ts: TransferSet, dataset: Dataset, teacher: Teacher,
                    rows: np.ndarray, trust_code: bool) -> np.ndarray:
        offsets, index = read_offsets(ts), ts.index()
        seq_of = row_sequences(offsets)[rows]
        parts = []
        for s in np.unique(seq_of):  # the teacher runs once per sampled sequence
            ids = pad([dataset[int(index[offsets[s]])]])
            with torch.inference_mode():
                z = combine_logits(teacher.member_logits(ids), ts.info.teacher.combine)[0]
            parts.append(z.cpu().numpy()[rows[seq_of == s] - offsets[s]])  # (n_s, C)
        return np.concatenate(parts)

    def word(self, ts: TransferSet, report: VerifyReport) -> None:
        speak_of_positions(ts, report)


KINDS: dict[str, Alignment] = {"examples": Examples(), "sequences": Sequences()}


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
