"""The layout of a transfer set: every array's shape, dtype and chunking, from a few numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TransferSetError
from . import schema as S


@dataclass(frozen=True)
class Layout:
    """Shapes and chunking of every array of one transfer set."""

    num_rows: int
    num_classes: int
    temperatures: tuple[float, ...]
    dtype: str = "float16"
    probs_dtype: str = "float32"
    num_members: int = 0  # > 0 stores member_logits
    chunk_rows: int = 0  # 0: pick ~1 MiB chunks
    shard_rows: int | None = None
    input_shape: tuple[int, ...] | None = None  # set: store the inputs too
    input_dtype: str = "float32"
    views: int = 0  # > 0: each row is one augmented view; store its seed
    topk: int = 0  # > 0: store the k largest logits instead of dense arrays
    sample_k: int = 0  # > 0: store k classes drawn from each p_T instead of dense arrays

    def __post_init__(self) -> None:
        if self.topk and self.sample_k:
            raise TransferSetError("choose --topk or --sample-k, not both")
        k = self.topk or self.sample_k
        if self.topk < 0 or self.sample_k < 0 or self.topk >= self.num_classes:
            raise TransferSetError(f"--topk must lie in [1, {self.num_classes - 1}] and "
                                   f"--sample-k be positive, for {self.num_classes} classes")
        if self.chunk_rows <= 0:
            # ~1 MiB of the widest per-row array: dense logits, or k int32/float32 values
            # never past the set itself: an edge chunk of uncompressed floats is stored whole
            width, dtype = (2 * k, "float32") if k else (self.num_classes, self.dtype)
            object.__setattr__(self, "chunk_rows",
                               min(S.default_chunk_rows(width, dtype), self.num_rows))
        if self.shard_rows is not None and self.shard_rows % self.chunk_rows:
            raise TransferSetError(f"shard rows {self.shard_rows} must be a multiple of chunk "
                                   f"rows {self.chunk_rows}")

    @property
    def block_rows(self) -> int:
        return self.shard_rows or self.chunk_rows

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.block_rows)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.num_rows)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) for every row array."""
        r, c, k = self.num_rows, self.num_classes, len(self.temperatures)
        out: dict[str, tuple[tuple[int, ...], str]] = {
            S.LABELS: ((r,), "int64"), S.INDEX: ((r,), "int64"), S.SAMPLE_HASH: ((r,), "uint64")}
        if self.topk:
            out |= {S.TOPK_INDICES: ((r, self.topk), "int32"),
                    S.TOPK_LOGITS: ((r, self.topk), "float32"),
                    S.TOPK_LOGSUMEXP: ((r, k), "float32")}
        elif self.sample_k:
            out[S.SAMPLE_INDICES] = ((k, r, self.sample_k), "int32")
        else:
            out |= {S.LOGITS: ((r, c), self.dtype), S.PROBS: ((k, r, c), self.probs_dtype)}
        if self.input_shape is not None:
            out[S.INPUTS] = ((r, *self.input_shape), self.input_dtype)
        if self.views:
            out[S.VIEW_SEED] = ((r,), "uint64")
        if self.num_members and not (self.topk or self.sample_k):
            out[S.MEMBER_LOGITS] = ((self.num_members, r, c), self.dtype)
        return out

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
