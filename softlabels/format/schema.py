"""The transfer-set format, version 2: every array and attribute name lives here and nowhere else.

See docs/FORMAT.md for the prose version of this contract.
"""

from __future__ import annotations

import hashlib
import math
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
# Hybrid (nucleus head + importance-sampled tail; format/targets/hybrid.py): W = k + M columns
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
    """(B,) uint64: `sample_hash` of each row x[i] of a batch (B, ...), the same values. Rows of
    4-16 bytes are hashed together in a few numpy passes (`_xxh3_short`); longer rows one XXH3
    call each, without a numpy view per row (~100 ns a row for small inputs)."""
    x = np.ascontiguousarray(x)
    rows = x.reshape(len(x), math.prod(x.shape[1:])).view(np.uint8)
    if 4 <= rows.shape[1] <= 16:
        return _xxh3_short(rows)
    return np.fromiter(map(xxhash.xxh3_64_intdigest, rows), dtype=np.uint64, count=len(rows))


# XXH3's default secret, its first 64 bytes (xxhash.h `XXH3_kSecret`): all that rows of <= 16
# bytes read; tests/format/test_sample_hashes.py checks every length against xxhash itself.
_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c")


def _secret64(offset: int) -> np.uint64:
    return np.uint64(int.from_bytes(_SECRET[offset:offset + 8], "little"))


_M32 = np.uint64(0xFFFFFFFF)


def _xxh3_short(rows: np.ndarray) -> np.ndarray:
    """(B,) uint64: XXH3-64 (seed 0) of each row of `rows` (B, n) uint8, 4 <= n <= 16, as
    xxhash.h's `XXH3_len_4to8_64b` / `XXH3_len_9to16_64b` compute it, over the whole batch at
    once (uint64 arithmetic wraps modulo 2^64 as C's does)."""
    n = rows.shape[1]
    if n <= 8:  # len 4-8: the first and last 4 bytes, keyed, then rrmxmx
        first = _le(rows[:, :4], np.uint32).astype(np.uint64)
        last = _le(rows[:, n - 4:], np.uint32).astype(np.uint64)
        h = (last + (first << np.uint64(32))) ^ (_secret64(8) ^ _secret64(16))
        h ^= _rotl(h, 49) ^ _rotl(h, 24)
        h *= np.uint64(0x9FB21C651E98DF25)
        h ^= (h >> np.uint64(35)) + np.uint64(n)
        h *= np.uint64(0x9FB21C651E98DF25)
        return h ^ (h >> np.uint64(28))
    lo = _le(rows[:, :8], np.uint64) ^ (_secret64(24) ^ _secret64(32))
    hi = _le(rows[:, n - 8:], np.uint64) ^ (_secret64(40) ^ _secret64(48))
    acc = np.uint64(n) + lo.byteswap() + hi + _mul128_fold64(lo, hi)
    acc ^= acc >> np.uint64(37)
    acc *= np.uint64(0x165667919E3779F9)
    return acc ^ (acc >> np.uint64(32))


def _le(columns: np.ndarray, dtype: type) -> np.ndarray:
    """(B,) the little-endian integer of each row of `columns` (B, itemsize) uint8."""
    return np.ascontiguousarray(columns).view(np.dtype(dtype).newbyteorder("<"))[:, 0] \
        .astype(dtype)


def _rotl(h: np.ndarray, r: int) -> np.ndarray:
    return (h << np.uint64(r)) | (h >> np.uint64(64 - r))


def _mul128_fold64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """low 64 bits XOR high 64 bits of the 128-bit products a * b (xxhash's portable form)."""
    a_lo, a_hi, b_lo, b_hi = a & _M32, a >> np.uint64(32), b & _M32, b >> np.uint64(32)
    lo_lo, hi_lo = a_lo * b_lo, a_hi * b_lo
    cross = (lo_lo >> np.uint64(32)) + (hi_lo & _M32) + a_lo * b_hi
    upper = (hi_lo >> np.uint64(32)) + (cross >> np.uint64(32)) + a_hi * b_hi
    lower = (cross << np.uint64(32)) | (lo_lo & _M32)
    return lower ^ upper
