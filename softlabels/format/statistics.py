"""`softlabels info --stats`: per-class mean probability and mean entropy at each stored T, and
the teacher's top-1 accuracy on labelled rows, reduced over whole checked blocks, one block in
memory at a time (a damaged block is refused, naming it, never averaged in)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from softlabels.errors import TransferSetError
from softlabels.format import schema as S

if TYPE_CHECKING:
    from softlabels.format.reader import TransferSet


def set_statistics(ts: TransferSet) -> dict[str, Any]:
    """class_mass (per T, per class: the mean probability over rows), mean_entropy (per T, in
    nats), labelled_rows and teacher_accuracy (argmax of the stored logits against the labels;
    None without labelled rows). Dense sets only."""
    if ts.target.sparse:
        raise TransferSetError(f"{ts.path} is sparse: --stats reads dense arrays; use "
                               "`softlabels report` instead")
    k, c = len(ts.temperatures), ts.num_classes
    mass, entropy = np.zeros((k, c)), np.zeros(k)
    correct = labelled = 0
    for block in range(ts.num_blocks):
        got = ts.read_block(block, [S.PROBS, S.LOGITS, S.LABELS])  # checked: damage is named
        labels, known = got[S.LABELS], got[S.LABELS] >= 0
        correct += int((got[S.LOGITS].argmax(axis=1)[known] == labels[known]).sum())
        labelled += int(known.sum())
        for i, p in enumerate(got[S.PROBS]):  # (rows, C) at one T
            p = p.astype(np.float32, copy=False)
            mass[i] += p.sum(axis=0, dtype=np.float64)
            entropy[i] -= float((p * np.log(np.where(p > 0, p, 1))).sum(dtype=np.float64))
    rows = max(ts.num_rows, 1)
    return {
        "temperatures": ts.temperatures,
        "class_mass": {f"{t:g}": (m / rows).round(6).tolist()
                       for t, m in zip(ts.temperatures, mass)},
        "mean_entropy": {f"{t:g}": round(float(e / rows), 6)
                         for t, e in zip(ts.temperatures, entropy)},
        "labelled_rows": labelled,
        "teacher_accuracy": correct / labelled if labelled else None,
    }
