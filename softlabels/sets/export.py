"""Export a sequence set to the columns LLM-distillation trainers read (Axolotl's KD plugin).

One record per sequence (docs/INTERCHANGE.md):

    input_ids         [L]      int32   the set's input tokens (seq/tokens)
    labels            [L]      int64   Hugging Face causal-LM labels: labels[p + 1] is the set's
                                       hard target at p where p is distilled, else -100;
                                       labels[0] = -100 (the model shifts them)
    target_token_ids  [L, K]   int32   the teacher's K classes at position p (the distribution of
                                       the token after p), most probable first
    target_logprobs   [L, K]   float32 their log-probabilities at the chosen stored T
    target_mask       [L, K]   uint8   1 where position p is distilled (seq/mask) and the entry
                                       holds a class (0 on padding entries)

A top-k set is exported as stored (log p = topk/logits / T - topk/logsumexp[T], exact); a dense
set as its K most probable classes at T (`topk`, log of the probabilities softlabels serves); a
sampled set as the distinct drawn classes with log(count / k), padded to k with id 0, log-prob
-inf and mask 0. A top-k set also carries `softlabels_*` columns (its stored top-k logits and
log-sum-exps, labels, index and sample hash), so `softlabels import` rebuilds it bit for bit.
The set's metadata, the T and the export's description go into every Parquet file's schema
metadata (key `softlabels`) and `_softlabels.json` beside them; in a `datasets` directory, into
`info.description` (JSON), which `datasets.load_from_disk` keeps.

Blocks are read one at a time through the checked reader; memory holds one block and the
sequences that continue past it. The output is written into `DIR.exporting` and renamed to DIR
when complete; every file is created without following links.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from softlabels._version import __version__
from softlabels.errors import OptionError, SoftlabelsError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.sequence import SEQ_MASK, SEQ_TOKENS, read_offsets
from softlabels.format.targets import TargetKind, refuse_unstored
from softlabels.progress import Progress
from softlabels.safe_read import MAX_DESCRIPTION_BYTES, read_input

FORMATS = ("hf", "parquet")
SHARD_POSITIONS = 1 << 20  # positions per Parquet file
META_KEY = "softlabels"
SIDECAR = "_softlabels.json"  # a leading _ : pyarrow.dataset and pandas skip it
STAGING = ".exporting"
ALIGNMENT = ("target_* at position p describe the token after p (the student's logits at p); "
             "labels are unshifted Hugging Face causal-LM labels")


def exact_temperatures(ts: TransferSet) -> list[float] | None:
    """The only temperatures a set's targets are exact at, when it records them (a set imported
    from log-probabilities: [1.0]); None when every stored T is exact."""
    targets = ts.info.teacher.targets
    temps = targets.exact_temperatures if targets else None
    return None if temps is None else [float(t) for t in temps]


def check_temperature_servable(ts: TransferSet, temperature: float) -> tuple[str, int | None]:
    """(kind, index of T among the stored ones or None); refuses, in one line, a T the set
    cannot serve exactly."""
    exact = exact_temperatures(ts)
    if exact is not None and not any(abs(t - temperature) <= 1e-6 * t for t in exact):
        raise OptionError(f"{ts.path} was imported from log-probabilities at T = "
                          f"{', '.join(f'{t:g}' for t in exact)}: its targets are exact there "
                          f"only, not at T = {temperature:g} (the classes outside the top k are "
                          "unknown, so no normaliser exists); use --temperature 1")
    k = ts.temperature_index(temperature)
    refuse_unstored(str(ts.path), ts.target, temperature, tuple(ts.temperatures), k)
    return ts.target.name, k


# --- rows --------------------------------------------------------------------------------------


def _records(cols: dict[str, np.ndarray], offsets: np.ndarray, target: TargetKind, t: float,
             k: int | None, topk: int | None) -> dict[str, Any]:
    """The export's columns for whole sequences: flat per-position arrays and the sequences'
    local offsets (n_seq + 1,). The targets are the codec's `ranked` view; a kind's own
    columns (`softlabels_*`: top-k's stored logits, so a round trip is exact) come with the
    stored labels, index and sample hashes."""
    tg = target.ranked(cols, t, k, topk)
    mask = cols[SEQ_MASK].astype(bool)
    lab = np.where(mask & (cols[S.LABELS] >= 0), cols[S.LABELS], -100)
    hf = np.empty_like(lab)
    hf[1:] = lab[:-1]
    hf[offsets[:-1]] = -100  # a sequence's first token is never a target
    out = {"input_ids": cols[SEQ_TOKENS].astype(np.int32), "labels": hf.astype(np.int64),
           "target_token_ids": tg["ids"].astype(np.int32), "target_logprobs": tg["lp"],
           "target_mask": (tg["valid"] & mask[:, None]).astype(np.uint8)}
    own = {name: a for name, a in tg.items() if name.startswith("softlabels_")}
    if own:
        out |= own | {"softlabels_labels": cols[S.LABELS].astype(np.int64),
                      "softlabels_index": cols[S.INDEX][offsets[:-1]],
                      "softlabels_sample_hash": cols[S.SAMPLE_HASH][offsets[:-1]]}
    return {"columns": out, "offsets": offsets}


def export_batches(ts: TransferSet, temperature: float = 1.0, topk: int | None = None,
                   ) -> Iterator[dict[str, Any]]:
    """The export's records, a chunk of whole sequences at a time, block by checked block:
    each {"columns": name -> flat per-position (or per-sequence) arrays, "offsets": (n + 1,)}.
    How a set's rows become records is its kind's (`KINDS`); checks run at the first record."""
    yield from KINDS[ts.layout.kind](ts, temperature, topk)


def _refuse_examples(ts: TransferSet, temperature: float, topk: int | None,
                     ) -> Iterator[dict[str, Any]]:
    raise SoftlabelsError(f"{ts.path} is an example set (one row per example); export "
                          "writes sequence sets, whose rows are token positions (read an "
                          "example set with zarr or h5py: docs/FORMAT.md)")


def _sequence_records(ts: TransferSet, temperature: float, topk: int | None,
                      ) -> Iterator[dict[str, Any]]:
    """A sequence set's records: whole sequences, those that continue past a block carried
    into the next."""
    kind, k = check_temperature_servable(ts, temperature)
    if kind == "dense" and not (topk and 0 < topk <= ts.num_classes):
        raise OptionError(f"{ts.path} is dense ({ts.num_classes} classes): pass --topk K "
                          f"(1..{ts.num_classes}) to export its K most probable classes")
    if kind != "dense" and topk is not None:
        raise OptionError(f"--topk {topk} applies to a dense set; {ts.path} is {kind} and is "
                          "exported with the classes it stores: leave --topk out")
    offsets = read_offsets(ts)
    names = [SEQ_TOKENS, S.LABELS, SEQ_MASK, S.INDEX, S.SAMPLE_HASH,
             *ts.target.served(k is not None)]
    carry: dict[str, list[np.ndarray]] = {}
    first = 0  # the row where the carried rows start
    for b in range(ts.num_blocks):
        got = ts.read_block(b, names, temperature=None if k is None else ts.temperatures[k])
        for name, a in got.items():
            carry.setdefault(name, []).append(a)
        stop = ts.block_range(b)[1]
        s0 = int(np.searchsorted(offsets, first))
        s1 = int(np.searchsorted(offsets, stop, side="right")) - 1  # sequences ending <= stop
        if s1 <= s0:
            continue
        end = int(offsets[s1]) - first
        cols = {n: np.concatenate(p) for n, p in carry.items()}
        try:
            record = _records({n: a[:end] for n, a in cols.items()},
                              offsets[s0:s1 + 1] - first, ts.target, temperature, k, topk)
        except OptionError as exc:  # a kind export has no columns for (hybrid)
            raise OptionError(f"{ts.path}: {exc}") from None
        yield record
        carry = {n: [a[end:]] for n, a in cols.items()}
        first += end


KINDS: dict[str, Callable[[TransferSet, float, int | None], Iterator[dict[str, Any]]]] = {
    "examples": _refuse_examples, "sequences": _sequence_records}


# --- Arrow -------------------------------------------------------------------------------------


def _arrow_table(record: dict[str, Any], metadata: dict[bytes, bytes]) -> Any:
    import pyarrow as pa

    offsets = pa.array(record["offsets"].astype(np.int32))
    arrays, names = [], []
    for name, a in record["columns"].items():
        if a.ndim == 1 and len(a) == len(record["offsets"]) - 1 and name in PER_SEQUENCE:
            arr = pa.array(a)
        elif a.ndim == 1:
            arr = pa.ListArray.from_arrays(offsets, pa.array(a))
        else:
            inner = pa.ListArray.from_arrays(
                pa.array(np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)),
                pa.array(a.reshape(-1)))
            arr = pa.ListArray.from_arrays(offsets, inner)
        arrays.append(arr)
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names).replace_schema_metadata(metadata)


PER_SEQUENCE = ("softlabels_index", "softlabels_sample_hash")


def _create(path: Path) -> Any:
    """A new file opened for writing: never through a link, never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "wb")


def _fresh_dir(out: Path) -> Path:
    """Refuse an existing non-empty DIR or a link; make DIR.exporting to write into."""
    if out.is_symlink():
        raise OptionError(f"{out} is a symbolic link; name a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptionError(f"{out} exists and is not an empty directory; name a new directory")
    if not out.parent.is_dir():
        raise OptionError(f"cannot export to {out}: the folder {out.parent} does not exist; "
                          "create it first, or name a directory in an existing folder")
    staging = out.with_name(out.name + STAGING)
    try:
        os.mkdir(staging)
    except FileExistsError:
        raise OptionError(f"{staging} exists (an export that was stopped?); remove it and "
                          "export again") from None
    return staging


def _write_parquet(batches: Iterator[dict[str, Any]], where: Path, metadata: dict[bytes, bytes],
                   shard_positions: int, progress: Progress | None, total: int,
                   ) -> tuple[list[Path], int, int]:
    import pyarrow.parquet as pq

    files: list[Path] = []
    writer, f, in_shard, done, seqs = None, None, 0, 0, 0
    try:
        for record in batches:
            table = _arrow_table(record, metadata)
            if writer is None or in_shard >= shard_positions:
                if writer is not None:
                    writer.close()
                    f.close()
                files.append(where / f"data-{len(files):05d}.parquet")
                f = _create(files[-1])
                writer, in_shard = pq.ParquetWriter(f, table.schema), 0
            writer.write_table(table)
            n = int(record["offsets"][-1])
            in_shard, done, seqs = in_shard + n, done + n, seqs + len(record["offsets"]) - 1
            if progress:
                progress(done, total)
    finally:
        if writer is not None:
            writer.close()
            f.close()
    return files, done, seqs


def _to_hf(files: list[Path], staging: Path, description: str) -> Path:
    """A `datasets` directory (save_to_disk) from the Parquet files, description attached."""
    try:
        import datasets
    except ImportError:
        raise SoftlabelsError("--to hf needs the `datasets` package: pip install datasets "
                              "(or export --to parquet)") from None
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_parquet([str(p) for p in files],
                                           cache_dir=str(staging / "_cache"))
        ds.info.description = description
        ds.save_to_disk(str(staging / "dataset"))
    finally:
        if bars:
            datasets.enable_progress_bars()
    return staging / "dataset"


def export_set(path: str | os.PathLike[str], out: str | os.PathLike[str], *, to: str = "parquet",
               temperature: float = 1.0, topk: int | None = None,
               shard_positions: int = SHARD_POSITIONS,
               progress: Progress | None = None) -> dict[str, Any]:
    """Export the sequence set at `path` into a new directory `out`: Parquet shards
    (`to="parquet"`) or a `datasets` directory (`to="hf"`). Returns a summary (the metadata
    written, sequences, positions, files)."""
    if to not in FORMATS:
        raise OptionError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    out = Path(out)
    with open_transfer_set(path) as ts:
        batches = export_batches(ts, temperature, topk)  # checks run at the first record
        first = next(batches)
        kind = ts.target.name
        info = {"format": "softlabels-export", "version": 1, "set": ts.meta,
                "source": str(ts.path), "temperature": temperature, "kind": kind,
                "k": int(first["columns"]["target_token_ids"].shape[1]),
                "alignment": ALIGNMENT, "softlabels": __version__}
        text = json.dumps(info, sort_keys=True)
        if _exported_before(out, text):  # a rerun of a finished export: nothing to do
            return {"path": str(out), "to": to, "already_complete": True,
                    "positions": ts.num_rows, "temperature": temperature, "kind": kind,
                    "k": info["k"]}
        staging = _fresh_dir(out)
        try:
            where = staging if to == "parquet" else staging / "_parquet"
            where.mkdir(exist_ok=True)
            files, positions, seqs = _write_parquet(
                _chain(first, batches), where, {META_KEY.encode(): text.encode()},
                shard_positions, progress, ts.num_rows)
            if to == "parquet":
                with _create(staging / SIDECAR) as f:
                    f.write(text.encode())
                done = staging
            else:
                done = _to_hf(files, staging, text)
            if out.exists():
                out.rmdir()  # empty (checked above): rename replaces it
            os.rename(done, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return {"path": str(out), "to": to, "sequences": seqs, "positions": positions,
            "files": len(files), "temperature": temperature, "kind": kind, "k": info["k"]}


def _exported_before(out: Path, text: str) -> bool:
    """Whether `out` holds a finished export with exactly this description (same set, T, k)."""
    if out.is_symlink() or not out.is_dir() or not any(out.iterdir()):
        return False
    try:
        return read_export_info(out) == json.loads(text)
    except (SoftlabelsError, OSError):
        return False


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest


def read_export_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `softlabels` description of an export (a Parquet file, a directory of them or a
    `datasets` directory), or None when it has none. A description that is not a JSON object,
    or a file that is not Parquet, is refused in one line."""
    path = Path(path)
    for name in (SIDECAR, "dataset_info.json"):  # one that is a fifo or a folder is refused,
        if (path / name).exists() and not (path / name).is_file():  # not taken as no sidecar
            raise TransferSetError(f"{path / name} is not a regular file (a fifo, a device or "
                                   "a folder); restore the export's description")
    if (path / SIDECAR).is_file():
        return _description(read_input(path / SIDECAR, "export description",
                                       limit=MAX_DESCRIPTION_BYTES), path / SIDECAR, strict=True)
    if (path / "dataset_info.json").is_file():
        info = _description(read_input(path / "dataset_info.json", "export description",
                                       limit=MAX_DESCRIPTION_BYTES),
                            path / "dataset_info.json", strict=True)
        found = _description(str((info or {}).get("description") or "").encode(), path,
                             strict=False)
        return found if found and found.get("format") == "softlabels-export" else None
    if path.is_file():
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, pa.ArrowException) as exc:
            raise TransferSetError(f"{path} is not a readable Parquet file "
                                   f"({str(exc).splitlines()[0][:120]}); it is damaged or "
                                   "another kind of file") from None
        key = META_KEY.encode()
        return _description(meta[key], path, strict=True) if key in meta else None
    raise TransferSetError(f"{path} is not an export (no {SIDECAR}, dataset_info.json or "
                           "Parquet file)")


def _description(raw: bytes, where: Path, *, strict: bool) -> dict[str, Any] | None:
    """A JSON object read from `raw`; anything else is refused (strict) or None."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        value = None
    if isinstance(value, dict):
        return value
    if strict:
        raise TransferSetError(f"{where} is not a JSON object as an export writes it; it is "
                               "damaged: export the set again")
    return None
