"""Parquet (or a `datasets` directory) in the export's columns -> a top-k sequence set.

Two cases (docs/INTERCHANGE.md):

- **A softlabels export of a top-k set** (its `softlabels` metadata and `softlabels_*` columns
  present): the set is rebuilt bit for bit - every array, the metadata and so the digest -
  from the stored top-k logits and log-sum-exps. Every column is checked against the
  metadata first (shapes, ids, the log-probs the logits imply at the export's T, the sample
  hashes), and the digest the rebuilt set will have is compared with the one recorded before
  anything is written.
- **Any other Parquet in those columns** (`input_ids`, `labels`, `target_token_ids`,
  `target_logprobs`, `target_mask`; Axolotl's KD layout): log-probabilities at one T
  (`temperature`, default 1) -> a top-k set that stores that T alone. Position p's K entries
  must all be masked in (a distilled position) or all out (stored with placeholder targets and
  mask 0); hard labels are read from the Hugging Face labels (`labels[p + 1]`, -100 -> -1).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import DataError, MismatchError, OptionError
from softlabels.format import schema as S
from softlabels.format.layout import Layout, check_described, digest
from softlabels.format.sequence import with_offsets
from softlabels.options import check_temperature
from softlabels.progress import Progress
from softlabels.safe_read import open_input
from softlabels.sets.export import META_KEY, SIDECAR, read_export_info
from softlabels.sets.imports import (
    SequenceRows,
    check_logprobs,
    check_vocab_size,
    first_pass,
    imported_meta,
    input_sha256,
    logprob_targets,
    next_token_labels,
    placeholder_targets,
    sequence_columns,
    sequence_hash,
    token_dataset,
    write_rows,
)
from softlabels.sources.saved_datasets import load_saved

COLUMNS = ("input_ids", "labels", "target_token_ids", "target_logprobs", "target_mask")
EXACT = ("softlabels_topk_logits", "softlabels_topk_logsumexp", "softlabels_labels",
         "softlabels_index", "softlabels_sample_hash")


# --- reading -----------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    """The Parquet files at `path` (a file or a directory of them), each a regular file (a
    fifo would be waited on by pyarrow)."""
    files = [path] if path.is_file() else sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        raise DataError(f"{path} is neither a Parquet file, a directory of them, nor a "
                        "`datasets` directory")
    for f in files:
        open_input(f, "Parquet file").close()
    return files


def _input_files(path: Path) -> list[Path]:
    """The files `_batches` reads: a `datasets` directory's Arrow files, or the Parquet ones."""
    if (path / "state.json").is_file():
        return sorted(path.glob("*.arrow"))
    return _files(path)


def _batches(path: Path, columns: list[str]) -> Iterator[Any]:
    """Record batches of `columns`, in order, from Parquet or a `datasets` directory."""
    if (path / "state.json").is_file():
        ds = load_saved(path)
        import datasets  # load_saved has found it

        if isinstance(ds, datasets.DatasetDict) or ds._indices is not None:
            raise DataError(f"{path}: name one split, without an indices mapping "
                            "(ds.flatten_indices().save_to_disk(...))")
        _require(ds.column_names, columns, path)
        yield from ds.data.table.select(columns).to_batches(max_chunksize=1024)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in _files(path):
        try:
            pf = pq.ParquetFile(f)
            _require(pf.schema_arrow.names, columns, f)
            yield from pf.iter_batches(batch_size=1024, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise DataError(f"{f} is not a readable Parquet file ({first}); it is damaged "
                            "or another kind of file: write or copy it again") from None


def _require(have: list[str], columns: list[str], where: Path) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"{where} lacks the column(s) {', '.join(missing)}; expected "
                        f"{', '.join(columns)}")


def _flat(col: Any, where: str, inner: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n + 1,), values) of a list column: values (total,) for a list of scalars,
    (total, K) for a list of lists, each inner list of K entries (`inner`, else the first's)."""
    import pyarrow as pa

    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise DataError(f"{where}: expected a list column, found {col.type}")
    if col.null_count:
        raise DataError(f"{where}: a row is null")
    offsets = np.asarray(col.offsets).astype(np.int64)
    values = col.values[int(offsets[0]):int(offsets[-1])]
    offsets = offsets - offsets[0]
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        return offsets, values.to_numpy(zero_copy_only=False)
    if values.null_count:
        raise DataError(f"{where}: a position is null")
    starts = np.asarray(values.offsets).astype(np.int64)
    lengths = np.diff(starts)
    k = inner if inner is not None else (int(lengths[0]) if len(lengths) else 0)
    if len(lengths) and (lengths != k).any():
        p = int(np.argmax(lengths != k))
        raise DataError(f"{where}: a position holds {lengths[p]} entries where {k} were "
                        "expected; every position needs the same K")
    flat = values.values[int(starts[0]):int(starts[-1])] if len(lengths) else values.values[:0]
    return offsets, flat.to_numpy(zero_copy_only=False).reshape(len(lengths), k)


SCALARS = ("softlabels_index", "softlabels_sample_hash")
TOPK_COLUMNS = ("target_token_ids", "target_logprobs", "target_mask", "softlabels_topk_logits")


def _sequences(path: Path, columns: list[str], k: int | None,
               ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(where, name -> the sequence's values) for every row, in order; the K entries of every
    position of the top-k columns must number `k`."""
    row = 0
    for batch in _batches(path, columns):
        cols = {}
        for name in columns:
            col = batch.column(name)
            cols[name] = ((None, col.to_numpy(zero_copy_only=False)) if name in SCALARS else
                          _flat(col, f"{path} column {name} (rows from {row})",
                                k if name in TOPK_COLUMNS else None))
        for i in range(batch.num_rows):
            yield f"{path} row {row}", {
                name: vals[i] if off is None else vals[off[i]:off[i + 1]]
                for name, (off, vals) in cols.items()}
            row += 1


# --- the two cases -----------------------------------------------------------------------------


def _checked_generic(where: str, seq: dict[str, np.ndarray], num_classes: int,
                     dtype: str) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray,
                                          np.ndarray]:
    tokens = seq["input_ids"].astype(np.int64)
    n = len(tokens)
    if n == 0:
        raise DataError(f"{where}: an empty sequence")
    for name in COLUMNS[1:]:
        if len(seq[name]) != n:
            raise DataError(f"{where}: {name} has {len(seq[name])} positions, input_ids {n}")
    mask2 = seq["target_mask"].astype(np.int64)
    on, off = (mask2 == 1).all(1), (mask2 == 0).all(1)
    if not (on | off).all():
        p = int(np.argmax(~(on | off)))
        raise DataError(f"{where}: position {p} is masked in part (target_mask {mask2[p]}); a "
                        "top-k set stores exactly K classes per distilled position")
    ids, lp = seq["target_token_ids"].astype(np.int64), seq["target_logprobs"]
    check_logprobs(lp[on].astype(np.float64), ids[on], num_classes, where)
    k = ids.shape[1]
    targets = placeholder_targets(n, k, dtype)
    real = logprob_targets(lp[on], ids[on], dtype)
    for name in targets:
        targets[name][on] = real[name]
    hf = seq["labels"].astype(np.int64)
    if ((hf < 0) & (hf != -100)).any() or (hf >= num_classes).any():
        raise DataError(f"{where}: labels must be token ids in [0, {num_classes}) or -100")
    labels = np.append(np.where(hf[1:] >= 0, hf[1:], -1), -1)
    return tokens, targets, on.astype(np.uint8), labels


def _checked_exact(where: str, seq: dict[str, np.ndarray], layout: Layout,
                   info: dict[str, Any]) -> dict[str, np.ndarray]:
    tokens = seq["input_ids"].astype(np.int64)
    n, k = len(tokens), layout.topk
    shapes = {"labels": (n,), "target_token_ids": (n, k), "target_logprobs": (n, k),
              "target_mask": (n, k), "softlabels_topk_logits": (n, k),
              "softlabels_topk_logsumexp": (n, len(layout.temperatures)),
              "softlabels_labels": (n,)}
    for name, shape in shapes.items():
        if seq[name].shape != shape:
            raise DataError(f"{where}: {name} has shape {seq[name].shape}, the metadata implies "
                            f"{shape}")
    ids = seq["target_token_ids"].astype(np.int64)
    z = seq["softlabels_topk_logits"]
    lse = seq["softlabels_topk_logsumexp"].astype(np.float32)
    if z.dtype != np.dtype(layout.topk_dtype):
        raise DataError(f"{where}: softlabels_topk_logits is {z.dtype}, the metadata says "
                        f"{layout.topk_dtype}")
    t = info.get("temperature")
    near = [isinstance(t, (int, float)) and abs(x - t) <= 1e-6 * t for x in layout.temperatures]
    if not any(near):
        raise MismatchError(f"{where}: the export's temperature {t!r} is not one the set "
                            f"stores ({list(layout.temperatures)}); the export was edited")
    t, ti = float(t), near.index(True)
    implied = z.astype(np.float32) / np.float32(t) - lse[:, ti:ti + 1]
    lp = seq["target_logprobs"]
    if not np.array_equal(implied.astype(np.float32), lp.astype(np.float32)):
        raise MismatchError(f"{where}: target_logprobs differ from what softlabels_topk_logits "
                            "and softlabels_topk_logsumexp imply; the export was edited")
    check_logprobs(lp.astype(np.float64), ids, layout.num_classes, where)
    if not np.isfinite(lse).all():
        raise DataError(f"{where}: softlabels_topk_logsumexp holds NaN or inf")
    mask = seq["target_mask"]
    if not ((mask == mask[:, :1]).all() and np.isin(mask, (0, 1)).all()):
        raise DataError(f"{where}: target_mask differs within a position")
    own = seq["softlabels_labels"].astype(np.int64)
    if ((own < -1) | (own >= layout.num_classes)).any() or (
            layout.sequence_labels == "next-token"
            and not np.array_equal(own, next_token_labels(tokens, layout.num_classes))):
        raise MismatchError(f"{where}: softlabels_labels are not "
                            + ("the next tokens" if layout.sequence_labels == "next-token" else
                               f"classes in [-1, {layout.num_classes})")
                            + "; the export was edited")
    hf = np.full(n, -100, np.int64)
    lab = own[:-1]
    hf[1:] = np.where((mask[:-1, 0] == 1) & (lab >= 0), lab, -100)
    if not np.array_equal(seq["labels"].astype(np.int64), hf):
        raise MismatchError(f"{where}: labels differ from what softlabels_labels and "
                            "target_mask imply; the export was edited")
    if int(seq["softlabels_sample_hash"]) != sequence_hash(tokens):
        raise MismatchError(f"{where}: softlabels_sample_hash is not the hash of input_ids")
    order = np.argsort(ids, axis=1, kind="stable")
    targets = {S.TOPK_INDICES: np.take_along_axis(ids, order, 1).astype(np.int32),
               S.TOPK_LOGITS: np.take_along_axis(z, order, 1),
               S.TOPK_LOGSUMEXP: lse}
    return sequence_columns(tokens, int(seq["softlabels_index"]), mask[:, 0],
                            seq["softlabels_labels"], targets)


# --- entry point -------------------------------------------------------------------------------


def import_parquet(path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   teacher_name: str | None = None, vocab_size: int | None = None,
                   temperature: float = 1.0, dtype: str = "float32", chunk_rows: int = 0,
                   overwrite: bool = False, progress: Progress | None = None,
                   ) -> dict[str, Any]:
    """Import Parquet (a file, a directory of files, or a `datasets` directory) in the
    export's columns into a sequence set (module docstring). Returns the set's metadata."""
    path = Path(path)
    described = path.is_dir() and any((path / n).is_file() for n in (SIDECAR, "dataset_info.json"))
    info = read_export_info(path if described else _files(path)[0])
    exact = (info is not None and info.get("kind") == "topk"
             and isinstance(info.get("set"), dict))
    if exact:
        return _import_exact(path, out, info, overwrite, progress)
    if teacher_name is None or vocab_size is None:
        raise OptionError("importing Parquet that is not a softlabels export of a top-k set "
                          "needs --teacher-name and --vocab-size")
    temperature = check_temperature(temperature, "--temperature")
    check_vocab_size(vocab_size)
    columns, k = list(COLUMNS), _first_k(path)
    offsets, hashes = first_pass((_checked_generic(where, seq, vocab_size, dtype)[0]
                                  for where, seq in _sequences(path, columns, k)),
                                 f"{path} holds no rows")
    layout = Layout(num_rows=int(offsets[-1]), num_classes=vocab_size,
                    temperatures=(float(temperature),), topk=k, num_sequences=len(hashes),
                    topk_dtype=dtype, chunk_rows=chunk_rows, sequence_labels="data")
    meta = imported_meta(
        teacher_name=teacher_name,
        dataset=token_dataset(f"tokens:{path}?field=input_ids", hashes),
        targets={"source": "logprobs", "exact_temperatures": [float(temperature)]},
        provenance={"format": "parquet", "path": str(path), "temperature": temperature},
        sha256=input_sha256(_input_files(path)))

    def rows() -> Iterator[dict[str, np.ndarray]]:
        for s, (where, seq) in enumerate(_sequences(path, columns, k)):
            tokens, targets, mask, labels = _checked_generic(where, seq, vocab_size, dtype)
            yield sequence_columns(tokens, s, mask, labels, targets)

    return write_rows(out, layout, meta, SequenceRows(offsets, rows()), overwrite=overwrite,
                      progress=progress)


def _first_k(path: Path) -> int:
    for _, seq in _sequences(path, ["target_token_ids"], None):
        if len(seq["target_token_ids"]):
            return int(seq["target_token_ids"].shape[1])
    raise DataError(f"{path}: no position holds a target")


def _import_exact(path: Path, out: str | os.PathLike[str], info: dict[str, Any],
                  overwrite: bool, progress: Progress | None) -> dict[str, Any]:
    meta = info["set"]
    where = f"{path} ({META_KEY} metadata)"
    layout = Layout.from_meta(meta, where=where)
    check_described(meta, where)
    if layout.kind != "sequences" or not layout.topk:
        raise DataError(f"{where} does not describe a top-k sequence set")
    columns = [*COLUMNS, *EXACT]
    lengths, row_hash = [], hashlib.sha256()
    for w, seq in _sequences(path, columns, layout.topk):  # pass 1: check all
        cols = _checked_exact(w, seq, layout, info)
        lengths.append(len(cols[S.LABELS]))
        row_hash.update(np.ascontiguousarray(cols[S.SAMPLE_HASH], "<u8").tobytes())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if len(lengths) != layout.num_sequences or offsets[-1] != layout.num_rows:
        raise MismatchError(f"{path} holds {len(lengths)} sequences of {offsets[-1]} positions; "
                            f"its metadata says {layout.num_sequences} of {layout.num_rows}")
    rebuilt = with_offsets(layout, offsets, where=out, labels=layout.sequence_labels)
    preview = {**meta, **rebuilt.to_meta(),
               "dataset": {**meta["dataset"], "fingerprint": row_hash.hexdigest()}}
    recorded = meta.get("digest") or {}
    differ = [key for key, value in digest(preview).items() if recorded.get(key, value) != value]
    if differ:
        raise MismatchError(f"{path}'s columns do not match the metadata it carries "
                            f"({', '.join(differ)} differ from the recorded digest); the "
                            "export was edited")
    meta = {**meta, "provenance": {**(meta.get("provenance") or {}), "imported_from": {
        "format": "softlabels-export", "path": str(path), "temperature": info["temperature"]}}}
    rows = (_checked_exact(w, seq, layout, info)
            for w, seq in _sequences(path, columns, layout.topk))
    return write_rows(out, layout, meta, SequenceRows(offsets, rows), overwrite=overwrite,
                      progress=progress)

