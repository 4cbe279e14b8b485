"""Integrity checks a transfer set can answer by itself: identity metadata against its digest,
exactly the arrays the metadata implies, every block readable and matching its checksum, finite
values, probabilities that sum to one and match the stored logits at the recorded temperatures,
index, labels and the dataset fingerprint. `softlabels verify` adds the checks that need the
data or the teacher."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from softlabels.format import schema as S
from softlabels.format.blockcheck import target_problem
from softlabels.format.layout import IDENTITY_KEYS, array_problems, edited_keys
from softlabels.format.reader import TransferSet
from softlabels.progress import Progress


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


def check_arrays(ts: TransferSet, report: VerifyReport) -> bool:
    """Exactly the arrays the metadata implies, with the declared shapes and dtypes (the reader
    refuses a set that fails this; verify reports it when the set opened all the same)."""
    bad = array_problems(ts.layout, {n: (s, d) for n, (s, d, _) in ts.arrays().items()},
                         version=ts.format_version)
    return report.add("arrays", not bad, "; ".join(bad) or f"{len(ts.layout.specs())} arrays, "
                      "shapes and dtypes as the metadata implies")


def check_meta(ts: TransferSet, report: VerifyReport) -> None:
    """The identity metadata against the digest written when the set was completed (a set
    whose digest does not match is refused on opening; see `layout.check_digest`)."""
    edited = edited_keys(ts.meta)
    report.add("metadata", not edited, "no digest recorded (a set from before digests)"
               if edited is None else f"edited: {', '.join(edited)}" if edited else
               f"{len(IDENTITY_KEYS)} identity fields match their digest")


def _read_block(ts: TransferSet, names: list[str], block: int,
                ) -> tuple[dict[str, np.ndarray], np.ndarray | None] | str:
    """Every row array's rows of one block and its recorded `array_checksum` row (None in a
    version 1 set), or why they cannot be read."""
    start, stop = ts.block_range(block)
    requests = [(n, (slice(None),) * S.row_axis(n) + (slice(start, stop),)) for n in names]
    v2 = ts.format_version >= 2
    if v2:
        requests.append((S.ARRAY_CHECKSUM, (block, slice(None))))
    try:
        got = ts.store.read_many(requests)
    except Exception as exc:  # a corrupted chunk fails in the codec, whatever the backend
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return dict(zip(names, got)), (got[-1] if v2 else None)


def _slot_name(ts: TransferSet, name: str, j: int | None) -> str:
    if j is None:
        return name
    return f"{name} at T={ts.temperatures[j]:g}" if name in S.TEMPERATURE_AXIS else \
        f"{name} of member {j}"


def _checksum_problem(ts: TransferSet, block: int, arrays: dict[str, np.ndarray],
                      recorded: np.ndarray | None, v1: np.ndarray | None) -> str | None:
    start, stop = ts.block_range(block)
    where = f"block {block} (rows {start}-{stop - 1}) does not match its checksum"
    if recorded is not None:
        bad = [_slot_name(ts, name, j) for (name, j), ok in
               zip(ts.layout.checksum_slots(), ts.layout.block_checksums(arrays) == recorded)
               if not ok]
        return f"{where} ({', '.join(bad)})" if bad else None
    if v1 is not None and S.block_checksum_v1(arrays) != int(v1[block]):
        return where
    return None


# Unit roundoff of a storage dtype, and the smallest stored probability whose log is compared.
_ROUNDOFF = {"float16": 2.0 ** -11, "float32": 2.0 ** -24}
_SMALLEST = {"float16": 1e-4, "float32": 1e-30}
_ROWS_COMPARED = 1024  # per set, spread evenly over the blocks (at least one per block)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    y = z - z.max(-1, keepdims=True)
    return y - np.log(np.exp(y).sum(-1, keepdims=True))


class TemperingCheck:
    """Stored `probs` against the stored logits at the recorded temperatures, block by block.

    Expected log-probabilities are recomputed in float64 from `member_logits` when kept (under
    the recorded `combine`), else from `logits` (a mean-probs ensemble without members: at T = 1
    only). The tolerance per row follows the storage dtypes: rounding the logits moves each
    log-probability by at most 2 * max|z| * u / T (u the unit roundoff), storing probs by u of
    theirs. An edited temperature moves it by about |z| * |1/T - 1/T'|, far beyond that.
    About 1024 rows are compared, evenly spaced within every block: an edited temperature moves
    every row (an edited row is the checksums' business), so verify costs little more than a
    plain read.
    """

    def __init__(self, ts: TransferSet) -> None:
        lay, teacher = ts.layout, ts.info.teacher
        self.layout, self.combine = lay, teacher.combine
        ensemble_without_members = (len(teacher.members) > 1 and not lay.num_members
                                    and self.combine == "mean-probs")
        self.checkable = [] if lay.target.sparse else [
            k for k, t in enumerate(lay.temperatures) if not ensemble_without_members or t == 1]
        self.worst = {k: (0.0, -1) for k in self.checkable}  # k -> (gap / tolerance, row)
        self.per_block = max(1, -(-_ROWS_COMPARED // lay.num_blocks))

    def _expected(self, arrays: dict[str, np.ndarray], t: float) -> np.ndarray:
        if S.MEMBER_LOGITS in arrays:
            z = arrays[S.MEMBER_LOGITS].astype(np.float64)  # (M, rows, C)
            if self.combine == "mean-logits":
                return _log_softmax(z.mean(0) / t)
            lp = _log_softmax(z / t)
            top = lp.max(0)
            return top + np.log(np.exp(lp - top).mean(0))
        return _log_softmax(arrays[S.LOGITS].astype(np.float64) / t)

    def add(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        if not self.checkable:
            return
        n = len(arrays[S.LABELS])
        rows = np.arange(n) if n <= self.per_block else np.linspace(
            0, n - 1, self.per_block).round().astype(np.int64)
        arrays = {name: np.take(arrays[name], rows, axis=S.row_axis(name))
                  for name in (S.LOGITS, S.PROBS, S.MEMBER_LOGITS) if name in arrays}
        z = arrays.get(S.MEMBER_LOGITS, arrays[S.LOGITS])
        zmax = np.abs(z.astype(np.float64)).reshape(-1, *z.shape[-2:]).max(axis=(0, 2))
        u_z, u_p = _ROUNDOFF[self.layout.dtype], _ROUNDOFF[self.layout.probs_dtype]
        smallest = _SMALLEST[self.layout.probs_dtype]
        for k in self.checkable:
            t = self.layout.temperatures[k]
            expected = self._expected(arrays, t)
            stored = arrays[S.PROBS][k].astype(np.float64)
            tol = (2 * zmax * u_z / t + 4 * u_p + 2.0 ** -20 * (1 + zmax / t)
                   + 2.0 ** -24 * self.layout.num_classes)
            compared = (stored >= smallest) | (expected >= np.log(2 * smallest))
            with np.errstate(divide="ignore", invalid="ignore"):
                gap = np.where(compared, np.abs(np.log(stored) - expected), 0) / tol[:, None]
            gap = np.nan_to_num(gap, nan=np.inf).max(axis=1)
            if gap.size and gap.max() > self.worst[k][0]:
                self.worst[k] = (float(gap.max()), start + int(rows[gap.argmax()]))

    def report(self, report: VerifyReport, covered: str = "") -> None:
        """Add the check's verdict; `covered` follows a pass (" in the 3 readable blocks of
        4")."""
        temps = self.layout.temperatures
        if not self.checkable:
            report.add("temperatures", True, "not checkable: a sparse set stores no dense "
                       "probabilities" if self.layout.target.sparse else "not checkable: a "
                       "mean-probs ensemble without --keep-members (checkable at T = 1 only)")
            return
        bad = [f"probs at T={temps[k]:g} do not match softmax(logits / {temps[k]:g}) (gap "
               f"{g:.1e} times the tolerance, worst at row {r})"
               for k, (g, r) in self.worst.items() if g > 1]
        unchecked = [f"{t:g}" for k, t in enumerate(temps) if k not in self.worst]
        worst = max(g for g, _ in self.worst.values())
        report.add("temperatures", not bad, "; ".join(bad) + ": the temperatures, the logits or "
                   "the probabilities were edited" if bad else
                   f"stored probabilities match the stored logits at T = "
                   f"{', '.join(f'{temps[k]:g}' for k in self.worst)} (worst gap {worst:.2f} of "
                   f"the tolerance){covered}"
                   + (f"; not checkable at T = {', '.join(unchecked)}: a mean-probs ensemble "
                      "without --keep-members" if unchecked else ""))


def check_values(ts: TransferSet, report: VerifyReport, progress: Progress | None) -> None:
    first_bad: dict[str, int] = {}
    worst_sum, summed = 0.0, 0  # the largest |row sum - 1| of dense probabilities, rows summed
    v1 = (ts.store.read(S.BLOCK_CHECKSUM) if ts.format_version == 1 and ts.has(S.BLOCK_CHECKSUM)
          else None)
    checked = ts.format_version >= 2 or v1 is not None
    corrupt: list[str] = []
    not_probabilities: list[str] = []
    unreadable = 0  # blocks
    tempering = TemperingCheck(ts)
    lay = ts.layout
    target_problems: list[str] = []  # the target kind's own recipe, checked block by block
    for b in range(ts.num_blocks):
        start, stop = ts.block_range(b)
        got = _read_block(ts, ts.row_arrays(), b)
        if isinstance(got, str):
            corrupt.append(f"block {b} (rows {start}-{stop - 1}) unreadable: {got}")
            unreadable += 1
            continue
        arrays, recorded = got
        problem = _checksum_problem(ts, b, arrays, recorded, v1)
        if problem:
            corrupt.append(problem)
        invalid = target_problem(arrays, ts.num_classes, ts.temperatures)
        if invalid:
            not_probabilities.append(f"block {b} (rows {start}-{stop - 1}) {invalid}")
        for name in S.TARGET_ARRAYS:
            if name in first_bad or name not in arrays:
                continue
            block = arrays[name].astype(np.float32)
            axis = S.row_axis(name)
            finite = np.isfinite(block).all(axis=tuple(i for i in range(block.ndim)
                                                       if i != axis))
            if not finite.all():
                first_bad[name] = start + int(np.argmin(finite))
            elif name == S.PROBS:
                worst_sum = max(worst_sum, float(np.abs(block.sum(-1) - 1).max(initial=0)))
                summed += stop - start
        if not first_bad:
            tempering.add(start, arrays)
        if not target_problems:
            problem = lay.target.problems(arrays, lay.num_classes, lay.temperatures, lay.dtype)
            if problem:
                target_problems.append(f"block {b} (rows {start}-{stop - 1}): {problem}")
        if progress:
            progress(stop, ts.num_rows)
    if not checked:
        report.add("checksums", True, "none recorded (a set from before block checksums)")
    else:
        per = (f"each row array's ({len(ts.layout.checksum_slots())} per block)"
               if ts.format_version >= 2 else "one per block, format version 1")
        report.add("checksums", not corrupt, "; ".join(corrupt[:5])
                   + (f"; and {len(corrupt) - 5} more" if len(corrupt) > 5 else "")
                   or f"all {ts.num_blocks} blocks match their checksums ({per})")
    # what the value checks below covered: a block that cannot be read is not among them
    read = (f" in the {ts.num_blocks - unreadable} readable blocks of {ts.num_blocks}"
            if unreadable else "")
    report.add("targets", not not_probabilities, "; ".join(not_probabilities[:3])
               + (f"; and {len(not_probabilities) - 3} more" if len(not_probabilities) > 3
                  else "") or "every stored target is a probability (top-k normalisers at or "
               f"above the top logit / T, top-k mass at most 1, class ids in range){read}")
    report.add("finite", not first_bad, "; ".join(f"{n} has NaN/inf at row {r}" for n, r in
                                                  first_bad.items()) or f"no NaN or inf{read}")
    tol = 1e-2 if ts.layout.probs_dtype == "float16" else 1e-4
    report.add("probabilities", worst_sum <= tol,
               "no dense probabilities stored (the targets check covers this kind's)"
               if not ts.has(S.PROBS) else f"rows sum to 1 within {worst_sum:.1e} (tolerance "
               f"{tol:.0e})" + (f", over {summed} of {ts.num_rows} rows (the rest unreadable "
                                "or from the first block with NaN/inf on)"
                                if summed < ts.num_rows else ""))
    if not first_bad:
        tempering.report(report, read)
    recipe = lay.target.recipe()
    if recipe is not None:  # a kind with its own recipe (`TargetKind.problems`)
        report.add(lay.target.name, not target_problems, "; ".join(target_problems) or recipe)
    if unreadable:
        report.add("columns", False, "index, labels and fingerprint not checked: some blocks "
                   "cannot be read; get a fresh copy of the set")
        return
    _check_columns(ts, report)


def _check_columns(ts: TransferSet, report: VerifyReport) -> None:
    index, labels = ts.index(), ts.labels()
    n = ts.info.num_examples
    ok_index = bool(len(index) == 0 or (index.min() >= 0 and index.max() < n))
    first_out = int(np.argmax((index < 0) | (index >= n))) if len(index) else 0
    report.add("index", ok_index, f"dataset indices within [0, {n})" if ok_index else
               f"dataset indices outside [0, {n}): first at row {first_out}")
    c = ts.num_classes
    bad_labels = (labels < -1) | (labels >= c)
    report.add("labels", not bad_labels.any(), f"labels are class ids in [0, {c}) or -1"
               if not bad_labels.any() else f"labels outside [-1, {c}): first at row "
               f"{int(np.argmax(bad_labels))} ({int(labels[np.argmax(bad_labels)])})")
    fp = S.fingerprint(ts.sample_hash())
    recorded = ts.info.dataset.fingerprint
    report.add("fingerprint", fp == recorded, f"sample_hash fingerprint {fp[:16]}… "
               + ("matches the recorded one" if fp == recorded else f"!= recorded {recorded}"))
