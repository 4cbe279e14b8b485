"""The read side of a transfer set: metadata, row-range reads, probabilities at any temperature."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.errors import (
    DataError,
    IncompleteTransferSetError,
    IntegrityError,
    SoftlabelsError,
    TransferSetError,
)
from softlabels.format import schema as S
from softlabels.format.aside import PARTIAL
from softlabels.format.backends import backend_of, open_store
from softlabels.format.blockcheck import (
    MEASURE_ABOVE_BYTES,
    checksum_problem,
    declared_bytes,
    missing_checksums_problem,
    size_problem,
    undone_problem,
    value_problem,
)
from softlabels.format.chunk_files import ChunkFiles
from softlabels.format.info import SetInfo
from softlabels.format.layout import Layout, array_problems, check_digest
from softlabels.format.location import Remote, cache_dir, is_timeout, is_url
from softlabels.format.store import Store
from softlabels.format.targets import TargetKind, refuse_unstored
from softlabels.tempering import check_temperature, tempered_softmax


class TransferSet:
    """A complete transfer set opened for reading. Use `open_transfer_set(path)`."""

    def __init__(self, store: Store, *, _check_arrays: bool = True) -> None:
        self.store = store
        self.path = store.path
        self.meta: dict[str, Any] = S.check_readable(store.get_meta(), str(store.path))
        check_digest(self.meta, str(store.path))
        self.layout = Layout.from_meta(self.meta, where=str(store.path))
        self.info = SetInfo.from_meta(self.meta, where=str(store.path))  # teacher, dataset...
        self.num_rows: int = self.layout.num_rows
        self.num_classes: int = self.layout.num_classes
        self.temperatures: list[float] = list(self.layout.temperatures)
        self.chunk_rows: int = self.layout.chunk_rows
        self.block_rows: int = self.layout.block_rows
        self.class_names: list[str] = list(self.info.class_names or ())
        if len(self.class_names) > self.num_classes:  # a name per class at most
            raise TransferSetError(
                f"{store.path} has malformed metadata (class_names: {len(self.class_names)} "
                f"names for {self.num_classes} classes); get a fresh copy of the set")
        self.target: TargetKind = self.layout.target  # the codec of its soft targets
        self.format_version: int = int(self.meta["format_version"])
        # read-only: listed once, not on every read (probed by name where it cannot be listed;
        # a version 1 set holds block_checksum instead of array_checksum)
        self._listed = store.names(expected=[*self.layout.specs(), S.BLOCK_CHECKSUM])
        self._names = set(self._listed)
        problems = _check_arrays and array_problems(
            self.layout, {n: store.info(n)[:2] for n in self._names},
            version=self.format_version)
        if problems:  # verify opens with _check_arrays=False, to report them as a check
            raise IntegrityError(f"{store.path} does not hold the arrays its metadata implies "
                                 f"({'; '.join(problems)}); get a fresh copy of the set")
        # version 2: (B, S) checksums, read with each block. Version 1: one checksum per block
        # over every row array, read here; None in a set from before block checksums.
        self._slots = {slot: col for col, slot in enumerate(self.layout.checksum_slots())}
        self._recorded: dict[int, np.ndarray] = {}  # block -> its array_checksum row, once read
        self._marked: set[int] = set()  # blocks whose `block_done` marker was read and is 1
        # (block, k, arrays) whose values passed `value_problem` in bytes that matched their
        # recorded checksums: the same bytes again (their checksums match) pass again
        self._valued: set[tuple[int, int | None, tuple[str, ...]]] = set()
        self._marks: np.ndarray | None = None  # all of `block_done`, where read at once
        self._v1_checksums = (store.read(S.BLOCK_CHECKSUM) if self.format_version == 1
                              and S.BLOCK_CHECKSUM in self._names else None)
        # a local Zarr directory: name -> its chunk files (None: read through zarr), once
        local = (not is_url(self.path) and backend_of(self.path) == "zarr"
                 and Path(self.path).is_dir())
        self._files: dict[str, ChunkFiles | None] | None = {} if local else None
        self._buffers = threading.local()  # each thread's reused read buffers
        if declared_bytes(self.layout) > MEASURE_ABOVE_BYTES:  # before any column is read
            too_few = size_problem(self.layout, self.nbytes_on_disk())
            if too_few:
                raise IntegrityError(f"{store.path} {too_few}; get a fresh copy of the set")
        downgraded = self.format_version == 1 and self._v1_checksums is None and \
            missing_checksums_problem(self.meta)
        if downgraded:
            raise IntegrityError(f"{store.path} {downgraded}; get a fresh copy of the set")

    # --- generic reads --------------------------------------------------------------------
    def arrays(self) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
        """name -> (shape, dtype, chunks) of every stored array."""
        return {n: (s, str(d), c) for n in self._listed for s, d, c in [self.store.info(n)]}

    def has(self, name: str) -> bool:
        return name in self._names

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of array `name` (all leading axes kept)."""
        if name not in self._names:
            raise TransferSetError(f"{self.path} has no array {name!r}; it has "
                                   f"{', '.join(self._listed)}")
        stop = self.num_rows if stop is None else stop
        sel: list[slice] = [slice(None)] * (S.row_axis(name) + 1)
        sel[S.row_axis(name)] = slice(start, stop)
        try:
            return self.store.read(name, tuple(sel))
        except SoftlabelsError:
            raise
        except Exception as exc:  # a corrupted chunk fails in the codec, whatever the backend
            if is_url(self.path) and is_timeout(exc):  # not damage: a server past its deadline
                raise TransferSetError(f"{name} of {self.path}: "
                                       f"{Remote(self.path).no_answer(exc)}") from None
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.store.drop_cache()
            raise IntegrityError(f"{name} (rows {start}-{stop - 1}) of {self.path} cannot be "
                                 f"read ({type(exc).__name__}: {first}); run `softlabels verify "
                                 f"{self.path}` and get a fresh copy of the set") from None

    def block_range(self, block: int) -> tuple[int, int]:
        """Rows [start, stop) of block `block`."""
        return self.layout.block_range(block)

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def row_arrays(self) -> list[str]:
        """Every array the metadata implies with one entry per row (all but the block
        bookkeeping), in name order."""
        return sorted(self.layout.arrays())

    def read_block(self, block: int, arrays: Iterable[str] | None = None, *,
                   temperature: float | None = None, checksum: bool = True,
                   ) -> dict[str, np.ndarray]:
        """Rows of one block, checked before anything uses them: of every row array, or of
        `arrays` only. With `temperature` (a stored one), `probs` and `sample/indices` are read
        at that temperature alone and returned without their temperature axis ((rows, ...)).

        The block must be marked done in `block_done` (checked on its first read), and what
        is read must be readable, match its recorded checksums, hold only finite targets,
        dataset indices in [0, num_examples) and labels in [-1, C); otherwise `IntegrityError`
        names the block and what is wrong with it. `checksum=False` skips the checksums (the
        other checks remain), for sets already verified. A version 1 set records one checksum
        over every row array of a block, so its checked reads read every row array, whatever
        `arrays` asks for.
        """
        return self.read_blocks([block], arrays, temperature=temperature, checksum=checksum)[0]

    def read_blocks(self, blocks: Iterable[int], arrays: Iterable[str] | None = None, *,
                    temperature: float | None = None, checksum: bool = True,
                    reuse: bool = False, into: dict[str, np.ndarray] | None = None,
                    ) -> list[dict[str, np.ndarray]]:
        """`read_block` of several blocks, their chunks fetched in one call (Zarr: one asyncio
        gather), then each block checked on its own bytes as `read_block` checks it. A block
        that cannot be read is named by reading the blocks again one at a time. `reuse`: the
        arrays may be views of buffers this thread's next `reuse` read overwrites (for a
        caller that copies them out at once: no fresh memory per block). `into` (one block):
        memory of the caller's that an array whose block is one whole chunk file of a local
        set may be read straight into (a flat array of the chunk's dtype and size, nothing
        else writing to it); that array is then a view of it, checked there."""
        blocks = [int(b) for b in blocks]
        if into and len(blocks) != 1:
            raise ValueError("read_blocks(into=...) reads one block")
        names = self.row_arrays() if arrays is None else list(dict.fromkeys(arrays))
        unknown = sorted(set(names) - set(self.layout.arrays()))
        if unknown:
            raise TransferSetError(f"{self.path} has no row array {unknown[0]!r}; its row arrays "
                                   f"are {', '.join(self.row_arrays())}")
        k = None if temperature is None else self.temperature_index(temperature)
        if temperature is not None and k is None:
            raise TransferSetError(f"{self.path} stores T={self.temperatures}, not "
                                   f"T={temperature}; read logits to re-temper")
        v1 = checksum and self._v1_checksums is not None
        read = self.row_arrays() if v1 else names
        v2 = checksum and self.format_version >= 2
        requests, plans = [], []
        for block in blocks:
            start, stop = self.block_range(block)
            mine = [(n, self._block_selection(n, start, stop, None if v1 else k)) for n in read]
            recorded = v2 and block not in self._recorded  # read with the block, kept for reuse
            if recorded:
                mine.append((S.ARRAY_CHECKSUM, (block, slice(None))))
            # A complete set marks every block done: checked on a block's first read, in the
            # same round trip where reads go together (Zarr: one object per block), else all at
            # once
            marker = block not in self._marked and self.store.reads_together
            if marker:
                mine.append((S.BLOCK_DONE, slice(block, block + 1)))
            plans.append((block, len(requests), len(mine), recorded, marker))
            requests += mine
        try:
            if any(b not in self._marked for b in blocks) and not self.store.reads_together \
                    and self._marks is None:
                self._marks = self.store.read(S.BLOCK_DONE)  # HDF5: ~10 us per block, once
            got = self._read_many(requests, reuse, into)
        except Exception as exc:  # a corrupted chunk fails in the codec, whatever the backend
            if is_url(self.path) and is_timeout(exc):  # not damage: a server past its deadline
                start, stop = self.block_range(blocks[0])
                raise TransferSetError(f"block {blocks[0]} (rows {start}-{stop - 1}) of "
                                       f"{self.path}: {Remote(self.path).no_answer(exc)}"
                                       ) from None
            if len(blocks) > 1:  # name the block: one at a time
                for block in blocks:
                    self.read_block(block, names, temperature=temperature, checksum=checksum)
            start, stop = self.block_range(blocks[0])
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.store.drop_cache()
            raise IntegrityError(f"block {blocks[0]} (rows {start}-{stop - 1}) of {self.path} "
                                 f"cannot be read ({type(exc).__name__}: {first}); get a fresh "
                                 "copy of the set") from None
        return [self._checked(block, list(got[at:at + n]), read, names, k, v1, v2, recorded,
                              marker) for block, at, n, recorded, marker in plans]

    def will_read(self, blocks: Iterable[int], arrays: Iterable[str], *,
                  temperature: float | None = None) -> None:
        """A hint that `read_blocks(blocks, arrays, temperature=...)` comes soon: the chunk
        files of a local Zarr set are read ahead by the kernel (`ChunkFiles.advise`), so a
        reader in one thread overlaps the disk with its work on the blocks before; nothing
        for other sets. Reads and checks nothing."""
        if self._files is None:
            return
        k = None if temperature is None else self.temperature_index(temperature)
        for block in blocks:
            start, stop = self.block_range(block)
            for name in arrays:
                files = self._chunk_files(name)
                if files is not None:
                    files.advise(self._block_selection(name, start, stop, k))

    def cache_misses(self) -> int | None:
        """How many chunk reads of this local Zarr set so far found their file out of the page
        cache (`ChunkFiles._probe`; 0 where the file system cannot tell), None for other
        sets: a reader tells a set read from disk by them."""
        if self._files is None:
            return None
        return sum(f.misses for f in self._files.values() if f is not None)

    def _chunk_files(self, name: str) -> ChunkFiles | None:
        """Array `name`'s chunk files where a local set lays them out as this package writes
        them (`ChunkFiles.of`, looked at once per array), else None."""
        if self._files is None:
            return None
        if name not in self._files:
            self._files[name] = ChunkFiles.of(Path(self.path) / name)
        return self._files[name]

    def _read_many(self, requests: list[tuple[str, Any]], reuse: bool = False,
                   into: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """`store.read_many`, except that the chunks of a local Zarr set laid out as this
        package writes them are read straight from their files (`chunk_files`: zarr-python's
        per-chunk work is 5x a file read's CPU); every other request goes through zarr. With
        `reuse`, into this thread's buffers, one per request position, or for an array in
        `into`, into that (see `read_blocks`)."""
        got: list[np.ndarray | None] = [None] * len(requests)
        if self._files is not None:
            kept = self._buffers.__dict__.setdefault("by_position", {}) if reuse else None
            for i, (name, selection) in enumerate(requests):
                files = self._chunk_files(name)
                scratch = ({"buffer": into[name]} if into and name in into  # this call only
                           else kept.setdefault((i, name), {}) if kept is not None else None)
                got[i] = files.read(selection, scratch) if files is not None else None
        rest = [i for i, g in enumerate(got) if g is None]
        if rest:
            for i, a in zip(rest, self.store.read_many([requests[i] for i in rest])):
                got[i] = a
        return got  # type: ignore[return-value]

    def _checked(self, block: int, got: list[np.ndarray], read: list[str], names: list[str],
                 k: int | None, v1: bool, v2: bool, recorded: bool, marker: bool,
                 ) -> dict[str, np.ndarray]:
        """One block's arrays as read (`got`: `read`, then its checksum row and marker where
        asked), checked; `IntegrityError` names the block."""
        start, stop = self.block_range(block)
        where = f"block {block} (rows {start}-{stop - 1}) of {self.path}"
        undone = (undone_problem(got.pop()) if marker else None if block in self._marked
                  else undone_problem(self._marks[block:block + 1]))
        if recorded:  # a copy: `reuse` reads hand out views of buffers read into again
            self._recorded[block] = np.array(got.pop())
        out = dict(zip(read, got))
        problem = None
        if v1 and S.block_checksum_v1(out) != int(self._v1_checksums[block]):
            problem = "does not match its checksum (a flipped byte or a missing chunk)"
        elif v2:
            problem = checksum_problem(self._slots, self.temperatures, out, k,
                                       self._recorded[block])
        # Values are checked once per block, arrays and temperature while the set is open: a
        # later read's bytes, matching the same recorded checksums, are the bytes that passed
        # (a verdict that is a function of them; checksum=False reads check values every time)
        valued = (block, k, tuple(read))
        known = v2 and valued in self._valued
        problem = undone or problem or (None if known else value_problem(
            out, self.num_classes, self.info.num_examples, temperatures=self.temperatures)
            or self._recipe_problem(out))
        if problem:
            self.store.drop_cache()
            raise IntegrityError(f"{where} {problem}; run `softlabels verify {self.path}` and "
                                 "get a fresh copy of the set")
        self._marked.add(block)
        if v2:
            self._valued.add(valued)
        if v1:  # what was asked for, out of every row array
            out = {n: out[n][k] if k is not None and n in S.TEMPERATURE_AXIS else out[n]
                   for n in names}
        return out

    def _recipe_problem(self, out: dict[str, np.ndarray]) -> str | None:
        """Where a block read holds every array of a target kind with its own recipe (a
        hybrid's heads and tails), whether they follow it (`TargetKind.problems`): metadata
        edited to another head size reads the same arrays as other targets."""
        if self.target.recipe() is None or not set(self.target.served(True)) <= set(out):
            return None
        problem = self.target.problems(out, self.num_classes, tuple(self.temperatures),
                                       self.layout.dtype)
        return f"holds {self.target.name} targets that break its recipe ({problem})" \
            if problem else None

    @staticmethod
    def _block_selection(name: str, start: int, stop: int, k: int | None) -> tuple[Any, ...]:
        if S.row_axis(name) == 0:
            return (slice(start, stop),)
        return (k if k is not None and name in S.TEMPERATURE_AXIS else slice(None),
                slice(start, stop))

    def logits(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(rows, C) combined teacher logits as float32."""
        if self.target.sparse:
            raise TransferSetError(f"{self.path} is sparse ({self.target.name}): it has no "
                                   "dense logits; use sparse_targets() or probs() at a stored T")
        return self.read(S.LOGITS, start, stop).astype(np.float32)

    def sparse_targets(self, temperature: float, start: int = 0, stop: int | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(classes (rows, k) int64, weights (rows, k) float32) of a sparse set at a stored T.

        topk: the k most likely classes and their exact probabilities (the rest of the mass is
        1 - sum). sample: k classes drawn from p_T, each weighing 1/k (an unbiased estimate).
        hybrid: the head's exact probabilities and the tail draws' importance weights (an
        unbiased estimate; `Hybrid.decode`), and a third array, log p_T of every column.
        """
        k = self.temperature_index(temperature)
        if not self.target.sparse:
            raise TransferSetError(f"{self.path} is dense; use probs()")
        refuse_unstored(str(self.path), self.target, temperature, tuple(self.temperatures), k)
        stop = self.num_rows if stop is None else stop
        arrays = {n: (self.store.read(n, (k, slice(start, stop))) if n in S.TEMPERATURE_AXIS
                      else self.read(n, start, stop)) for n in self.target.served(True)}
        return tuple(t.numpy() for t in self.target.decode(arrays, temperature, k,
                                                           tuple(self.temperatures)))

    def probs(self, temperature: float, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(rows, C) float32 probabilities at `temperature`: the stored ones when T was stored,
        else re-tempered from the stored logits in float32."""
        temperature = check_temperature(temperature, at_most=math.inf)
        if self.target.sparse:
            return self._dense_from_sparse(temperature, start, stop)
        k = self.temperature_index(temperature)
        if k is not None:
            stop = self.num_rows if stop is None else stop
            return self.store.read(S.PROBS, (k, slice(start, stop))).astype(np.float32)
        z = torch.from_numpy(self.logits(start, stop))
        return tempered_softmax(z, temperature).numpy()

    def _dense_from_sparse(self, temperature: float, start: int, stop: int | None,
                           ) -> np.ndarray:
        return self.densify(*self.sparse_targets(temperature, start, stop)[:2])

    def densify(self, classes: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Dense (rows, C) float32 probabilities from sparse targets (classes, weights) of this
        set: top-k exact, the residual mass spread evenly over the other classes; or the
        sampled frequencies (a hybrid set: the head exact, the tail's importance weights)."""
        return self.target.densify(classes, weights, self.num_classes)

    def temperature_index(self, temperature: float) -> int | None:
        for k, t in enumerate(self.temperatures):  # np.isclose(rtol=1e-6, atol=0), 30x faster
            if abs(t - temperature) <= 1e-6 * abs(temperature):
                return k
        return None

    def labels(self) -> np.ndarray:
        return self.read(S.LABELS)

    def index(self) -> np.ndarray:
        return self.read(S.INDEX)

    def sample_hash(self) -> np.ndarray:
        return self.read(S.SAMPLE_HASH)

    def nbytes_on_disk(self) -> int | None:
        """Bytes stored; None for a set at a URL that cannot be listed (http)."""
        if is_url(self.path):
            return Remote(self.path).size()
        if self.path.is_dir():
            return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return self.path.stat().st_size

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: metadata, arrays, size on disk."""
        return {
            "path": str(self.path),
            "backend": backend_of(self.path),
            "bytes": self.nbytes_on_disk(),
            "arrays": {n: {"shape": list(s), "dtype": d, "chunks": list(c)}
                       for n, (s, d, c) in self.arrays().items()},
            **self.meta,
        }

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> TransferSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (f"TransferSet({str(self.path)!r}, rows={self.num_rows}, "
                f"classes={self.num_classes}, temperatures={self.temperatures})")


class TransferSetInputs(Dataset):
    """The inputs a set stores (`precompute --store-inputs`), as a dataset indexed like its
    source: item i is (input, label) of the source's example i. DATA spec `transferset:PATH`.

    Reads whole chunks and keeps the last one, so a sequential pass reads each chunk once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        with open_transfer_set(path) as ts:
            if not ts.has(S.INPUTS):
                raise DataError(f"{ts.path} holds no inputs: it was made without "
                                "--store-inputs; remake it with that flag, or pass the DATA it "
                                "was made from")
            self.path, self.classes = ts.path, ts.class_names
            self.chunk = ts.arrays()[S.INPUTS][2][0]
            index, self.labels = ts.index(), ts.labels()
            self.row_of = np.full(ts.info.num_examples, -1, dtype=np.int64)
            self.row_of[index] = np.arange(len(index))
        self._ts: TransferSet | None = None
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0))

    def __len__(self) -> int:
        return len(self.row_of)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.row_of[i])
        if row < 0:
            raise DataError(f"example {i} is not in {self.path}, a subset of its data")
        c = row // self.chunk
        if self._cached[0] != c:
            if self._ts is None:
                self._ts = open_transfer_set(self.path)
            start = c * self.chunk
            self._cached = (c, self._ts.read(S.INPUTS, start, start + self.chunk))
        return torch.from_numpy(self._cached[1][row % self.chunk].copy()), int(self.labels[row])

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handle
        return {**self.__dict__, "_ts": None, "_cached": (-1, np.empty(0))}


def open_transfer_set(path: str | os.PathLike[str], *, cache: str | None = None,
                      ) -> TransferSet:
    """Open a complete transfer set (`.zarr`, `.zarr.zip` or `.h5`) for reading, from a local
    path or a URL (`s3://`, `gs://`, `https://`, `http://`).

    Refuses anything that is not complete, of an unknown format version, whose identity
    metadata was edited after completion (`IntegrityError` naming the keys), or whose metadata
    describes no valid layout, saying what to do. `cache`: a local directory caching a remote
    Zarr set's chunks for repeated reads (default: `SOFTLABELS_CACHE` when set).
    """
    if is_url(path):
        store = open_store(path, "r", cache=cache or cache_dir())
    else:
        store = open_store(Path(path), "r")
    try:
        return TransferSet(store)
    except IncompleteTransferSetError:
        store.close()
        from softlabels.format.lease import holder

        who, p = holder(path), Path(path)
        if who is None and p.name.endswith(PARTIAL):
            raise IncompleteTransferSetError(
                f"{p} is the unfinished output of a `softlabels merge`, `convert` or `subset` "
                f"into {p.name[:-len(PARTIAL)]} that was stopped; rerun that same command (it "
                "starts again and removes this)") from None
        if who is None:
            raise
        raise IncompleteTransferSetError(f"{path} is being written by {who}; wait for it to "
                                         "finish") from None
    except BaseException:
        store.close()
        raise
