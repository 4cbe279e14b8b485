"""A transfer set from arrays you already have: your own inference, another tool's output.

    write_set("set.zarr", logits=z, data="npz:data.npz", teacher_name="my-model",
              temperatures=[1, 4])                                     # dense
    write_set("set.zarr", topk_indices=i, topk_values=v, logsumexp=lse, num_classes=32000,
              data="npz:data.npz", teacher_name="my-model", temperatures=[1, 2])   # top-k

The set is an example set like `precompute`'s, written through the one writing path of every
import (`sets.imports.write_rows`: leased, laid out aside, checksummed per block, resumable,
complete last), with the same provenance fields: the teacher as the user names it
(`teacher.members[0].spec = "imported:NAME"`, no weights to hash), the data's spec, probe and
per-row sample hashes (`--data`: `sample_hash[r]` hashes example `index[r]` of the data, so
`verify --data` checks the rows against it).

Top-k rows: `topk_values` are logits with `logsumexp` (R, len(temperatures)) =
logsumexp(z / T_k) over all C classes, exact at each T; without `logsumexp` they are
log-probabilities at T = 1 (as vLLM returns them), stored with logsumexp 0 and exact at T = 1
only (`temperatures` must be [1]). Rows are stored largest first, as `precompute --topk` does.
Arrays may be numpy arrays or `.npy` paths, opened with `np.load(allow_pickle=False,
mmap_mode="r")`; every shape is checked before anything is allocated, and rows are read one
block at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch.utils.data import Dataset

from softlabels.compute.record import dataset_probe
from softlabels.errors import DataError, MismatchError, OptionError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.layout import Layout
from softlabels.options import check_choice, check_num_classes, check_temperature
from softlabels.progress import Progress
from softlabels.safe_read import open_input
from softlabels.sets.imports import ExampleRows, check_topk, imported_meta, write_rows
from softlabels.sources.arrays import (
    NpzDataset,
    check_labels,
    class_names,
    example_hash,
    split_item,
)
from softlabels.sources.load import load_data
from softlabels.sources.tokens import data_kind
from softlabels.tempering import tempered_softmax

ArrayLike = np.ndarray | str | os.PathLike


def _array(value: ArrayLike | None, what: str) -> np.ndarray | None:
    """An array, or a `.npy` file memory-mapped (never unpickled)."""
    if value is None or isinstance(value, np.ndarray):
        return value
    open_input(value, what).close()  # a fifo would be waited on, a device read without end
    try:
        return np.load(value, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
        why = ("not a .npy array" if "pickle" in str(exc) or isinstance(exc, EOFError)
               else str(exc).splitlines()[0])  # numpy's advice would be to unpickle it
        raise DataError(f"cannot read {what} from {value} ({why}); save it with numpy.save"
                        ) from None


def _shape(a: np.ndarray, shape: tuple[int | None, ...], what: str, kind: str) -> None:
    ok = a.ndim == len(shape) and all(n is None or n == m for n, m in zip(shape, a.shape))
    if not ok or np.dtype(a.dtype).kind not in kind:
        want = "x".join("?" if n is None else str(n) for n in shape)
        words = {"iu": "integer", "f": "float"}.get(kind, "numeric")
        raise DataError(f"{what} must be a ({want}) {words} array, found {a.shape} {a.dtype}")


def _row_hashes(data: Dataset, index: np.ndarray) -> np.ndarray:
    """(n,) uint64: the sample hash of example index[i] of `data` (array data hashed in place)."""
    x = data.x.numpy() if isinstance(data, NpzDataset) else None
    if x is not None and len(index) and x.flags.c_contiguous \
            and (np.diff(index) == 1).all():  # a run of examples: hash rows of one buffer
        return S.sample_hashes(x[int(index[0]):int(index[-1]) + 1])
    uniq, where = np.unique(index, return_inverse=True)
    if x is not None:
        hashes = [S.sample_hash(x[i]) for i in uniq.tolist()]
    else:
        hashes = [example_hash(data, i) for i in uniq.tolist()]  # an image: its file's
    return np.array(hashes, dtype=np.uint64)[where]


def _data_labels(data: Dataset, index: np.ndarray) -> np.ndarray:
    if isinstance(data, NpzDataset):
        return data.y.numpy()[index]
    return np.array([split_item(data[int(i)])[1] for i in index], dtype=np.int64)


def _dense_block(z: np.ndarray, temps: Sequence[float]) -> dict[str, np.ndarray]:
    if not np.isfinite(z).all():
        raise DataError("logits hold NaN or inf")
    zt = torch.from_numpy(np.array(z, dtype=np.float32))  # a copy: a memory map is read-only
    return {S.LOGITS: z, S.PROBS: np.stack([tempered_softmax(zt, t).numpy() for t in temps])}


def _topk_block(idx: np.ndarray, val: np.ndarray, lse: np.ndarray | None,
                temps: Sequence[float], num_classes: int, where: str) -> dict[str, np.ndarray]:
    """Checked top-k arrays of one block (`check_topk`), largest first."""
    val = np.asarray(val, dtype=np.float32)
    idx = np.asarray(idx)
    lse = None if lse is None else np.asarray(lse, dtype=np.float32)
    check_topk(idx, val, num_classes, where, logsumexp=lse, temperatures=temps)
    if (val[:, 1:] > val[:, :-1]).any():  # not largest first already (torch.topk's order)
        order = np.argsort(-val, axis=1, kind="stable")
        idx, val = np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)
    if lse is None:  # log-probabilities at T = 1
        lse = np.zeros((len(val), 1), np.float32)
    return {S.TOPK_INDICES: idx.astype(np.int32, copy=False), S.TOPK_LOGITS: val,
            S.TOPK_LOGSUMEXP: lse}


def write_set(out: str | os.PathLike[str], *, data: str | Dataset, teacher_name: str,
              logits: ArrayLike | None = None, labels: ArrayLike | None = None,
              index: ArrayLike | None = None, topk_indices: ArrayLike | None = None,
              topk_values: ArrayLike | None = None, logsumexp: ArrayLike | None = None,
              num_classes: int | None = None, temperatures: Sequence[float] = (1.0,),
              dtype: str = "float32", chunk_rows: int = 0, overwrite: bool = False,
              progress: Progress | None = None) -> dict[str, Any]:
    """Write a complete, checksummed example set from arrays (module docstring): `logits`
    (R, C), or `topk_indices`/`topk_values` (R, k) with optional `logsumexp` (R, K) and
    `num_classes`. `labels` (R,) default to the data's, `index` (R,) to 0..R-1. Returns the
    set's metadata."""
    temps = tuple(check_temperature(t) for t in temperatures)
    check_choice(dtype, S.DTYPE_CHOICES, "dtype")
    z, idx, val = _array(logits, "logits"), _array(topk_indices, "--topk-indices"), \
        _array(topk_values, "--topk-values")
    lse = _array(logsumexp, "--logsumexp")
    if (z is None) == (idx is None or val is None) or (z is not None and idx is not None):
        raise OptionError("pass either logits, or topk indices and values")
    if data_kind(data) != "examples":
        raise OptionError("write_set makes example sets (one row per example); bring token "
                          "sequences in with `softlabels import --vllm` or `--parquet`")
    dataset = load_data(data) if isinstance(data, str) else data
    if z is not None:
        _shape(z, (None, None), "logits", "f")
        rows, c, k = z.shape[0], z.shape[1], 0
        if num_classes is not None and num_classes != c:
            raise OptionError(f"--num-classes {num_classes} but the logits have {c} columns; "
                              "drop --num-classes (dense logits give the classes)")
    else:
        _shape(idx, (None, None), "topk indices", "iu")
        rows, k = idx.shape
        _shape(val, (rows, k), "topk values", "f")
        if lse is not None:
            _shape(lse, (rows, len(temps)), "logsumexp (one column per temperature)", "f")
        elif temps != (1.0,):
            raise OptionError("top-k values without --logsumexp are log-probabilities at T = 1: "
                              "they are exact at T = 1 only; pass --temperatures 1, or the "
                              "logsumexp of every temperature")
        if num_classes is None:
            raise OptionError("top-k arrays need --num-classes (the teacher's C)")
        c = check_num_classes(num_classes, "--num-classes", above=k)
    index = (np.arange(rows, dtype=np.int64) if index is None else
             np.asarray(_array(index, "index")))
    _shape(index, (rows,), "index", "iu")
    if rows == 0 or index.min() < 0 or index.max() >= len(dataset):
        raise DataError(f"index must lie in [0, {len(dataset)}) (the data's examples), and "
                        "there must be rows")
    if labels is None:
        labels = _data_labels(dataset, index)
    else:
        labels = _array(labels, "labels")
        _shape(labels, (rows,), "labels", "iuf")  # before any copy
        labels = check_labels(np.asarray(labels), where="labels", num_classes=c)
    layout = Layout(num_rows=rows, num_classes=c, temperatures=temps, dtype=dtype, topk=k,
                    chunk_rows=chunk_rows)
    proof = arrays_digest({"logits": z, "topk_indices": idx, "topk_values": val,
                           "logsumexp": lse, "labels": labels, "index": index})
    if not overwrite:
        refuse_other_arrays(out, proof)
    source = "logprobs" if k and lse is None else "logits"
    made: dict[str, Any] = {"source": source}
    if k:  # top-k: exact at the stored T (dense: at every T, re-tempered from the logits)
        made["exact_temperatures"] = [1.0] if source == "logprobs" else list(temps)
    meta = imported_meta(
        teacher_name=teacher_name, targets=made, class_names=class_names(dataset),
        dataset={"spec": data if isinstance(data, str) else f"object:{type(data).__name__}",
                 "length": len(dataset), "probe": dataset_probe(dataset)},
        provenance={"format": "arrays", "digest": proof})

    def block_arrays(block: int) -> dict[str, np.ndarray]:
        a, b = layout.block_range(block)
        targets = (_dense_block(z[a:b], temps) if not k else
                   _topk_block(idx[a:b], val[a:b], None if lse is None else lse[a:b], temps, c,
                               f"rows {a}-{b - 1}"))
        return {S.LABELS: labels[a:b], S.INDEX: index[a:b],
                S.SAMPLE_HASH: _row_hashes(dataset, index[a:b]), **targets}

    return write_rows(out, layout, meta,
                      ExampleRows(block_arrays, lambda a, b: _row_hashes(dataset, index[a:b])),
                      overwrite=overwrite, progress=progress)

def arrays_digest(arrays: dict[str, np.ndarray | None]) -> str:
    """xxh3-128 over each given array's name, dtype, shape and bytes (in 64 MiB slices)."""
    h = xxhash.xxh3_128()
    for name, a in sorted((n, a) for n, a in arrays.items() if a is not None):
        a = np.asarray(a)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        flat = a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
        step = max(1, (64 << 20) // max(a.itemsize, 1))
        for start in range(0, flat.size, step):
            h.update(flat[start:start + step].view(np.uint8))  # no copy
    return h.hexdigest()


def refuse_other_arrays(out: str | os.PathLike[str], proof: str) -> None:
    """Refuse to resume (or call complete) a set at `out` begun from other arrays: the writer
    compares the teacher's weights and the data, and an imported teacher has no weights."""
    try:
        store = open_store(out, "r")
    except (SoftlabelsError, OSError):
        return  # nothing there, or not a set: the writer says so
    try:
        old = store.get_meta() or {}
    finally:
        store.close()
    recorded = ((old.get("provenance") or {}).get("imported_from") or {}).get("digest")
    if recorded is not None and recorded != proof:
        raise MismatchError(f"{out} was begun from other arrays (digest {recorded}, these are "
                            f"{proof}); it was left untouched: use another --out, or "
                            "--overwrite")


def load_arrays(paths: dict[str, str | Path | None]) -> dict[str, np.ndarray | None]:
    """name -> the array at each path (memory-mapped), for the command line."""
    return {name: _array(p, name) for name, p in paths.items()}
