"""The transfer-set format, version 2: every array and attribute name lives here and nowhere else.

See docs/FORMAT.md for the prose version of this contract.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import xxhash

from softlabels.errors import IncompleteTransferSetError, TransferSetError

FORMAT_VERSION = 2  # what the writer writes
READABLE_VERSIONS = (1, 2)  # 1: one `block_checksum` per block over every row array
ATTR_KEY = "softlabels"  # root attribute holding one JSON object

# Arrays (row axis is axis 0, except probs / member_logits where it is axis 1).
LOGITS = "logits"  # (R, C) float16|float32
PROBS = "probs"  # (K, R, C) float32|float16
LABELS = "labels"  # (R,) int64, -1 = unknown
INDEX = "index"  # (R,) int64
SAMPLE_HASH = "sample_hash"  # (R,) uint64
VIEW_SEED = "view_seed"  # (R,) uint64, only with augmented views
MEMBER_LOGITS = "member_logits"  # (M, R, C)
INPUTS = "inputs"  # (R, ...) the preprocessed inputs, only with --store-inputs
BLOCK_DONE = "block_done"  # (B,) uint8, 1 once every array's rows of block b are in place
ARRAY_CHECKSUM = "array_checksum"  # (B, S) uint64, XXH3-64 of block b's rows of checksum slot s
BLOCK_CHECKSUM = "block_checksum"  # version 1 only: (B,) uint64, one XXH3-64 over every row array
# Sequence sets (one row per position of token sequences; format/sequence.py).
SEQ_OFFSETS = "seq/offsets"  # (S+1,) int64, rows [offsets[s], offsets[s+1]) are sequence s
SEQ_POSITION = "seq/position"  # (R,) int32, the row's position inside its sequence
SEQ_TOKENS = "seq/tokens"  # (R,) int32, the input token at that position
SEQ_MASK = "seq/mask"  # (R,) uint8, 1 where the position is distilled
# arrays without one entry per row
BOOKKEEPING = (BLOCK_DONE, ARRAY_CHECKSUM, BLOCK_CHECKSUM, SEQ_OFFSETS)

# Sparse layouts (instead of dense logits and probs).
TOPK_INDICES = "topk/indices"  # (R, k) int32, the k largest logits' classes, descending
TOPK_LOGITS = "topk/logits"  # (R, k) float32, their logits
TOPK_LOGSUMEXP = "topk/logsumexp"  # (R, K) float32, logsumexp(z / T_k) over all classes
SAMPLE_INDICES = "sample/indices"  # (K, R, k) int32, k classes drawn from p_T_k, sorted
# Hybrid (nucleus head + importance-sampled tail; format/targets.py): W = k + M columns
HYBRID_INDICES = "hybrid/indices"  # (R, W) int32, head classes (-1 pads), then M tail draws
HYBRID_VALUES = "hybrid/values"  # (R, W) float16|float32 logits - row max, or uint8 codes
HYBRID_LOGSUMEXP = "hybrid/logsumexp"  # (R, K) float32, logsumexp(z / T_k) - max(z) / T_k
HYBRID_SCALE = "hybrid/scale"  # (R,) float32, only when quantised: logit step of one code
SHUFFLED = (HYBRID_INDICES, HYBRID_VALUES)  # stored byte-shuffled + zstd in every set

# Float arrays a reader must find finite (NaN is also the fill value of an unwritten chunk).
TARGET_ARRAYS = (LOGITS, PROBS, MEMBER_LOGITS, TOPK_LOGITS, TOPK_LOGSUMEXP, HYBRID_VALUES,
                 HYBRID_LOGSUMEXP, HYBRID_SCALE)

ROW_AXIS = {PROBS: 1, MEMBER_LOGITS: 1, SAMPLE_INDICES: 1}
TEMPERATURE_AXIS = (PROBS, SAMPLE_INDICES)  # arrays whose leading axis is the temperature

# Dimension names (Zarr `dimension_names`, so xarray opens a set with named dimensions).
ROWS, CLASSES, TEMPERATURE, MEMBER, K = "rows", "classes", "temperature", "member", "k"
BLOCKS, BOUNDS, SLOTS = "blocks", "sequence_bounds", "checksum_slots"
DIMENSIONS = {LOGITS: (ROWS, CLASSES), PROBS: (TEMPERATURE, ROWS, CLASSES), LABELS: (ROWS,),
              INDEX: (ROWS,), SAMPLE_HASH: (ROWS,), VIEW_SEED: (ROWS,),
              MEMBER_LOGITS: (MEMBER, ROWS, CLASSES), TOPK_INDICES: (ROWS, K),
              TOPK_LOGITS: (ROWS, K), TOPK_LOGSUMEXP: (ROWS, TEMPERATURE),
              SAMPLE_INDICES: (TEMPERATURE, ROWS, K), BLOCK_DONE: (BLOCKS,),
              BLOCK_CHECKSUM: (BLOCKS,), ARRAY_CHECKSUM: (BLOCKS, SLOTS),
              SEQ_OFFSETS: (BOUNDS,), SEQ_POSITION: (ROWS,), SEQ_TOKENS: (ROWS,),
              SEQ_MASK: (ROWS,), HYBRID_INDICES: (ROWS, K), HYBRID_VALUES: (ROWS, K),
              HYBRID_LOGSUMEXP: (ROWS, TEMPERATURE), HYBRID_SCALE: (ROWS,)}
# (inputs: rows, input_1, ..., input_n)

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
COMBINE_CHOICES = ("mean-logits", "mean-probs")
DTYPE_CHOICES = ("float16", "float32")

CHUNK_TARGET_BYTES = 1 << 20  # ~1 MiB per chunk of logits


def row_axis(name: str) -> int:
    """The axis that indexes rows in array `name`."""
    return ROW_AXIS.get(name, 0)


def default_chunk_rows(num_classes: int, dtype: str) -> int:
    """Rows per chunk so one chunk of logits is near 1 MiB: a power of two, never below 1."""
    row_bytes = num_classes * np.dtype(dtype).itemsize
    return max(1, 1 << int(np.floor(np.log2(max(1, CHUNK_TARGET_BYTES // row_bytes)))))


def fingerprint(sample_hashes: np.ndarray) -> str:
    """SHA-256 (hex) over the little-endian uint64 sample hashes in row order."""
    return hashlib.sha256(np.ascontiguousarray(sample_hashes, dtype="<u8").tobytes()).hexdigest()


def check_readable(meta: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """Refuse metadata that is missing, of an unknown version, or not complete."""
    if not isinstance(meta, dict):
        raise TransferSetError(
            f"{where} is not a softlabels transfer set (no '{ATTR_KEY}' attribute at its root); "
            "make one with `softlabels precompute`"
        )
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise TransferSetError(
            f"{where} has format_version {version!r}, this softlabels reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade softlabels or re-create the set"
        )
    if meta.get("status") != STATUS_COMPLETE:
        raise IncompleteTransferSetError(
            f"{where} is incomplete (status {meta.get('status')!r}): its writer stopped; rerun "
            "the same command that wrote it to finish it"
        )
    return meta


def array_checksum(data: np.ndarray) -> int:
    """XXH3-64 (seed 0) of an array's little-endian C-order bytes, as stored (one checksum slot
    of one block; `Layout.checksum_slots`). Hashes the array's memory in place, no copy, when
    it is C-contiguous and little-endian (as read)."""
    return xxhash.xxh3_64_intdigest(_little_endian(data))


def _little_endian(data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data)
    return data.astype(data.dtype.newbyteorder("<")) if data.dtype.byteorder == ">" else data


def block_checksum_v1(arrays: dict[str, np.ndarray]) -> int:
    """Format version 1's `block_checksum`: XXH3-64 over, for each row array in name order, its
    name and the little-endian C-order bytes of the block's rows (all leading axes), as stored."""
    h = xxhash.xxh3_64()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(_little_endian(arrays[name]))
    return h.intdigest()


def sample_hash(x: np.ndarray) -> int:
    """XXH3-64 (seed 0) of an input's C-contiguous bytes.

    XXH3 rather than a cryptographic hash: it runs at memory speed (about 14x BLAKE2b here), so
    hashing 224x224 images keeps pace with a GPU teacher; it detects edits, not attacks.
    """
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(x))


def sample_hashes(x: np.ndarray) -> np.ndarray:
    """(B,) uint64: `sample_hash` of each row x[i] of a batch (B, ...), the same values, without
    a numpy view per row (~100 ns a row for small inputs)."""
    rows = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8)
    return np.fromiter(map(xxhash.xxh3_64_intdigest, rows), dtype=np.uint64, count=len(rows))
