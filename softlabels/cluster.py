"""Stage one on a Dask cluster (DESIGN §4): each task computes and writes whole blocks.

A block is one chunk along rows (one shard when sharded), so no two writers ever share a chunk
or shard file. Workers load the data and the teacher once per process (a cache keyed by the
specs, never pickled into the graph), tasks are retried and idempotent (a retry first erases
the block's earlier partial files), and only the driver writes metadata and completes the set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SoftlabelsError
from .format._store import backend_of
from .format.layout import Layout
from .format.lease import refuse_if_busy
from .format.writer import BlockWriter, TransferSetWriter
from .precompute import LAYOUT_DEFAULTS, PrecomputeResult, prepare, row_hashes, rows_of, run_blocks
from .progress import Progress
from .specs import load_data
from .teacher import Teacher
from .views import ViewDataset

log = logging.getLogger(__name__)

_CACHE: dict[tuple[Any, ...], tuple[Any, Teacher]] = {}  # per worker process


def _worker_state(data: str, teachers: tuple[str, ...], device: str, precision: str,
                  combine: str, views: tuple[int, str | None, int]) -> tuple[Any, Teacher]:
    key = (data, teachers, device, precision, combine, views)
    if key not in _CACHE:
        import torch

        torch.set_num_threads(1)  # one thread per single-threaded worker process
        _CACHE.clear()
        dataset = load_data(data)
        if views[0]:
            dataset = ViewDataset(dataset, *views)
        _CACHE[key] = (dataset, Teacher(list(teachers), device=device, precision=precision,
                                        combine=combine))
    return _CACHE[key]


def compute_blocks(path: str, layout: Layout, blocks: list[int], data: str,
                   teachers: tuple[str, ...], device: str, precision: str, combine: str,
                   batch_size: int, views: tuple[int, str | None, int] = (0, None, 0),
                   ) -> list[int]:
    """A task: compute and write `blocks` of the set at `path`; returns them."""
    dataset, teacher = _worker_state(data, teachers, device, precision, combine, views)
    writer = BlockWriter(path, layout)
    try:
        writer.erase(blocks)
        run_blocks(teacher, dataset, writer, blocks, batch_size, 0, lambda n: None)
    finally:
        writer.close()
    return blocks


@contextmanager
def _client(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    import dask
    from dask.distributed import Client, LocalCluster

    # DataLoader workers inside tasks need non-daemonic worker processes.
    dask.config.set({"distributed.worker.daemon": False})
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def precompute_on_cluster(
    data: str,
    teachers: Sequence[str],
    out: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    retries: int = 3,
    progress: Progress | None = None,
    **options: Any,
) -> PrecomputeResult:
    """`precompute` with its blocks spread over a Dask cluster: `workers` local processes, or
    the running cluster at `scheduler`. `options` are precompute's (temperatures, batch_size,
    dtype, ...; see `precompute.LAYOUT_DEFAULTS`). The result is identical to a
    single-process run."""
    t0 = time.perf_counter()
    unknown = set(options) - set(LAYOUT_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown precompute options {sorted(unknown)}")
    opts = {**LAYOUT_DEFAULTS, **options}
    if backend_of(out) != "zarr":
        raise SoftlabelsError(f"--workers/--scheduler write Zarr only (HDF5 has no safe "
                              f"parallel writer): use a .zarr --out instead of {out}")
    if not isinstance(data, str) or not all(isinstance(t, str) for t in teachers):
        raise SoftlabelsError("on a cluster, data and teachers must be specs (strings) that "
                              "each worker can load")
    if workers is not None and workers <= 0:
        raise SoftlabelsError(f"--workers must be positive, got {workers}")
    refuse_if_busy(out)
    dataset, _, layout, meta = prepare(data, teachers, **opts)
    with TransferSetWriter(out, layout, meta, overwrite=overwrite,
                           row_hashes=row_hashes(dataset)) as writer:
        pending = list(writer.pending)
        done = layout.num_rows - len(rows_of(layout, pending))
        if progress:
            progress(done, layout.num_rows)
        if pending:
            views = (opts["views"], opts["augment"], opts["view_seed"])
            done = _submit(layout, pending, str(out), data, tuple(teachers), opts["device"],
                           opts["precision"], opts["combine"], opts["batch_size"], views,
                           workers, scheduler, retries, progress, done)
    return PrecomputeResult(path=Path(out), num_rows=layout.num_rows,
                            rows_computed=len(rows_of(layout, pending)),
                            resumed=writer.resumed, already_complete=writer.already_complete,
                            seconds=time.perf_counter() - t0, meta=writer.meta)


def _submit(layout: Layout, pending: list[int], out: str, data: str, teachers: tuple[str, ...],
            device: str, precision: str, combine: str, batch_size: int,
            views: tuple[int, str | None, int], workers: int | None, scheduler: str | None,
            retries: int, progress: Progress | None, done: int) -> int:
    from dask.distributed import as_completed

    with _client(workers, scheduler) as client:
        futures = [client.submit(compute_blocks, out, layout, [b], data, teachers, device,
                                 precision, combine, batch_size, views,
                                 key=f"softlabels-block-{b}",
                                 retries=retries, pure=False)
                   for b in pending]
        for future in as_completed(futures):
            blocks = future.result()
            future.release()
            done += len(rows_of(layout, blocks))
            if progress:
                progress(done, layout.num_rows)
        del futures  # nothing left for the scheduler to keep when the cluster closes
    return done
