"""Stage one: run the teacher once over a dataset and write its soft targets (docs/FORMAT.md).

One loop for every kind of row: the main thread walks the pending blocks in units, feeds their
batches through the teacher and copies the stored targets to the host; a writer thread hands
each batch to its unit's assembler, which checks, hashes and gathers rows into whole blocks and
writes them, so storage overlaps compute (a CPU teacher's targets are made there too, so that
its thread runs only forward passes). What differs by kind is a `rows.RowKind`, chosen once
from `KINDS` by the DATA's kind (`sources.tokens.data_kind`) or the set's (`Layout.kind`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from softlabels.compute.examples import ExampleRows
from softlabels.compute.positions import PositionRows
from softlabels.compute.record import PrecomputeResult, as_options
from softlabels.compute.rows import Assembler, Batch, Feed, Prepared, RowKind, Unit, rows_of
from softlabels.errors import OptionError
from softlabels.format.layout import Layout
from softlabels.format.lease import refuse_if_busy
from softlabels.format.writer import BlockWriter, TransferSetWriter
from softlabels.options import PrecomputeOptions, check_output_file
from softlabels.progress import Progress
from softlabels.sources.tokens import data_kind
from softlabels.teachers.ensemble import Teacher

log = logging.getLogger(__name__)

KINDS: dict[str, RowKind] = {"examples": ExampleRows(), "sequences": PositionRows()}


def precompute(
    data: str | Dataset,
    teachers: Sequence[str | nn.Module],
    out: str | Path,
    options: PrecomputeOptions | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    **kwargs: Any,
) -> PrecomputeResult:
    """Run `teachers` (one, or an ensemble) over `data` once and write a transfer set to `out`:
    one row per example (or view), or, for token DATA (`tokens:`, `text:`), one row per
    token position of a sequence set.

    Options come as a `PrecomputeOptions`, or as its fields by keyword (temperatures,
    batch_size, dtype, probs_dtype, combine, keep_members, store_inputs, topk, sample_k, views,
    augment, view_seed, chunk_rows, shard_rows, device, precision, num_workers, trust_code);
    `batch_size` counts sequences for token DATA. Rerunning the same call after an interruption
    resumes: only blocks not marked done are recomputed. A set made from another teacher or
    dataset is refused unless `overwrite`.
    """
    t0 = time.perf_counter()
    opts = as_options(options, kwargs)
    check_output_file(out, directory_ok=True)  # before loading data and teacher
    refuse_if_busy(out)  # before loading anything; the writer takes the lease itself
    kind = KINDS[data_kind(data)]
    dataset, teacher, layout, meta = kind.prepare(data, teachers, opts)
    with kind.open_writer(out, dataset, layout, meta, overwrite=overwrite) as writer:
        layout = writer.layout  # a sequence set's carries its offsets' hash
        pending = list(writer.pending)
        todo = len(rows_of(layout, pending))
        done = layout.num_rows - todo
        if progress:
            progress(done, layout.num_rows)
        if pending:
            feed = Feed(opts.batch_size, opts.num_workers, opts.decode_device,
                        pin_memory=teacher.device.type == "cuda")
            run_blocks(kind, teacher, dataset, writer, kind.units(layout, pending, split=False),
                       feed, lambda n: progress(done + n, layout.num_rows) if progress else None,
                       spare_core=spare_core(opts.num_workers))
    return PrecomputeResult(path=Path(out), num_rows=layout.num_rows, rows_computed=todo,
                            resumed=writer.resumed, already_complete=writer.already_complete,
                            seconds=time.perf_counter() - t0, meta=writer.meta)


def prepare(data: str | Dataset, teachers: Sequence[str | nn.Module], opts: PrecomputeOptions,
            ) -> Prepared:
    """Load data and teacher, check they fit each other, and lay out the set: all but the
    writing (also what a Dask run does on the driver, cluster.py). `opts` were checked when
    made. Returns (the rows' dataset, the teacher, the layout, the metadata)."""
    return KINDS[data_kind(data)].prepare(data, teachers, opts)


def run_blocks(kind: RowKind, teacher: Teacher, dataset: Dataset,
               writer: TransferSetWriter | BlockWriter, units: Sequence[Unit], feed: Feed,
               report: Callable[[int], None], *, spare_core: bool = False) -> None:
    """Compute and write the pending blocks of `units`; `report(rows done so far)` after each
    batch. Each batch runs through the teacher here; its targets, copied to the host without
    waiting, go to its unit's assembler on the writer thread (or inline, `writer_thread`).
    A CPU teacher's targets (tempering, storage dtypes, top-k: CPU work like the teacher's) are
    made on the writer thread, beside the next batch's forward pass."""
    cuda = teacher.device.type == "cuda"
    layout = writer.layout
    errors: list[BaseException] = []
    # On a GPU a writer thread overlaps storage with compute, and so it does on the CPU where
    # the teacher leaves a core free (`spare_core`). Where torch's threads take every core, a
    # thread only preempts them (measured: 0.89 of bare speed with a thread, see
    # benchmarks/README.md), so there the same work runs inline between batches.
    threaded = writer_thread(cuda, spare_core)
    targets_on_writer = threaded and teacher.device.type == "cpu"
    q: Any = queue.Queue(maxsize=WRITER_QUEUE) if threaded else _Inline(errors)
    thread = threading.Thread(target=_writer_loop, args=(q, errors), name="softlabels-writer",
                              daemon=True)
    if threaded:
        thread.start()
    done = 0
    try:
        for unit in units:
            if errors:
                break
            assembler = kind.assembler(writer, dataset, unit)
            for batch in kind.batches(dataset, layout, unit, feed):
                if errors:
                    break
                # queued for the thread, a batch owns its memory: a CPU teacher's own output
                # tensor is copied where it is made (Teacher.member_logits), not every array
                member_logits = kind.forward(teacher, batch)
                if targets_on_writer:
                    q.put((None, _targets_then_add,
                           (kind, teacher, layout, batch, member_logits, assembler)))
                else:
                    outputs = kind.targets(teacher, layout, batch, member_logits)
                    host = {name: t.to("cpu", non_blocking=cuda) for name, t in outputs.items()}
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record()
                    q.put((event, assembler.add, (batch, host)))
                done += batch.count
                report(done)
            q.put((None, assembler.finish, ()))
    finally:
        q.put(None)
        if threaded:
            thread.join()
    if errors:
        raise errors[0]


def _targets_then_add(kind: RowKind, teacher: Teacher, layout: Layout, batch: Batch,
                      member_logits: torch.Tensor, assembler: Assembler) -> None:
    """A CPU teacher's batch on the writer thread: its targets, then its unit's assembler."""
    assembler.add(batch, kind.targets(teacher, layout, batch, member_logits))


WRITER_QUEUE = 4  # batches the teacher may run ahead of the writer thread
Work = tuple[Any, Callable[..., None], tuple[Any, ...]]  # (CUDA event or None, call, its args)


def _consume(item: Work, errors: list[BaseException]) -> None:
    """Hand one batch to its assembler (or finish a unit), once its device-to-host copy is
    done; keep the first failure, which the producer re-raises after its loop."""
    if errors:
        return  # after a failure, drain without writing so the producer never blocks
    event, call, args = item
    try:
        if event is not None:
            event.synchronize()
        call(*args)
    except BaseException as exc:
        errors.append(exc)


def _writer_loop(q: queue.Queue, errors: list[BaseException]) -> None:
    while (item := q.get()) is not None:
        _consume(item, errors)


def writer_thread(cuda: bool, spare_core: bool = False) -> bool:
    """Whether block writes run on a writer thread: by default on a GPU, or on the CPU where a
    core is left to it (`spare_core`); or as the environment variable SOFTLABELS_WRITER_THREAD
    says (1 or 0)."""
    value = os.environ.get("SOFTLABELS_WRITER_THREAD", "").strip()
    if value not in ("", "0", "1"):
        raise OptionError(f"SOFTLABELS_WRITER_THREAD must be 1 or 0, found {value!r}")
    return (cuda or spare_core) if not value else value == "1"


def spare_core(num_workers: int) -> bool:
    """Whether torch's threads and `num_workers` loader processes leave one of the cores this
    process may run on free, for a writer thread (2 cores, one torch thread, a teacher at the
    issue's rates: 0.66 of the teacher alone with the thread, 0.39 inline; benchmarks/README.md).
    Only a run that has the host to itself asks; a cluster's workers share its cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() + num_workers < cores


class _Inline:
    """The writer queue's stand-in on the CPU: each batch is written as it is put."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors

    def put(self, item: Work | None) -> None:
        if item is not None:
            _consume(item, self.errors)

