"""Batches of whole sequences, right-padded (the sequence kind's batches in stage two): input
tokens, hard next tokens, mask and the soft targets (classes and weights, or dense
probabilities) of B whole sequences, bucketed by length so padding stays small.

The teacher is never loaded: the set holds the input tokens, the hard next tokens and the soft
targets. Every block is read through `TransferSet.read_block` (checked): `SequenceBatches` reads
each once, into memory; `StreamingSequenceBatches` reads a window of blocks at a time, for sets
larger than memory.

    batches = SequenceBatches("set.zarr", temperature=2.0, batch_size=16)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for batch in batches:
            logits = student(batch.tokens)                       # (B, L, V)
            loss = sequence_kd_loss(logits, batch, temperature=2.0, alpha=0.9)  # losses.py

Both resume mid-epoch: `state_dict()` says (epoch, batches served, seed), `load_state_dict()`
makes the next iteration serve the rest of that epoch, the same batches, without reading the
windows already served.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from softlabels.errors import MismatchError, OptionError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.sequence import SEQ_MASK, SEQ_TOKENS, read_offsets
from softlabels.format.targets import refuse_unstored
from softlabels.options import check_batch_size
from softlabels.sources.tokens import TokenSequences
from softlabels.tempering import check_temperature
from softlabels.train.epochs import resume_point

MAX_IN_MEMORY = 4 << 30  # bytes of targets held in memory


@dataclass
class SequenceBatch:
    """B sequences right-padded to the longest, L."""

    tokens: torch.Tensor  # (B, L) int64 input ids (0 past a sequence's end)
    labels: torch.Tensor  # (B, L) int64 hard targets, -1 where none
    mask: torch.Tensor  # (B, L) bool, True where a position is trained on
    kind: str  # "topk" | "sample" | "hybrid" | "dense" | "hard" (no soft targets)
    classes: torch.Tensor | None = None  # (B, L, k) int64 (sparse sets)
    weights: torch.Tensor | None = None  # (B, L, k) float32 teacher probabilities (or 1/k)
    log_p: torch.Tensor | None = None  # (B, L, k) float32 teacher log-probabilities (hybrid)
    probs: torch.Tensor | None = None  # (B, L, C) float32 (dense sets)
    sequences: torch.Tensor | None = None  # (B,) int64 the sequences' numbers in the set

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(**{f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                for f in fields(self) for v in [getattr(self, f.name)]})


def target_kind(ts: TransferSet, temperature: float | None) -> tuple[str, float, int | None]:
    """(kind, T, index of T among the stored temperatures or None) of a sequence set's soft
    targets at `temperature` (default: the first stored T); refuses what cannot serve them."""
    if ts.layout.kind != "sequences":
        raise SoftlabelsError(f"{ts.path} is not a sequence set; train it with "
                              "`softlabels train` (SoftTargetDataset)")
    t = (ts.temperatures[0] if temperature is None
         else check_temperature(temperature, at_most=math.inf))
    k = ts.temperature_index(t)
    refuse_unstored(str(ts.path), ts.target, t, tuple(ts.temperatures), k)
    return ts.target.name, t, k


def target_bytes(ts: TransferSet) -> int:
    """Bytes the targets of every row take in memory (what decides streaming)."""
    return ts.num_rows * ts.target.served_bytes(ts.num_classes, 4)


def check_tokens(data: TokenSequences, ts: TransferSet, offsets: np.ndarray) -> None:
    """Refuse a set whose stored tokens, the student's inputs, are not `data`'s: sample hashes
    match the data, but the tokens themselves are read from the set (checked block by block),
    so a set edited with forged checksums could feed the student other tokens, or ids past its
    vocabulary. Compares every position, one checked block of tokens and indices at a time."""
    lengths = np.diff(offsets)
    for b in range(ts.num_blocks):
        start, stop = ts.block_range(b)
        got = ts.read_block(b, [SEQ_TOKENS, S.INDEX])  # indices within the data: checked
        stored, index = got[SEQ_TOKENS], got[S.INDEX]
        pos = np.arange(start, stop)
        seq = np.searchsorted(offsets, pos, side="right") - 1
        if np.any(lengths[seq] != data.lengths[index]):
            raise MismatchError(f"{ts.path}'s sequences are not the data's (their lengths "
                                f"differ in block {b}); pass the tokens:... DATA it was made "
                                "from, or run `softlabels verify` on the set with --data")
        want = data.tokens[data.offsets[index] + pos - offsets[seq]]
        if not np.array_equal(stored, want):
            p = start + int(np.argmax(stored != want))
            s = int(seq[p - start])
            raise MismatchError(
                f"block {b} of {ts.path} holds token {int(stored[p - start])} at position {p} "
                f"(sequence {s}, token {p - int(offsets[s])}) where the data has "
                f"{int(want[p - start])}: the set's tokens are not its data's; run `softlabels "
                "verify` on the set with --data, and get a fresh copy of the set")


def block_arrays(ts: TransferSet, k: int | None) -> list[str]:
    """The row arrays `read_columns` cuts its columns from, at the stored temperature `k` (or
    None): a block read reads and checks only these (not the logits of a sparse set, nor the
    index and sample hashes)."""
    return [SEQ_TOKENS, S.LABELS, SEQ_MASK, *ts.target.served(k is not None)]


def read_columns(ts: TransferSet, block: int, t: float, k: int | None) -> dict[str, np.ndarray]:
    """The columns batches are cut from, for the rows of one checked block: tokens, labels,
    mask and the targets at T (`TargetKind.decode`): classes, weights (and a hybrid's log_p),
    or dense probs."""
    arrays = ts.read_block(block, block_arrays(ts, k),
                           temperature=ts.temperatures[k] if k is not None else None)
    out = {"tokens": arrays[SEQ_TOKENS], "labels": arrays[S.LABELS],
           "mask": arrays[SEQ_MASK].astype(bool)}
    targets = [x.numpy() for x in ts.target.decode(arrays, t, k, tuple(ts.temperatures))]
    names = ("classes", "weights", "log_p") if ts.target.sparse else ("probs",)
    return out | dict(zip(names, targets))


def pad_batch(kind: str, cols: dict[str, np.ndarray], rows: list[np.ndarray],
              seqs: np.ndarray) -> SequenceBatch:
    """One batch, right-padded: sequence i of `seqs` is rows[i] of the columns `cols`."""
    lengths = np.array([len(r) for r in rows])
    b, width = len(rows), int(lengths.max())
    src = np.concatenate(rows)
    dest = np.concatenate([i * width + np.arange(n) for i, n in enumerate(lengths)])

    def put(col: np.ndarray, fill: Any, dtype: Any) -> torch.Tensor:
        out = np.full((b * width, *col.shape[1:]), fill, dtype=dtype)
        out[dest] = col[src]
        return torch.from_numpy(out.reshape(b, width, *col.shape[1:]))

    out: dict[str, Any] = {"tokens": put(cols["tokens"], 0, np.int64),
                           "labels": put(cols["labels"], -1, np.int64),
                           "mask": put(cols["mask"], False, bool), "kind": kind,
                           "sequences": torch.as_tensor(np.asarray(seqs, dtype=np.int64))}
    if "classes" in cols:
        out["classes"] = put(cols["classes"], 0, np.int64)
        out["weights"] = put(cols["weights"], 0, np.float32)
    if "log_p" in cols:
        out["log_p"] = put(cols["log_p"], 0, np.float32)
    if "probs" in cols:
        out["probs"] = put(cols["probs"], 0, np.float32)
    return SequenceBatch(**out)


def _selection(offsets: np.ndarray, sequences: np.ndarray | None) -> np.ndarray:
    n = len(offsets) - 1
    chosen = np.arange(n) if sequences is None else np.asarray(sequences, dtype=np.int64)
    if len(chosen) == 0 or chosen.min() < 0 or chosen.max() >= n:
        raise SoftlabelsError(f"sequences must be a non-empty selection of 0..{n - 1}")
    return chosen


def _batches_by_length(seqs: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, *,
                       batch_size: int, bucket: int, shuffle: bool) -> list[np.ndarray]:
    """Shuffle `seqs`, sort each run of `bucket` batches' worth by length, cut into batches,
    shuffle the batches."""
    seqs = rng.permutation(seqs) if shuffle else seqs
    group = bucket * batch_size
    batches = []
    for g in range(0, len(seqs), group):
        part = seqs[g:g + group]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class Resumable:
    """Where an epoch of sequence batches stands (`state_dict`), and a resume into it
    (`load_state_dict`): the plan of an epoch is a function of (seed, epoch) alone, so the rest
    of an epoch is its plan after the batches served."""

    seed: int
    epoch: int
    _start: int = 0  # the batch of the epoch the next iteration starts at
    _served: int = 0  # batches of the epoch served so far

    def set_epoch(self, epoch: int) -> None:
        """Serve `epoch` from its first batch on the next iteration."""
        self.epoch, self._start, self._served = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the next iteration serves the rest of that epoch."""
        epoch, batches = resume_point(state, seed=self.seed, steps=self._epoch_length,
                                      what="batches")
        self.set_epoch(epoch)
        self._start = self._served = batches

    def _epoch_length(self, epoch: int) -> int:
        """Batches in `epoch` (its plan depends on the epoch: set to it)."""
        self.set_epoch(epoch)
        return len(self)  # type: ignore[arg-type]


class SequenceBatches(Resumable):
    """Batches of whole sequences, from a sequence set (`temperature` picks the stored soft
    targets) or from token data (hard next tokens only: `SequenceBatches.from_tokens`).

    Each epoch (`set_epoch`) shuffles the sequences with (seed, epoch), sorts each run of
    `bucket` batches' worth by length so padding stays small, then shuffles the batches.
    """

    def __init__(self, source: str | os.PathLike[str] | TransferSet, *,
                 temperature: float | None = None, batch_size: int = 16,
                 sequences: np.ndarray | None = None, shuffle: bool = True, seed: int = 0,
                 bucket: int = 50, max_memory: int = MAX_IN_MEMORY) -> None:
        batch_size = check_batch_size(batch_size)
        self.batch_size, self.shuffle, self.seed, self.bucket = batch_size, shuffle, seed, bucket
        self.epoch = 0
        if source is None:  # from_tokens fills the columns itself
            return
        ts = source if isinstance(source, TransferSet) else open_transfer_set(source)
        try:
            self._load(ts, temperature, max_memory)
        finally:
            if not isinstance(source, TransferSet):
                ts.close()
        self._select(sequences)

    @classmethod
    def from_tokens(cls, data: TokenSequences, *, batch_size: int = 16,
                    sequences: np.ndarray | None = None, shuffle: bool = True, seed: int = 0,
                    num_classes: int | None = None, bucket: int = 50) -> SequenceBatches:
        """Hard next-token batches straight from token data (no transfer set)."""
        self = cls(None, batch_size=batch_size, shuffle=shuffle, seed=seed, bucket=bucket)
        c = int(data.tokens.max()) + 1 if num_classes is None else num_classes
        self.offsets = data.offsets
        self.kind = "hard"
        self.columns = {
            "tokens": data.tokens,
            "labels": np.concatenate([data.sequence_labels(s, c) for s in range(len(data))]),
            "mask": (np.ones(len(data.tokens), bool) if data.mask is None
                     else data.mask.astype(bool))}
        self._select(sequences)
        return self

    def _load(self, ts: TransferSet, temperature: float | None, max_memory: int) -> None:
        self.kind, t, k = target_kind(ts, temperature)
        if target_bytes(ts) > max_memory:
            raise SoftlabelsError(f"the targets need {target_bytes(ts) / 2**30:.1f} GiB, over "
                                  "max_memory; stream them (StreamingSequenceBatches, `train "
                                  "--stream`) or cut the set with `softlabels subset`")
        self.offsets = read_offsets(ts)
        parts: dict[str, list[np.ndarray]] = {}
        for b in range(ts.num_blocks):
            for name, data in read_columns(ts, b, t, k).items():
                parts.setdefault(name, []).append(data)
        self.columns = {n: np.concatenate(p) for n, p in parts.items()}

    def _select(self, sequences: np.ndarray | None) -> None:
        self.sequences = _selection(self.offsets, sequences)
        self.lengths = np.diff(self.offsets)

    @property
    def num_positions(self) -> int:
        return int(self.lengths[self.sequences].sum())

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        return -(-len(self.sequences) // self.batch_size)

    def plan(self) -> list[np.ndarray]:
        """This epoch's batches of sequence numbers."""
        return _batches_by_length(self.sequences, self.lengths,
                                  np.random.default_rng([self.seed, self.epoch]),
                                  batch_size=self.batch_size, bucket=self.bucket,
                                  shuffle=self.shuffle)

    def __iter__(self) -> Iterator[SequenceBatch]:
        self._served = self._start
        for seqs in self.plan()[self._start:]:
            self._served += 1
            yield self.batch(seqs)

    def batch(self, seqs: np.ndarray) -> SequenceBatch:
        """One padded batch of the given sequence numbers."""
        rows = [np.arange(self.offsets[s], self.offsets[s + 1]) for s in seqs]
        return pad_batch(self.kind, self.columns, rows, seqs)


class StreamingSequenceBatches(Resumable):
    """`SequenceBatches` for sets larger than memory: whole checked blocks, a window at a time.

    A sequence belongs to the block it starts in. Each epoch (`set_epoch`) cuts the blocks into
    windows of `window_blocks` consecutive blocks, at an offset drawn with (seed, epoch), and
    takes the windows in a shuffled order; a window's sequences are shuffled, bucketed by length
    and batched as `SequenceBatches` does, so every batch holds whole sequences. A window reads
    its blocks and, for sequences that run past its last block's end, the blocks they continue
    into (each read through `TransferSet.read_block`: damage raises
    `IntegrityError` naming the block before any of its rows is served). Memory holds one
    window's blocks plus those continuations, whatever the set's size. Every selected sequence
    is served once per epoch; which sequences share a batch depends on the windows.
    """

    def __init__(self, source: str | os.PathLike[str] | TransferSet, *,
                 temperature: float | None = None, batch_size: int = 16,
                 sequences: np.ndarray | None = None, shuffle: bool = True, seed: int = 0,
                 bucket: int = 50, window_blocks: int = 16) -> None:
        batch_size = check_batch_size(batch_size)
        if window_blocks <= 0:
            raise OptionError(f"window_blocks must be positive, got {window_blocks}")
        self.batch_size, self.shuffle, self.seed, self.bucket = batch_size, shuffle, seed, bucket
        self.window_blocks, self.epoch = window_blocks, 0
        self._plan: tuple[int, list[tuple[np.ndarray, list[np.ndarray]]]] | None = None
        self._own = not isinstance(source, TransferSet)
        self.ts = open_transfer_set(source) if self._own else source
        try:
            self.kind, self._t, self._k = target_kind(self.ts, temperature)
            self.offsets = read_offsets(self.ts)
        except BaseException:
            self.close()
            raise
        self.sequences = _selection(self.offsets, sequences)
        self.lengths = np.diff(self.offsets)
        rows = self.ts.block_rows
        self._first = self.offsets[:-1] // rows  # the block each sequence starts in
        self._last = (self.offsets[1:] - 1) // rows  # ... and ends in

    @property
    def num_positions(self) -> int:
        return int(self.lengths[self.sequences].sum())

    def plan(self) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """This epoch's windows: (the blocks whose sequences it serves, its batches of sequence
        numbers). Made from the offsets alone; nothing is read."""
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        owners = self._first[self.sequences]
        # windows of consecutive blocks (a sequence continues into the next block, so only a
        # window's last block adds a read), cut at an offset drawn per epoch, in shuffled order
        w = self.window_blocks
        shift = int(rng.integers(w)) if self.shuffle else 0
        group = (owners + shift) // w
        order = np.unique(group)
        if self.shuffle:
            order = rng.permutation(order)
        plan = []
        for g in order:
            seqs = self.sequences[group == g]
            window = np.unique(owners[group == g])
            plan.append((window, _batches_by_length(seqs, self.lengths, rng,
                                                    batch_size=self.batch_size,
                                                    bucket=self.bucket, shuffle=self.shuffle)))
        self._plan = (self.epoch, plan)
        return plan

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        return sum(len(batches) for _, batches in self.plan())

    def __iter__(self) -> Iterator[SequenceBatch]:
        rows = self.ts.block_rows
        skip = self._served = self._start
        for _, batches in self.plan():
            if skip >= len(batches):  # served before a resume: not read again
                skip -= len(batches)
                continue
            batches, skip = batches[skip:], 0
            seqs = np.concatenate(batches)
            needed = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in
                                               zip(self._first[seqs], self._last[seqs])]))
            parts: dict[str, list[np.ndarray]] = {}
            for block in needed:  # checked before any of its rows is served
                cols = read_columns(self.ts, int(block), self._t, self._k)
                for name, col in cols.items():
                    parts.setdefault(name, []).append(col)
            # where each needed block's rows start in the window's columns
            base = np.cumsum([0] + [len(c) for c in parts["tokens"][:-1]])
            columns = {name: np.concatenate(p) for name, p in parts.items()}
            del parts
            for batch in batches:
                local = []
                for s in batch:
                    r = np.arange(self.offsets[s], self.offsets[s + 1])
                    blocks = r // rows
                    local.append(base[np.searchsorted(needed, blocks)] + r - blocks * rows)
                self._served += 1
                yield pad_batch(self.kind, columns, local, batch)

    def close(self) -> None:
        if self._own:
            self.ts.close()
