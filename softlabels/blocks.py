"""Stage two's checked read of a transfer set, one block at a time: every block a student
trains on passes `TransferSet.read_block` (readable, checksum, finite targets, labels in range)
and becomes the soft targets at the chosen temperature."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import IntegrityError, SoftlabelsError
from .format import schema as S
from .format.reader import TransferSet
from .tempering import tempered_softmax


def check_servable(ts: TransferSet, temperature: float) -> None:
    """Refuse a sparse set at a temperature it did not store (sparse targets cannot re-temper)."""
    if ts.sparse and ts.temperature_index(temperature) is None:
        raise SoftlabelsError(f"{ts.path} is sparse ({ts.sparse['kind']}) and stores targets at "
                              f"T={ts.temperatures} only, not T={temperature}; pass one of them")


def block_targets(ts: TransferSet, arrays: dict[str, np.ndarray],
                  temperature: float) -> list[np.ndarray]:
    """The soft targets at `temperature` of one block's arrays (from `read_block`):
    [probs (n, C) float32] for a dense set — stored when T was stored, else re-tempered from
    the logits in float32 — or [classes (n, k) int64, weights (n, k) float32] for a sparse one."""
    k = ts.temperature_index(temperature)
    if ts.sparse:
        check_servable(ts, temperature)
        if ts.sparse["kind"] == "topk":
            z, lse = arrays[S.TOPK_LOGITS], arrays[S.TOPK_LOGSUMEXP][:, k:k + 1]
            return [arrays[S.TOPK_INDICES].astype(np.int64),
                    np.exp(z / temperature - lse).astype(np.float32)]
        idx = arrays[S.SAMPLE_INDICES][k].astype(np.int64)
        return [idx, np.full(idx.shape, 1 / max(idx.shape[1], 1), dtype=np.float32)]
    if k is not None:
        return [arrays[S.PROBS][k].astype(np.float32, copy=False)]
    return [tempered_softmax(torch.from_numpy(arrays[S.LOGITS]), temperature).numpy()]


def needed_arrays(ts: TransferSet, temperature: float) -> list[str]:
    """The arrays stage two serves from (a block read without its checksum reads only these)."""
    if ts.sparse:
        return [S.LABELS, S.INDEX, *((S.TOPK_INDICES, S.TOPK_LOGITS, S.TOPK_LOGSUMEXP)
                                     if ts.sparse["kind"] == "topk" else (S.SAMPLE_INDICES,))]
    stored = ts.temperature_index(temperature) is not None
    return [S.LABELS, S.INDEX, S.PROBS if stored else S.LOGITS]


def read_checked(ts: TransferSet, block: int, *, temperature: float,
                 checksum: bool = True) -> dict[str, np.ndarray]:
    """One block's arrays, checked: `ts.read_block` (readable, checksum, finite targets, labels
    in range; `IntegrityError` names the block). With checksum=False only the served arrays are
    read and the value checks run (no flipped-byte detection: for sets already verified)."""
    if checksum:
        return ts.read_block(block)
    start, stop = ts.block_range(block)
    arrays = {n: ts.read(n, start, stop) for n in needed_arrays(ts, temperature)}
    labels = arrays[S.LABELS]
    bad = [n for n in arrays if n in S.TARGET_ARRAYS and not np.isfinite(arrays[n]).all()]
    if bad or (len(labels) and (labels.min() < -1 or labels.max() >= ts.num_classes)):
        what = f"NaN or inf in {bad[0]!r}" if bad else "labels outside [-1, C)"
        raise IntegrityError(f"block {block} (rows {start}-{stop - 1}) of {ts.path} holds {what}; "
                             f"run `softlabels verify {ts.path}` and get a fresh copy of the set")
    return arrays


def load_checked(ts: TransferSet, temperature: float) -> dict[str, Any]:
    """Every row's labels, index, view seeds (or None) and targets at T, read block by block
    through `read_checked`: damage anywhere raises `IntegrityError` naming the block."""
    check_servable(ts, temperature)
    parts: dict[str, list[np.ndarray]] = {"labels": [], "index": [], "view_seed": [],
                                          "targets": []}
    for b in range(ts.num_blocks):
        arrays = read_checked(ts, b, temperature=temperature)
        parts["labels"].append(arrays[S.LABELS])
        parts["index"].append(arrays[S.INDEX])
        if S.VIEW_SEED in arrays:
            parts["view_seed"].append(arrays[S.VIEW_SEED])
        parts["targets"].append(block_targets(ts, arrays, temperature))
    cat = np.concatenate
    per_block = parts["targets"]
    return {"labels": cat(parts["labels"]), "index": cat(parts["index"]),
            "view_seed": cat(parts["view_seed"]) if parts["view_seed"] else None,
            "targets": [cat([t[j] for t in per_block]) for j in range(len(per_block[0]))]}
