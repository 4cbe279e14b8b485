"""Stage one's rows of token positions: one row per position of token sequences, from a
teacher mapping (B, L) token ids to (B, L, C) logits (the `sequences` kind of `rows.RowKind`;
see format/sequence.py).

Blocks are taken in fixed windows of consecutive rows; the sequences that touch a window are
sorted by length and batched, so padding stays small, and a window holding a pending block is
computed whole, so a resumed run batches every sequence as an uninterrupted run did. Top-k,
log-sum-exp and sampled classes are computed on the teacher's device: only (B, L, k) values come
to the host, never (B, L, V).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softlabels.compute.record import dataset_probe, versions
from softlabels.compute.rows import Batch, Feed, Prepared, Unit, as_stored
from softlabels.compute.token_checks import (
    check_fits_teacher,
    check_labels,
    check_something_to_distil,
)
from softlabels.errors import OptionError, SoftlabelsError, TeacherOutputError
from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.sequence import (
    SEQ_MASK,
    SEQ_POSITION,
    SEQ_TOKENS,
    SequenceSetWriter,
    row_sequences,
)
from softlabels.format.targets import TeacherOutputs
from softlabels.format.writer import BlockWriter, TransferSetWriter
from softlabels.options import PrecomputeOptions
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import Teacher
from softlabels.tempering import combine_logits, ensemble_probs, tempered_softmax

log = logging.getLogger(__name__)

# A window: up to WINDOW_BLOCKS consecutive blocks (and WINDOW_ROWS rows) whose sequences are
# sorted by length and batched together; a kill loses at most one window's work.
WINDOW_BLOCKS, WINDOW_ROWS = 16, 1 << 16
_REFUSED = {"keep_members": False, "store_inputs": False, "views": 0, "augment": None,
            "num_workers": 0}


class PositionRows:
    """The `sequences` kind (rows.RowKind): one row per position of token sequences."""

    unit = "token"

    def prepare(self, data: str | TokenSequences, teachers: Sequence[str | nn.Module],
                opts: PrecomputeOptions) -> Prepared:
        """Token data and its teacher, checked against each other before anything is written
        (token_checks.py). A sequence set stores its tokens and one row per position, so views,
        inputs, member logits and DataLoader workers are refused."""
        for name, value in _REFUSED.items():
            if getattr(opts, name) not in (value, None):
                raise OptionError(f"{name.replace('_', '-')} does not apply to token sequences "
                                  "(a sequence set stores its tokens and one row per position)")
        dataset = load_data(data) if isinstance(data, str) else data
        if not isinstance(dataset, TokenSequences):
            raise SoftlabelsError(f"{data!r} is not token sequences; use a tokens:PATH or "
                                  "text:PATH DATA spec")
        check_something_to_distil(dataset)
        teacher = Teacher(teachers, device=opts.device, precision=opts.precision,
                          combine=opts.combine, trust_code=opts.trust_code,
                          max_bytes=opts.max_teacher_bytes)
        teacher.refuse_untrained(opts.random_teacher)
        check_fits_teacher(dataset, teacher)  # before the first batch, and before any writing
        num_classes = _num_classes(teacher, dataset)
        check_labels(dataset, num_classes)
        layout = Layout(
            num_rows=int(dataset.offsets[-1]), num_classes=num_classes,
            temperatures=opts.temperatures, dtype=opts.dtype, probs_dtype=opts.probs_dtype,
            chunk_rows=opts.chunk_rows, shard_rows=opts.shard_rows, **opts.sparse_args(),
            num_sequences=len(dataset),
            topk_dtype=opts.dtype if opts.topk and not opts.nucleus else "float32")
        meta = {
            "num_examples": len(dataset), "class_names": [], "teacher": teacher.describe(),
            "dataset": {"spec": data if isinstance(data, str) else "object:TokenSequences",
                        "length": len(dataset), "probe": dataset_probe(dataset),
                        # a text: source's tokenizer and windows
                        **getattr(dataset, "provenance", {})},
            "views": None, "augment": None, "view_seed": None,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "device": str(teacher.device), "precision": opts.precision,
        }
        return dataset, teacher, layout, meta

    def open_writer(self, out: str | Path, dataset: TokenSequences, layout: Layout,
                    meta: dict[str, Any], *, overwrite: bool) -> TransferSetWriter:
        """The writer that creates or resumes the sequence set of `dataset` at `out`."""
        labels = "next-token" if dataset.labels is None else "data"
        return SequenceSetWriter(out, layout, meta, offsets=dataset.offsets, labels=labels,
                                 overwrite=overwrite, row_hashes=_row_hashes(dataset))

    def units(self, layout: Layout, pending: Sequence[int], *, split: bool) -> list[Unit]:
        """The windows that hold pending blocks (`windows`), split or not."""
        return [Unit(blocks, window)
                for window, blocks in windows(layout, list(pending), WINDOW_ROWS)]

    def batches(self, dataset: TokenSequences, layout: Layout, unit: Unit,
                feed: Feed) -> Iterator[Batch]:
        """The window's sequences sorted by length (longest first), `batch_size` at a time,
        right-padded (B, L) ids."""
        offsets = dataset.offsets
        start, stop = window_range(layout, unit)
        first, last = window_sequences(offsets, start, stop)
        seqs = np.arange(first, last + 1)
        seqs = seqs[np.argsort(-dataset.lengths[seqs], kind="stable")]  # batches by length
        pending = np.zeros(stop - start, dtype=bool)  # rows of the window still to write
        for b in unit.blocks:
            a, z = layout.block_range(b)
            pending[a - start:z - start] = True
        for i in range(0, len(seqs), feed.batch_size):
            batch = [int(s) for s in seqs[i:i + feed.batch_size]]
            lengths = dataset.lengths[batch]
            _, dst = _placed(offsets, batch, lengths, start, stop)
            yield Batch(inputs=pad([dataset[s] for s in batch]), rows=(batch, lengths),
                        count=int(pending[dst].sum()))

    def forward(self, teacher: Teacher, batch: Batch) -> torch.Tensor:
        return teacher.member_logits(batch.inputs)  # (M, B, L, V)

    def targets(self, teacher: Teacher, layout: Layout, batch: Batch,
                member_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        seqs, lengths = batch.rows
        return device_targets(teacher, member_logits, lengths, layout, seqs)

    def assembler(self, writer: TransferSetWriter | BlockWriter, dataset: TokenSequences,
                  unit: Unit) -> _WindowAssembler:
        return _WindowAssembler(writer, dataset, unit)


def _row_hashes(dataset: TokenSequences) -> Callable[[int, int], np.ndarray]:
    """Rows [start, stop)'s sample hashes from the current data (each row carries its whole
    sequence's hash): what a resume checks the earlier run's rows against."""
    seq = row_sequences(dataset.offsets)

    def hashes(start: int, stop: int) -> np.ndarray:
        seqs, where = np.unique(seq[start:stop], return_inverse=True)
        return np.array([S.sample_hash(dataset[int(s)].numpy()) for s in seqs],
                        dtype=np.uint64)[where]

    return hashes


def _num_classes(teacher: Teacher, dataset: TokenSequences) -> int:
    try:
        z = teacher.member_logits(dataset[0][None, :8])
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise TeacherOutputError(f"the teacher failed on (1, L) int64 token ids "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0]}); a "
                                 "sequence teacher maps (B, L) token ids to (B, L, C) logits"
                                 ) from None
    if z.dim() != 4 or z.shape[2] != min(8, len(dataset[0])):
        raise TeacherOutputError(f"a sequence teacher maps (B, L) token ids to (B, L, C) "
                                 f"logits; this one returned {tuple(z.shape[1:])} for (1, "
                                 f"{min(8, len(dataset[0]))}) ids")
    return int(z.shape[-1])


def windows(layout: Layout, pending: list[int], window_rows: int,
             ) -> list[tuple[list[int], list[int]]]:
    """The windows that hold pending blocks, each as (all its blocks, its pending blocks).

    Windows are fixed runs of consecutive blocks counted from block 0 (at most WINDOW_BLOCKS
    blocks and `window_rows` rows, at least one block), the same on every run: a sequence is
    always batched with the same sequences, so a resumed run computes bit for bit what an
    uninterrupted one would (padding to another batch's length changes the float rounding)."""
    per = max(1, min(WINDOW_BLOCKS, window_rows // layout.block_rows))
    todo: dict[int, list[int]] = {}
    for b in pending:
        todo.setdefault(b // per, []).append(b)
    return [(list(range(w * per, min((w + 1) * per, layout.num_blocks))), blocks)
            for w, blocks in sorted(todo.items())]


def pad(seqs: list[torch.Tensor], value: int = 0) -> torch.Tensor:
    """(B, max L) right-padded with `value`."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


@torch.inference_mode()
def device_targets(teacher: Teacher, z: torch.Tensor, lengths: np.ndarray,
                   layout: Layout, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
    """The target arrays of one padded batch from the teacher's member logits `z` (M, B, L, V),
    computed on its device; (B, L, ...) (or (K, B, L, ...) for probs and sampled classes)."""
    logits = combine_logits(z, teacher.combine)  # (B, L, V)
    valid = torch.arange(z.shape[2], device=z.device)[None] < \
        torch.as_tensor(lengths, device=z.device)[:, None]
    # a row is finite iff its largest and smallest logits are (NaN propagates through both):
    # two reading passes over (B, L, V), no (B, L, V) temporaries
    bad = valid & ~(torch.isfinite(logits.amax(-1)) & torch.isfinite(logits.amin(-1)))
    if bad.any():
        b, pos = (int(v) for v in bad.nonzero()[0])
        raise TeacherOutputError(f"the teacher's output has NaN or inf at position {pos} of "
                                 f"sequence {seeds[b]}; check that model and that input")
    b, n, v = logits.shape
    flat, temps = logits.reshape(b * n, v), layout.temperatures

    def uniforms(leading: tuple[int, ...], per_row: int) -> torch.Tensor:
        """Sequence s's uniforms are `torch.rand(*leading, L_s, per_row)` from a CPU generator
        seeded by s, so any batching, window, resume or device draws the same."""
        u = torch.zeros(*leading, b, n, per_row)
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            u[..., i, :lengths[i], :] = torch.rand(*leading, int(lengths[i]), per_row,
                                                   generator=g)
        return u.reshape(*leading, b * n, per_row)

    encoded = layout.target.encode(TeacherOutputs(
        flat, lambda: ensemble_probs(z, temps, teacher.combine).reshape(len(temps), b * n, v),
        lambda j: tempered_softmax(flat, temps[j])), temps, uniforms)
    return {name: a.reshape(*a.shape[:S.row_axis(name)], b, n, *a.shape[S.row_axis(name) + 1:])
            for name, a in as_stored(layout, encoded).items()}  # (B, L, ...) or (K, B, L, ...)


def _sequence_columns(dataset: TokenSequences, s: int, num_classes: int) -> dict[str, Any]:
    tokens = dataset[s].numpy()
    labels = dataset.sequence_labels(s, num_classes)
    if len(labels) and (labels.min() < -1 or labels.max() >= num_classes):
        raise SoftlabelsError(f"sequence {s} has labels outside [-1, {num_classes}); the "
                              "teacher predicts that many classes")
    return {S.LABELS: labels, S.INDEX: np.full(len(tokens), s, np.int64),
            S.SAMPLE_HASH: np.full(len(tokens), S.sample_hash(tokens), np.uint64),
            SEQ_POSITION: np.arange(len(tokens), dtype=np.int32),
            SEQ_TOKENS: tokens.astype(np.int32), SEQ_MASK: dataset.sequence_mask(s)}


class _WindowAssembler:
    """The host side of one window: the rows' own columns, filled when it is made (before the
    window's first batch, so a bad label stops the run before the teacher runs), and each
    batch's targets scattered into the window's buffers on the writer thread; the pending
    blocks are written once every batch is in. While one window is written the next is filled:
    at most two windows' buffers are held."""

    def __init__(self, writer: TransferSetWriter | BlockWriter, dataset: TokenSequences,
                 unit: Unit) -> None:
        self.writer, self.dataset, self.blocks = writer, dataset, unit.blocks
        self.lay = layout = writer.layout
        self.start, self.stop = window_range(layout, unit)
        self.buffers = {}
        for name, (shape, dtype) in layout.arrays().items():
            s = list(shape)
            s[S.row_axis(name)] = self.stop - self.start
            self.buffers[name] = np.empty(s, dtype=dtype)
        first, last = window_sequences(dataset.offsets, self.start, self.stop)
        for seq in range(first, last + 1):  # the data's columns, sequence by sequence
            o0, o1 = int(dataset.offsets[seq]), int(dataset.offsets[seq + 1])
            a, b = max(self.start, o0), min(self.stop, o1)
            for name, col in _sequence_columns(dataset, seq, layout.num_classes).items():
                self.buffers[name][a - self.start:b - self.start] = col[a - o0:b - o0]

    def add(self, batch: Batch, host: dict[str, torch.Tensor]) -> None:
        """A batch of whole sequences, (B, L, ...) targets: the positions inside the window."""
        seqs, lengths = batch.rows
        inside, dst = _placed(self.dataset.offsets, seqs, lengths, self.start, self.stop)
        for name, t in host.items():
            arr = t.numpy()
            if S.row_axis(name):
                self.buffers[name][:, dst] = arr[:, inside]
            else:
                self.buffers[name][dst] = arr[inside]

    def finish(self) -> None:
        for b in self.blocks:
            a, z = self.lay.block_range(b)
            self.writer.write_block(b, {name: (buf[:, a - self.start:z - self.start]
                                               if S.row_axis(name)
                                               else buf[a - self.start:z - self.start])
                                        for name, buf in self.buffers.items()})


def window_range(layout: Layout, unit: Unit) -> tuple[int, int]:
    """The rows [start, stop) of a unit's window."""
    return layout.block_range(unit.window[0])[0], layout.block_range(unit.window[-1])[1]


def window_sequences(offsets: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """The first and last sequence with a position in rows [start, stop)."""
    return (int(np.searchsorted(offsets, start, "right")) - 1,
            int(np.searchsorted(offsets, stop - 1, "right")) - 1)


def _placed(offsets: np.ndarray, seqs: list[int], lengths: np.ndarray, start: int,
            stop: int) -> tuple[np.ndarray, np.ndarray]:
    """((B, L) mask of a padded batch's positions that lie in rows [start, stop), their rows
    counted from `start`)."""
    row = offsets[seqs][:, None] + np.arange(int(lengths.max()))[None] - start
    inside = (row >= 0) & (row < stop - start) & (np.arange(row.shape[1]) < lengths[:, None])
    return inside, row[inside]
