"""What a Dask worker runs for stage one on a cluster (cluster.py is the driver): the check
each worker passes before any task (`check_worker`), and the task that computes and writes
whole blocks (`compute_blocks`), with the worker's dataset and teacher loaded once per process
and refused when they differ from the driver's. `set_token` names the very set the driver
created, so a worker that sees another set at the same path writes nothing."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softlabels._version import __version__
from softlabels.compute.blocks import KINDS, run_blocks
from softlabels.compute.record import dataset_probe
from softlabels.compute.rows import Feed, Unit
from softlabels.compute.teacher_inputs import teacher_inputs
from softlabels.compute.views import ViewDataset
from softlabels.errors import MismatchError, SoftlabelsError, TransferSetError
from softlabels.format.layout import Layout
from softlabels.format.location import Remote, is_url
from softlabels.format.writer import BlockWriter
from softlabels.options import PrecomputeOptions
from softlabels.sources.images import model_inputs
from softlabels.sources.load import load_data
from softlabels.teachers.ensemble import Teacher

_CACHE: dict[tuple[Any, ...], tuple[Any, Teacher]] = {}  # per worker process
SHARED = ("every worker must see the DATA, the MODEL files and --out at the same path (a "
           "shared filesystem)")


@dataclass(frozen=True)
class Work:
    """What every task of one cluster run shares, made once by the driver: the specs each
    worker loads (`data`, `teachers`, with absolute paths), the run's checked options, the
    set the driver created (`token`, `set_token`: a worker that sees another writes nothing)
    and what the driver's data and teachers were (`expect`: the dataset probe and the
    teachers' weight hashes)."""

    data: str
    teachers: tuple[str, ...]
    opts: PrecomputeOptions
    token: str | None = None
    expect: tuple[str, tuple[str, ...]] | None = None


def _worker_state(work: Work) -> tuple[Any, Teacher]:
    """This process's dataset and teacher, loaded once; `work.expect` refuses a worker that
    loads other data or weights from the same paths (a node with its own, different copy)."""
    opts, data, teachers = work.opts, work.data, work.teachers
    views = (opts.views, opts.augment, opts.view_seed)
    key = (data, teachers, opts.device, opts.precision, opts.combine, views, opts.trust_code)
    if key not in _CACHE:
        import torch

        torch.set_num_threads(1)  # one thread per single-threaded worker process
        _CACHE.clear()
        dataset = load_data(data)
        teacher = Teacher(list(teachers), device=opts.device, precision=opts.precision,
                          combine=opts.combine, trust_code=opts.trust_code,
                          max_bytes=opts.max_teacher_bytes)  # bounded as on the driver
        dataset, _ = teacher_inputs(dataset, teacher.preprocess())  # as on the driver
        dataset = model_inputs(dataset)  # raw images no preprocessing took: as on the driver
        if work.expect is not None:
            probe, weights = work.expect
            if dataset_probe(dataset) != probe:
                raise MismatchError(f"{data} holds other examples here than on the driver "
                                    "(its probe hashes differ); give every worker the same data")
            mine = tuple(m.sha256 for m in teacher.members)
            if mine != weights:
                raise MismatchError(f"the teacher {', '.join(teachers)} has other weights here "
                                    "than on the driver; give every worker the same files")
        if opts.views:
            dataset = ViewDataset(dataset, *views)
        _CACHE[key] = (dataset, teacher)
    return _CACHE[key]


def set_token(path: str | Path) -> str:
    """What identifies the set at `path` to a worker: a hash of its root metadata file, which
    holds the run's metadata (written at creation, rewritten only when the set completes)."""
    if is_url(path):  # a set in an object store: the same object, read through fsspec
        remote = Remote(path)
        try:
            return hashlib.sha256(remote.get(remote.child("zarr.json"))).hexdigest()
        except FileNotFoundError as exc:
            raise OSError(exc.errno, "no such object", str(path)) from None
    with open(os.path.join(path, "zarr.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return f"worker {get_worker().address} (host {socket.gethostname()})"
    except (ImportError, ValueError):  # not inside a Dask worker
        return f"process {os.getpid()} (host {socket.gethostname()})"


def _failure(exc: BaseException, blocks: list[int], path: str) -> SoftlabelsError:
    """A task's exception as one line naming the worker, the block and the set; the library's
    own errors keep their class."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if not isinstance(exc, SoftlabelsError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    message = f"{_worker_name()} failed on block {blocks[0]} of {path}: {text}"
    try:
        return type(exc)(message) if isinstance(exc, SoftlabelsError) else SoftlabelsError(message)
    except TypeError:  # a subclass with another constructor
        return SoftlabelsError(message)


def compute_blocks(path: str, layout: Layout, unit: Unit, work: Work) -> list[int]:
    """A task: compute and write the pending `unit.blocks` of the set at `path`; returns them.
    The unit's `window` (a sequence set's `positions.windows`; else the blocks themselves) is
    the fixed run of blocks whose rows are batched together, computed whole, so the pending
    blocks come out bit for bit as in a single process. With `work.token`, a worker that does
    not see that very set writes nothing.
    Any failure is raised as one line naming the worker, the block and the set."""
    blocks, token = unit.blocks, work.token
    try:
        if token is not None:
            try:
                seen = set_token(path)
            except OSError as exc:
                raise TransferSetError(f"cannot see the set {path} ({exc.strerror}); "
                                       f"{SHARED}") from None
            if seen != token:
                raise TransferSetError(f"sees another set at {path} than the driver created; "
                                       f"{SHARED}")
        dataset, teacher = _worker_state(work)
        writer = BlockWriter(path, layout)
        try:
            writer.erase(blocks)
            run_blocks(KINDS[layout.kind], teacher, dataset, writer, [unit],
                       Feed(work.opts.batch_size, pin_memory=teacher.device.type == "cuda"),
                       lambda n: None)
        finally:
            writer.close()
    except Exception as exc:
        raise _failure(exc, blocks, path) from None
    return blocks


def check_worker(paths: Sequence[str], modules: Sequence[str], version: str,
                 out: str | None = None, token: str | None = None) -> str | None:
    """Run on each worker before any task (`Client.run`): None when this worker runs the
    driver's softlabels version, sees every path, imports every module and (given `out`)
    sees and can write in the very set the driver created; else what it lacks, in words."""
    if version != __version__:
        return (f"runs softlabels {__version__}, the driver {version}; install the same version "
                "on every worker")
    for path in paths:
        if not os.path.exists(path):
            return f"cannot see {path}"
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"cannot import module {module} (put it on the worker's PYTHONPATH)"
    if out is not None:
        try:
            seen = set_token(out)
        except OSError as exc:
            return f"cannot see the set {out} ({exc.strerror})"
        if seen != token:
            return f"sees another set at {out} than the driver created"
        if is_url(out):  # its objects are written with the worker's own credentials
            return None
        try:  # a real probe: workers write the blocks
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            return f"cannot write in {out} ({exc.strerror})"
    return None
