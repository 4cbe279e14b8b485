"""sets.imports.check_topk: the one check of imported top-k rows (write_set, vLLM, Parquet)."""

import numpy as np
import pytest

from softlabels.errors import DataError
from softlabels.sets.imports import check_logprobs, check_topk

C = 50


def _rows(n: int = 6, k: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(n, C)).astype(np.float32) * 2
    ids = np.argsort(-z, 1)[:, :k]
    lse = np.stack([np.log(np.exp(z / t).sum(1)) for t in (1, 3)], 1).astype(np.float32)
    return ids, np.take_along_axis(z, ids, 1), lse


def test_good_rows_pass_at_every_temperature() -> None:
    ids, val, lse = _rows()
    check_topk(ids, val, C, "here", logsumexp=lse, temperatures=(1, 3))
    logp = val - lse[:, :1]
    check_logprobs(logp.astype(np.float64), ids, C, "here")


@pytest.mark.parametrize("edit, match", [
    (lambda i, v, z: i.__setitem__((2, 1), C),
     r"here: class id 50 outside the vocabulary \[0, 50\)"),
    (lambda i, v, z: i.__setitem__((3, 2), i[3, 0]), "here: row 3 lists a class twice"),
    (lambda i, v, z: v.__setitem__((1, 0), np.nan), "finite, found nan"),
    (lambda i, v, z: z.__setitem__((4, 1), np.inf), "finite, found inf"),
    (lambda i, v, z: z.__setitem__((5, 1), z[5, 1] - 3), r"row 5 at T = 3 sum to .* > 1"),
])
def test_each_refusal_names_the_row(edit, match: str) -> None:
    ids, val, lse = _rows()
    edit(ids, val, lse)
    with pytest.raises(DataError, match=match):
        check_topk(ids, val, C, "here", logsumexp=lse, temperatures=(1, 3))


def test_log_probabilities_must_be_at_most_zero_and_sum_to_at_most_one() -> None:
    ids, val, lse = _rows()
    logp = (val - lse[:, :1]).astype(np.float64)
    logp[2, 3] = 0.25
    with pytest.raises(DataError, match="position 2|<= 0, found 0.25"):
        check_logprobs(logp, ids, C, "here")
    logp = np.full((3, 4), np.log(0.3))
    with pytest.raises(DataError, match=r"position 0 at T = 1 sum to 1.2"):
        check_logprobs(logp, np.tile(np.arange(4), (3, 1)), C, "here")
