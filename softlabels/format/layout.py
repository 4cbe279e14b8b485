"""The layout of a transfer set, defined once.

For every kind of set (dense, ensemble with member logits, mean-probs, top-k, sampled, views,
stored inputs, sharded) a `Layout` says which arrays the set holds (name, shape, dtype, chunks,
shards, dimension names: `specs()`) and which metadata describes them, in both directions:
`to_meta()` and `Layout.from_meta(meta)`. The writer, the reader, the integrity checks and the
set operations all derive from here; docs/FORMAT.md is the prose of the same contract.

This module also names the metadata that is a set's identity (`IDENTITY_KEYS`, covered by the
`digest` written when a set is completed) and the keys that describe one file rather than its
content (`FILE_KEYS`, never carried into a copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from softlabels.errors import IntegrityError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.targets import Dense, Hybrid, Sampled, TargetKind, TopK


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: everything a backend needs to create it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    dims: tuple[str, ...]
    shuffle_compress: bool = False  # byte-shuffle + zstd (shifted top-k logits of sequences)


@dataclass(frozen=True)
class Layout:
    """Shapes, dtypes and chunking of every array of one transfer set."""

    num_rows: int
    num_classes: int
    temperatures: tuple[float, ...]
    dtype: str = "float16"
    probs_dtype: str = "float32"
    num_members: int = 0  # > 0 stores member_logits (dense sets only)
    chunk_rows: int = 0  # 0: pick ~1 MiB chunks
    shard_rows: int | None = None
    input_shape: tuple[int, ...] | None = None  # set: store the inputs too
    input_dtype: str = "float32"
    views: int = 0  # > 0: each row is one augmented view; store its seed
    topk: int = 0  # > 0: store the k largest logits instead of dense arrays
    sample_k: int = 0  # > 0: store k classes drawn from each p_T instead of dense arrays
    hybrid: Hybrid | None = None  # set: a nucleus head plus sampled tail (format/targets/hybrid.py)
    # Sequence sets (one row per position of token sequences; format/sequence.py)
    num_sequences: int = 0  # > 0: a sequence set of that many sequences
    topk_dtype: str = "float32"  # storage dtype of topk/logits (float16: sequence sets only)
    sequence_labels: str = "next-token"  # labels are the next tokens, or the data's ("data")
    offsets_xxh3: str = ""  # XXH3-64 of seq/offsets (sequence.offsets_hash)
    # the codec of the targets (format/targets), chosen once from the fields above
    target: TargetKind = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.topk and self.sample_k:
            raise TransferSetError("choose --topk or --sample-k, not both")
        if self.hybrid and (self.topk or self.sample_k):
            raise TransferSetError("a hybrid set takes its head cap from Hybrid.k; drop topk "
                                   "and sample_k")
        if self.hybrid and self.hybrid.k >= self.num_classes:
            raise TransferSetError(f"--topk (the hybrid head's cap) must lie in [1, "
                                   f"{self.num_classes - 1}] for {self.num_classes} classes")
        k = self.topk or self.sample_k or (self.hybrid.width if self.hybrid else 0)
        if self.topk < 0 or self.sample_k < 0 or self.topk >= self.num_classes:
            raise TransferSetError(f"--topk must lie in [1, {self.num_classes - 1}] and "
                                   f"--sample-k be positive, for {self.num_classes} classes")
        if k:  # a sparse set keeps no dense arrays, member logits included
            object.__setattr__(self, "num_members", 0)
        object.__setattr__(self, "target", (
            TopK(self.topk, self.topk_dtype, shifted=bool(self.num_sequences)) if self.topk
            else Sampled(self.sample_k) if self.sample_k
            else self.hybrid or Dense(self.num_members)))
        if self.chunk_rows <= 0:
            # ~1 MiB of the widest per-row array: dense logits, or k int32/float32 values
            # never past the set itself: an edge chunk of uncompressed floats is stored whole
            width, dtype = self.target.chunk_width(self.num_classes, self.dtype)
            object.__setattr__(self, "chunk_rows",
                               min(S.default_chunk_rows(width, dtype), self.num_rows))
        if self.topk_dtype not in S.DTYPE_CHOICES:
            raise TransferSetError(f"topk dtype must be one of {S.DTYPE_CHOICES}, "
                                   f"got {self.topk_dtype!r}")
        if self.num_sequences:
            self._check_sequences()
        elif self.topk_dtype != "float32":
            raise TransferSetError("float16 top-k logits are stored only in sequence sets "
                                   "(shifted by each row's largest logit)")
        if self.shard_rows is not None and self.shard_rows % self.chunk_rows:
            raise TransferSetError(f"shard rows {self.shard_rows} must be a multiple of chunk "
                                   f"rows {self.chunk_rows}")

    @property
    def kind(self) -> str:
        """The set's kind of row, from ROW_KINDS: "sequences" (one row per position of token
        sequences) or "examples" (one row per example). Every stage picks its strategy by it."""
        return "sequences" if self.num_sequences else "examples"

    def _check_sequences(self) -> None:
        if not 0 < self.num_sequences <= self.num_rows:
            raise TransferSetError(f"a sequence set needs 1..{self.num_rows} sequences of at "
                                   f"least one position, got {self.num_sequences}")
        if self.views or self.input_shape is not None or self.num_members:
            raise TransferSetError("sequence sets store tokens, not views, inputs or member "
                                   "logits; drop --views, --store-inputs and --keep-members")
        if self.sequence_labels not in SEQUENCE_LABELS:
            raise TransferSetError(f"sequence labels must be one of {SEQUENCE_LABELS}, got "
                                   f"{self.sequence_labels!r}")

    # --- blocks ---------------------------------------------------------------------------
    @property
    def block_rows(self) -> int:
        return self.shard_rows or self.chunk_rows

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.block_rows)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.num_rows)

    # --- arrays ---------------------------------------------------------------------------
    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) for every row array (one entry per row along its row axis)."""
        r, c, k = self.num_rows, self.num_classes, len(self.temperatures)
        out: dict[str, tuple[tuple[int, ...], str]] = {
            S.LABELS: ((r,), "int64"), S.INDEX: ((r,), "int64"), S.SAMPLE_HASH: ((r,), "uint64")}
        out |= self.target.arrays(r, k, self.dtype, self.probs_dtype, c)
        if self.input_shape is not None:
            out[S.INPUTS] = ((r, *self.input_shape), self.input_dtype)
        if self.views:
            out[S.VIEW_SEED] = ((r,), "uint64")
        if self.num_sequences:
            out |= {S.SEQ_POSITION: ((r,), "int32"), S.SEQ_TOKENS: ((r,), "int32"),
                    S.SEQ_MASK: ((r,), "uint8")}
        return out

    def specs(self) -> dict[str, ArraySpec]:
        """Every stored array, the block bookkeeping included, as the writer creates it."""
        out = {}
        for name, (shape, dtype) in self.arrays().items():
            rows = self.input_chunk_rows if name == S.INPUTS else self.chunk_rows
            shards = self.grid(name, shape, self.shard_rows) if self.shard_rows else None
            # sorted, shifted top-k logits of sequence sets halve once byte-shuffled
            # (measured in benchmarks/sequence_storage.py); so do a hybrid's sorted int32 ids
            # (benchmarks/sparse_fidelity.py)
            out[name] = ArraySpec(name, shape, dtype, self.grid(name, shape, rows), shards,
                                  dims_of(name, len(shape)),
                                  shuffle_compress=name in S.SHUFFLED
                                  or (bool(self.num_sequences) and name == S.TOPK_LOGITS))
        out[S.BLOCK_DONE] = ArraySpec(S.BLOCK_DONE, (self.num_blocks,), "uint8", (1,), None,
                                      dims_of(S.BLOCK_DONE, 1))
        slots = len(self.checksum_slots())  # one chunk per block: one writer per chunk
        out[S.ARRAY_CHECKSUM] = ArraySpec(S.ARRAY_CHECKSUM, (self.num_blocks, slots), "uint64",
                                          (1, slots), None, dims_of(S.ARRAY_CHECKSUM, 2))
        if self.num_sequences:  # written whole when the set is laid out, not by block
            n = self.num_sequences + 1
            out[S.SEQ_OFFSETS] = ArraySpec(S.SEQ_OFFSETS, (n,), "int64", (min(n, 1 << 17),),
                                           None, dims_of(S.SEQ_OFFSETS, 1))
        return out

    # --- block checksums (format version 2) ------------------------------------------------
    def checksum_slots(self) -> list[tuple[str, int | None]]:
        """What each column of `array_checksum` covers: every row array in name order, as
        (name, None); an array whose rows lie on axis 1 (`probs`, `member_logits`,
        `sample/indices`) has one slot per leading index (name, j), one temperature or member,
        so a reader of one temperature reads and checks only that temperature."""
        slots: list[tuple[str, int | None]] = []
        for name, (shape, _) in sorted(self.arrays().items()):
            slots += ([(name, j) for j in range(shape[0])] if S.row_axis(name) == 1
                      else [(name, None)])
        return slots

    def block_checksums(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """(S,) uint64: the XXH3-64 of every checksum slot of one block's row arrays (each
        array's rows of the block, all leading axes, as stored)."""
        return np.array([S.array_checksum(arrays[name] if j is None else arrays[name][j])
                         for name, j in self.checksum_slots()], dtype=np.uint64)

    @property
    def input_chunk_rows(self) -> int:
        """Rows per chunk of `inputs`: near 1 MiB, and dividing the block so that a block
        still owns whole chunks."""
        row_bytes = int(np.prod(self.input_shape or (1,))) * np.dtype(self.input_dtype).itemsize
        rows = min(self.block_rows, max(1, S.CHUNK_TARGET_BYTES // row_bytes))
        while self.block_rows % rows:
            rows -= 1
        return rows

    def grid(self, name: str, shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
        """Chunk (or shard) shape: `rows` along the row axis, 1 on leading axes, whole classes."""
        axis = S.row_axis(name)
        return tuple(rows if i == axis else (1 if i < axis else n) for i, n in enumerate(shape))

    # --- metadata, both directions --------------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        """The metadata that describes this layout (the keys of `LAYOUT_KEYS`)."""
        return {
            "num_rows": self.num_rows, "num_classes": self.num_classes,
            "temperatures": list(self.temperatures), "dtype": self.dtype,
            "probs_dtype": self.probs_dtype, "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows, "block_rows": self.block_rows,
            "keep_members": self.num_members > 0, "sparse": self.target.to_meta(),
            "inputs": (None if self.input_shape is None else
                       {"shape": list(self.input_shape), "dtype": self.input_dtype}),
            "views": self.views or None,
            "sequence": None if not self.num_sequences else {
                "num_sequences": self.num_sequences, "topk_dtype": self.topk_dtype,
                "topk_shifted": True, "topk_order": "class", "labels": self.sequence_labels,
                "offsets_xxh3": self.offsets_xxh3},
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any], *, where: str = "the transfer set") -> Layout:
        """The layout a set's metadata describes; the number of members comes from `teacher`.

        Metadata that describes no valid layout raises `TransferSetError` naming the problem.
        """
        try:
            sparse, inputs = meta.get("sparse") or {}, meta.get("inputs") or {}
            seq = meta.get("sequence") or {}
            if seq and (seq.get("topk_shifted"), seq.get("topk_order")) != (True, "class"):
                raise ValueError("a sequence set's top-k logits are shifted and in class order "
                                 f"(topk_shifted true, topk_order 'class'), found {seq!r}")
            if sparse and sparse.get("kind") not in SPARSE_KINDS:
                raise ValueError(f"unknown sparse kind {sparse.get('kind')!r}")
            layout = cls(
                num_rows=_count(meta["num_rows"], 1), num_classes=_count(meta["num_classes"], 1),
                temperatures=_temperatures(meta["temperatures"]),
                dtype=str(meta["dtype"]), probs_dtype=str(meta.get("probs_dtype", "float32")),
                num_members=(len(meta["teacher"]["members"]) if meta.get("keep_members")
                             else 0),
                chunk_rows=_count(meta["chunk_rows"], 1),
                shard_rows=None if meta.get("shard_rows") is None
                else _count(meta["shard_rows"], 1),
                input_shape=tuple(_count(n) for n in inputs["shape"]) if inputs else None,
                input_dtype=str(inputs.get("dtype", "float32")),
                views=_count(meta.get("views") or 0),
                topk=_count(sparse["k"], 1) if sparse.get("kind") == "topk" else 0,
                sample_k=_count(sparse["k"], 1) if sparse.get("kind") == "sample" else 0,
                hybrid=Hybrid.from_meta(sparse) if sparse.get("kind") == "hybrid" else None,
                num_sequences=_count(seq["num_sequences"], 1) if seq else 0,
                topk_dtype=str(seq.get("topk_dtype", "float32")),
                sequence_labels=str(seq.get("labels", "next-token")),
                offsets_xxh3=str(seq["offsets_xxh3"]) if seq else "")
            if inputs and np.dtype(layout.input_dtype).kind not in "biuf":
                raise ValueError(f"inputs dtype {layout.input_dtype!r} is not numeric")
            for name in ("dtype", "probs_dtype"):
                if getattr(layout, name) not in S.DTYPE_CHOICES:
                    raise ValueError(f"{name} {getattr(layout, name)!r} is not one of "
                                     f"{S.DTYPE_CHOICES}")
            if meta.get("block_rows", layout.block_rows) != layout.block_rows:
                raise ValueError(f"block_rows {meta['block_rows']} disagrees with chunk_rows "
                                 f"and shard_rows ({layout.block_rows})")
        except (KeyError, TypeError, ValueError, AttributeError, TransferSetError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TransferSetError(f"{where} has metadata that describes no valid layout "
                                   f"({what}); get a fresh copy of the set") from None
        return layout


def array_problems(layout: Layout, have: dict[str, tuple[tuple[int, ...], Any]], *,
                   version: int = S.FORMAT_VERSION) -> list[str]:
    """How stored arrays (name -> (shape, dtype)) differ from exactly those the layout implies
    in format `version`: version 2 holds `array_checksum`; version 1 holds `block_checksum`
    instead, or no checksums at all in a set from before block checksums."""
    want = layout.specs()
    if version == 1:
        want.pop(S.ARRAY_CHECKSUM)
        if S.BLOCK_CHECKSUM in have:
            want[S.BLOCK_CHECKSUM] = ArraySpec(S.BLOCK_CHECKSUM, (layout.num_blocks,), "uint64",
                                               (1,), None, dims_of(S.BLOCK_CHECKSUM, 1))
    bad = [f"{n}: expected {a.shape} {a.dtype}, found "
           + (f"{have[n][0]} {have[n][1]}" if n in have else "nothing")
           for n, a in want.items()
           if n not in have or (tuple(have[n][0]), str(have[n][1])) != (a.shape, a.dtype)]
    return bad + [f"{n}: not implied by the metadata" for n in sorted(set(have) - set(want))]


def check_described(meta: dict[str, Any], where: str) -> None:
    """Refuse descriptive metadata of the wrong form (teacher, dataset, counts), in one line."""
    teacher, dataset = meta.get("teacher"), meta.get("dataset")
    members = teacher.get("members") if isinstance(teacher, dict) else None
    problems = [
        *(["teacher: expected {\"members\": [{\"spec\", \"sha256\", ...}, ...], \"combine\"}"]
          if not (isinstance(members, list) and members
                  and all(isinstance(m, dict) and isinstance(m.get("sha256"), str)
                          and isinstance(m.get("spec"), str) for m in members)
                  and teacher.get("combine") in S.COMBINE_CHOICES) else []),
        *(["dataset: expected {\"spec\", \"length\", \"fingerprint\", ...}"]
          if not (isinstance(dataset, dict) and isinstance(dataset.get("fingerprint"), str))
          else []),
        *([f"num_examples: expected a positive integer, found {meta.get('num_examples')!r}"]
          if isinstance(meta.get("num_examples"), bool)
          or not isinstance(meta.get("num_examples"), int) or meta["num_examples"] < 1 else []),
        *(["class_names: expected a list of strings"]
          if not isinstance(meta.get("class_names") or [], list)
          or not all(isinstance(c, str) for c in meta.get("class_names") or []) else []),
        *(["augment: a view set names its augmentation"]
          if meta.get("views") and not isinstance(meta.get("augment"), str) else []),
    ]
    if problems:
        raise TransferSetError(f"{where} has malformed metadata ({'; '.join(problems)}); get a "
                               "fresh copy of the set")


def _count(value: Any, least: int = 0) -> int:
    """An integer >= `least` from JSON (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"expected an integer >= {least}, found {value!r}")
    return value


def _temperatures(values: Any) -> tuple[float, ...]:
    """A non-empty list of positive, finite, distinct temperatures from JSON."""
    temps = tuple(float(t) for t in values if not isinstance(t, (bool, str)))
    if (not temps or len(temps) != len(values) or len(set(temps)) != len(temps)
            or not all(0 < t < float("inf") for t in temps)):
        raise ValueError(f"temperatures must be distinct positive numbers, found {values!r}")
    return temps


def dims_of(name: str, ndim: int) -> tuple[str, ...]:
    """Dimension names of array `name` (inputs: rows, then input_1 ... input_n)."""
    if name == S.INPUTS:
        return (S.ROWS, *(f"input_{i}" for i in range(1, ndim)))
    return S.DIMENSIONS[name]


SEQUENCE_LABELS = ("next-token", "data")
SPARSE_KINDS = ("topk", "sample", "hybrid")
ROW_KINDS = ("examples", "sequences")  # Layout.kind; each stage keeps one strategy per kind

# --- metadata keys --------------------------------------------------------------------------
LAYOUT_KEYS = tuple(Layout(num_rows=1, num_classes=2, temperatures=(1.0,)).to_meta())
# Beyond the data, what each row is (which augmented view): sets merged row by row must agree.
ROW_KEYS = ("views", "augment", "view_seed")
# What the rows are: the layout, the data and the teacher. Covered by the digest.
IDENTITY_KEYS = tuple(dict.fromkeys((*LAYOUT_KEYS, *ROW_KEYS, "num_examples", "class_names",
                                     "teacher", "dataset", "precision")))
# What describes one file, not its content: set by the writer, never carried into a copy.
FILE_KEYS = ("format_version", "status", "completed_at", "digest")
DIGEST = "digest"


def _value_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return xxhash.xxh3_64_hexdigest(text.encode())


def digest(meta: dict[str, Any]) -> dict[str, str]:
    """key -> XXH3-64 hex of the canonical JSON of meta[key] (null when absent), for every
    identity key: written when a set is completed, so an edit to any of them is detected."""
    return {key: _value_digest(meta.get(key)) for key in IDENTITY_KEYS}


def edited_keys(meta: dict[str, Any]) -> list[str] | None:
    """Identity keys whose value no longer matches the recorded digest; None when the set
    records no digest (a set from before digests)."""
    recorded = meta.get(DIGEST)
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        return [DIGEST]
    # a key added to the identity after the set was made (e.g. `sequence`) was recorded as null
    null = _value_digest(None)
    return [key for key, value in digest(meta).items() if recorded.get(key, null) != value]


def check_digest(meta: dict[str, Any], where: str) -> None:
    """Refuse metadata edited after the set was completed, naming the edited keys."""
    edited = edited_keys(meta)
    if edited:
        raise IntegrityError(f"{where} has edited metadata: {', '.join(edited)} no longer "
                             "match(es) the digest recorded when the set was completed; get a "
                             "fresh copy of the set or remake it")


def resume_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What must agree for a rerun to resume into a partly written set (no fingerprint yet:
    the dataset is compared by length and probe)."""
    teacher, dataset = meta.get("teacher") or {}, meta.get("dataset") or {}
    return {**{key: meta.get(key) for key in dict.fromkeys((*LAYOUT_KEYS, *ROW_KEYS))},
            "teacher weights": [m.get("sha256") for m in teacher.get("members", [])],
            "combine": teacher.get("combine"), "dataset length": dataset.get("length"),
            "dataset probe": dataset.get("probe")}

