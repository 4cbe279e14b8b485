"""Stage one for sequences: run a teacher mapping (B, L) token ids to (B, L, C) logits over
token sequences once, and write one row per position (see format/sequence.py).

Blocks are taken in fixed windows of consecutive rows; the sequences that touch a window are
sorted by length and batched, so padding stays small, and a window holding a pending block is
computed whole, so a resumed run batches every sequence as an uninterrupted run did. Top-k,
log-sum-exp and sampled classes are computed on the teacher's device: only (B, L, k) values come
to the host, never (B, L, V).
Resume, checksums and `verify --teacher` work as for example sets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softlabels.compute.record import PrecomputeResult, as_options, dataset_probe, versions
from softlabels.compute.sequence_checks import (
    check_fits_teacher,
    check_labels,
    check_something_to_distil,
)
from softlabels.errors import OptionError, SoftlabelsError, TeacherOutputError
from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.lease import refuse_if_busy
from softlabels.format.sequence import (
    SEQ_MASK,
    SEQ_POSITION,
    SEQ_TOKENS,
    SequenceSetWriter,
    row_sequences,
)
from softlabels.format.writer import BlockWriter
from softlabels.options import PrecomputeOptions, check_output_file
from softlabels.progress import Progress
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import Teacher
from softlabels.tempering import combine_logits, ensemble_probs

log = logging.getLogger(__name__)

# A window: up to WINDOW_BLOCKS consecutive blocks (and WINDOW_ROWS rows) whose sequences are
# sorted by length and batched together; a kill loses at most one window's work.
WINDOW_BLOCKS, WINDOW_ROWS = 16, 1 << 16
_REFUSED = {"keep_members": False, "store_inputs": False, "views": 0, "augment": None,
            "num_workers": 0}


def precompute_sequences(
    data: str | TokenSequences,
    teachers: Sequence[str | nn.Module],
    out: str | Path,
    options: PrecomputeOptions | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    window_rows: int = WINDOW_ROWS,
    **kwargs: Any,
) -> PrecomputeResult:
    """Run `teachers` over token sequences and write a sequence set to `out`.

    Options as for `precompute` (a `PrecomputeOptions` or its fields by keyword); `batch_size`
    counts sequences. `dtype` is the storage dtype of the logits: dense `logits`, or
    `topk/logits` (stored shifted by each row's largest logit). A rerun resumes.
    """
    t0 = time.perf_counter()
    opts = as_options(options, kwargs)
    check_output_file(out, directory_ok=True)  # before loading data and teacher
    refuse_if_busy(out)
    dataset, teacher, layout, meta = prepare_sequences(data, teachers, opts)
    with sequence_writer(out, dataset, layout, meta, overwrite=overwrite) as writer:
        pending = list(writer.pending)
        todo = sum(np.subtract(*layout.block_range(b)[::-1]) for b in pending)
        done = layout.num_rows - todo
        if progress:
            progress(done, layout.num_rows)
        for window, blocks in windows(layout, pending, window_rows):
            done += write_window(teacher, dataset, writer, window, blocks, opts.batch_size)
            if progress:
                progress(done, layout.num_rows)
    return PrecomputeResult(path=Path(out), num_rows=layout.num_rows, rows_computed=int(todo),
                            resumed=writer.resumed, already_complete=writer.already_complete,
                            seconds=time.perf_counter() - t0, meta=writer.meta)


def prepare_sequences(data: str | TokenSequences, teachers: Sequence[str | nn.Module],
                      opts: PrecomputeOptions,
                      ) -> tuple[TokenSequences, Teacher, Layout, dict[str, Any]]:
    """Load token data and teacher, check they fit, and lay out the sequence set: all but the
    writing (also what a Dask run does on the driver, cluster.py)."""
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
                    **getattr(dataset, "provenance", {})},  # a text: source's tokenizer, windows
        "views": None, "augment": None, "view_seed": None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "device": str(teacher.device), "precision": opts.precision,
    }
    return dataset, teacher, layout, meta


def sequence_writer(out: str | Path, dataset: TokenSequences, layout: Layout,
                    meta: dict[str, Any], *, overwrite: bool = False) -> SequenceSetWriter:
    """The writer that creates or resumes the sequence set of `dataset` at `out`."""
    labels = "next-token" if dataset.labels is None else "data"
    return SequenceSetWriter(out, layout, meta, offsets=dataset.offsets, labels=labels,
                             overwrite=overwrite, row_hashes=_row_hashes(dataset))


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
def device_targets(teacher: Teacher, ids: torch.Tensor, lengths: np.ndarray,
                   layout: Layout, seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """The target arrays of one padded batch, computed on the teacher's device; (B, L, ...)
    (or (K, B, L, ...) for probs and sampled classes) on the host."""
    z = teacher.member_logits(ids)  # (M, B, L, V) on the device
    logits = combine_logits(z, teacher.combine)  # (B, L, V)
    valid = torch.arange(ids.shape[1], device=z.device)[None] < \
        torch.as_tensor(lengths, device=z.device)[:, None]
    top = torch.topk(logits, layout.topk, dim=-1) if layout.topk else None
    # a row is finite iff its largest and smallest logits are (NaN propagates through both):
    # two reading passes over (B, L, V), no (B, L, V) temporaries; top-k's first is the max
    high = top.values[..., 0] if top is not None else logits.amax(-1)
    bad = valid & ~(torch.isfinite(high) & torch.isfinite(logits.amin(-1)))
    if bad.any():
        b, pos = (int(v) for v in bad.nonzero()[0])
        raise TeacherOutputError(f"the teacher's output has NaN or inf at position {pos} of "
                                 f"sequence {seeds[b]}; check that model and that input")
    temps = torch.tensor(layout.temperatures, device=z.device)
    if top is not None:
        lse = torch.stack([torch.logsumexp(logits if t == 1 else logits / t, -1)
                           for t in layout.temperatures], -1)  # z / 1 == z: one pass less
        shift = top.values[..., :1]  # the row's largest logit: the stored largest is 0
        # classes in ascending id order: sorted ids compress 3-10x better (sequence_storage.py)
        classes, order = top.indices.sort(-1)
        values = (top.values - shift).gather(-1, order)
        return {S.TOPK_INDICES: classes.int().cpu().numpy(),
                S.TOPK_LOGITS: values.to(getattr(torch, layout.topk_dtype)).cpu().numpy(),
                S.TOPK_LOGSUMEXP: (lse - shift / temps).cpu().numpy()}
    if layout.sample_k:
        return {S.SAMPLE_INDICES: _sample(logits, lengths, layout, seeds).numpy()}
    if layout.hybrid:
        return _hybrid(logits, lengths, layout, seeds)
    probs = ensemble_probs(z, layout.temperatures, teacher.combine)  # (K, B, L, C)
    return {S.LOGITS: logits.cpu().numpy(), S.PROBS: probs.cpu().numpy()}


def _sample(logits: torch.Tensor, lengths: np.ndarray, layout: Layout,
            seeds: Sequence[int]) -> torch.Tensor:
    """(K, B, L, k) int32 classes drawn from p_T by inverse CDF, on the logits' device.

    The uniforms come from a CPU generator seeded by the sequence's number, so any batching,
    window, resume or device draws the same classes (to float32 resolution of the CDF)."""
    b, n, k = logits.shape[0], logits.shape[1], layout.sample_k
    u = torch.zeros(len(layout.temperatures), b, n, k)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        u[:, i, :lengths[i]] = torch.rand(len(layout.temperatures), int(lengths[i]), k,
                                          generator=g)
    u = u.to(logits.device)
    draws = []
    for j, t in enumerate(layout.temperatures):  # one (B, L, V) CDF at a time
        cdf = torch.softmax(logits / t, -1).cumsum(-1)
        idx = torch.searchsorted(cdf, u[j] * cdf[..., -1:], right=True)
        draws.append(idx.clamp_max(logits.shape[-1] - 1).sort(-1).values.int().cpu())
    return torch.stack(draws)


def _hybrid(logits: torch.Tensor, lengths: np.ndarray, layout: Layout,
            seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """The hybrid arrays (B, L, ...) of a padded batch; the tail's uniforms of sequence s are
    `torch.rand(L_s, M)` from a CPU generator seeded by s (any batching draws the same)."""
    b, n = logits.shape[:2]
    u = torch.zeros(b, n, layout.hybrid.tail)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        u[i, :lengths[i]] = torch.rand(int(lengths[i]), layout.hybrid.tail, generator=g)
    out = layout.hybrid.encode(logits.reshape(b * n, -1), layout.temperatures,
                               u.reshape(b * n, -1))
    return {name: a.reshape(b, n, *a.shape[1:]) for name, a in out.items()}


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


def write_window(teacher: Teacher, dataset: TokenSequences,
                 writer: SequenceSetWriter | BlockWriter, window: list[int], blocks: list[int],
                 batch_size: int) -> int:
    """Compute a window of consecutive blocks and write its pending `blocks`; returns the rows
    written."""
    layout, offsets = writer.layout, dataset.offsets
    start, stop = layout.block_range(window[0])[0], layout.block_range(window[-1])[1]
    first = int(np.searchsorted(offsets, start, "right")) - 1
    last = int(np.searchsorted(offsets, stop - 1, "right")) - 1
    seqs = np.arange(first, last + 1)
    seqs = seqs[np.argsort(-dataset.lengths[seqs], kind="stable")]  # batches by length
    buffers = {}
    for name, (shape, dtype) in layout.arrays().items():
        s = list(shape)
        s[S.row_axis(name)] = stop - start
        buffers[name] = np.empty(s, dtype=dtype)
    for seq in range(first, last + 1):  # the data's columns, sequence by sequence
        o0, o1 = int(offsets[seq]), int(offsets[seq + 1])
        dst = slice(max(start, o0) - start, min(stop, o1) - start)
        for name, col in _sequence_columns(dataset, seq, layout.num_classes).items():
            buffers[name][dst] = col[max(start, o0) - o0:min(stop, o1) - o0]
    for i in range(0, len(seqs), batch_size):
        batch = [int(s) for s in seqs[i:i + batch_size]]
        lengths = dataset.lengths[batch]
        targets = device_targets(teacher, pad([dataset[s] for s in batch]), lengths, layout,
                                 batch)
        # (B, L) positions of the batch that lie in the window, and their rows in it
        row = offsets[batch][:, None] + np.arange(int(lengths.max()))[None] - start
        inside = (row >= 0) & (row < stop - start) & (np.arange(row.shape[1]) < lengths[:, None])
        dst = row[inside]
        for name, arr in targets.items():
            if S.row_axis(name):
                buffers[name][:, dst] = arr[:, inside]
            else:
                buffers[name][dst] = arr[inside]
    for b in blocks:
        a, z = layout.block_range(b)
        writer.write_block(b, {name: (buf[:, a - start:z - start] if S.row_axis(name)
                                      else buf[a - start:z - start])
                               for name, buf in buffers.items()})
    return sum(layout.block_range(b)[1] - layout.block_range(b)[0] for b in blocks)
