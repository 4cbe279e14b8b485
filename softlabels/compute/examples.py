"""Stage one's rows of examples: one row per example of the DATA, or per augmented view of it
(the `examples` kind of `rows.RowKind`, docs/FORMAT.md).

Batches never cross a block and are fetched by a DataLoader; the teacher's outputs become the
stored targets on its device (`device_outputs`); on the host each batch's rows are checked,
hashed and gathered into whole blocks (`_BlockAssembler`).
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
from torch.utils.data import DataLoader, Dataset

from softlabels.compute.fetch import RowBatches, as_is
from softlabels.compute.record import dataset_probe, versions
from softlabels.compute.rows import Batch, Feed, Prepared, Unit, as_stored, rows_of
from softlabels.compute.teacher_inputs import teacher_inputs
from softlabels.compute.views import ViewDataset
from softlabels.errors import DataError, OptionError, SoftlabelsError, TeacherOutputError
from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.targets import TeacherOutputs
from softlabels.format.writer import BlockWriter, TransferSetWriter
from softlabels.options import PrecomputeOptions
from softlabels.preprocessing import Preprocess
from softlabels.sources.arrays import check_labels, class_names, example_hash, split_item
from softlabels.sources.images import decode_batch, keep_decodable, model_inputs
from softlabels.sources.load import load_data
from softlabels.teachers.ensemble import Teacher

log = logging.getLogger(__name__)

PEAK, MEMBER_PEAK = "peak", "member_peak"  # device outputs the writer checks, never stored
INPUT = "teacher_input"  # the batch as the teacher read it (decoded): hashed, or stored
HOST_LOGITS, HOST_PROBS = "host_logits", "host_probs"  # float32, for codecs run on the host


class ExampleRows:
    """The `examples` kind (rows.RowKind): one row per example, or per view of it."""

    unit = "row"

    def prepare(self, data: str | Dataset, teachers: Sequence[str | nn.Module],
                opts: PrecomputeOptions) -> Prepared:
        """Examples and their teacher, checked against each other (labels, class count). With
        `views`, the returned dataset yields view rows (see `views.ViewDataset`)."""
        dataset = load_data(data) if isinstance(data, str) else data
        if len(dataset) == 0:
            raise DataError("the dataset is empty; check the DATA spec")
        full = dataset
        if opts.skip_bad_images:  # a decoding pass first: the rows are fixed before the layout
            dataset = keep_decodable(dataset, opts.num_workers)
        teacher = Teacher(teachers, device=opts.device, precision=opts.precision,
                          combine=opts.combine, trust_code=opts.trust_code,
                          max_bytes=opts.max_teacher_bytes)
        teacher.refuse_untrained(opts.random_teacher)
        names = class_names(dataset) or teacher.class_names()
        dataset, applied = teacher_inputs(dataset, teacher.preprocess())
        dataset = model_inputs(dataset)  # raw images no preprocessing took: scaled to [0, 1]
        x0, _ = split_item(dataset[0])
        num_classes = teacher.num_classes(x0)
        _check_known_labels(dataset, num_classes)
        views = opts.views
        rows_data = ViewDataset(dataset, views, opts.augment, opts.view_seed) if views else dataset
        layout = Layout(num_rows=len(rows_data), num_classes=num_classes,
                        temperatures=opts.temperatures, dtype=opts.dtype,
                        probs_dtype=opts.probs_dtype,
                        num_members=len(teacher.members) if opts.keep_members else 0,
                        chunk_rows=opts.chunk_rows, shard_rows=opts.shard_rows,
                        input_shape=tuple(x0.shape) if opts.store_inputs else None,
                        input_dtype=str(x0.numpy().dtype), **opts.sparse_args(),
                        views=views)
        meta = {
            "num_examples": len(full),
            "class_names": names,
            "teacher": teacher.describe(applied),
            "dataset": {"spec": data if isinstance(data, str) else f"object:{type(data).__name__}",
                        "length": len(full), "probe": dataset_probe(dataset),
                        **({"skipped": dataset.skipped} if opts.skip_bad_images else {})},
            "views": views or None, "augment": opts.augment,
            "view_seed": opts.view_seed if views else None,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "device": str(teacher.device) + (f" ({torch.cuda.get_device_name(teacher.device)})"
                                             if teacher.device.type == "cuda" else ""),
            "precision": opts.precision,
        }
        return rows_data, teacher, layout, meta

    def open_writer(self, out: str | Path, dataset: Dataset, layout: Layout,
                    meta: dict[str, Any], *, overwrite: bool) -> TransferSetWriter:
        return TransferSetWriter(out, layout, meta, overwrite=overwrite,
                                 row_hashes=row_hashes(dataset))

    def units(self, layout: Layout, pending: Sequence[int], *, split: bool) -> list[Unit]:
        """All pending blocks at once (one DataLoader), or one block per unit."""
        if split:
            return [Unit([b], [b]) for b in pending]
        return [Unit(list(pending), list(pending))] if len(pending) else []

    def batches(self, dataset: Dataset, layout: Layout, unit: Unit,
                feed: Feed) -> Iterator[Batch]:
        """`block_batches` of the unit, fetched by a DataLoader; with `decode_device` cuda,
        image sources hand over encoded bytes, decoded here on that device."""
        items, decode_on = _loader_items(dataset, feed.decode_device)
        loader = DataLoader(RowBatches(items, rows_of(layout, unit.blocks),
                                       block_batches(layout, unit.blocks, feed.batch_size),
                                       encoded=decode_on is not None),
                            batch_size=None, collate_fn=as_is, num_workers=feed.num_workers,
                            pin_memory=feed.pin_memory and decode_on is None)
        for x, y, *hashed in _worker_errors(loader):  # hashed rows: (hashes[, seeds])
            if decode_on is not None:  # encoded bytes: decode and preprocess on the device
                x = decode_batch(x, decode_on, _examples(dataset).preprocess or Preprocess())
            yield Batch(inputs=x, rows=(y, *hashed), count=len(x))

    def forward(self, teacher: Teacher, batch: Batch) -> torch.Tensor:
        return teacher.member_logits(batch.inputs)

    def targets(self, teacher: Teacher, layout: Layout, batch: Batch,
                member_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """`device_outputs`, and the batch's input as the teacher read it."""
        outputs = device_outputs(layout, *teacher.targets_of(member_logits, layout.temperatures))
        return outputs | {INPUT: batch.inputs}

    def assembler(self, writer: TransferSetWriter | BlockWriter, dataset: Dataset,
                  unit: Unit) -> _BlockAssembler:
        return _BlockAssembler(writer, rows_of(writer.layout, unit.blocks),
                               getattr(_examples(dataset), "kept", None))


@torch.inference_mode()
def device_outputs(layout: Layout, members: torch.Tensor, logits: torch.Tensor,
                   probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the writer needs of one batch, computed where the teacher ran, so that only what is
    stored crosses to the host: the rows' largest |logit| (B,) (NaN, inf and the storage
    dtype's range are checked from it) and the set's target arrays (`TargetKind.encode`) in
    their storage dtypes; where the codec draws (sampled, hybrid), the float32 logits (B, C)
    and probs (K, B, C) instead, encoded on the host with uniforms seeded by the batch."""
    out = {PEAK: _peak(logits, (1,))}  # NaN and inf show in the row's peak
    if members is not None and layout.num_members:
        out[MEMBER_PEAK] = _peak(members, (0, 2))
    if layout.target.needs_uniforms:  # drawn on the host, seeded by the batch's first row
        return out | {HOST_LOGITS: logits, HOST_PROBS: probs}
    encoded = layout.target.encode(TeacherOutputs(logits, lambda: probs, probs.__getitem__,
                                                  members), layout.temperatures, None)
    return out | as_stored(layout, encoded)


def _peak(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """|t|'s largest value over `dims`, as max(max t, -min t): two reading passes, no |t|
    temporary; NaN propagates through both."""
    return torch.maximum(t.amax(dim=dims), -t.amin(dim=dims))


class _BlockAssembler:
    """Writer-thread side: gathers batches into whole blocks and writes each once it is full."""

    def __init__(self, writer: TransferSetWriter | BlockWriter, rows: np.ndarray,
                 kept: np.ndarray | None = None) -> None:
        self.writer, self.rows, self.pos, self.kept = writer, rows, 0, kept
        self.lay = writer.layout
        self.buffers: dict[int, dict[str, np.ndarray]] = {}
        self.filled: dict[int, int] = {}

    def _buffer(self, block: int) -> dict[str, np.ndarray]:
        if block not in self.buffers:
            start, stop = self.lay.block_range(block)
            bufs = {}
            for name, (shape, dtype) in self.lay.arrays().items():
                s = list(shape)
                s[S.row_axis(name)] = stop - start
                bufs[name] = np.empty(s, dtype=dtype)
            self.buffers[block], self.filled[block] = bufs, 0
        return self.buffers[block]

    def _drawn(self, rows: np.ndarray, logits: torch.Tensor,
               probs: torch.Tensor) -> dict[str, np.ndarray]:
        """Targets whose codec draws (`TargetKind.needs_uniforms`), encoded on the host: the
        uniforms come from a CPU generator seeded by the batch's first row. Blocks are cut into
        the same batches on every run (block_batches), so a resumed or distributed run draws
        the same classes."""
        g = torch.Generator().manual_seed(int(rows[0]))

        def uniforms(leading: tuple[int, ...], per_row: int) -> torch.Tensor:
            return torch.rand(*leading, len(rows), per_row, generator=g)

        encoded = self.lay.target.encode(TeacherOutputs(logits, lambda: probs, probs.__getitem__),
                                         self.lay.temperatures, uniforms)
        return {name: t.numpy() for name, t in as_stored(self.lay, encoded).items()}

    def _check(self, rows: np.ndarray, index: np.ndarray, y: torch.Tensor,
               peak: torch.Tensor, member_peak: torch.Tensor | None) -> None:
        """Refuse rows no reader may be handed: NaN/inf logits, logits past the storage
        dtype's range (stored they would be inf, a set its own verify fails), bad labels.
        `peak`: each row's largest |logit| (B,); `member_peak`: the same over kept members."""
        bad = ~torch.isfinite(peak)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise TeacherOutputError(f"the teacher's output has NaN or inf at row {int(rows[i])}"
                                     f" (dataset index {index[i]}); check that model and that "
                                     "input")
        limit = float(np.finfo(self.lay.dtype).max)
        if member_peak is not None:
            peak = torch.maximum(peak, member_peak)
        if (peak > limit).any():
            i = int((peak > limit).nonzero()[0])
            raise TeacherOutputError(
                f"the teacher's logits reach {float(peak[i]):.6g} at row {int(rows[i])} (dataset"
                f" index {index[i]}), beyond {self.lay.dtype}'s largest value {limit:g}: stored "
                "they would be inf; rerun with --dtype float32")
        bad = (y < -1) | (y >= self.lay.num_classes)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataError(f"label {int(y[i])} of dataset example {index[i]} is outside the "
                            f"teacher's {self.lay.num_classes} classes; labels must lie in "
                            f"[0, {self.lay.num_classes}), or be -1 for unknown")

    def add(self, batch: Batch, host: dict[str, torch.Tensor]) -> None:
        """One batch of rows: its labels (and, for hashed sources and view rows, the
        un-augmented input's hashes and the views' seeds) and its `ExampleRows.targets` on the
        host."""
        self._add(host[INPUT], *batch.rows, outputs=host)

    def _add(self, x: torch.Tensor, y: torch.Tensor, hashes: np.ndarray | None = None,
             seeds: np.ndarray | None = None, *, outputs: dict[str, torch.Tensor]) -> None:
        rows = self.rows[self.pos:self.pos + len(x)]
        self.pos += len(x)
        index = rows // self.lay.views if self.lay.views else rows
        if self.kept is not None:  # bad images left out: row -> the dataset's own index
            index = self.kept[index]
        self._check(rows, index, y, outputs[PEAK], outputs.get(MEMBER_PEAK))
        xs = x.numpy()
        if hashes is None:
            hashes = S.sample_hashes(xs)  # per batch: no per-row numpy view
        columns = {S.LABELS: y.numpy(), S.INDEX: index, S.SAMPLE_HASH: hashes, S.INPUTS: xs,
                   S.VIEW_SEED: seeds, **{name: t.numpy() for name, t in outputs.items()
                                          if name != INPUT}}
        if HOST_LOGITS in outputs:
            columns |= self._drawn(rows, outputs[HOST_LOGITS], outputs[HOST_PROBS])
        self._place(rows, columns)

    def finish(self) -> None:
        """Nothing is held: batches never cross a block, and a block is written once full."""

    def _place(self, rows: np.ndarray, columns: dict[str, Any]) -> None:
        """Copy a batch's columns into its block's buffers (a batch of a whole block is written
        as it is), and write each block once full. A batch of consecutive rows in one block
        (what `block_batches` makes) is copied by slice; other batches row by row."""
        lay, first = self.lay, int(rows[0])
        block = first // lay.block_rows
        start, stop = lay.block_range(block)
        a, b = first - start, first - start + len(rows)
        if b > stop - start or int(rows[-1]) - first + 1 != len(rows):
            return self._scatter(rows, columns)
        if a == 0 and b == stop - start:
            self.writer.write_block(block, {name: columns[name] for name in lay.arrays()})
            return None
        bufs = self._buffer(block)
        for name, buf in bufs.items():
            if S.row_axis(name):
                buf[:, a:b] = columns[name]
            else:
                buf[a:b] = columns[name]
        self._filled(block, b - a)
        return None

    def _scatter(self, rows: np.ndarray, columns: dict[str, Any]) -> None:
        for block in np.unique(rows // self.lay.block_rows):
            start, _ = self.lay.block_range(int(block))
            mine = (rows // self.lay.block_rows) == block
            local = rows[mine] - start
            bufs = self._buffer(int(block))
            for name, buf in bufs.items():
                src = np.compress(mine, columns[name], axis=S.row_axis(name))
                if S.row_axis(name):
                    buf[:, local] = src
                else:
                    buf[local] = src
            self._filled(int(block), int(mine.sum()))

    def _filled(self, block: int, rows: int) -> None:
        self.filled[block] += rows
        start, stop = self.lay.block_range(block)
        if self.filled[block] == stop - start:
            self.writer.write_block(block, self.buffers.pop(block))
            del self.filled[block]


def row_hashes(rows_data: Dataset) -> Callable[[int, int], np.ndarray]:
    """The current data's sample hashes of rows [start, stop) (of the un-augmented example for
    view rows): what a resume checks the earlier run's rows against."""
    data, views = ((rows_data.data, rows_data.views) if isinstance(rows_data, ViewDataset)
                   else (rows_data, 1))

    def hashes(start: int, stop: int) -> np.ndarray:
        examples, where = np.unique(np.arange(start, stop) // views, return_inverse=True)
        return np.array([example_hash(data, int(i)) for i in examples],
                        dtype=np.uint64)[where]

    return hashes


def _check_known_labels(dataset: Dataset, num_classes: int) -> None:
    """Check all labels up front where the dataset holds them as one array (npz `y`,
    torchvision `targets`); other datasets are checked batch by batch as rows are written."""
    for name in ("y", "targets"):
        labels = getattr(dataset, name, None)
        if labels is not None and not isinstance(labels, str) and len(labels) == len(dataset):
            check_labels(np.asarray(labels), where="the dataset", num_classes=num_classes)
            return


def block_batches(layout: Layout, blocks: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches (positions in the concatenated rows of `blocks`) that never cross a block.

    Every block is cut into batches from its own first row, so a row always shares its batch
    with the same rows: resumed, single-process and distributed runs compute identical logits
    even where a kernel's result depends on the batch.
    """
    batches, offset = [], 0
    for b in blocks:
        start, stop = layout.block_range(b)
        n = stop - start
        batches += [list(range(offset + i, offset + min(i + batch_size, n)))
                    for i in range(0, n, batch_size)]
        offset += n
    return batches


def _examples(dataset: Dataset) -> Dataset:
    """The examples behind the rows (a view set's rows are views of them)."""
    return dataset.data if isinstance(dataset, ViewDataset) else dataset


def _loader_items(dataset: Dataset, decode_device: str) -> tuple[Dataset, str | None]:
    """What the DataLoader reads, and the device that decodes (None: the workers decode).
    A dataset with its own hashes (an image source) hands them over with each item, so the
    writer hashes no decoded tensor."""
    if decode_device != "cpu":
        if isinstance(dataset, ViewDataset) or not hasattr(dataset, "as_encoded"):
            raise OptionError("--decode-device cuda decodes image sources (imagefolder:, hfds:, "
                              "wds:) without --views; use --decode-device cpu here")
        return _Hashed(dataset.as_encoded()), decode_device
    return (_Hashed(dataset) if hasattr(dataset, "hashed_item") else dataset), None


class _Hashed(Dataset):
    """Items (input, label, sample hash) of a dataset that hashes its own examples."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.data.hashed_item(i)


def _worker_errors(loader: DataLoader) -> Any:
    """The loader's batches; a library error raised in a worker process is re-raised with its
    own one-line message (the DataLoader wraps it in the worker's traceback)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except SoftlabelsError as exc:
            text = str(exc)
            if "Original Traceback" not in text:
                raise
            line = [ln for ln in text.splitlines() if ln.strip()][-1]
            raise type(exc)(line.split(": ", 1)[-1]) from None
        yield batch
