"""Stage one on a Dask cluster (docs/SCALING.md): each task computes and writes whole blocks.

A block is one chunk along rows (one shard when sharded), so no two writers ever share a chunk
or shard file. Workers load the data and the teacher once per process (a cache keyed by the
specs, never pickled into the graph), tasks are retried and idempotent (a retry first erases
the block's earlier partial files), and only the driver writes metadata and completes the set.

Workers may run elsewhere, in another working directory: the driver makes every path in the
specs and `--out` absolute, and before any block is computed checks on every worker that it
sees the DATA and MODEL files and the very set the driver created (docs/SCALING.md).
What runs on the workers is cluster_tasks.py's; this module is the driver.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from softlabels._version import __version__
from softlabels.compute.blocks import KINDS
from softlabels.compute.cluster_tasks import (
    SHARED,
    Work,
    check_worker,
    compute_blocks,
    set_token,
)
from softlabels.compute.record import PrecomputeResult, as_options
from softlabels.compute.rows import RowKind, rows_of
from softlabels.errors import OptionError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.aside import remove_set
from softlabels.format.backends import backend_of, open_store
from softlabels.format.layout import Layout
from softlabels.format.lease import refuse_if_busy
from softlabels.format.location import Remote, is_url, timeout_s
from softlabels.options import PrecomputeOptions, check_output_file
from softlabels.progress import Progress
from softlabels.sources.tokens import data_kind
from softlabels.specs import portable_spec

log = logging.getLogger(__name__)

def _check_workers(client: Any, *args: Any) -> tuple[str, str] | None:
    """(worker address, what it lacks) for the first worker `check_worker` refuses."""
    answers = client.run(check_worker, *args, on_error="return")
    bad = [(addr, f"cannot run softlabels ({type(a).__name__}: {a})"
            if isinstance(a, BaseException) else a)
           for addr, a in sorted(answers.items()) if a is not None]
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more worker(s))" if len(bad) > 1 else ""
    return bad[0][0], f"{bad[0][1]}{more}"


def _connect_seconds(seconds: float) -> float:
    """The wait for the scheduler: `--timeout`, or dask's own connect timeout if shorter."""
    import dask
    from dask.utils import parse_timedelta

    configured = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
    return min(seconds, configured) if configured else seconds


def _probe_scheduler(address: str, seconds: float) -> None:
    """Connect to the scheduler once, handshake included, within `seconds`: dask's Client
    waits without end on an address that accepts and never answers."""
    import asyncio

    from distributed.comm import connect

    async def probe() -> None:
        # dask's own connect timeout (refused, unreachable) speaks first; ours ends the rest
        comm = await asyncio.wait_for(connect(address, timeout=seconds), seconds + 1)
        await comm.close()

    try:
        asyncio.run(probe())
    except TimeoutError:
        raise OSError(f"no answer within {seconds:g} s; allow longer with --timeout SECONDS"
                      ) from None


@contextmanager
def _client(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    import dask
    from dask.distributed import Client, LocalCluster

    # DataLoader workers inside tasks need non-daemonic worker processes.
    dask.config.set({"distributed.worker.daemon": False})
    if scheduler:
        try:
            wait = _connect_seconds(timeout_s())
            _probe_scheduler(scheduler, wait)
            client = Client(scheduler, timeout=wait)
        except OSError as exc:
            raise SoftlabelsError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); "
                                  "start one with `dask scheduler` or check the address"
                                  ) from None
        with client:
            if not client.scheduler_info()["workers"]:
                log.warning("no worker has joined %s yet; waiting (start `dask worker %s`)",
                            scheduler, scheduler)
                client.wait_for_workers(1)
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def precompute_on_cluster(
    data: str,
    teachers: Sequence[str],
    out: str | Path,
    options: PrecomputeOptions | None = None,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    retries: int = 3,
    progress: Progress | None = None,
    **kwargs: Any,
) -> PrecomputeResult:
    """`precompute` with its blocks spread over a Dask cluster: `workers` local processes, or
    the running cluster at `scheduler`. Options as for `precompute` (a `PrecomputeOptions` or
    its fields by keyword). The result is identical to a single-process run; token DATA
    (`tokens:...`) makes a sequence set, one task per window of blocks.

    Relative paths are resolved here; every worker must see the same files at the same
    absolute paths (a shared filesystem). That is checked on every worker before any block
    is computed; a worker that cannot is named in one line, and a set this run created is
    removed again."""
    t0 = time.perf_counter()
    opts = as_options(options, kwargs)
    if backend_of(out) != "zarr":
        raise SoftlabelsError(f"--workers/--scheduler write Zarr only (HDF5 has no safe "
                              f"parallel writer): use a .zarr --out instead of {out}")
    if not isinstance(data, str) or not all(isinstance(t, str) for t in teachers):
        raise SoftlabelsError("on a cluster, data and teachers must be specs (strings) that "
                              "each worker can load")
    if workers is not None and workers <= 0:
        raise OptionError(f"--workers must be positive, got {workers}")
    if opts.skip_bad_images or opts.decode_device != "cpu":
        raise OptionError("--skip-bad-images and --decode-device run in a single process; "
                          "drop them, or drop --workers/--scheduler")
    check_output_file(out, directory_ok=True)  # before loading data and teacher
    refuse_if_busy(out)
    target = Remote(out).url if is_url(out) else os.path.abspath(out)
    specs = [portable_spec(data, kind="DATA")] + [portable_spec(t, kind="MODEL")
                                                  for t in teachers]
    kind = KINDS[data_kind(data)]
    dataset, _, layout, meta = kind.prepare(data, teachers, opts)
    expect = (meta["dataset"]["probe"],
              tuple(m["sha256"] for m in meta["teacher"]["members"]))
    done_already = not overwrite and _is_complete(target)  # no cluster needed to say so
    with nullcontext() if done_already else _client(workers, scheduler) as client:
        extra = [Remote(target).module] if is_url(target) else []  # s3fs or gcsfs
        needs = (sorted({p for s in specs for p in s.paths}),
                 sorted({m for s in specs for m in s.modules} | set(extra)), __version__)
        refused = None if done_already else _check_workers(client, *needs)
        if refused:
            raise SoftlabelsError(f"worker {refused[0]} {refused[1]}: {SHARED}; nothing was "
                                  "computed")
        exists = Remote(target).exists() if is_url(target) else os.path.exists(target)
        fresh, submitted = overwrite or not exists, False
        try:
            with kind.open_writer(out, dataset, layout, meta, overwrite=overwrite) as writer:
                layout = writer.layout  # a sequence set's carries its offsets' hash
                pending = list(writer.pending)
                done = layout.num_rows - len(rows_of(layout, pending))
                if progress:
                    progress(done, layout.num_rows)
                if pending:
                    token = set_token(target)
                    refused = _check_workers(client, *needs, target, token)
                    if refused:
                        raise _Unseen(refused)
                    submitted = True
                    work = Work(data=specs[0].spec, teachers=tuple(s.spec for s in specs[1:]),
                                opts=opts, token=token, expect=expect)
                    _submit(client, kind, layout, pending, target, work, retries, progress,
                            done)
        except _Unseen as unseen:
            raise SoftlabelsError(f"worker {unseen.worker} {unseen.lack}: {SHARED}; nothing "
                                  f"was computed, {_left_behind(target, fresh)}") from None
        except SoftlabelsError as exc:
            if not submitted:
                raise
            raise _with_state(exc, target, layout) from None
    return PrecomputeResult(path=Path(out), num_rows=layout.num_rows,
                            rows_computed=len(rows_of(layout, pending)),
                            resumed=writer.resumed, already_complete=writer.already_complete,
                            seconds=time.perf_counter() - t0, meta=writer.meta)


def _is_complete(target: str) -> bool:
    try:
        with open_store(target, "r") as store:
            return (store.get_meta() or {}).get("status") == S.STATUS_COMPLETE
    except (SoftlabelsError, OSError):
        return False


class _Unseen(Exception):
    def __init__(self, refused: tuple[str, str]) -> None:
        super().__init__(*refused)
        self.worker, self.lack = refused


def _left_behind(target: str, fresh: bool) -> str:
    """Remove the set this run created when no block of it was written (a rerun must not
    take it for a run to resume); say what was done."""
    if not fresh:
        return f"and {target} was left as it was"
    with open_store(target, "r") as store:
        written = int(np.count_nonzero(store.read(S.BLOCK_DONE)))
    if written:
        return f"and {target} was kept ({written} block(s) written)"
    if is_url(target):
        remove_set(target, what="clean-up")
    else:
        shutil.rmtree(target)
    return f"and the empty {target} this run created was removed"


def _with_state(exc: SoftlabelsError, target: str, layout: Layout) -> SoftlabelsError:
    """A failure during the run, with the state of the set and what to do."""
    try:
        with open_store(target, "r") as store:
            written = int(np.count_nonzero(store.read(S.BLOCK_DONE)))
            complete = (store.get_meta() or {}).get("status") == S.STATUS_COMPLETE
    except (SoftlabelsError, OSError):
        return exc  # the failure came before the set existed
    if complete:
        return exc
    state = (f"{target} is incomplete ({written} of {layout.num_blocks} blocks written): fix "
             "the cause and rerun the same command to compute the rest, or pass --overwrite")
    try:
        return type(exc)(f"{exc}; {state}")
    except TypeError:
        return SoftlabelsError(f"{exc}; {state}")


def _submit(client: Any, kind: RowKind, layout: Layout, pending: list[int], out: str,
            work: Work, retries: int, progress: Progress | None, done: int) -> int:
    from dask.distributed import as_completed

    # one task per unit: a block, or a window of blocks computed whole (a sequence set)
    futures = {client.submit(compute_blocks, out, layout, unit, work,
                             key=f"softlabels-block-{unit.blocks[0]}", retries=retries,
                             pure=False): unit.blocks[0]
               for unit in kind.units(layout, pending, split=True)}
    try:
        for future in as_completed(futures):
            try:
                blocks = future.result()
            except SoftlabelsError:
                raise
            except Exception as exc:  # the cluster's own (a task that kept killing workers)
                text = str(exc).splitlines()[0] if str(exc) else ""
                raise SoftlabelsError(f"the cluster failed on block {futures[future]} of {out}"
                                      f": {type(exc).__name__}: {text}") from None
            future.release()
            done += len(rows_of(layout, blocks))
            if progress:
                progress(done, layout.num_rows)
    except BaseException:
        client.cancel(list(futures))  # after a failure, start nothing more
        raise
    finally:
        futures.clear()  # nothing left for the scheduler to keep when the cluster closes
    return done
