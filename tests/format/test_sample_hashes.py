"""schema.sample_hashes: the batched XXH3 of short rows equals xxhash's per-row XXH3-64."""

import numpy as np
import pytest
import xxhash

from softlabels.format import schema as S


@pytest.mark.parametrize("nbytes", range(1, 34))
def test_sample_hashes_equal_xxhash_per_row(nbytes: int) -> None:
    rng = np.random.default_rng(nbytes)
    rows = rng.integers(0, 256, size=(257, nbytes), dtype=np.uint8)
    rows[0] = 0
    rows[1] = 255
    want = np.array([xxhash.xxh3_64_intdigest(r.tobytes()) for r in rows], dtype=np.uint64)
    np.testing.assert_array_equal(S.sample_hashes(rows), want)
    assert all(S.sample_hash(r) == w for r, w in zip(rows[:3], want[:3]))


@pytest.mark.parametrize("shape,dtype", [((9, 4), np.float32), ((5, 2, 2), np.float16),
                                         ((7, 3), np.int32), ((6, 2), np.float64)])
def test_sample_hashes_of_typed_batches_equal_sample_hash(shape, dtype) -> None:
    x = (np.random.default_rng(1).normal(size=shape) * 100).astype(dtype)
    np.testing.assert_array_equal(S.sample_hashes(x), [S.sample_hash(r) for r in x])
    strided = np.asfortranarray(x)  # not C-contiguous: the same bytes hashed
    np.testing.assert_array_equal(S.sample_hashes(strided), [S.sample_hash(r) for r in x])


def test_sample_hashes_of_no_rows() -> None:
    assert S.sample_hashes(np.zeros((0, 4), np.float32)).shape == (0,)
